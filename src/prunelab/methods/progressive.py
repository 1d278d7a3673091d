"""``progressive``: magnitude pruning that ramps sparsity up within ONE training cycle.

methods.md section 1 (seed arXiv 2606.12278; p = 3 is Zhu & Gupta's gradual
magnitude pruning). Before the batch of each update step, the mask is
recomputed from the magnitudes of the weights still active and intersected
with the old mask (monotone). With ``monotone=False`` the mask is recomputed
from all weights, a pruned weight competing with the magnitude it had when
it was pruned and coming back with that value if it wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from prunelab.errors import UserError
from prunelab.methods.base import register_method
from prunelab.methods.context import Context
from prunelab.sparsity.allocate import allocate
from prunelab.sparsity.schedules import PolynomialSchedule
from prunelab.sparsity.scores import magnitude
from prunelab.training.loop import Trainer

if TYPE_CHECKING:
    from prunelab.config import RunConfig


@dataclass(frozen=True)
class ProgressiveSettings:
    """Settings of progressive pruning (epochs count from 0, within the cycle)."""

    start_epoch: int = field(default=0, metadata={"help": "epoch of the first mask update"})
    end_epoch: int | None = field(
        default=None,
        metadata={"help": "epoch by which the target is reached (None: half the cycle, leaving epochs to recover)"},
    )
    update_every: int = field(default=0, metadata={"help": "optimizer steps between mask updates (0: every epoch)"})
    power: float = field(default=1.0, metadata={"help": "ramp shape: 1 linear (the seed), 3 Zhu & Gupta"})
    initial_sparsity: float = field(default=0.0, metadata={"help": "sparsity the ramp starts from"})
    monotone: bool = field(default=True, metadata={"help": "a pruned weight never returns"})


def ramp_end(settings: ProgressiveSettings, epochs: int) -> int:
    """The epoch the ramp ends (default: half the cycle, rounded up)."""
    return settings.end_epoch if settings.end_epoch is not None else math.ceil(epochs / 2)


def _check(cfg: RunConfig) -> RunConfig:
    s: ProgressiveSettings = cfg.method.settings
    epochs, end = cfg.train.epochs, ramp_end(s, cfg.train.epochs)
    if not 0 <= s.start_epoch < end <= epochs:
        raise UserError(
            f"progressive needs 0 <= method.start_epoch < method.end_epoch <= train.epochs, "
            f"got start {s.start_epoch}, end {end}, epochs {epochs}"
        )
    if s.update_every < 0 or s.power <= 0:
        raise UserError(f"method.update_every must be >= 0 and method.power > 0, got {s.update_every} and {s.power}")
    if not 0 <= s.initial_sparsity <= cfg.prune.sparsity:
        raise UserError(f"method.initial_sparsity must be in [0, sparsity], got {s.initial_sparsity}")
    return cfg


class ProgressiveHook:
    """Recomputes the mask at the schedule's update steps."""

    def __init__(self, schedule: PolynomialSchedule, allocation: str, monotone: bool) -> None:
        self.schedule = schedule
        self.allocation = allocation
        self.monotone = monotone
        # Non-monotone only: the value each pruned weight had when it was pruned.
        self.shadow: dict[str, torch.Tensor] = {}

    def before_step(self, step: int, trainer: Trainer) -> None:
        if not self.schedule.is_update(step):
            return
        density = 1.0 - self.schedule.sparsity_at(step)
        params, old = trainer.masker.params, trainer.masker.masks
        if self.monotone:
            masks = allocate(magnitude(params), density, self.allocation, old)
            trainer.set_masks(masks)
            return
        values = {n: torch.where(old[n], p.detach(), self.shadow.get(n, p.detach())) for n, p in params.items()}
        masks = allocate(magnitude(values), density, self.allocation, None)
        with torch.no_grad():
            for n, p in params.items():
                self.shadow[n] = torch.where(masks[n], torch.zeros_like(p), values[n])
                p.copy_(torch.where(masks[n], values[n], p))  # revived weights get their old value back
        trainer.set_masks(masks)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = dict(state.get("shadow", {}))


@register_method(
    "progressive",
    ProgressiveSettings,
    "one cycle; global magnitude pruning ramps sparsity from 0 to the target (default: by mid-cycle)",
    _check,
)
def run(ctx: Context, s: ProgressiveSettings) -> None:
    """One cycle with the mask updated on a polynomial schedule."""
    epochs = ctx.cfg.train.epochs
    steps_per_epoch = ctx.trainer.steps_per_epoch
    every = s.update_every or steps_per_epoch
    schedule = PolynomialSchedule(
        initial=s.initial_sparsity,
        final=ctx.cfg.prune.sparsity,
        start=s.start_epoch * steps_per_epoch,
        end=ramp_end(s, epochs) * steps_per_epoch,
        every=every,
        power=s.power,
    )
    ctx.train_cycle("train", hook=ProgressiveHook(schedule, ctx.cfg.prune.allocation, s.monotone))
