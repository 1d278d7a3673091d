"""Masks read back from the store: per-layer density and overlap (IoU) of kept weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from prunelab.runs.store import MASK, Store

Mask = Mapping[str, torch.Tensor]


def load_mask(store: Store, run_id: str) -> dict[str, torch.Tensor] | None:
    """The final masks ``{param name: bool tensor}`` of a finished run (checked), or None if it stored none."""
    if not (store.root / run_id / MASK).exists():
        return None
    return store.load_masks(run_id)


def layer_densities(mask: Mask) -> dict[str, float]:
    """Fraction of weights kept in each layer, in the mask's layer order."""
    return {name: float(m.sum()) / m.numel() if m.numel() else 0.0 for name, m in mask.items()}


def mask_iou(a: Mask, b: Mask) -> float:
    """Intersection over union of the kept weights of two masks, over all their layers.

    A layer present in only one mask counts its kept weights in the union. Two
    masks that keep nothing are identical: IoU 1.
    """
    inter = union = 0
    for name in dict.fromkeys([*a, *b]):
        x, y = a.get(name), b.get(name)
        if x is None or y is None:
            union += int((x if x is not None else y).sum())
            continue
        if x.shape != y.shape:
            raise ValueError(f"layer {name} has shape {tuple(x.shape)} in one mask and {tuple(y.shape)} in the other")
        inter += int((x & y).sum())
        union += int((x | y).sum())
    return inter / union if union else 1.0


def iou_matrix(masks: Sequence[Mask]) -> list[list[float]]:
    """Symmetric matrix of :func:`mask_iou` between every pair (1 on the diagonal)."""
    n = len(masks)
    out = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            out[i][j] = out[j][i] = mask_iou(masks[i], masks[j])
    return out
