"""Resuming an interrupted run: RNG states, the checkpoint of a cycle, and replay.

A run restarted with the same program re-executes its method from the
start. Every cycle that finished before the interruption is skipped, and so
is every state change the method makes before the interrupted cycle starts
(pruning, rewinding, loading pretrained weights): the run is *replaying*.
The checkpoint of the interrupted cycle then restores all of that state at
once and training continues from its epoch, bit-identical on CPU to a run
that was never interrupted. :class:`Replay` alone decides when a run is
replaying; operations that change state opt out with
:func:`skipped_while_replaying` instead of asking themselves.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from prunelab.training.accounting import Cost, CostMeter
from prunelab.sparsity.dynamic import MaskHistory
from prunelab.training.protocols import StepHook
from prunelab.training.selection import CycleResult, Selection


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors and lists (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [py_version, list(py_state), py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


# ---------------------------------------------------------------- replay


class Replay:
    """The checkpoint a restarted run resumes from, and the cycles it makes the run replay."""

    def __init__(self, checkpoint: dict[str, Any] | None) -> None:
        """``checkpoint``: what the run's checkpointer loaded (None: the run starts afresh)."""
        self._checkpoint = checkpoint

    def active(self, next_cycle: int) -> bool:
        """True while the method runs up to the interrupted cycle (``next_cycle``: cycles started so far).

        It includes the state changes just before the interrupted cycle
        starts: its checkpoint restores all of that state when it starts.
        """
        return self._checkpoint is not None and self._checkpoint["cycle"] >= next_cycle

    def skips(self, cycle: int) -> bool:
        """True for a cycle that finished before the interruption (a later checkpoint restores its outcome)."""
        return self._checkpoint is not None and self._checkpoint["cycle"] > cycle

    def take(self, cycle: int) -> dict[str, Any] | None:
        """The checkpoint to continue ``cycle`` from, when it is the interrupted one; replay ends there."""
        if self._checkpoint is None or self._checkpoint["cycle"] != cycle:
            return None
        checkpoint, self._checkpoint = self._checkpoint, None
        return checkpoint


class _Replayable(Protocol):
    @property
    def replaying(self) -> bool: ...


S = TypeVar("S", bound=_Replayable)
P = ParamSpec("P")


def skipped_while_replaying(operation: Callable[Concatenate[S, P], None]) -> Callable[Concatenate[S, P], None]:
    """Make a state-changing method a no-op while its object is ``replaying``.

    Its effect is part of the checkpoint the replay ends at, so doing it
    again would be wasted work at best (scoring) and wrong at worst (adding a
    pretrained run's cost twice).
    """

    @functools.wraps(operation)
    def unless_replaying(self: S, *args: P.args, **kwargs: P.kwargs) -> None:
        if not self.replaying:
            operation(self, *args, **kwargs)

    return unless_replaying


# ---------------------------------------------------------------- the checkpoint of a cycle


def cycle_checkpoint(
    *,
    cycle: int,
    epochs_done: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    masks: Mapping[str, torch.Tensor],
    hook: StepHook[Any] | None,
    cost: Cost,
    result: CycleResult,
    extra: Mapping[str, Any],
    mask_history: MaskHistory,
) -> dict[str, Any]:
    """Everything needed to continue ``cycle`` after ``epochs_done`` epochs, as one checkpoint."""
    return {
        "cycle": cycle,
        "epoch": epochs_done,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "masks": dict(masks),
        "hook": hook.state_dict() if hook is not None else {},
        "cost": asdict(cost),
        "rng": rng_state(),
        "history": result.history,
        "selection": asdict(result.selection),
        "improved_epoch": result.improved_epoch,
        "extra": dict(extra),
        "mask_history": mask_history.state_dict(),
    }


def restore_cycle(
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    hook: StepHook[Any] | None,
    meter: CostMeter,
    result: CycleResult,
    extra: dict[str, Any],
    mask_history: MaskHistory,
) -> int:
    """Load a :func:`cycle_checkpoint` beyond the weights and masks (installed first); the epochs it had done.

    The global RNG states come back too, so the rest of the cycle draws what
    it would have drawn had it never been interrupted.
    """
    optimizer.load_state_dict(state["optimizer"])
    if hook is not None:
        hook.load_state_dict(state["hook"])
    meter.restore(state["cost"])
    set_rng_state(state["rng"])
    result.history.extend(state["history"])
    result.selection = Selection(**state["selection"])
    result.improved_epoch = int(state["improved_epoch"])
    extra.clear()
    extra.update(state["extra"])
    if "mask_history" in state:  # checkpoints written before ITOP was recorded start the history afresh
        mask_history.load_state_dict(state["mask_history"], state["masks"])
    return int(state["epoch"])
