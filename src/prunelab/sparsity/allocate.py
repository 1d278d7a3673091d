"""Turning scores into masks with exact counts.

Every allocation keeps exactly ``round(density * n)`` weights (layerwise and
ERK: per layer, with the rounding remainders distributed so the total is exact too).
Ties are broken deterministically: among equal scores the weight with the
lower flat index (parameters in model order) is kept. With ``current`` masks
the update is monotone: only weights still active compete, so a pruned weight
never returns. Scores are compared in float32, or in float64 when given as
float64 (SynFlow's scores span more than float32's range).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from prunelab.registry import Registry
from prunelab.sparsity.mask import Masks
from prunelab.sparsity.structure import NM, UNSTRUCTURED, nm_top, parse_structure


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
    threshold = torch.kthvalue(_compare_dtype(flat).cpu(), n - k + 1).values.to(flat.device)
    keep = flat > threshold
    missing = k - int(keep.sum())
    tied = torch.nonzero(flat == threshold).reshape(-1)[:missing]
    keep[tied] = True
    return keep.reshape(scores.shape)


def _compare_dtype(scores: torch.Tensor) -> torch.Tensor:
    """Scores in the dtype they are ranked in: float64 stays float64, anything else float32."""
    return scores if scores.dtype == torch.float64 else scores.float()


def _competing(scores: Mapping[str, torch.Tensor], current: Masks | None) -> dict[str, torch.Tensor]:
    """Scores as float with NaN and (when monotone) inactive weights set to -inf."""
    out = {}
    for name, s in scores.items():
        s = torch.nan_to_num(_compare_dtype(s.detach()), nan=-math.inf)
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


def layer_counts(
    sizes: Mapping[str, int],
    densities: Mapping[str, float],
    total_keep: int,
    caps: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Integer keep counts near ``density * size`` per layer that add up to ``total_keep``.

    Largest-remainder rounding: floor every layer, then give the leftover
    weights to the layers with the largest fractional parts (ties to model order).
    ``caps`` (default: the sizes) bounds each count, e.g. by the weights still
    active; what a capped layer cannot take goes to the others, in the same
    order, so the total stays exact as long as the caps allow it.
    """
    limit = {n: sizes[n] if caps is None else min(sizes[n], caps[n]) for n in sizes}
    exact = {n: densities[n] * sizes[n] for n in sizes}
    counts = {n: min(limit[n], math.floor(v)) for n, v in exact.items()}
    position = {n: i for i, n in enumerate(sizes)}
    order = sorted(sizes, key=lambda n: (-(exact[n] - counts[n]), position[n]))
    leftover = total_keep - sum(counts.values())
    # Usually one pass of +1 suffices; caps can leave more to hand out, so repeat.
    while leftover > 0:
        open_layers = [n for n in order if counts[n] < limit[n]][:leftover]
        if not open_layers:
            break
        for n in open_layers:
            counts[n] += 1
        leftover -= len(open_layers)
    return counts


def _per_layer_masks(
    scores: Mapping[str, torch.Tensor],
    densities: Mapping[str, float],
    total_keep: int,
    current: Masks | None,
) -> Masks:
    """Top scores of each tensor; counts from :func:`layer_counts`, capped at the active weights."""
    sizes = {n: s.numel() for n, s in scores.items()}
    active = _active_counts(scores, current)
    counts = layer_counts(sizes, densities, total_keep, caps=active)
    competing = _competing(scores, current)
    return {n: top_k_mask(competing[n], counts[n]) for n in scores}


def layerwise_masks(
    scores: Mapping[str, torch.Tensor],
    density: float | Mapping[str, float],
    current: Masks | None = None,
) -> Masks:
    """Keep the top scores of each tensor separately, at one density or one per layer."""
    sizes = {n: s.numel() for n, s in scores.items()}
    if isinstance(density, Mapping):
        densities = dict(density)
        total_keep = round(sum(densities[n] * sizes[n] for n in sizes))
    else:
        densities = {n: density for n in scores}
        total_keep = round(density * sum(sizes.values()))
    return _per_layer_masks(scores, densities, total_keep, current)


