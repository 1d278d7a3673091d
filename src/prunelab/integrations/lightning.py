"""Progressive (or one-shot) pruning inside a Lightning ``Trainer``: the :class:`Pruning` callback.

::

    from prunelab.integrations.lightning import Pruning

    trainer = lightning.pytorch.Trainer(max_epochs=10, callbacks=[Pruning(sparsity=0.9, start=0, end=5)])
    trainer.fit(module, loader)

The masks and the step count travel in the trainer's checkpoints (the callback's
``state_dict``), so ``trainer.fit(..., ckpt_path=...)`` resumes with the same masks.
"""

from __future__ import annotations

from typing import Any

from prunelab.errors import UserError
from prunelab.integrations._pruning import PruningCallback, only_optimizer

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as error:  # the framework is an optional extra
    raise UserError("prunelab.integrations.lightning needs lightning: pip install 'prunelab[lightning]'") from error


class Pruning(PruningCallback, Callback):
    """A Lightning callback that prunes the ``LightningModule`` as :class:`prunelab.ProgressivePruner` does.

    Arguments are those of ``ProgressivePruner`` (``sparsity``, ``start``, ``end`` in the trainer's
    epochs, ``power``, ``initial_sparsity``, ``every``, ``scope``, ``exclude``, ``embeddings``,
    ``structure``) and ``steps_per_epoch``; start == end prunes once and keeps the masks. Steps per epoch are
    ``ceil(trainer.num_training_batches / accumulate_grad_batches)``, the optimizer steps Lightning
    makes in an epoch, unless ``steps_per_epoch`` is given (needed for data without a length).
    Pruning starts in ``on_train_start`` (the optimizer exists then, and a checkpoint has been
    restored) and follows ``trainer.global_step`` after every batch. Pruned weights and their
    optimizer state (momentum, Adam moments) are exactly 0 after every optimizer step; the trainer's
    one optimizer must hold the pruned weights. ``masks`` and ``sparsity`` read the current masks.
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start pruning: from the checkpoint's masks when resuming, else by the schedule's first step."""
        self.pruning.begin(pl_module, only_optimizer(trainer.optimizers), trainer.global_step,
                           trainer.num_training_batches, trainer.accumulate_grad_batches)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Count the optimizer steps of this batch (none while gradients accumulate); update on schedule."""
        self.pruning.follow(trainer.global_step)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """After fitting, detach the gradient hooks (the zeros and the masks stay)."""
        if stage == "fit":
            self.pruning.close()

    def state_dict(self) -> dict[str, Any]:
        """The step count and masks, saved in the trainer's checkpoints."""
        return self.pruning.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the masks are applied when training starts."""
        self.pruning.load_state_dict(state_dict)
