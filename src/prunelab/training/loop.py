"""The training engine: one cycle of the learning-rate schedule with masks, hooks and checkpoints.

Every method trains through :meth:`Trainer.run_cycle`, so masking, cost
counting, validation and checkpointing behave identically for all of them.
A cycle checkpoints after every epoch; a run restarted with the same program
fast-forwards through finished cycles and resumes the interrupted one, ending
bit-identical on CPU (the data order of an epoch is a pure function of
(seed, cycle index, epoch) and every RNG state is saved). Under torchrun the
same loop trains one run on several processes, each on its share of every
batch (:mod:`prunelab.training.distributed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from prunelab.data import Augment, DataSplits, eval_batches, num_batches, train_batches
from prunelab.errors import Diverged
from prunelab.faults import fault_point
from prunelab.sparsity.mask import Masker, Masks, layer_densities
from prunelab.training.cost import dense_train_step_flops, train_step_flops
from prunelab.training.distributed import SINGLE, SharedCheckpointer, World, masks_digest
from prunelab.training.optim import OptimSettings, build_optimizer, lr_at, set_lr

# Arithmetic of the forward pass and the loss: "bf16" runs them under bfloat16 autocast.
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs from the training config."""

    batch_size: int
    label_smoothing: float
    optim: OptimSettings
    augment: Augment = Augment()
    eval_batch_size: int = 1000
    precision: str = "fp32"


@dataclass
class Cost:
    """Training compute spent so far (all cycles of a run)."""

    epochs: float = 0.0
    steps: int = 0
    wall_s: float = 0.0
    train_flops: float = 0.0
    dense_train_flops: float = 0.0


@dataclass
class Selection:
    """The validation-selected state of a cycle: best validation accuracy among eligible epochs."""

    val_acc: float = -1.0
    epoch: int = -1
    state: dict[str, torch.Tensor] | None = None


@dataclass
class CycleResult:
    """What a finished cycle hands back to its method."""

    history: list[dict[str, Any]] = field(default_factory=list)
    selection: Selection = field(default_factory=Selection)
    improved_epoch: int = -1  # last epoch (1-based) that beat the best validation accuracy by min_delta


class Checkpointer(Protocol):
    """Where a run's checkpoints live (the store implements it; training knows nothing of the store)."""

    def save(self, state: dict[str, Any]) -> None: ...

    def load(self) -> dict[str, Any] | None: ...


