"""The training engine: one cycle of the learning-rate schedule with masks, hooks and checkpoints.

Every method trains through :meth:`Trainer.run_cycle`, so masking, cost
counting, validation and checkpointing behave identically for all of them.
A cycle checkpoints after every epoch; a run restarted with the same program
fast-forwards through finished cycles and resumes the interrupted one, ending
bit-identical on CPU (the data order of an epoch is a pure function of
(seed, cycle index, epoch) and every RNG state is saved). Under torchrun the
same loop trains one run on several processes, each on its share of every
batch (:mod:`prunelab.training.distributed`).

The parts live beside this module: the step and evaluation in
:mod:`~prunelab.training.step`, cost in :mod:`~prunelab.training.accounting`,
selection and early stopping in :mod:`~prunelab.training.selection`,
checkpoints and replay in :mod:`~prunelab.training.resume`, and the
interfaces in :mod:`~prunelab.training.protocols`. What is left here is the
order in which they happen.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from prunelab.data import Augment, DataSplits, num_batches, train_batches
from prunelab.faults import fault_point
from prunelab.sparsity.dynamic import MaskHistory
from prunelab.errors import UserError
from prunelab.sparsity.channel_cut import Removal, remove_channels, replay_cuts
from prunelab.sparsity.channels import Group
from prunelab.sparsity.mask import Masker, Masks, count_kept, count_total
from prunelab.training.accounting import Cost, CostMeter
from prunelab.training.distributed import SINGLE, SharedCheckpointer, World, masks_digest
from prunelab.training.optim import OptimSettings, build_optimizer, lr_at, set_lr
from prunelab.training.protocols import Checkpointer, StepHook
from prunelab.training.resume import Replay, cycle_checkpoint, restore_cycle
from prunelab.training.seeds import derive_seed
from prunelab.training.selection import CycleResult, Selection, patience_exhausted, select
from prunelab.training.step import (
    PRECISIONS,
    EpochTally,
    check_finite,
    check_validation,
    evaluate,
    train_step,
)

#: Key of :attr:`Trainer.extra` that lists the channel removals so far, in order.
CHANNEL_CUTS = "channel_cuts"

# Re-exported: the rest of prunelab imports these from here.
__all__ = [
    "PRECISIONS", "Checkpointer", "Cost", "CycleResult", "LoopSettings", "Selection", "StepHook", "Trainer",
]


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs from the training config."""

    batch_size: int
    label_smoothing: float
    optim: OptimSettings
    augment: Augment = Augment()
    eval_batch_size: int = 1000
    precision: str = "fp32"
    bn_l1: float = 0.0


@dataclass(frozen=True)
class _Cycle:
    """What stays fixed for the epochs of one cycle."""

    name: str
    index: int
    epochs: int
    optim: OptimSettings
    hook: StepHook[Trainer] | None
    start_step: int = 0


