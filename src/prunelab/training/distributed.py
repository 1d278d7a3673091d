"""Data-parallel training of ONE run over the processes ``torchrun`` starts.

Every torch.distributed call of prunelab lives here. The design keeps a
distributed run's result meaningful:

- every rank draws the same global batch (the per-epoch generator is seeded
  by (seed, cycle, epoch) alone) and trains on its contiguous shard of it, so
  DistributedDataParallel's gradient average is the single-process step on
  the global batch (up to the order of float additions; BatchNorm
  normalises each shard by its own statistics, and its running statistics
  are rank 0's);
- weights, buffers and masks are identical on every rank, so every rank
  computes the same masks; :meth:`World.agree` checks that by comparing
  digests and raises when ranks disagree;
- only rank 0 writes (the store, checkpoints, metrics, results); the other
  ranks read the checkpoints rank 0 wrote, after a barrier.

Outside ``torchrun`` (or with one process) :data:`SINGLE` stands for the
world, and every method of it returns at once.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from prunelab.errors import UserError
from prunelab.training.protocols import Checkpointer


class RanksDisagree(RuntimeError):
    """The processes of a distributed run are no longer in step (their masks or resume points differ)."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes that train one run together."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collective tensors live (CUDA for NCCL)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and prints results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains the run."""
        return self.size > 1

    # ------------------------------------------------------------ batches

    def check_batching(self, n_train: int, batch_size: int) -> None:
        """Raise one sentence unless every global batch splits into a non-empty shard per rank."""
        if not self.distributed:
            return
        if batch_size % self.size:
            raise UserError(
                f"train.batch_size ({batch_size}) must be divisible by the number of processes ({self.size}), "
                "so that every process trains on an equal share of each batch"
            )
        last = n_train % batch_size
        if 0 < last < self.size:
            raise UserError(
                f"the last batch of an epoch has {last} training images, fewer than the {self.size} processes; "
                "change train.batch_size or data.val_size"
            )

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's contiguous share of a global batch, and the factor its mean loss is scaled by.

        Shares differ by at most one sample (only the last batch of an epoch can
        be uneven). DDP averages the ranks' gradients, so scaling the mean loss
        of a share of ``k`` of ``n`` samples by ``k * size / n`` makes the step
        that of the global batch's mean loss; the factor is exactly 1.0 for
        equal shares.
        """
        if not self.distributed:
            return x, y, 1.0
        n = len(y)
        start, stop = n * self.rank // self.size, n * (self.rank + 1) // self.size
        return x[start:stop], y[start:stop], (stop - start) * self.size / n

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` as the training step calls it: wrapped in DistributedDataParallel when distributed.

        The wrapper shares ``model``'s parameters; everything else (state
        dicts, masks, evaluation, scoring) keeps using ``model`` itself.
        Gradients computed outside the wrapper's forward (pruning criteria)
        are not averaged, which is right: every rank scores on the same data.
        """
        if not self.distributed:
            return model
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    # ------------------------------------------------------------ collectives

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``values`` over the ranks (float64, on ``values``'s device)."""
        if not self.distributed:
            return values
        total = values.to(self.device, torch.float64)
        dist.all_reduce(total)
        return total.to(values.device)

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics drift apart per shard)."""
        if not self.distributed:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            dist.barrier()

    def gather_digests(self, digest: str) -> list[str]:
        """Every rank's sha256 hex digest, in rank order."""
        if not self.distributed:
            return [digest]
        mine = torch.frombuffer(bytearray.fromhex(digest), dtype=torch.uint8).to(self.device)
        every = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine)
        return [t.cpu().numpy().tobytes().hex() for t in every]

    def agree(self, digest: str, what: str) -> list[str]:
        """Every rank's ``digest`` of ``what``; raises :class:`RanksDisagree` unless they are all equal."""
        digests = self.gather_digests(digest)
        if len(set(digests)) > 1:
            short = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
            raise RanksDisagree(f"the processes disagree on {what} ({short}); the distributed run is not in step")
        return digests

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (JSON data) on every rank; the other ranks' ``obj`` is ignored."""
        if not self.distributed:
            return obj
        payload = json.dumps(obj, sort_keys=True).encode() if self.is_main else b""
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=0)
        data = torch.zeros(int(size), dtype=torch.uint8, device=self.device)
        if self.is_main:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(data, src=0)
        return obj if self.is_main else json.loads(data.cpu().numpy().tobytes().decode())

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. downloading a dataset), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


SINGLE = World()


def masks_digest(masks: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex of a mask set (names, shapes and kept positions; not memory layout or device)."""
    h = hashlib.sha256()
    for name, mask in masks.items():
        h.update(f"{name}:{tuple(mask.shape)}\n".encode())
        h.update(mask.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()


class SharedCheckpointer:
    """A run folder's checkpoints shared by the ranks: rank 0 writes, every rank reads the same one.

    A barrier follows every save, so no rank runs ahead of a checkpoint rank 0
    has not finished; rank 0 loads first (setting damaged files aside), then
    the others load what it found.
    """

    def __init__(self, inner: Checkpointer, world: World) -> None:
        """``inner``: the run folder's own checkpointer, which rank 0 alone writes through."""
        self.inner = inner
        self.world = world

    def save(self, state: dict[str, Any]) -> None:
        """Rank 0 saves ``state``; every rank waits until it has."""
        if self.world.is_main:
            self.inner.save(state)
        self.world.barrier()

    def load(self) -> dict[str, Any] | None:
        """The checkpoint rank 0 finds, on every rank; raises :class:`RanksDisagree` if a rank found another."""
        with self.world.main_first():
            state = self.inner.load()
        where = "none" if state is None else f"{state['cycle']}/{state['epoch']}"
        self.world.agree(hashlib.sha256(where.encode()).hexdigest(), f"the checkpoint to resume from ({where})")
        return state


# ---------------------------------------------------------------- the process group


def launched() -> bool:
    """True when this process is one of several started by torchrun (or a launcher that sets the same variables).

    torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; one process
    (``--nproc_per_node 1`` on one node) runs as a plain single-process run.
    """
    return dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def current() -> World:
    """This process's world: from the initialised process group, else :data:`SINGLE`."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", local_rank) if nccl else torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


@contextmanager
def session(device: str) -> Iterator[World]:
    """Join the process group torchrun describes for the block (NCCL for CUDA, else gloo); a no-op otherwise.

    ``device`` is the ``--device`` choice: with CUDA each process uses GPU
    ``LOCAL_RANK``. A group the caller initialised already is used as it is.
    """
    if not launched() or dist.is_initialized():
        yield current()
        return
    gpu = None
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is available")
        gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(gpu)
    dist.init_process_group("nccl" if gpu is not None else "gloo", device_id=gpu)
    try:
        yield current()
        # Leave together: a rank that tears its group down while another still talks to it can make
        # that one fail at exit, and torchrun then reports a failure although the run was stored.
        dist.barrier()
    finally:
        # DistributedDataParallel wrappers live in reference cycles: collect them while the group is
        # alive, or their reducers are torn down at interpreter exit, which now and then aborts.
        gc.collect()
        dist.destroy_process_group()
