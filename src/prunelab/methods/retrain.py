"""``oneshot`` and ``iterative``: prune a trained dense network, then fine-tune (docs/methods.md section 2).

Seed arXiv 2508.13836. The dense pretraining is part of the run and of its
cost; a stored dense run of the same recipe is reused. Fine-tuning per step
follows the authors' code: a fresh SGD at a tenth of the learning rate,
constant, for a fixed number of epochs or with patience-based early stopping
on the VALIDATION split (the authors monitored the test split; prunelab
never decides on test data), continuing from the best validation epoch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prunelab.errors import BudgetTooSmall, UserError
from prunelab.methods.base import ALL_STRUCTURES, Plan, check_counts, register_method, with_epochs
from prunelab.methods.context import Context
from prunelab.methods.scoring import prune_by
from prunelab.sparsity import criteria
from prunelab.sparsity.knobs import BATCHES
from prunelab.sparsity.schedules import ITERATIVE_SCHEDULES, iterative_sparsities

if TYPE_CHECKING:
    from prunelab.config.schema import RunConfig


TRAINED = criteria.names(trained=True)


@dataclass(frozen=True)
class OneShotSettings:
    """Criterion and fine-tuning of one-shot pruning."""

    score: str = field(default="magnitude", metadata={
        "help": "criterion: " + ", ".join(TRAINED) + " (l2 and bn_scale: prune.structure=channel only)"})
    batches: int = BATCHES.field("taylor/hessian")
    finetune_epochs: int | None = field(default=None, metadata={"help": "fine-tuning epochs (None: train.epochs)"})
    finetune_lr: float | None = field(default=None, metadata={"help": "fine-tuning lr (None: train.lr / 10)"})
    patience: int = field(default=0, metadata={"help": "early-stopping patience in epochs (0: fixed epochs)"})
    min_delta: float = field(default=0.0, metadata={"help": "validation-accuracy gain that counts as improvement"})
    pretrain_share: float = field(default=0.5, metadata={
        "help": "with train.budget: the share of it spent on dense pretraining (the rest fine-tunes)"})

    def __post_init__(self) -> None:
        check_counts(self, 1, "batches")


@dataclass(frozen=True)
class IterativeSettings(OneShotSettings):
    """Schedule of iterative pruning (each step is prune + fine-tune)."""

    schedule: str = field(default="geometric", metadata={"help": "constant, geometric or hybrid"})
    steps: int = field(default=5, metadata={"help": "constant: number of pruning steps"})
    fraction: float | None = field(
        default=None,
        metadata={"help": "geometric: fraction of remaining weights pruned per step (None: 0.2; "
                          "hybrid: 0.1 below 80% target, else 0.02)"},
    )
    first: float = field(default=0.7, metadata={"help": "hybrid: first step prunes this fraction of the target"})
    step_epochs: int | None = field(
        default=None, metadata={"help": "hybrid: fine-tuning epochs after each later step (None: train.epochs // 10)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_counts(self, 0, "step_epochs")


def _check(cfg: RunConfig) -> RunConfig:
    s = cfg.method.settings
    if s.score not in TRAINED:
        raise UserError(f"unknown criterion {s.score!r}; choose one of: {', '.join(TRAINED)}")
    criteria.CRITERIA.get(s.score).check(cfg.prune.structure)
    if s.patience < 0 or (s.finetune_epochs is not None and s.finetune_epochs < 1):
        raise UserError("method.patience must be >= 0 and method.finetune_epochs >= 1")
    if isinstance(s, IterativeSettings):
        if s.schedule not in ITERATIVE_SCHEDULES:
            raise UserError(f"unknown schedule {s.schedule!r}; choose one of: {', '.join(ITERATIVE_SCHEDULES)}")
        if s.steps < 1 or (s.fraction is not None and not 0 < s.fraction < 1) or not 0 < s.first <= 1:
            raise UserError("method.steps must be >= 1, method.fraction in (0, 1) and method.first in (0, 1]")
    return cfg


def _spend(cfg: RunConfig, budget: int) -> RunConfig:
    """Dense pretraining of floor(B * pretrain_share) epochs, fine-tuning of the rest: one-shot in one
    stretch; iterative split evenly over its steps (hybrid: each later step gets e = F // (S + 9), the
    first the rest, about ten times as long, as without a budget). Early stopping may spend less."""
    s = cfg.method.settings
    if not 0 < s.pretrain_share < 1:
        raise UserError(f"method.pretrain_share must be in (0, 1), got {s.pretrain_share}")
    pretrain = int(budget * s.pretrain_share)
    finetune = budget - pretrain
    cfg = with_epochs(cfg, pretrain, "dense pretraining")
    if not isinstance(s, IterativeSettings):
        return _settings(cfg, finetune_epochs=finetune)
    steps = len(iterative_sparsities(cfg.prune.sparsity, s.schedule, s.steps, step_fraction(s, cfg.prune.sparsity),
                                     s.first))
    if s.schedule == "hybrid":
        later = finetune // (steps + 9)
        first = finetune - (steps - 1) * later
        if later < 1 and steps > 1:
            raise BudgetTooSmall(f"train.budget {budget} leaves the {steps - 1} later steps less than one epoch each")
        return _settings(cfg, finetune_epochs=first, step_epochs=max(later, 1))
    if finetune // steps < 1:
        raise BudgetTooSmall(f"train.budget {budget} leaves each of {steps} fine-tuning steps less than one epoch")
    return _settings(cfg, finetune_epochs=finetune // steps)


def _settings(cfg: RunConfig, **changes: int) -> RunConfig:
    return dataclasses.replace(cfg, method=dataclasses.replace(
        cfg.method, settings=dataclasses.replace(cfg.method.settings, **changes)))


def step_fraction(s: IterativeSettings, target: float) -> float:
    """Fraction of remaining weights removed per geometric step."""
    if s.fraction is not None:
        return s.fraction
    if s.schedule == "hybrid":
        return 0.1 if target < 0.8 else 0.02
    return 0.2


def _plan(cfg: RunConfig) -> Plan:
    """Dense pretraining, then fine-tuning (at most; early stopping may end each stretch sooner)."""
    s, epochs = cfg.method.settings, cfg.train.epochs
    finetune = s.finetune_epochs or epochs
    if not isinstance(s, IterativeSettings):
        return Plan(epochs + finetune, pretrained=True, split=f"{epochs} + {finetune}")
    steps = len(iterative_sparsities(cfg.prune.sparsity, s.schedule, s.steps, step_fraction(s, cfg.prune.sparsity),
                                     s.first))
    if s.schedule == "hybrid":
        short = short_epochs(s, epochs)
        return Plan(epochs + finetune + (steps - 1) * short, pretrained=True,
                    split=f"{epochs} + {finetune} + {steps - 1} × {short}")
    return Plan(epochs + steps * finetune, pretrained=True, split=f"{epochs} + {steps} × {finetune}")


def short_epochs(s: IterativeSettings, epochs: int) -> int:
    """Fine-tuning epochs after each later step of the hybrid schedule."""
    return s.step_epochs or max(1, math.ceil(epochs / 10))


@register_method("oneshot", OneShotSettings,
                 "train dense (reused from the store), prune once to the target, fine-tune", _check, _plan,
                 ALL_STRUCTURES, _spend)
def oneshot(ctx: Context, s: OneShotSettings) -> None:
    """Pretrained dense -> one prune -> fine-tune."""
    ctx.load_pretrained()
    prune_by(ctx, s.score, ctx.target_density, s)
    ctx.finetune("finetune", s.finetune_epochs or ctx.cfg.train.epochs, s.finetune_lr, s.patience, s.min_delta)


@register_method("iterative", IterativeSettings,
                 "train dense, then prune-and-fine-tune steps on a constant, geometric or hybrid schedule", _check, _plan,
                 ALL_STRUCTURES, _spend)
def iterative(ctx: Context, s: IterativeSettings) -> None:
    """Pretrained dense -> (prune a step, fine-tune) until the target."""
    ctx.load_pretrained()
    target = ctx.cfg.prune.sparsity
    sparsities = iterative_sparsities(target, s.schedule, s.steps, step_fraction(s, target), s.first)
    long_epochs = s.finetune_epochs or ctx.cfg.train.epochs
    for i, sparsity in enumerate(sparsities):
        prune_by(ctx, s.score, 1.0 - sparsity, s)
        epochs = long_epochs if s.schedule != "hybrid" or i == 0 else short_epochs(s, ctx.cfg.train.epochs)
        ctx.finetune(f"step {i + 1}/{len(sparsities)}", epochs, s.finetune_lr, s.patience, s.min_delta)
