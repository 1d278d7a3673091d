"""``progressive``: magnitude pruning that ramps sparsity up within ONE training cycle.

docs/methods.md section 1 (seed arXiv 2606.12278; p = 3 is Zhu & Gupta's gradual
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

from prunelab.errors import UserError
from prunelab.methods.base import ALL_STRUCTURES, register_method
from prunelab.methods.context import Context
from prunelab.methods.scoring import channels_by
from prunelab.sparsity.criteria import CRITERIA
from prunelab.sparsity.pruner import MagnitudeRamp
from prunelab.sparsity.schedules import PolynomialSchedule
from prunelab.sparsity.structure import CHANNEL
from prunelab.training.loop import StepHook, Trainer

if TYPE_CHECKING:
    from prunelab.config.schema import RunConfig


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
    score: str = field(default="magnitude", metadata={
        "help": "prune.structure=channel: the channel criterion (magnitude = L1 norm, l2, bn_scale, taylor)"})


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
    if cfg.prune.structure == CHANNEL:
        CRITERIA.get(s.score).check(CHANNEL)
        if not s.monotone:
            raise UserError("removed channels are gone: prune.structure=channel needs method.monotone=true")
    elif s.score != "magnitude":
        raise UserError(f"method.score={s.score!r} needs prune.structure=channel; progressive pruning of "
                        "single weights is by magnitude")
    return cfg


class ProgressiveHook(StepHook[Trainer]):
    """Drives the library's :class:`MagnitudeRamp` from the trainer, before the batch of each step."""

    def __init__(self, ramp: MagnitudeRamp) -> None:
        self.ramp = ramp

    def before_step(self, step: int, trainer: Trainer) -> None:
        masks = self.ramp.masks_at(step, trainer.masker.params, trainer.masker.masks)
        if masks is not None:
            trainer.set_masks(masks)

    def state_dict(self) -> dict[str, Any]:
        return self.ramp.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ramp.load_state_dict(state)


class ChannelRamp(StepHook[Trainer]):
    """At each update step of the schedule, removes the lowest-scoring channels until the network
    keeps at most the schedule's density of its prunable weights (as built)."""

    def __init__(self, ctx: Context, schedule: PolynomialSchedule, settings: ProgressiveSettings) -> None:
        self.ctx, self.schedule, self.settings = ctx, schedule, settings

    def before_step(self, step: int, trainer: Trainer) -> None:
        if not self.schedule.is_update(step):
            return
        density = 1.0 - self.schedule.sparsity_at(step)
        if self.ctx.kept > round(density * trainer.dense_total):
            trainer.remove_channels(*channels_by(self.ctx, self.settings.score, density, self.settings))


@register_method(
    "progressive",
    ProgressiveSettings,
    "one cycle; global magnitude pruning ramps sparsity from 0 to the target (default: by mid-cycle)",
    _check,
    structures=ALL_STRUCTURES,
)
def run(ctx: Context, s: ProgressiveSettings) -> None:
    """One cycle with the mask updated on a polynomial schedule."""
    epochs = ctx.cfg.train.epochs
    steps_per_epoch = ctx.trainer.steps_per_epoch
    every = s.update_every or steps_per_epoch
    end = ramp_end(s, epochs)
    if end <= 1 and not ctx.replaying:
        ctx.notes.append(f"the ramp ends at epoch {end}: the target is reached within the first epoch, "
                         "so this run is in effect pruning at initialisation (magnitude at init)")
    schedule = PolynomialSchedule(
        initial=s.initial_sparsity,
        final=ctx.cfg.prune.sparsity,
        start=s.start_epoch * steps_per_epoch,
        end=end * steps_per_epoch,
        every=every,
        power=s.power,
    )
    if ctx.cfg.prune.structure == CHANNEL:
        ctx.train_cycle("train", hook=ChannelRamp(ctx, schedule, s))
        return
    ramp = MagnitudeRamp(schedule, ctx.cfg.prune.allocation, s.monotone, ctx.cfg.prune.structure)
    ctx.train_cycle("train", hook=ProgressiveHook(ramp))
