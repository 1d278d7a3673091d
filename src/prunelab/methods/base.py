"""What a method is: a name, a frozen settings dataclass, and a short program over shared parts.

Every method module registers itself in :data:`METHODS` with
:func:`register_method`. The program receives a :class:`~prunelab.methods.context.Context`
(model, data, trainer, target) and its own settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from prunelab.errors import BudgetTooSmall, UserError
from prunelab.registry import Registry
from prunelab.sparsity.structure import structure_kind

if TYPE_CHECKING:
    from prunelab.config.schema import RunConfig
    from prunelab.methods.context import Context


@dataclass(frozen=True)
class NoSettings:
    """Settings of a method that has none."""


@dataclass(frozen=True)
class Plan:
    """What a run of a method will train, known before it starts (for sweeps).

    ``epochs``: all epochs it trains, its dense pretraining included (an upper
    bound with early stopping). ``pretrained``: whether it starts from the
    stored dense run of its recipe (a sweep trains that run first, once).
    """

    epochs: float
    pretrained: bool = False
    split: str = ""
    """How the epochs fall into cycles, e.g. ``5 × 4`` (five cycles of four epochs) or ``10 + 10``
    (dense pretraining, then fine-tuning): what ``prunelab sweep --dry-run`` shows of a budget's spending."""


def one_cycle(cfg: RunConfig) -> Plan:
    """The plan of a method that trains one cycle from scratch."""
    return Plan(cfg.train.epochs, split=f"1 × {cfg.train.epochs}")


def with_epochs(cfg: RunConfig, epochs: int, what: str) -> RunConfig:
    """``cfg`` training cycles of ``epochs`` epochs; a budget that leaves less than one is refused."""
    if epochs < 1:
        raise BudgetTooSmall(f"train.budget {cfg.train.budget} leaves {what} less than one epoch; give a larger "
                             "budget")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))


#: The config paths a spend rule may set (and the only ones): a report treats them as the budget's
#: consequences, not as settings that make a variant.
SPENT_FIELDS = ("train.epochs", "method.settings.finetune_epochs", "method.settings.step_epochs")


def spend_one_cycle(cfg: RunConfig, budget: int) -> RunConfig:
    """One cycle of the whole budget."""
    return with_epochs(cfg, budget, "one cycle")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    ``resolve`` maps a validated config to the config the method actually runs
    (e.g. ``dense`` sets the target sparsity to 0, so every dense run of the
    same recipe shares one run id); it may raise ``UserError`` for settings
    that contradict the rest of the config.
    """

    name: str
    settings: type
    run: Callable[[Context, Any], None]
    resolve: Callable[[RunConfig], RunConfig]
    plan: Callable[[RunConfig], Plan] = one_cycle
    structures: tuple[str, ...] = ("unstructured", "N:M")
    """The kinds of ``prune.structure`` the method can keep (``unstructured``, ``N:M``, ``channel``)."""
    spend: Callable[[RunConfig, int], RunConfig] = spend_one_cycle
    """How the method splits a training budget (``train.budget``) into its cycles."""


METHODS: Registry[MethodSpec] = Registry("method")
#: Every kind of ``prune.structure``: what a method that can also remove whole channels registers.
ALL_STRUCTURES = ("unstructured", "N:M", "channel")


def _identity(cfg: RunConfig) -> RunConfig:
    return cfg


def register_method(
    name: str,
    settings: type,
    summary: str,
    resolve: Callable[[RunConfig], RunConfig] | None = None,
    plan: Callable[[RunConfig], Plan] = one_cycle,
    structures: tuple[str, ...] = ("unstructured", "N:M"),
    spend: Callable[[RunConfig, int], RunConfig] = spend_one_cycle,
) -> Callable[[Callable[[Context, Any], None]], Callable[[Context, Any], None]]:
    """Decorator registering a method program under ``name`` with its settings class."""

    def decorate(run: Callable[[Context, Any], None]) -> Callable[[Context, Any], None]:
        checked = _structure_checked(name, structures, resolve or _identity)
        METHODS.register(name, summary)(MethodSpec(name, settings, run, checked, plan, structures, spend))
        return run

    return decorate


def _structure_checked(
    name: str, structures: tuple[str, ...], resolve: Callable[[RunConfig], RunConfig]
) -> Callable[[RunConfig], RunConfig]:
    """``resolve``, after refusing a ``prune.structure`` the method cannot keep."""

    def checked(cfg: RunConfig) -> RunConfig:
        if structure_kind(cfg.prune.structure) not in structures:
            raise UserError(f"{name} cannot prune with prune.structure={cfg.prune.structure}; "
                            f"it supports {', '.join(structures)}")
        return resolve(cfg)

    return checked


def check_counts(settings: object, minimum: int, *names: str) -> None:
    """One sentence if a count field of ``settings`` (None allowed: "use the default") is below ``minimum``."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and value < minimum:
            raise UserError(f"method.{name} must be at least {minimum}, got {value}")


def settings_help(settings: type) -> list[tuple[str, str, str]]:
    """(name, default, help) for each field of a settings dataclass, for `--help` and `list`."""
    rows = []
    for f in fields(settings):
        rows.append((f.name, repr(f.default), f.metadata.get("help", "")))
    return rows
