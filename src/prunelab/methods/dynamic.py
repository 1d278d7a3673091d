"""Dynamic sparse training in one cycle: ``set``, ``rigl`` and ``granet`` (docs/methods.md section 5).

Connections move during training: at each update step some active
connections of each layer are dropped (smallest |w|) and as many inactive
ones regrown (SET: at random; RigL and GraNet: largest |dense gradient| of the
step's batch), so each layer keeps its density. Regrown connections start at
exactly 0 with zero optimizer state (the masker keeps both at 0 while a
weight is pruned). GraNet also prunes gradually, from dense (or from an ERK
mask at ``initial_sparsity``) to the target, on Zhu & Gupta's cubic schedule.
The parts are in :mod:`prunelab.sparsity.dynamic`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from prunelab.errors import UserError
from prunelab.methods.base import register_method
from prunelab.methods.context import Context
from prunelab.methods.pai import erk_unless_layerwise
from prunelab.methods.progressive import ramp_end
from prunelab.methods.scoring import prune_by
from prunelab.sparsity import pai
from prunelab.sparsity.allocate import allocate
from prunelab.sparsity.dynamic import cosine_fraction, drop_and_grow
from prunelab.sparsity.pruner import MagnitudeRamp
from prunelab.sparsity.schedules import PolynomialSchedule
from prunelab.training.loop import StepHook, Trainer
from prunelab.training.seeds import derive_seed

if TYPE_CHECKING:
    from prunelab.config.schema import RunConfig


@dataclass(frozen=True)
class Updates:
    """Mask updates at steps ``start, start + every, ...`` while ``< end`` (steps of the cycle)."""

    start: int
    every: int
    end: int

    def at(self, step: int) -> bool:
        """Whether ``step`` is an update step."""
        return self.start <= step < self.end and (step - self.start) % self.every == 0


def _dense_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    """|gradient| of every prunable weight for the step's batch, before masking (0 where none flowed)."""
    return {n: (p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p))
            for n, p in trainer.masker.params.items()}


# ---------------------------------------------------------------- SET


@dataclass(frozen=True)
class SetSettings:
    """SET (Mocanu et al. 2018): the fraction moved at each update, and how often."""

    drop: float = field(default=0.3, metadata={"help": "zeta: fraction of each layer's active connections moved"})
    update_every: int = field(default=0, metadata={"help": "optimizer steps between updates (0: every epoch)"})


class SetHook(StepHook[Trainer]):
    """Before the batch of an update step: drop the smallest |w|, regrow as many at random positions."""

    def __init__(self, updates: Updates, drop: float) -> None:
        self.updates, self.drop = updates, drop

    def before_step(self, step: int, trainer: Trainer) -> None:
        if not self.updates.at(step):
            return
        m = trainer.masker
        # A generator per update, derived from the run's seed: the same draw after a resume.
        generator = torch.Generator().manual_seed(derive_seed(trainer.seed, "set-grow", trainer.cycle_index, step))
        masks, _ = drop_and_grow(m.params, m.masks, self.drop, pai.random_scores(m.params, generator))
        trainer.set_masks(masks)


# Regrowth moves single connections anywhere in a layer: no N:M groups or whole channels.
UNSTRUCTURED_ONLY = ("unstructured",)


def _check_set(cfg: RunConfig) -> RunConfig:
    s: SetSettings = cfg.method.settings
    if not 0 < s.drop < 1 or s.update_every < 0:
        raise UserError(f"set needs 0 < method.drop < 1 and method.update_every >= 0, got {s.drop} and {s.update_every}")
    return erk_unless_layerwise(cfg)


@register_method("set", SetSettings, "sparse from the start (ERK); every epoch 30% of each layer's weights move "
                 "(smallest |w| dropped, as many regrown at random)", _check_set, structures=UNSTRUCTURED_ONLY)
def run_set(ctx: Context, s: SetSettings) -> None:
    """A random ERK mask at initialisation, then one cycle with SET's updates after every epoch but the last."""
    prune_by(ctx, "random", ctx.target_density, s)
    every = s.update_every or ctx.trainer.steps_per_epoch
    total = ctx.cfg.train.epochs * ctx.trainer.steps_per_epoch
    ctx.train_cycle("train", hook=SetHook(Updates(every, every, total), s.drop))


# ---------------------------------------------------------------- RigL


@dataclass(frozen=True)
class RiglSettings:
    """RigL (Evci et al. 2020): the drop fraction, its cosine decay, and the update interval."""

    drop: float = field(default=0.3, metadata={"help": "alpha: initial fraction of each layer's connections moved"})
    delta: int = field(default=100, metadata={"help": "optimizer steps between updates (Delta T)"})
    end: float = field(default=0.75, metadata={"help": "fraction of the cycle after which the mask stays fixed"})


class RiglHook(StepHook[Trainer]):
    """At an update step, with the batch's dense gradients: drop the smallest |w|, regrow the largest |g|.

    As in RigL's code, the update step changes the mask instead of stepping the optimizer.
    """

    def __init__(self, updates: Updates, drop: float) -> None:
        self.updates, self.drop = updates, drop

    def after_backward(self, step: int, trainer: Trainer) -> bool:
        if not self.updates.at(step):
            return False
        m = trainer.masker
        fraction = cosine_fraction(self.drop, step, self.updates.end)
        masks, _ = drop_and_grow(m.params, m.masks, fraction, _dense_gradients(trainer))
        trainer.meter.count_dense_gradient()
        trainer.set_masks(masks)
        return True


