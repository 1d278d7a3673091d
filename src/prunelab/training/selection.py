"""Validation-based selection within a cycle: the best eligible epoch's state, and early stopping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


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


def select(
    result: CycleResult,
    record: dict[str, Any],
    epoch: int,
    model: nn.Module,
    select_kept: int | None,
    min_delta: float,
) -> None:
    """Let the epoch ``record`` (0-based ``epoch``) compete for the cycle's selection and its early stopping.

    Only epochs that keep at most ``select_kept`` weights compete, that is
    epochs at the target (None: every epoch); masks stop exactly at it, and a
    network whose channels were removed stops at most one channel below it,
    so every competing epoch has the final network's shape. Never one whose
    validation accuracy is NaN (an empty validation split). ``model``'s state
    is copied when the epoch wins.
    """
    val = record["val_acc"]
    if select_kept is not None and record["kept"] > select_kept or val != val:  # val != val: NaN
        return
    selection = result.selection
    if val > selection.val_acc + min_delta:
        result.improved_epoch = epoch + 1
    if val > selection.val_acc:
        selection.val_acc, selection.epoch = val, epoch + 1
        selection.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def patience_exhausted(result: CycleResult, epoch: int, patience: int) -> bool:
    """True when early stopping ends the cycle before ``epoch`` (0-based): ``patience`` epochs without improvement.

    ``patience`` 0 never stops; neither does a cycle that has not improved once yet.
    """
    return bool(patience) and result.improved_epoch > 0 and epoch - result.improved_epoch >= patience
