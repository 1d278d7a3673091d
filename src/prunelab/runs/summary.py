"""What a finished run records: :class:`RunSummary`, one typed home for the summary's fields.

A summary is stored as JSON (``summary.json`` and the index row) and printed
by ``prunelab run --json`` and ``show --json`` with exactly these keys;
:meth:`RunSummary.as_dict` writes that form and :meth:`RunSummary.from_dict`
reads it back, accepting summaries stored by earlier versions (fields added
since are None there). A diverged run has no result: it stores a
:class:`DivergedSummary` instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Fields that every stored summary carries; the others may be missing in older ones.
_REQUIRED = ("run_id", "status", "method", "model", "dataset", "target_sparsity", "seed")


def whole(value: float | None) -> float | int | None:
    """A count that may be fractional (epochs: a late rewind to a step trains part of one) as an int
    when it is whole, so that JSON says 20, not 20.0."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


@dataclass(frozen=True)
class RunSummary:
    """A finished run's result, cost and provenance."""

    run_id: str
    status: str
    """``ok``."""
    method: str
    model: str
    dataset: str
    target_sparsity: float
    seed: int
    sparsity: float | None = None
    """Achieved: the fraction of the network's prunable weights (as built) that are exactly 0 in the
    stored weights or were removed with their channels."""
    channel_sparsity: float | None = None
    """prune.structure=channel only: the fraction of the output channels of the Conv and Linear layers
    (the classifier's excepted) that were removed."""
    channel_cuts: list[dict[str, list[int]]] | None = None
    """prune.structure=channel only: the channels removed, cut by cut (group root layer -> channels, numbered
    as the network was at that cut); replayed on the built model, they give the stored weights' shapes."""
    test_acc: float | None = None
    """Of the final weights."""
    test_loss: float | None = None
    val_acc: float | None = None
    """Of the final weights (the last epoch's validation)."""
    selected_epoch: int | None = None
    """The last cycle's epoch with the best validation accuracy, where the method allows selection."""
    selected_val_acc: float | None = None
    selected_test_acc: float | None = None
    """Test accuracy of the validation-selected weights (never used to select anything)."""
    epochs: float | None = None
    """Epochs trained, all cycles and reused pretraining included."""
    budget: int | None = None
    """``train.budget``, the epochs the run was allowed (None: no budget, its cycles set by train.epochs);
    ``epochs`` is what it trained, never more."""
    steps: int | None = None
    wall_s: float | None = None
    eval_s: float | None = None
    train_flops: float | None = None
    dense_train_flops: float | None = None
    """The same steps' FLOPs had every layer been dense."""
    itop_rate: float | None = None
    """In-time over-parameterisation (Liu et al. 2021): the fraction of prunable weights active in at
    least one training step (dense pretraining included): 1 when training starts dense, the density for a
    fixed mask from initialisation, more when connections move."""
    connections_moved: int | None = None
    """Connections activated after the start of training (regrown or revived); 0 for monotone pruning."""
    weights_sha256: str | None = None
    mask_sha256: str | None = None
    threads: int | None = None
    data_identity: dict[str, Any] | None = None
    collapsed_layers: list[str] = field(default_factory=list)
    """Layers the masks removed entirely."""
    reused_runs: list[str] = field(default_factory=list)
    """Stored runs this one built on (shared dense pretraining)."""
    notes: list[str] = field(default_factory=list)
    ddp: dict[str, Any] | None = None
    """Under torchrun: the world size and every rank's mask digest (absent otherwise)."""

    def as_dict(self) -> dict[str, Any]:
        """The stored and printed form: every field by name (``ddp`` only for a distributed run, the
        channel fields only for ``prune.structure=channel``)."""
        out = dataclasses.asdict(self)
        out["epochs"] = whole(self.epochs)
        for key in ("ddp", "channel_sparsity", "channel_cuts"):  # absent where they do not apply
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> RunSummary:
        """The summary as stored (keys this version does not know are ignored)."""
        missing = [k for k in _REQUIRED if k not in stored]
        if missing:
            raise ValueError(f"a run summary lacks {missing}")
        return cls(**{f.name: stored[f.name] for f in dataclasses.fields(cls) if f.name in stored})


@dataclass(frozen=True)
class DivergedSummary:
    """What a diverged run stores instead of a result: where its loss stopped being finite."""

    run_id: str
    method: str
    model: str
    dataset: str
    target_sparsity: float
    seed: int
    error: str
    epoch: int | None
    step: int | None
    data_identity: dict[str, Any] | None
    status: str = "diverged"

    def as_dict(self) -> dict[str, Any]:
        """The stored and printed form."""
        return dataclasses.asdict(self)
