"""What the Lightning and Hugging Face ``Pruning`` callbacks share: their settings, and a
:class:`~prunelab.sparsity.pruner.ProgressivePruner` that follows the trainer's optimizer-step counter.

The callbacks only translate their trainer's events into :meth:`TrainerPruner.begin` (training
starts: model, optimizer and steps per epoch are known), :meth:`TrainerPruner.follow` (after an
optimizer step) and the checkpoint state; the masking itself is ``ProgressivePruner``'s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prunelab.errors import UserError
from prunelab.sparsity.allocate import ALLOCATORS
from prunelab.sparsity.mask import Masks
from prunelab.sparsity.pruner import ProgressivePruner, check_ramp
from prunelab.sparsity.structure import UNSTRUCTURED, parse_structure


@dataclass(frozen=True)
class PruningSettings:
    """The constructor arguments of a ``Pruning`` callback, as those of ``ProgressivePruner``.

    ``steps_per_epoch`` None: taken from the trainer when training starts.
    """

    sparsity: float
    start: float = 0
    end: float | None = None
    power: float = 1.0
    initial_sparsity: float = 0.0
    every: int | None = None
    scope: str = "global"
    exclude: tuple[str, ...] = ()
    embeddings: bool = False
    structure: str = UNSTRUCTURED
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        # Fail when the callback is made, not epochs later when training starts.
        check_ramp(self.sparsity, self.start, self.start if self.end is None else self.end, self.power,
                   self.initial_sparsity)
        ALLOCATORS.entry(self.scope)
        parse_structure(self.structure)
        for name in ("every", "steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of the callbacks (plain values, JSON-serialisable)."""
        kwargs = asdict(self)
        kwargs["exclude"] = list(self.exclude)
        return kwargs


def updates_per_epoch(batches: float, accumulation: int) -> int:
    """Optimizer steps in an epoch of ``batches`` batches, one step every ``accumulation`` batches.

    An epoch's last, incomplete accumulation still steps (as in Lightning and the Hugging Face Trainer).
    """
    if not math.isfinite(batches) or batches < 1:
        raise UserError("the trainer does not know how many batches an epoch has: pass steps_per_epoch=N "
                        "to Pruning")
    return max(1, math.ceil(int(batches) / max(1, accumulation)))


class TrainerPruner:
    """A :class:`ProgressivePruner` driven by a trainer's count of optimizer steps (its global step).

    Following the count, not the callback calls, keeps the schedule right under gradient
    accumulation and after a resume, where the trainer restores its count from the checkpoint.
    """

    def __init__(self, settings: PruningSettings) -> None:
        self.settings = settings
        self.pruner: ProgressivePruner | None = None
        self._saved: Mapping[str, Any] | None = None  # a checkpoint's state, until training starts

    def begin(self, model: nn.Module, optimizer: torch.optim.Optimizer, global_step: int, batches: float,
              accumulation: int) -> None:
        """Start pruning ``model`` (on the state restored by :meth:`load_state_dict`, if any).

        An epoch has ``batches`` batches and an optimizer step every ``accumulation`` of them,
        unless the settings fix ``steps_per_epoch``.
        """
        self.close()
        s = self.settings
        steps_per_epoch = s.steps_per_epoch or updates_per_epoch(batches, accumulation)
        saved, self._saved = self._saved, None
        try:
            self.pruner = ProgressivePruner(
                model, optimizer, s.sparsity, s.start, s.end, steps_per_epoch,
                every=s.every, initial_sparsity=s.initial_sparsity, power=s.power, scope=s.scope,
                exclude=s.exclude, embeddings=s.embeddings, structure=s.structure, state=saved or None)
        except ValueError as error:
            if isinstance(error, UserError) or not saved:
                raise
            raise UserError("the checkpoint's pruning masks do not fit this model's prunable weights "
                            "(another model, exclude or embeddings setting?)") from error
        if self.pruner.steps > global_step:
            self.close()
            raise UserError(f"the checkpoint's pruning state is at optimizer step {self.pruner.steps} but "
                            f"the trainer resumes at step {global_step}")
        if self.pruner.steps < global_step:
            warnings.warn(f"training resumes at optimizer step {global_step} without pruning state: the "
                          "masks catch up with the schedule now", stacklevel=3)
        self.follow(global_step)

    def follow(self, global_step: int) -> None:
        """Count the optimizer steps the trainer has made since the last call (updating masks on schedule)."""
        if self.pruner is not None:
            while self.pruner.steps < global_step:
                self.pruner.step()

    def state_dict(self) -> dict[str, Any]:
        """The pruner's step count and masks (empty before training has started)."""
        if self.pruner is not None:
            return self.pruner.state_dict()
        return dict(self._saved or {})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Keep a checkpoint's state for :meth:`begin` (trainers restore it before the optimizer exists)."""
        self._saved = dict(state)

    def close(self) -> None:
        """Detach the pruner's gradient hooks; the pruned weights stay 0 and the masks stay readable."""
        if self.pruner is not None:
            self.pruner.remove()

    @property
    def masks(self) -> Masks:
        """The current masks (True = kept), by parameter name; empty before training has started."""
        return self.pruner.masks if self.pruner is not None else {}

    @property
    def sparsity(self) -> float:
        """The fraction of the prunable weights the current masks remove (0 before training has started)."""
        return self.pruner.sparsity if self.pruner is not None else 0.0


def only_optimizer(optimizers: Sequence[torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """The one optimizer the trainer steps (pruning keeps the state of exactly one at zero)."""
    if len(optimizers) != 1:
        raise UserError(f"Pruning works with one optimizer, the trainer has {len(optimizers)}")
    return optimizers[0]


class PruningCallback:
    """The constructor and read-outs of both ``Pruning`` callbacks (each adds its trainer's events).

    Progressive magnitude pruning as :class:`~prunelab.sparsity.pruner.ProgressivePruner`: the
    sparsity ramps from ``initial_sparsity`` at epoch ``start`` to ``sparsity`` at epoch ``end``
    (epochs may be fractional) along ``s(t) = sparsity + (initial - sparsity) * (1 - progress)^power``,
    the masks updated every ``every`` optimizer steps (default: once an epoch); ``start == end``
    (the default ``end``) prunes once at ``start`` and keeps the masks. ``scope``, ``exclude``,
    ``embeddings`` and ``structure`` are those of :func:`prunelab.prune`. Steps per epoch come from
    the trainer (batches per epoch over gradient accumulation) unless ``steps_per_epoch`` is given.
    """

    def __init__(
        self,
        sparsity: float,
        start: float = 0,
        end: float | None = None,
        *,
        power: float = 1.0,
        initial_sparsity: float = 0.0,
        every: int | None = None,
        scope: str = "global",
        exclude: Sequence[str] = (),
        embeddings: bool = False,
        structure: str = UNSTRUCTURED,
        steps_per_epoch: int | None = None,
    ) -> None:
        if isinstance(exclude, str):  # a lone pattern would be split into characters
            raise UserError(f"exclude must be a sequence of name patterns, got the string {exclude!r}")
        self.settings = PruningSettings(sparsity, start, end, power, initial_sparsity, every, scope,
                                        tuple(exclude), embeddings, structure, steps_per_epoch)
        self.pruning = TrainerPruner(self.settings)

    @property
    def masks(self) -> Masks:
        """The current masks (True = kept), by parameter name; empty before training has started."""
        return self.pruning.masks

    @property
    def sparsity(self) -> float:
        """The fraction of the prunable weights the current masks remove."""
        return self.pruning.sparsity
