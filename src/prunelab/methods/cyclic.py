"""``cyclic`` training of a fixed mask and ``sculpt`` (seed arXiv 2406.02773, docs/methods.md section 3).

No official code was found for the seed; the details come from reviews of the
paper. cyclic: a mask from a pruning-at-initialisation criterion, then C
cycles of the learning-rate schedule, each continuing from the current
weights (learning-rate rewinding without pruning). sculpt: the same at a LOW
sparsity s0, then ONE global magnitude prune to the target and one more cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prunelab.errors import UserError
from prunelab.methods.base import Plan, check_counts, register_method, with_epochs
from prunelab.methods.context import Context
from prunelab.methods.scoring import prune_by
from prunelab.sparsity import criteria
from prunelab.sparsity.allocate import allocate
from prunelab.sparsity.knobs import ITERATIONS, REINIT, SAMPLES_PER_CLASS, TEMPERATURE
from prunelab.sparsity.scores import magnitude

if TYPE_CHECKING:
    from prunelab.config.schema import RunConfig


AT_INIT = criteria.names(at_init=True)


@dataclass(frozen=True)
class CyclicSettings:
    """The initial mask's criterion and the number of cycles."""

    score: str = field(default="random", metadata={"help": "criterion at init: " + ", ".join(AT_INIT)})
    cycles: int = field(default=4, metadata={"help": "cycles of the LR schedule with the fixed mask (C)"})
    temperature: float = TEMPERATURE.field("grasp")
    samples_per_class: int = SAMPLES_PER_CLASS.field("grasp")
    reinit: bool = REINIT.field("grasp")
    iterations: int = ITERATIONS.field("synflow")

    def __post_init__(self) -> None:
        check_counts(self, 1, "samples_per_class", "iterations")


@dataclass(frozen=True)
class SculptSettings(CyclicSettings):
    """SCULPT: cyclic training at a low sparsity, one magnitude prune, one last cycle."""

    initial_sparsity: float = field(default=0.5, metadata={"help": "sparsity s0 of the initial mask"})


def _check(cfg: RunConfig) -> RunConfig:
    s = cfg.method.settings
    if s.score not in AT_INIT:
        raise UserError(f"unknown criterion at init {s.score!r}; choose one of: {', '.join(AT_INIT)}")
    if s.cycles < 1:
        raise UserError(f"method.cycles must be at least 1, got {s.cycles}")
    if isinstance(s, SculptSettings) and not 0 <= s.initial_sparsity <= cfg.prune.sparsity:
        raise UserError(
            f"method.initial_sparsity must be in [0, sparsity {cfg.prune.sparsity}], got {s.initial_sparsity}"
        )
    return cfg


def _spend(cfg: RunConfig, budget: int) -> RunConfig:
    """C cycles of B // C epochs (SCULPT: C + 1 cycles, its final one included)."""
    s = cfg.method.settings
    cycles = s.cycles + isinstance(s, SculptSettings)
    return with_epochs(cfg, budget // cycles, f"each of {cycles} cycles")


def _plan(cfg: RunConfig) -> Plan:
    s = cfg.method.settings
    cycles = s.cycles + isinstance(s, SculptSettings)
    return Plan(cycles * cfg.train.epochs, split=f"{cycles} × {cfg.train.epochs}")


@register_method("cyclic", CyclicSettings,
                 "mask at init (random per layer by default), then C cycles of the LR schedule with it", _check, _plan,
                 spend=_spend)
def cyclic(ctx: Context, s: CyclicSettings) -> None:
    """Prune at init to the target, then C cycles with the mask fixed."""
    prune_by(ctx, s.score, ctx.target_density, s)
    for c in range(1, s.cycles + 1):
        ctx.train_cycle(f"cycle {c}/{s.cycles}")


@register_method("sculpt", SculptSettings,
                 "mask at init at s0=0.5, C cycles, one global magnitude prune to the target, one cycle", _check, _plan,
                 spend=_spend)
def sculpt(ctx: Context, s: SculptSettings) -> None:
    """Cyclic training at s0, magnitude prune to the target, one final cycle."""
    prune_by(ctx, s.score, 1.0 - s.initial_sparsity, s)
    for c in range(1, s.cycles + 1):
        ctx.train_cycle(f"cycle {c}/{s.cycles}")
    # One GLOBAL magnitude prune, whatever allocation gave the initial mask.
    m = ctx.trainer.masker
    ctx.update_masks(lambda: allocate(magnitude(m.params), ctx.target_density, "global", m.masks,
                                      ctx.cfg.prune.structure))
    ctx.train_cycle("final cycle")