class Trainer:
    """Trains one model through the cycles of a method, with masks, cost and checkpoints."""

    def __init__(
        self,
        model: nn.Module,
        data: DataSplits,
        settings: LoopSettings,
        masker: Masker,
        layer_flops: Mapping[str, int],
        seed: int,
        checkpointer: Checkpointer | None = None,
        log: Callable[[dict[str, Any]], None] | None = None,
        progress: bool | None = None,
        world: World = SINGLE,
    ) -> None:
        """``world``: the processes that train this run together (:mod:`prunelab.training.distributed`).

        With several, each trains on its share of every batch, rank 0 alone
        writes checkpoints (every rank reads them), and the caller passes a
        ``log`` only on rank 0.
        """
        self.model = model
        self.world = world
        # What the training step calls: the model itself, or its DistributedDataParallel wrapper.
        self._step_model = world.wrap(model)
        if checkpointer is not None and world.distributed:
            checkpointer = SharedCheckpointer(checkpointer, world)
        self.data = data
        self.settings = settings
        self.masker = masker
        self.seed = seed
        self.checkpointer = checkpointer
        self.log = log or (lambda record: None)
        self.progress = progress
        self.meter = CostMeter(layer_flops, masker.masks)
        # Prunable weights of the network as built: sparsities count against these, also once
        # channels are removed (prune.structure=channel) and the layers are smaller.
        self.dense_total = count_total(masker.masks)
        # Which connections were ever trained, and how many came in after the start (ITOP).
        self.history = MaskHistory(masker.masks)
        self.mask_digests: list[str] = []  # per rank, from the last check of a distributed run
        self.optimizer: torch.optim.Optimizer | None = None
        self.cycle_index = 0
        # Method state that must survive an interruption (rewind points); checkpointed with the cycle.
        self.extra: dict[str, Any] = {}
        self.replay = Replay(checkpointer.load() if checkpointer is not None else None)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (the last partial batch counts)."""
        return num_batches(len(self.data.train_y), self.settings.batch_size)

    @property
    def cost(self) -> Cost:
        """Training compute spent so far, all cycles of the run included."""
        return self.meter.cost

    @property
    def replaying(self) -> bool:
        """True while a resumed run re-executes its method up to the interrupted cycle.

        Methods skip state changes (pruning, rewinding, loading) while
        replaying, up to and including those just before the interrupted cycle
        starts: its checkpoint restores all of that state when it starts.
        """
        return self.replay.active(self.cycle_index)

    # ------------------------------------------------------------ masks

    def set_masks(self, masks: Masks) -> None:
        """Install new masks: pruned weights and their optimizer state become 0, FLOPs are recounted."""
        self._install_masks(masks, self.optimizer, "the masks after a mask update")
        fault_point("mask")

    def remove_channels(self, groups: Sequence[Group], removal: Removal) -> None:
        """Cut the ``removal``'s channels out of the model for real (weights, gradients, optimizer
        state, BatchNorm statistics); the masks become those of the smaller layers, all kept.

        The cut is recorded in :attr:`extra`, so a checkpoint rebuilds the smaller network.
        """
        if self.world.distributed:
            raise UserError("prune.structure=channel does not run under torchrun yet; train on one process")
        remove_channels(self.model, groups, removal, self.optimizer)
        self.extra.setdefault(CHANNEL_CUTS, []).append({root: list(cs) for root, cs in removal.items()})
        self._smaller_masker()

    def _smaller_masker(self) -> None:
        """A masker (all kept) over the model's prunable weights as they are now."""
        self.masker = Masker({name: self.model.get_parameter(name) for name in self.masker.params})
        self.history = MaskHistory(self.masker.masks)  # connections are gone, not pruned: no ITOP
        self._install_masks(self.masker.masks, None, "the masks after channels were removed")

    def _rebuild(self, checkpoint: Mapping[str, Any]) -> None:
        """Cut the channels a checkpoint's network had lost (the cuts not made yet, in order)."""
        done = self.extra.get(CHANNEL_CUTS, [])
        cuts = checkpoint["extra"].get(CHANNEL_CUTS, [])
        if cuts[: len(done)] != done:
            raise RuntimeError("the checkpoint's network is not a continuation of this one")
        replay_cuts(self.model, cuts[len(done):], self.data.train_x[:1])
        if len(cuts) > len(done):
            self.extra[CHANNEL_CUTS] = [dict(c) for c in cuts]
            self._smaller_masker()

    def agree_on_masks(self, what: str = "the final masks") -> list[str]:
        """Every rank's sha256 of its masks, in rank order; raises if the ranks' masks differ.

        Single-process: nothing is computed (an empty list).
        """
        if self.world.distributed:
            self.mask_digests = self.world.agree(masks_digest(self.masker.masks), what)
        return self.mask_digests

    def _install_masks(self, masks: Masks, optimizer: torch.optim.Optimizer | None, what: str) -> None:
        self.masker.set_masks(masks, optimizer)
        self.meter.masks_changed(self.masker.masks)
        self.history.installed(self.masker.masks)
        self.agree_on_masks(what)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Loss and accuracy of the model on (x, y), at the training precision (identical on every rank)."""
        return evaluate(self.model, x, y, self.settings.eval_batch_size, self.settings.precision)

    # ------------------------------------------------------------ the cycle

    def run_cycle(
        self,
        name: str,
        epochs: int,
        hook: StepHook[Trainer] | None = None,
        select_kept: int | None = None,
        optim: OptimSettings | None = None,
        patience: int = 0,
        min_delta: float = 0.0,
        start_step: int = 0,
    ) -> CycleResult:
        """Train ``epochs`` epochs with a fresh optimizer and a full run of the LR schedule.

        ``start_step`` > 0: the cycle starts at that step (late rewinding), with the
        learning rate and the data order the schedule has there, and trains the rest.

        ``select_kept``: only epochs whose masks keep exactly this many weights
        compete for the validation-selected state (None: every epoch).
        ``optim`` replaces the optimizer settings for this cycle (fine-tuning).
        ``patience`` > 0: stop once validation accuracy has not improved by
        more than ``min_delta`` for ``patience`` epochs, and continue from the
        best validation epoch's weights (``epochs`` is then the maximum).
        """
        cycle = _Cycle(name, self.cycle_index, epochs, optim or self.settings.optim, hook, start_step)
        self.cycle_index += 1
        result = CycleResult()
        if self.replay.skips(cycle.index):
            self.optimizer = build_optimizer(self.model.parameters(), cycle.optim)
            return result  # finished before the interruption; a later checkpoint restores the state
        checkpoint = self.replay.take(cycle.index)
        if checkpoint is not None:
            self._rebuild(checkpoint)  # the network the checkpoint's weights belong to
        self.optimizer = build_optimizer(self.model.parameters(), cycle.optim)
        start_epoch = (self._restore(checkpoint, hook, result) if checkpoint is not None
                       else start_step // self.steps_per_epoch)
        started = time.perf_counter()
        for epoch in range(start_epoch, epochs):
            if patience_exhausted(result, epoch, patience):
                break
            record = self._train_epoch(cycle, epoch)
            now = time.perf_counter()
            self.meter.count_wall(now - started)
            started = now
            select(result, record, epoch, self.model, select_kept, min_delta)
            result.history.append(record)
            self.log(record)
            self._epoch_line(cycle, record)
            self._checkpoint(cycle, epoch + 1, result)
        if patience and result.selection.state is not None:
            self.model.load_state_dict(result.selection.state)
        return result

    def _train_epoch(self, cycle: _Cycle, epoch: int) -> dict[str, Any]:
        """Train one epoch (0-based) of ``cycle`` and validate; the epoch's metrics record."""
        assert self.optimizer is not None
        opt, s, steps_per_epoch = self.optimizer, self.settings, self.steps_per_epoch
        self.model.train()
        # Each step's loss stays on the device (no sync per step); checked for divergence once per epoch.
        tally = EpochTally(steps_per_epoch, self.data.train_x.device)
        bar = self._batches(cycle, epoch)
        skip = max(0, cycle.start_step - epoch * steps_per_epoch)  # a cycle that starts mid-epoch
        for i, batch in enumerate(bar):
            if i < skip:
                continue
            fault_point("step")
            step = epoch * steps_per_epoch + i
            hook = cycle.hook
            if hook is not None:
                hook.before_step(step, self)
            set_lr(opt, lr_at(step, steps_per_epoch, cycle.epochs, cycle.optim))
            # The global batch: its cost is counted, whatever share of it this process trained.
            self.meter.count_step(len(batch[1]))
            self.history.stepped()  # the masks in force now are those of this step's forward pass
            tally.add(i, *train_step(self._step_model, opt, self.masker, self.world, batch, s.precision,
                                     s.label_smoothing, None if hook is None else partial(hook.after_backward, step, self),
                                     s.bn_l1))
        bar.close()
        check_finite(tally.losses, self.model, epoch, steps_per_epoch)
        self.masker.apply_to_weights()  # guard only; a no-op for SGD, Adam and AdamW (see Masker)
        train_loss, train_acc = tally.means(self.world)
        if self.world.distributed:
            # BatchNorm statistics as rank 0's on every rank, so that validation,
            # checkpoints and the next masks are the same everywhere.
            self.world.sync_buffers(self.model)
        self.meter.count_epoch(steps_per_epoch - skip, steps_per_epoch)
        val_loss, val_acc = self.evaluate(self.data.val_x, self.data.val_y)
        check_validation(val_loss, epoch, steps_per_epoch)
        masks = self.masker.masks
        return {
            "cycle": cycle.index, "phase": cycle.name, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
            "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
            "kept": count_kept(masks), "mask_sparsity": 1.0 - count_kept(masks) / self.dense_total,
            "train_flops": self.cost.train_flops,  # so far, reused runs' included: the trackers plot cost
        }

    def _epoch_line(self, cycle: _Cycle, record: Mapping[str, Any]) -> None:
        """Where no progress bar can be drawn (under nohup, CI, a notebook: stderr is no terminal) and
        none was turned off, one line per epoch on stderr instead."""
        if self.progress is not None or sys.stderr.isatty() or not self.world.is_main:
            return
        print(f"prunelab: {cycle.name} epoch {record['epoch']}/{cycle.epochs}: train loss "
              f"{record['train_loss']:.4f}, val acc {record['val_acc']:.4f}, sparsity {record['mask_sparsity']:.4f}, "
              f"lr {record['lr']:.3g}", file=sys.stderr, flush=True)

    def _batches(self, cycle: _Cycle, epoch: int) -> tqdm[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's global batches (the same on every rank), behind a progress bar."""
        s = self.settings
        generator = torch.Generator().manual_seed(derive_seed(self.seed, cycle.index, epoch))
        batches = train_batches(self.data.train_x, self.data.train_y, s.batch_size, generator, s.augment)
        return tqdm(batches, total=self.steps_per_epoch, desc=f"{cycle.name} {epoch + 1}/{cycle.epochs}",
                    leave=False, disable=None if self.progress is None else not self.progress,  # None: only on a TTY
                    unit="batch", dynamic_ncols=True)

    # ------------------------------------------------------------ checkpoints

    def _checkpoint(self, cycle: _Cycle, epochs_done: int, result: CycleResult) -> None:
        if self.checkpointer is None:
            return
        assert self.optimizer is not None
        self.checkpointer.save(cycle_checkpoint(
            cycle=cycle.index, epochs_done=epochs_done, model=self.model, optimizer=self.optimizer,
            masks=self.masker.masks, hook=cycle.hook, cost=self.cost, result=result, extra=self.extra,
            mask_history=self.history,
        ))

    def _restore(self, state: dict[str, Any], hook: StepHook[Trainer] | None, result: CycleResult) -> int:
        assert self.optimizer is not None
        self.model.load_state_dict(state["model"])
        self._install_masks(state["masks"], None, "the masks of the checkpoint resumed from")
        return restore_cycle(state, self.optimizer, hook, self.meter, result, self.extra, self.history)
