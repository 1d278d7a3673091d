"""Turning scores into masks with exact counts.

Every allocation keeps exactly ``round(density * n)`` weights (layerwise: per
layer, with the rounding remainders distributed so the total is exact too).
Ties are broken deterministically: among equal scores the weight with the
lower flat index (parameters in model order) is kept. With ``current`` masks
the update is monotone: only weights still active compete, so a pruned weight
never returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from prunelab.sparsity.mask import Masks

ALLOCATIONS = ("global", "layerwise")


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``scores`` (any shape), ties to lower index.

    Runs in linear time (kthvalue + one pass over the ties) instead of a full sort.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat.float().cpu(), n - k + 1).values.to(flat.device)
    keep = flat > threshold
    missing = k - int(keep.sum())
    tied = torch.nonzero(flat == threshold).reshape(-1)[:missing]
    keep[tied] = True
    return keep.reshape(scores.shape)


def _competing(scores: Mapping[str, torch.Tensor], current: Masks | None) -> dict[str, torch.Tensor]:
    """Scores as float with NaN and (when monotone) inactive weights set to -inf."""
    out = {}
    for name, s in scores.items():
        s = torch.nan_to_num(s.detach().float(), nan=-math.inf)
        if current is not None:
            s = torch.where(current[name], s, torch.full_like(s, -math.inf))
        out[name] = s
    return out


def _active_counts(scores: Mapping[str, torch.Tensor], current: Masks | None) -> dict[str, int]:
    if current is None:
        return {n: s.numel() for n, s in scores.items()}
    return {n: int(current[n].sum()) for n in scores}


def global_masks(scores: Mapping[str, torch.Tensor], density: float, current: Masks | None = None) -> Masks:
    """One threshold over all tensors: keep the top ``round(density * n)`` scores overall."""
    names = list(scores)
    competing = _competing(scores, current)
    total = sum(s.numel() for s in competing.values())
    k = min(round(density * total), sum(_active_counts(scores, current).values()))
    keep = top_k_mask(torch.cat([competing[n].reshape(-1).cpu() for n in names]), k)
    masks, offset = {}, 0
    for n in names:
        size = competing[n].numel()
        masks[n] = keep[offset : offset + size].reshape(competing[n].shape).to(scores[n].device)
        offset += size
    return masks


def layer_counts(sizes: Mapping[str, int], densities: Mapping[str, float], total_keep: int) -> dict[str, int]:
    """Integer keep counts near ``density * size`` per layer that add up to ``total_keep``.

    Largest-remainder rounding: floor every layer, then give the leftover
    weights to the layers with the largest fractional parts (ties to model order).
    """
    exact = {n: densities[n] * sizes[n] for n in sizes}
    counts = {n: min(sizes[n], math.floor(v)) for n, v in exact.items()}
    leftover = total_keep - sum(counts.values())
    order = sorted(sizes, key=lambda n: (-(exact[n] - counts[n]), list(sizes).index(n)))
    for n in order:
        if leftover <= 0:
            break
        if counts[n] < sizes[n]:
            counts[n] += 1
            leftover -= 1
    return counts


def layerwise_masks(
    scores: Mapping[str, torch.Tensor],
    density: float | Mapping[str, float],
    current: Masks | None = None,
) -> Masks:
    """Keep the top scores of each tensor separately, at one density or one per layer."""
    sizes = {n: s.numel() for n, s in scores.items()}
    densities = density if isinstance(density, Mapping) else {n: density for n in scores}
    total_keep = round(sum(densities[n] * sizes[n] for n in sizes))
    counts = layer_counts(sizes, densities, total_keep)
    competing = _competing(scores, current)
    active = _active_counts(scores, current)
    return {n: top_k_mask(competing[n], min(counts[n], active[n])) for n in scores}


def allocate(
    scores: Mapping[str, torch.Tensor], density: float, scheme: str, current: Masks | None = None
) -> Masks:
    """Masks keeping ``density`` of the weights, allocated by ``scheme`` ('global' or 'layerwise')."""
    if scheme == "global":
        return global_masks(scores, density, current)
    if scheme == "layerwise":
        return layerwise_masks(scores, density, current)
    raise ValueError(f"unknown allocation {scheme!r}; choose one of: {', '.join(ALLOCATIONS)}")
