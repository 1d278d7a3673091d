"""Criteria: functions from a model's prunable weights to one score per weight (higher = keep)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def magnitude(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|w|: the magnitude criterion."""
    return {name: p.detach().abs() for name, p in params.items()}
