"""Cost accounting: the epochs, steps, wall time and training FLOPs a run spends.

The FLOP counts themselves come from :mod:`prunelab.training.cost`; this
module only keeps the books. A step's cost depends on the masks, so the
per-step figures are recounted whenever the masks change, not every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from prunelab.training.cost import TRAIN_STEP_FORWARDS, dense_train_step_flops, train_step_flops


@dataclass
class Cost:
    """Training compute spent so far (all cycles of a run)."""

    epochs: float = 0.0
    steps: int = 0
    wall_s: float = 0.0
    train_flops: float = 0.0
    dense_train_flops: float = 0.0

    def add(self, other: Cost) -> None:
        """Add ``other``'s spending to this one (a stored run this run builds on)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class CostMeter:
    """Keeps a run's :class:`Cost`, counting each step at the FLOPs of the masks in force."""

    def __init__(self, layer_flops: Mapping[str, int], masks: Mapping[str, torch.Tensor]) -> None:
        """``layer_flops``: forward FLOPs per prunable weight of one sample (:func:`forward_flops`),
        of the network as built; ``masks`` cover its prunable weights."""
        self.layer_flops = dict(layer_flops)
        # A layer's FLOPs scale with the weights it keeps of those it was built with: by its mask, and
        # by the channels removed from it (its later masks are smaller).
        self.sizes = {name: m.numel() for name, m in masks.items()}
        self.cost = Cost()
        # Per sample; a step costs these times its global batch size.
        self._dense_step_flops = dense_train_step_flops(self.layer_flops, 1)
        self._step_flops = 0.0
        self._last_batch = 0
        self.masks_changed(masks)

    def masks_changed(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Recount the FLOPs of a step under new ``masks`` (call whenever the masks change)."""
        densities = {name: int(m.sum()) / self.sizes[name] for name, m in masks.items()}
        self._step_flops = train_step_flops(self.layer_flops, densities, 1)

    def count_step(self, batch_size: int) -> None:
        """One optimizer step on a global batch of ``batch_size`` samples (whatever share this process trains)."""
        self.cost.train_flops += self._step_flops * batch_size
        self.cost.dense_train_flops += self._dense_step_flops * batch_size
        self._last_batch = batch_size

    def count_dense_gradient(self) -> None:
        """The last step also computed the dense gradient of its batch (RigL's and GraNet's mask updates).

        RigL's accounting (Evci et al. 2020): such a step costs 2 f_S + f_D per
        sample, a sparse forward and input gradient plus the dense weight
        gradient, instead of 3 f_S; the difference f_D - f_S is added.
        """
        per_forward = (self._dense_step_flops - self._step_flops) / TRAIN_STEP_FORWARDS
        self.cost.train_flops += per_forward * self._last_batch

    def count_epoch(self, steps: int, steps_per_epoch: int) -> None:
        """One finished epoch in which ``steps`` of its ``steps_per_epoch`` steps were trained (fewer when a
        cycle starts mid-epoch: that epoch counts as the fraction trained)."""
        self.cost.steps += steps
        self.cost.epochs += 1.0 if steps == steps_per_epoch else steps / steps_per_epoch

    def count_wall(self, seconds: float) -> None:
        """Wall time spent in a cycle's epochs."""
        self.cost.wall_s += seconds

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Continue from the books of a checkpoint (``dataclasses.asdict`` of a :class:`Cost`)."""
        self.cost = Cost(**saved)