def _check_rigl(cfg: RunConfig) -> RunConfig:
    s: RiglSettings = cfg.method.settings
    if not 0 < s.drop < 1 or s.delta < 1 or not 0 < s.end <= 1:
        raise UserError("rigl needs 0 < method.drop < 1, method.delta >= 1 and 0 < method.end <= 1, "
                        f"got {s.drop}, {s.delta} and {s.end}")
    return erk_unless_layerwise(cfg)


@register_method("rigl", RiglSettings, "sparse from the start (ERK); every 100 steps until 75% of the cycle, "
                 "drop the smallest |w|, regrow the largest |dense gradient| (cosine-decayed 30%)", _check_rigl,
                 structures=UNSTRUCTURED_ONLY)
def run_rigl(ctx: Context, s: RiglSettings) -> None:
    """A random ERK mask at initialisation, then one cycle with RigL's updates."""
    prune_by(ctx, "random", ctx.target_density, s)
    end = math.floor(s.end * ctx.cfg.train.epochs * ctx.trainer.steps_per_epoch)
    ctx.train_cycle("train", hook=RiglHook(Updates(0, s.delta, end), s.drop))


# ---------------------------------------------------------------- GraNet


@dataclass(frozen=True)
class GranetSettings:
    """GraNet (Liu et al. 2021): gradual magnitude pruning with prune-and-regrow at every update."""

    initial_sparsity: float = field(
        default=0.0, metadata={"help": "0: dense-to-sparse; > 0: an ERK random mask at this sparsity first (0.5)"})
    start_epoch: int = field(default=0, metadata={"help": "epoch of the first update"})
    end_epoch: int | None = field(
        default=None, metadata={"help": "epoch by which the target is reached (None: half the cycle)"})
    update_every: int = field(default=100, metadata={"help": "optimizer steps between updates"})
    regrow: float = field(default=0.5, metadata={"help": "initial fraction of each layer's connections moved"})
    regrow_min: float = field(default=0.005, metadata={"help": "the fraction moved at the end of the cycle"})


class GranetHook(StepHook[Trainer]):
    """At an update step: prune on the cubic schedule (global magnitude), then drop and regrow by |g|.

    GraNet's code updates right after the optimizer step; here the update comes
    right before it, and that step trains only connections active before and after it.
    """

    def __init__(self, updates: Updates, ramp: MagnitudeRamp, regrow: float, regrow_min: float, total: int) -> None:
        self.updates, self.ramp = updates, ramp
        self.regrow, self.regrow_min, self.total = regrow, regrow_min, total

    def after_backward(self, step: int, trainer: Trainer) -> bool:
        if not self.updates.at(step):
            return False
        m = trainer.masker
        before = m.masks
        pruned = self.ramp.masks_at(step, m.params, before) or before
        # GraNet's regrowth fraction: cosine annealing from regrow to regrow_min over the whole cycle.
        fraction = self.regrow_min + cosine_fraction(self.regrow - self.regrow_min, step, self.total)
        masks, _ = drop_and_grow(m.params, pruned, fraction, _dense_gradients(trainer), round_up=True)
        trainer.meter.count_dense_gradient()
        trainer.set_masks(masks)
        m.mask_grads_with(before)  # a regrown connection starts training at the next step
        return False

    def state_dict(self) -> dict[str, Any]:
        return self.ramp.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ramp.load_state_dict(state)


def _check_granet(cfg: RunConfig) -> RunConfig:
    s: GranetSettings = cfg.method.settings
    epochs, end = cfg.train.epochs, ramp_end(s, cfg.train.epochs)  # type: ignore[arg-type]
    if not 0 <= s.start_epoch < end <= epochs:
        raise UserError(f"granet needs 0 <= method.start_epoch < method.end_epoch <= train.epochs, "
                        f"got start {s.start_epoch}, end {end}, epochs {epochs}")
    if not 0 <= s.initial_sparsity <= cfg.prune.sparsity or s.update_every < 1:
        raise UserError("granet needs 0 <= method.initial_sparsity <= sparsity and method.update_every >= 1, "
                        f"got {s.initial_sparsity} and {s.update_every}")
    if not 0 <= s.regrow_min <= s.regrow < 1:
        raise UserError(f"granet needs 0 <= method.regrow_min <= method.regrow < 1, got {s.regrow_min}, {s.regrow}")
    return cfg


@register_method("granet", GranetSettings, "gradual magnitude pruning (cubic, dense to the target by mid-cycle) "
                 "with prune-and-regrow by |dense gradient| every 100 steps", _check_granet,
                 structures=UNSTRUCTURED_ONLY)
def run_granet(ctx: Context, s: GranetSettings) -> None:
    """Optionally an ERK mask at ``initial_sparsity``, then one cycle of gradual pruning with regrowth."""
    if s.initial_sparsity > 0:
        params = ctx.trainer.masker.params
        scores = pai.random_scores(params, ctx.generator("granet-init"))
        ctx.update_masks(lambda: allocate(scores, 1.0 - s.initial_sparsity, "erk"))
    spe = ctx.trainer.steps_per_epoch
    total = ctx.cfg.train.epochs * spe
    start, end = s.start_epoch * spe, ramp_end(s, ctx.cfg.train.epochs) * spe  # type: ignore[arg-type]
    schedule = PolynomialSchedule(s.initial_sparsity, ctx.cfg.prune.sparsity, start, end, s.update_every, power=3)
    ramp = MagnitudeRamp(schedule, ctx.cfg.prune.allocation, monotone=True)
    ctx.train_cycle("train", hook=GranetHook(Updates(start, s.update_every, total), ramp, s.regrow, s.regrow_min,
                                             total))
