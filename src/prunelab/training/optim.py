"""Optimizers and learning-rate schedules.

The learning rate is a pure function of the step within a cycle, so a resumed
run needs no scheduler state and a method can restart the schedule (learning
rate rewinding) by starting a new cycle.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class OptimSettings:
    """What an optimizer and its learning-rate schedule need (a view of the train config)."""

    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    betas: tuple[float, float]
    schedule: str
    milestones: tuple[int, ...]
    gamma: float
    warmup_epochs: int


def build_optimizer(params: Iterable[torch.nn.Parameter], s: OptimSettings) -> torch.optim.Optimizer:
    """A fresh optimizer over ``params`` (weight decay applies to every parameter, as in the seeds)."""
    params = list(params)
    if s.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov, weight_decay=s.weight_decay
        )
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}")


def lr_at(step: int, steps_per_epoch: int, epochs: int, s: OptimSettings) -> float:
    """Learning rate for ``step`` (0-based, within a cycle of ``epochs`` epochs).

    Linear warm-up over ``warmup_epochs`` (from lr/steps to lr), then the
    schedule: constant; step decay by ``gamma`` at each epoch in ``milestones``;
    or cosine decay to 0 over the remaining steps of the cycle.
    """
    warmup = s.warmup_epochs * steps_per_epoch
    if step < warmup:
        return s.lr * (step + 1) / warmup
    if s.schedule == "constant":
        return s.lr
    if s.schedule == "step":
        epoch = step // steps_per_epoch
        return s.lr * s.gamma ** sum(1 for m in s.milestones if epoch >= m)
    if s.schedule == "cosine":
        total = max(1, epochs * steps_per_epoch - warmup)
        progress = min(1.0, (step - warmup) / total)
        return 0.5 * s.lr * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {s.schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
