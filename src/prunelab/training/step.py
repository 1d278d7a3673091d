"""The training step and what is measured around it: one optimizer step, an epoch's tally, evaluation.

Nothing here knows about cycles, checkpoints or methods; the loop
(:mod:`prunelab.training.loop`) calls these in order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from prunelab.data import eval_batches
from prunelab.errors import Diverged
from prunelab.models.modes import eval_mode
from prunelab.sparsity.mask import Masker
from prunelab.training.distributed import World

# Arithmetic of the forward pass and the loss: "bf16" runs them under bfloat16 autocast.
PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """The context the forward pass and loss run in: bfloat16 autocast for "bf16" (CPU or CUDA)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    masker: Masker,
    world: World,
    batch: tuple[torch.Tensor, torch.Tensor],
    precision: str,
    label_smoothing: float,
    after_backward: Callable[[], bool] | None = None,
    bn_l1: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One optimizer step on this process's share of the global ``batch``, pruned weights kept at 0.

    ``model`` is what the step calls (the DistributedDataParallel wrapper
    when distributed). ``after_backward`` runs while the gradients are dense
    (averaged over the ranks); when it returns True the optimizer does not
    step. ``bn_l1`` > 0 adds network slimming's sparsity penalty: ``bn_l1 *
    sign(gamma)`` to the gradient of every BatchNorm scale, the subgradient of
    ``bn_l1 * |gamma|`` (Liu et al. 2017, as their code does after backward).
    Returns the share's mean loss (detached, not synced), its number of
    correct predictions (a tensor) and its size.
    """
    x, y, scale = world.shard(*batch)
    with autocast(x.device, precision):
        out = model(x)
        loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    (loss if scale == 1.0 else loss * scale).backward()
    if bn_l1:
        add_bn_l1(model, bn_l1)
    if after_backward is None or not after_backward():
        masker.apply_to_grads()
        optimizer.step()  # pruned weights stay exactly 0: see Masker
    return loss.detach(), (out.detach().argmax(1) == y).sum(), len(y)


@torch.no_grad()
def add_bn_l1(model: nn.Module, strength: float) -> None:
    """Add ``strength * sign(gamma)`` to the gradient of every BatchNorm scale gamma that has one."""
    scales = [m.weight for m in model.modules() if isinstance(m, _BatchNorm) and m.weight is not None
              and m.weight.grad is not None]
    if scales:
        torch._foreach_add_([g.grad for g in scales], torch._foreach_sign(scales), alpha=strength)


class EpochTally:
    """An epoch's training loss and accuracy, kept on the device (no host sync per step)."""

    def __init__(self, steps: int, device: torch.device) -> None:
        """Room for ``steps`` steps' losses; divergence is checked once per epoch from them."""
        self.losses = torch.zeros(steps, device=device)
        self.sizes = torch.zeros(steps, device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0

    def add(self, i: int, loss: torch.Tensor, correct: torch.Tensor, size: int) -> None:
        """Record step ``i`` of the epoch (0-based), as :func:`train_step` returned it."""
        self.losses[i] = loss
        self.sizes[i] = size
        self.correct += correct
        self.seen += size

    def means(self, world: World) -> tuple[float, float]:
        """Mean training loss and accuracy over the epoch's global batches (summed over the ranks)."""
        loss_sum, correct, seen = (self.losses * self.sizes).sum(), self.correct, self.seen
        if world.distributed:
            totals = world.sum(torch.tensor([float(loss_sum), float(correct), float(seen)], dtype=torch.float64))
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2])
        return float(loss_sum) / seen, int(correct) / seen


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000, precision: str = "fp32"
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y); (nan, nan) on an empty split."""
    if len(y) == 0:
        return float("nan"), float("nan")
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    with eval_mode(model):
        for xb, yb in eval_batches(x, y, batch_size):
            with autocast(x.device, precision):
                out = model(xb)
            loss += F.cross_entropy(out.float(), yb, reduction="sum")
            correct += (out.argmax(1) == yb).sum()
    return float(loss) / len(y), int(correct) / len(y)


def check_finite(losses: torch.Tensor, model: nn.Module, epoch: int, steps_per_epoch: int) -> None:
    """Raise :class:`Diverged` naming the first step of the epoch whose loss is not finite, or non-finite weights.

    ``epoch`` is 0-based; the message counts epochs and steps from 1 (steps over the whole cycle).
    """
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        i = int(bad[0])
        step = epoch * steps_per_epoch + i + 1
        raise Diverged(
            f"training diverged: the loss was {float(losses[i])} at step {step} (epoch {epoch + 1}, "
            f"batch {i + 1} of {steps_per_epoch}); lower the learning rate or check the data", epoch + 1, step
        )
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise Diverged(
            f"training diverged: some weights are not finite after epoch {epoch + 1}; lower the learning rate",
            epoch + 1, (epoch + 1) * steps_per_epoch,
        )


def check_validation(val_loss: float, epoch: int, steps_per_epoch: int) -> None:
    """Raise :class:`Diverged` when the validation loss after ``epoch`` (0-based) is not finite."""
    if not math.isfinite(val_loss):
        raise Diverged(
            f"training diverged: the validation loss after epoch {epoch + 1} is {val_loss} "
            "(the weights overflowed); lower the learning rate", epoch + 1, (epoch + 1) * steps_per_epoch
        )
