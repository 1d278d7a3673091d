"""``lottery`` (iterative magnitude pruning with rewinding) and ``lrr`` (learning-rate rewinding).

lottery (Frankle & Carbin 2019; late rewinding, Frankle et al. 2020): train,
prune a fraction of the remaining weights by magnitude, reset the survivors
to their values at the rewind point (initialisation, or step k of the first
training), train again; repeat until the target. lrr (Renda et al. 2020):
the same rounds, but keep the final weights and restart only the learning-
rate schedule. The round that would pass the target prunes exactly to it.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from prunelab.errors import BudgetTooSmall, UserError
from prunelab.data import DATASETS
from prunelab.methods.base import Plan, register_method, with_epochs
from prunelab.models import build_model
from prunelab.methods.context import Context
from prunelab.sparsity.allocate import allocate, layerwise_masks
from prunelab.sparsity.mask import Masks, count_kept, count_total, full_masks, prunable_parameters
from prunelab.sparsity.scores import magnitude
from prunelab.sparsity.structure import UNSTRUCTURED
from prunelab.training.loop import StepHook, Trainer

if TYPE_CHECKING:
    from prunelab.config.schema import PruneConfig, RunConfig

REWIND = re.compile(r"^(0|(\d+)(ep|it))$")


@dataclass(frozen=True)
class LRRSettings:
    """Per-round pruning of learning-rate rewinding."""

    rate: float = field(default=0.2, metadata={"help": "fraction of the remaining weights pruned per round"})
    layer_rates: tuple[str, ...] = field(
        default=(), metadata={"help": "per-layer rates 'pattern=rate' (layerwise rounds), e.g. ['fc3=0.1']"}
    )


@dataclass(frozen=True)
class LotterySettings(LRRSettings):
    """Per-round pruning and the rewind point of the lottery ticket procedure."""

    rewind: str = field(default="0", metadata={"help": "rewind point: 0 (init), '<N>ep' or '<N>it' of round 0"})

    def identity_extra(self) -> dict[str, str]:
        """Rounds after a late rewind continue from step k since 2026-12 (they restarted the cycle
        before): such configs carry this in their run id, so no earlier result is taken for them."""
        return {"late_rewind": "continue"} if self.rewind != "0" else {}


def layer_rates(s: LRRSettings) -> list[tuple[str, float]]:
    """Parsed ``layer_rates`` as (fnmatch pattern, rate)."""
    out = []
    for item in s.layer_rates:
        pattern, _, rate = item.partition("=")
        out.append((pattern.strip(), float(rate)))
    return out


def _check(cfg: RunConfig) -> RunConfig:
    s = cfg.method.settings
    try:
        rates = [s.rate] + [r for _, r in layer_rates(s)]
    except ValueError:
        raise UserError(f"method.layer_rates must be 'pattern=rate' items, got {list(s.layer_rates)}") from None
    if not all(0 < r < 1 for r in rates):
        raise UserError(f"pruning rates must be in (0, 1), got {rates}")
    if s.layer_rates and cfg.prune.structure != UNSTRUCTURED:
        raise UserError(f"method.layer_rates sets each layer's density itself, which prune.structure="
                        f"{cfg.prune.structure} does not allow; use one rate")
    if isinstance(s, LotterySettings) and not REWIND.match(s.rewind):
        raise UserError(f"method.rewind must be 0, '<N>ep' or '<N>it', got {s.rewind!r}")
    return cfg


def next_masks(
    params: Mapping[str, torch.Tensor], masks: Masks, s: LRRSettings, prune: PruneConfig, target_kept: int
) -> Masks:
    """Masks of the next round: prune ``rate`` of the remaining weights (per layer with
    ``layer_rates``, else by ``prune.allocation`` and ``prune.structure``) by magnitude, never past the target."""
    total = sum(m.numel() for m in masks.values())
    rates = layer_rates(s)
    if not rates:
        density = max(target_kept / total, count_kept(masks) / total * (1 - s.rate))
        return allocate(magnitude(params), density, prune.allocation, masks, prune.structure)
    densities = {}
    for name, m in masks.items():
        rate = next((r for p, r in rates if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*")), s.rate)
        densities[name] = float(m.sum()) * (1 - rate) / m.numel()
    planned = sum(d * masks[n].numel() for n, d in densities.items())
    if planned < target_kept:  # the last round: scale every layer so the total is exactly the target
        densities = {n: d * target_kept / planned for n, d in densities.items()}
    return layerwise_masks(magnitude(params), densities, masks)


def prune_rounds(params: Mapping[str, torch.Tensor], masks: Masks, s: LRRSettings, prune: PruneConfig,
                 target_kept: int) -> int:
    """Rounds to the target (ceil(log(1 - s) / log(1 - rate)) for one global rate), by dry run."""
    rounds = 0
    while count_kept(masks) > target_kept:
        masks = next_masks(params, masks, s, prune, target_kept)
        rounds += 1
    return rounds


def _rounds(ctx: Context, s: LRRSettings) -> Iterator[str]:
    """Yields the name ``round r/R`` of rounds 1..R after pruning round r (pruning skipped while a
    resumed run replays)."""
    m = ctx.trainer.masker
    args = (s, ctx.cfg.prune, ctx.target_kept)
    total = prune_rounds(m.params, m.masks, *args)
    for r in range(1, total + 1):
        ctx.update_masks(lambda: next_masks(m.params, m.masks, *args))
        yield f"round {r}/{total}"


class Snapshot(StepHook[Trainer]):
    """Saves the network's state before the batch of ``step`` (i.e. after ``step`` optimizer steps)."""

    def __init__(self, step: int, name: str) -> None:
        self.step, self.name = step, name

    def before_step(self, step: int, trainer: Trainer) -> None:
        if step == self.step:
            trainer.extra[self.name] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}



