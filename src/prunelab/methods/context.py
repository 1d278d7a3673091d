"""The shared parts a method program works with: train a cycle, score, prune, rewind, pretrain.

Every operation that changes state goes through here, so that a resumed run
can re-execute its method program cheaply: while the trainer is *replaying*
(re-running the program up to the interrupted cycle), pruning, rewinding and
loading are skipped (:func:`~prunelab.training.resume.skipped_while_replaying`),
because the checkpoint of the interrupted cycle restores the model, the
masks, the cost and :attr:`Trainer.extra` anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from prunelab.sparsity.allocate import allocate
from prunelab.sparsity.channel_cut import Removal
from prunelab.sparsity.channels import Group
from prunelab.sparsity.mask import Masks, collapsed_layers, count_kept
from prunelab.training.loop import Cost, CycleResult, StepHook, Trainer
from prunelab.training.resume import skipped_while_replaying
from prunelab.training.seeds import derive_seed

if TYPE_CHECKING:
    from prunelab.config.schema import RunConfig


@dataclass(frozen=True)
class Pretrained:
    """A trained dense network of the same recipe, and what training it cost."""

    run_id: str
    weights: dict[str, torch.Tensor]
    cost: Cost


@dataclass
class Context:
    """A run in progress, as a method sees it.

    ``last_cycle`` is the most recent finished cycle; the run's validation-
    selected checkpoint is taken from it (the cycle that produced the final
    sparse network). ``pretrained`` is provided by the experiment: it returns
    the stored dense run of the same recipe, training it first if needed.
    """

    cfg: RunConfig
    trainer: Trainer
    pretrained: Callable[[], Pretrained] | None = None
    last_cycle: CycleResult | None = None

    # Notes and reused runs live in the trainer's checkpointed state, so a resumed run reports them too.
    @property
    def notes(self) -> list[str]:
        """Things the summary must say (layer collapse, reused pretraining)."""
        return self.trainer.extra.setdefault("notes", [])

    @property
    def reused(self) -> list[str]:
        """Ids of stored runs this run built on (their cost is included in this run's)."""
        return self.trainer.extra.setdefault("reused", [])

    # ------------------------------------------------------------ targets

    @property
    def target_density(self) -> float:
        """Fraction of prunable weights the final network keeps."""
        return 1.0 - self.cfg.prune.sparsity

    @property
    def target_kept(self) -> int:
        """Exact number of prunable weights the final network keeps."""
        return round(self.target_density * self.total)

    @property
    def total(self) -> int:
        """Number of prunable weights of the network as built."""
        return self.trainer.dense_total

    @property
    def kept(self) -> int:
        """Number of prunable weights the current masks keep."""
        return count_kept(self.trainer.masker.masks)

    @property
    def replaying(self) -> bool:
        """True while a resumed run re-executes the program up to its interrupted cycle (skip costly scoring)."""
        return self.trainer.replaying

    @property
    def density(self) -> float:
        """Current fraction of prunable weights kept."""
        return self.kept / self.total

    # ------------------------------------------------------------ training

    def train_cycle(
        self, name: str, epochs: int | None = None, hook: StepHook | None = None, **options: object
    ) -> CycleResult:
        """One full cycle of the LR schedule (default: the config's epochs) from the current weights.

        ``options`` go to :meth:`Trainer.run_cycle` (``optim``, ``patience``, ``min_delta``).
        """
        result = self.trainer.run_cycle(
            name, epochs or self.cfg.train.epochs, hook=hook, select_kept=self.target_kept, **options  # type: ignore[arg-type]
        )
        self.last_cycle = result
        return result

    def finetune(self, name: str, epochs: int, lr: float | None, patience: int = 0, min_delta: float = 0.0) -> CycleResult:
        """Fine-tuning as in docs/methods.md section 2: a fresh optimizer at ``lr``
        (default: a tenth of the training lr), constant learning rate, a fixed
        number of epochs or early stopping on the validation split."""
        optim = dataclasses.replace(
            self.cfg.train.optim(), lr=lr or self.cfg.train.lr / 10, schedule="constant", warmup_epochs=0
        )
        return self.train_cycle(name, epochs, optim=optim, patience=patience, min_delta=min_delta)

    def load_pretrained(self) -> None:
        """Start from the trained dense network of the same recipe (its cost is added to this run's)."""
        if self.pretrained is None:
            raise RuntimeError("this context has no source of pretrained dense networks")
        self._load_pretrained(self.pretrained)

    @skipped_while_replaying
    def _load_pretrained(self, pretrained: Callable[[], Pretrained]) -> None:
        dense = pretrained()
        self.trainer.model.load_state_dict(dense.weights)
        self.trainer.cost.add(dense.cost)
        self.trainer.history.pretrained()  # every weight was trained, in the stored dense run
        self.reused.append(dense.run_id)
        self.notes.append(f"dense pretraining is run {dense.run_id}; its cost is included in this run's")

    # ------------------------------------------------------------ pruning

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator for ``purpose``, seeded by (seed, purpose, cycles so far): reproducible on resume."""
        return torch.Generator().manual_seed(derive_seed(self.cfg.seed, purpose, self.trainer.cycle_index, keep="high"))

    def sample(self, n: int, purpose: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random training images and labels (for data-dependent criteria)."""
        data = self.trainer.data
        index = torch.randperm(len(data.train_y), generator=self.generator(purpose))[:n].to(data.train_y.device)
        return data.train_x[index], data.train_y[index]

    def allocate(self, scores: Mapping[str, torch.Tensor], density: float, monotone: bool = True) -> Masks:
        """Masks keeping ``density`` of the weights by ``scores`` (higher = keep) with the config's
        allocation and structure."""
        current = self.trainer.masker.masks if monotone else None
        return allocate(scores, density, self.cfg.prune.allocation, current, self.cfg.prune.structure)

    @skipped_while_replaying
    def set_masks(self, masks: Masks) -> None:
        """Install masks (pruned weights and their optimizer state become 0) and guard against layer collapse."""
        self.trainer.set_masks(masks)
        self.check_collapse()

    def check_collapse(self) -> list[str]:
        """Layers the current masks empty entirely; each is noted once (the network is disconnected)."""
        collapsed = collapsed_layers(self.trainer.masker.masks)
        for name in collapsed:
            note = f"layer {name} lost all its weights: the network is disconnected"
            if note not in self.notes:
                self.notes.append(note)
        return collapsed

    @skipped_while_replaying
    def update_masks(self, compute: Callable[[], Masks]) -> None:
        """Install the masks ``compute`` returns; while a resumed run replays, neither compute nor install
        them (the checkpoint of the interrupted cycle restores the masks, and scoring may be costly)."""
        self.set_masks(compute())

    @skipped_while_replaying
    def cut(self, compute: Callable[[], tuple[Sequence[Group], Removal]]) -> None:
        """Remove the channels ``compute`` chooses from the network for real; while a resumed run
        replays, neither choose nor remove them (the checkpoint rebuilds the smaller network)."""
        self.trainer.remove_channels(*compute())

    @skipped_while_replaying
    def prune(self, scores: Mapping[str, torch.Tensor], density: float) -> None:
        """Monotone pruning of the current network to ``density`` by ``scores``."""
        self.set_masks(self.allocate(scores, density))

    # ------------------------------------------------------------ rewinding

    @skipped_while_replaying
    def save_point(self, name: str) -> None:
        """Remember the current weights (and buffers) under ``name``; kept across interruptions."""
        state = self.trainer.model.state_dict()
        self.trainer.extra[name] = {k: v.detach().clone() for k, v in state.items()}

    @skipped_while_replaying
    def rewind(self, name: str) -> None:
        """Reset the network to the saved point ``name``; pruned weights stay 0."""
        self.trainer.model.load_state_dict(self.trainer.extra[name])
        self.trainer.masker.apply_to_weights()