def erk_densities(shapes: Mapping[str, torch.Size], density: float) -> dict[str, float]:
    """Per-layer densities of the Erdos-Renyi-Kernel allocation (Evci et al. 2020).

    A layer of shape (d1, ..., dk) gets density ``factor * (d1 + ... + dk) / (d1 * ... * dk)``
    (kernel dims included for convs), with one ``factor`` for all layers so that
    the kept weights add up to ``density`` of the total. A layer whose density
    would exceed 1 is made dense and the factor is solved again over the rest,
    until no layer exceeds 1. Making every exceeding layer dense at once is
    the same as one at a time: dropping such a layer only raises the factor.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    sizes = {n: math.prod(shape) for n, shape in shapes.items()}
    raw = {n: sum(shape) / sizes[n] if sizes[n] else 0.0 for n, shape in shapes.items()}
    target = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        rest = [n for n in shapes if n not in dense]
        budget = target - sum(sizes[n] for n in dense)
        weight = sum(raw[n] * sizes[n] for n in rest)
        factor = budget / weight if weight > 0 else 0.0
        over = {n for n in rest if factor * raw[n] > 1.0}
        if not over:
            return {n: 1.0 if n in dense else factor * raw[n] for n in shapes}
        dense |= over


def erk_masks(
    scores: Mapping[str, torch.Tensor], density: float, current: Masks | None = None
) -> Masks:
    """Top scores of each tensor at its ERK density; exactly ``round(density * n)`` kept in all."""
    densities = erk_densities({n: s.shape for n, s in scores.items()}, density)
    total_keep = round(density * sum(s.numel() for s in scores.values()))
    return _per_layer_masks(scores, densities, total_keep, current)


Allocator = Callable[[Mapping[str, torch.Tensor], float, "Masks | None"], Masks]

#: The allocations by name: the config's ``prune.allocation`` and the API's ``scope``.
ALLOCATORS: Registry[Allocator] = Registry("allocation")
ALLOCATORS.register("global", "one ranking over all layers")(global_masks)
ALLOCATORS.register("layerwise", "the same density in every layer")(layerwise_masks)
ALLOCATORS.register("erk", "Erdős-Rényi-Kernel layer densities")(erk_masks)
ALLOCATIONS = tuple(ALLOCATORS.names())


def allocate(
    scores: Mapping[str, torch.Tensor],
    density: float,
    scheme: str,
    current: Masks | None = None,
    structure: str = UNSTRUCTURED,
) -> Masks:
    """Masks keeping ``density`` of the weights, allocated by ``scheme`` (one of ALLOCATIONS).

    ``structure`` ``"N:M"``: see :func:`nm_masks`.
    """
    allocator = ALLOCATORS.get(scheme)
    nm = parse_structure(structure)
    return allocator(scores, density, current) if nm is None else nm_masks(allocator, scores, density, current, nm)


def nm_masks(
    allocator: Allocator, scores: Mapping[str, torch.Tensor], density: float, current: Masks | None, nm: NM
) -> Masks:
    """Masks at ``density`` (at least N/M) whose every group of M input weights keeps its top N.

    At ``density == N/M`` these are the N:M masks, whatever the allocation.
    Above it (the intermediate steps of a ramp or an iterative schedule), the
    top N of every group are kept first and ``allocator`` adds the other
    weights, so each later, sparser mask can still be N:M. With ``current``
    masks, the top N are taken among the weights still active.
    """
    competing = _competing(scores, current)
    top = {n: nm_top(s, nm) if current is None else nm_top(s, nm) & current[n] for n, s in competing.items()}
    total = sum(s.numel() for s in competing.values())
    k, floor = round(density * total), total * nm.n // nm.m
    if k < floor:
        raise ValueError(f"density {density} is below the {nm.density} that structure {nm} keeps")
    if k == floor:
        return {n: t.to(scores[n].device) for n, t in top.items()}
    boosted = {n: torch.where(top[n], math.inf, s) for n, s in competing.items()}
    return allocator(boosted, density, current)