class StepHook(Protocol):
    """Called before every optimizer step of a cycle (progressive pruning is one)."""

    def before_step(self, step: int, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def epoch_seed(seed: int, cycle: int, epoch: int) -> int:
    """Seed of one epoch's data order and augmentation, stable across processes."""
    digest = hashlib.sha256(f"prunelab/{seed}/{cycle}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """The context the forward pass and loss run in: bfloat16 autocast for "bf16" (CPU or CUDA)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000, precision: str = "fp32"
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (x, y); (nan, nan) on an empty split."""
    if len(y) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for xb, yb in eval_batches(x, y, batch_size):
        with autocast(x.device, precision):
            out = model(xb)
        loss += F.cross_entropy(out.float(), yb, reduction="sum")
        correct += (out.argmax(1) == yb).sum()
    model.train(was_training)
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
        self.layer_flops = dict(layer_flops)
        self.seed = seed
        self.checkpointer = checkpointer
        self.log = log or (lambda record: None)
        self.progress = progress
        self.cost = Cost()
        self.mask_digests: list[str] = []  # per rank, from the last check of a distributed run
        self.optimizer: torch.optim.Optimizer | None = None
        self.cycle_index = 0
        # Method state that must survive an interruption (rewind points); checkpointed with the cycle.
        self.extra: dict[str, Any] = {}
        self._resume = checkpointer.load() if checkpointer is not None else None
        self._step_flops = 0.0
        self._dense_step_flops = dense_train_step_flops(self.layer_flops, 1)
        self._refresh_step_flops()

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (the last partial batch counts)."""
        return num_batches(len(self.data.train_y), self.settings.batch_size)

    # ------------------------------------------------------------ masks

    def set_masks(self, masks: Masks) -> None:
        """Install new masks: pruned weights and their optimizer state become 0, FLOPs are recounted."""
        self.masker.set_masks(masks, self.optimizer)
        self._refresh_step_flops()
        self.agree_on_masks("the masks after a mask update")
        fault_point("mask")

    def agree_on_masks(self, what: str = "the final masks") -> list[str]:
        """Every rank's sha256 of its masks, in rank order; raises if the ranks' masks differ.

        Single-process: nothing is computed (an empty list).
        """
        if self.world.distributed:
            self.mask_digests = self.world.agree(masks_digest(self.masker.masks), what)
        return self.mask_digests

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Loss and accuracy of the model on (x, y), at the training precision (identical on every rank)."""
        return evaluate(self.model, x, y, self.settings.eval_batch_size, self.settings.precision)

    def _refresh_step_flops(self) -> None:
        self._step_flops = train_step_flops(self.layer_flops, layer_densities(self.masker.masks), 1)

    # ------------------------------------------------------------ the cycle

    @property
    def replaying(self) -> bool:
        """True while a resumed run re-executes its method up to the interrupted cycle.

        Methods skip state changes (pruning, rewinding, loading) while
        replaying, up to and including those just before the interrupted cycle
        starts: its checkpoint restores all of that state when it starts.
        """
        return self._resume is not None and self._resume["cycle"] >= self.cycle_index

    def run_cycle(
        self,
        name: str,
        epochs: int,
        hook: StepHook | None = None,
        select_kept: int | None = None,
        optim: OptimSettings | None = None,
        patience: int = 0,
        min_delta: float = 0.0,
    ) -> CycleResult:
        """Train ``epochs`` epochs with a fresh optimizer and a full run of the LR schedule.

        ``select_kept``: only epochs whose masks keep exactly this many weights
        compete for the validation-selected state (None: every epoch).
        ``optim`` replaces the optimizer settings for this cycle (fine-tuning).
        ``patience`` > 0: stop once validation accuracy has not improved by
        more than ``min_delta`` for ``patience`` epochs, and continue from the
        best validation epoch's weights (``epochs`` is then the maximum).
        """
        index = self.cycle_index
        self.cycle_index += 1
        optim = optim or self.settings.optim
        self.optimizer = build_optimizer(self.model.parameters(), optim)
        result, start_epoch = CycleResult(), 0
        resume = self._resume
        if resume is not None and resume["cycle"] > index:
            return result  # finished before the interruption; a later checkpoint restores the state
        if resume is not None and resume["cycle"] == index:
            start_epoch = self._restore(resume, hook, result)
            self._resume = None
        started = time.perf_counter()
        for epoch in range(start_epoch, epochs):
            if patience and result.improved_epoch > 0 and epoch - result.improved_epoch >= patience:
                break
            record = self._train_epoch(name, index, epoch, epochs, optim, hook)
            self.cost.wall_s += time.perf_counter() - started
            started = time.perf_counter()
            self._select(result, record, epoch, select_kept, min_delta)
            result.history.append(record)
            self.log(record)
            self._checkpoint(index, epoch + 1, hook, result)
        if patience and result.selection.state is not None:
            self.model.load_state_dict(result.selection.state)
        return result

    def _train_epoch(
        self, name: str, index: int, epoch: int, epochs: int, optim: OptimSettings, hook: StepHook | None
    ) -> dict[str, Any]:
        assert self.optimizer is not None
        model, masker, opt, s = self.model, self.masker, self.optimizer, self.settings
        steps_per_epoch = self.steps_per_epoch
        model.train()
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, index, epoch))
        batches = train_batches(self.data.train_x, self.data.train_y, s.batch_size, generator, s.augment)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"{name} {epoch + 1}/{epochs}", leave=False,
                   disable=None if self.progress is None else not self.progress,  # None: only on a TTY
                   unit="batch", dynamic_ncols=True)
        device = self.data.train_x.device
        world = self.world
        # Each step's loss goes into one tensor (no sync per step); checked for divergence once per epoch.
        losses = torch.zeros(steps_per_epoch, device=device)
        sizes = torch.zeros(steps_per_epoch, device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for i, (x, y) in enumerate(bar):
            fault_point("step")
            step = epoch * steps_per_epoch + i
            if hook is not None:
                hook.before_step(step, self)
            set_lr(opt, lr_at(step, steps_per_epoch, epochs, optim))
            n = len(y)  # the global batch: its cost is counted, whatever share of it this process trains
            x, y, scale = world.shard(x, y)
            with autocast(device, s.precision):
                out = self._step_model(x)
                loss = F.cross_entropy(out, y, label_smoothing=s.label_smoothing)
            opt.zero_grad(set_to_none=True)
            (loss if scale == 1.0 else loss * scale).backward()
            masker.apply_to_grads()
            opt.step()  # pruned weights stay exactly 0: see Masker
            losses[i] = loss.detach()
            sizes[i] = len(y)
            correct += (out.detach().argmax(1) == y).sum()
            seen += len(y)
            self.cost.train_flops += self._step_flops * n
            self.cost.dense_train_flops += self._dense_step_flops * n
        bar.close()
        check_finite(losses, model, epoch, steps_per_epoch)
        loss_sum = (losses * sizes).sum()
        masker.apply_to_weights()  # guard only; a no-op for SGD, Adam and AdamW (see Masker)
        if world.distributed:
            # Training figures over the global batches; BatchNorm statistics as rank 0's on every rank,
            # so that validation, checkpoints and the next masks are the same everywhere.
            totals = world.sum(torch.tensor([float(loss_sum), float(correct), float(seen)], dtype=torch.float64))
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2])
            world.sync_buffers(model)
        self.cost.steps += steps_per_epoch
        self.cost.epochs += 1
        val_loss, val_acc = self.evaluate(self.data.val_x, self.data.val_y)
        if not math.isfinite(val_loss):
            raise Diverged(
                f"training diverged: the validation loss after epoch {epoch + 1} is {val_loss} "
                "(the weights overflowed); lower the learning rate", epoch + 1, (epoch + 1) * steps_per_epoch
            )
        kept = sum(int(m.sum()) for m in masker.masks.values())
        total = sum(m.numel() for m in masker.masks.values())
        return {
            "cycle": index, "phase": name, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
            "train_loss": float(loss_sum) / seen, "train_acc": int(correct) / seen,
            "val_loss": val_loss, "val_acc": val_acc, "kept": kept, "sparsity": 1 - kept / total,
        }

    def _select(
        self, result: CycleResult, record: dict[str, Any], epoch: int, select_kept: int | None, min_delta: float
    ) -> None:
        val = record["val_acc"]
        if select_kept is not None and record["kept"] != select_kept or val != val:  # val != val: NaN
            return
        selection = result.selection
        if val > selection.val_acc + min_delta:
            result.improved_epoch = epoch + 1
        if val > selection.val_acc:
            selection.val_acc, selection.epoch = val, epoch + 1
            selection.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------ checkpoints

    def _checkpoint(self, index: int, epochs_done: int, hook: StepHook | None, result: CycleResult) -> None:
        if self.checkpointer is None:
            return
        assert self.optimizer is not None
        self.checkpointer.save({
            "cycle": index,
            "epoch": epochs_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "masks": dict(self.masker.masks),
            "hook": hook.state_dict() if hook is not None else {},
            "cost": asdict(self.cost),
            "rng": rng_state(),
            "history": result.history,
            "selection": asdict(result.selection),
            "improved_epoch": result.improved_epoch,
            "extra": dict(self.extra),
        })

    def _restore(self, state: dict[str, Any], hook: StepHook | None, result: CycleResult) -> int:
        assert self.optimizer is not None
        self.model.load_state_dict(state["model"])
        self.masker.set_masks(state["masks"])
        self._refresh_step_flops()
        self.agree_on_masks("the masks of the checkpoint resumed from")
        self.optimizer.load_state_dict(state["optimizer"])
        if hook is not None:
            hook.load_state_dict(state["hook"])
        self.cost = Cost(**state["cost"])
        set_rng_state(state["rng"])
        result.history.extend(state["history"])
        result.selection = Selection(**state["selection"])
        result.improved_epoch = int(state["improved_epoch"])
        self.extra.clear()
        self.extra.update(state["extra"])
        return int(state["epoch"])