def _rewind_step(rewind: str, steps_per_epoch: int, total: int) -> int:
    n, unit = int(REWIND.match(rewind).group(2)), REWIND.match(rewind).group(3)  # type: ignore[union-attr]
    step = n * steps_per_epoch if unit == "ep" else n
    if step >= total:
        raise UserError(f"rewind point {rewind} is past the end of the first training cycle ({total} steps)")
    return step


def _plan(cfg: RunConfig) -> Plan:
    """Round 0 and R pruning rounds, R counted exactly (:func:`_exact_rounds`).

    With late rewinding to epoch k each round trains T - k epochs; to a step (``<N>it``) the
    plan counts full rounds, an upper bound (the steps of an epoch are known only with the data).
    """
    s, epochs = cfg.method.settings, cfg.train.epochs
    rounds = _exact_rounds(cfg) if cfg.prune.sparsity > 0 else 0
    late = isinstance(s, LotterySettings) and s.rewind != "0"
    match = REWIND.match(s.rewind) if late else None
    later = epochs - (int(match.group(2)) if match is not None and match.group(3) == "ep" else 0)
    split = f"{rounds + 1} × {epochs}" if later == epochs else f"{epochs} + {rounds} × {later}"
    return Plan(epochs + rounds * later, pretrained=not late, split=split)


def _exact_rounds(cfg: RunConfig) -> int:
    """Pruning rounds to the target, by a dry run on the model's prunable weights (counts only)."""
    return _rounds_of(cfg.model.name, cfg.data.dataset, cfg.prune, cfg.method.settings)


@functools.lru_cache(maxsize=256)
def _rounds_of(model: str, dataset: str, prune: PruneConfig, s: LRRSettings) -> int:
    """:func:`_exact_rounds` by what it depends on: the seed does not change the counts, so the points
    of a sweep that differ only in seed, budget or training settings share one dry run."""
    spec = DATASETS.get(dataset)
    with torch.random.fork_rng(devices=[]):  # planning draws no numbers from the caller's generator
        net = build_model(model, spec.channels, spec.image_size, spec.num_classes)
    params = prunable_parameters(net, prune.exclude)
    masks = full_masks(params)
    target_kept = round((1 - prune.sparsity) * count_total(masks))
    return prune_rounds(params, masks, s, prune, target_kept)


def _spend(cfg: RunConfig, budget: int) -> RunConfig:
    """R + 1 cycles of B // (R + 1) epochs; rewinding to epoch k, round 0 full and R rounds of T - k,
    T = (B + R k) // (R + 1). A rewind to a step is refused (the steps of an epoch need the data)."""
    s, rounds = cfg.method.settings, _exact_rounds(cfg)
    match = REWIND.match(s.rewind) if isinstance(s, LotterySettings) and s.rewind != "0" else None
    if match is not None and match.group(3) == "it":
        raise UserError("train.budget needs method.rewind in epochs ('<N>ep') or 0, not steps")
    k = int(match.group(2)) if match is not None else 0
    epochs = (budget + rounds * k) // (rounds + 1)
    if k and epochs <= k:
        raise BudgetTooSmall(f"train.budget {budget} leaves no epochs after the rewind point {s.rewind} in "
                        f"{rounds} rounds; give a larger budget")
    return with_epochs(cfg, epochs, f"each of {rounds + 1} rounds")


@register_method("lottery", LotterySettings,
                 "iterative magnitude pruning (20%/round), survivors rewound to init or an early step", _check, _plan,
                 spend=_spend)
def lottery(ctx: Context, s: LotterySettings) -> None:
    """Round 0 trains dense; each later round prunes, rewinds and retrains."""
    if s.rewind == "0":
        ctx.save_point("rewind")
        ctx.load_pretrained()  # the stored dense run starts from the same initialisation (same seed)
        step = 0
    else:
        step = _rewind_step(s.rewind, ctx.trainer.steps_per_epoch, ctx.trainer.steps_per_epoch * ctx.cfg.train.epochs)
        ctx.train_cycle(f"round 0/{_exact_rounds(ctx.cfg)}", hook=Snapshot(step, "rewind"))
    for name in _rounds(ctx, s):
        # Late rewinding (Frankle et al. 2020, and the lottery-ticket framework): weights AND
        # schedule go back to step k; the round trains the remaining T - k steps.
        ctx.rewind("rewind")
        ctx.train_cycle(name, start_step=step)


@register_method("lrr", LRRSettings,
                 "iterative magnitude pruning (20%/round) keeping the weights, restarting the LR schedule", _check, _plan,
                 spend=_spend)
def lrr(ctx: Context, s: LRRSettings) -> None:
    """Pretrained dense; each round prunes and retrains a full cycle from the current weights."""
    ctx.load_pretrained()
    for name in _rounds(ctx, s):
        ctx.train_cycle(name)
