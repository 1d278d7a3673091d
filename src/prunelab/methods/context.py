"""The shared parts a method program works with: the trainer, the target, pruning helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prunelab.sparsity.allocate import allocate
from prunelab.sparsity.mask import Masks, count_total
from prunelab.training.loop import CycleResult, StepHook, Trainer

if TYPE_CHECKING:
    from prunelab.config import RunConfig


@dataclass
class Context:
    """A run in progress, as a method sees it.

    ``last_cycle`` is the most recent finished cycle; the run's validation-
    selected checkpoint is taken from it (the cycle that produced the final
    sparse network).
    """

    cfg: RunConfig
    trainer: Trainer
    last_cycle: CycleResult | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def target_density(self) -> float:
        """Fraction of prunable weights the final network keeps."""
        return 1.0 - self.cfg.prune.sparsity

    @property
    def target_kept(self) -> int:
        """Exact number of prunable weights the final network keeps."""
        return round(self.target_density * count_total(self.trainer.masker.masks))

    def train_cycle(self, name: str, epochs: int | None = None, hook: StepHook | None = None) -> CycleResult:
        """One full cycle of the LR schedule (default: the config's epochs) from the current weights."""
        result = self.trainer.run_cycle(
            name, epochs or self.cfg.train.epochs, hook=hook, select_kept=self.target_kept
        )
        self.last_cycle = result
        return result

    def masks_for(self, scores: dict, density: float, monotone: bool = True) -> Masks:
        """Masks keeping ``density`` of the weights by ``scores``, with the config's allocation."""
        current = self.trainer.masker.masks if monotone else None
        return allocate(scores, density, self.cfg.prune.allocation, current)
