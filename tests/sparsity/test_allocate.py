"""Allocation keeps exact counts, breaks ties deterministically and is monotone with current masks."""

from __future__ import annotations

import pytest
import torch

from prunelab.sparsity.allocate import allocate, global_masks, layer_counts, layerwise_masks, top_k_mask


def _scores(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(30, 20, generator=g), "b": torch.randn(7, 3, 3, 3, generator=g), "c": torch.randn(11, generator=g)}


def test_top_k_exact_with_ties_keeps_lower_indices() -> None:
    scores = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.5, 3.0])
    keep = top_k_mask(scores, 3)
    assert keep.tolist() == [False, True, True, True, False, False]


@pytest.mark.parametrize("k", [0, 1, 5, 99, 100])
def test_top_k_all_equal(k: int) -> None:
    keep = top_k_mask(torch.zeros(100), k)
    assert int(keep.sum()) == k
    assert keep[:k].all() and not keep[k:].any()


@pytest.mark.parametrize("density", [0.0, 0.013, 0.1, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("scheme", ["global", "layerwise"])
def test_exact_total_count(density: float, scheme: str) -> None:
    scores = _scores()
    total = sum(s.numel() for s in scores.values())
    masks = allocate(scores, density, scheme)
    assert sum(int(m.sum()) for m in masks.values()) == round(density * total)
    assert all(m.dtype == torch.bool and m.shape == scores[n].shape for n, m in masks.items())


def test_global_keeps_the_largest_scores_overall() -> None:
    scores = _scores()
    masks = global_masks({n: s.abs() for n, s in scores.items()}, 0.3)
    kept = torch.cat([s.abs()[masks[n]] for n, s in scores.items()])
    dropped = torch.cat([s.abs()[~masks[n]] for n, s in scores.items()])
    assert kept.min() >= dropped.max()


def test_layerwise_same_density_per_layer() -> None:
    scores = _scores()
    masks = layerwise_masks(scores, 0.25)
    for name, m in masks.items():
        assert abs(int(m.sum()) - 0.25 * m.numel()) < 1.0


def test_layer_counts_largest_remainder() -> None:
    counts = layer_counts({"a": 10, "b": 10, "c": 10}, {"a": 0.25, "b": 0.25, "c": 0.25}, 8)
    assert counts == {"a": 3, "b": 3, "c": 2}


@pytest.mark.parametrize("scheme", ["global", "layerwise"])
def test_monotone_update_is_subset_of_current(scheme: str) -> None:
    scores = _scores(1)
    first = allocate(scores, 0.5, scheme)
    new_scores = _scores(2)  # different scores: without monotonicity other weights would win
    second = allocate(new_scores, 0.2, scheme, current=first)
    for n in scores:
        assert not (second[n] & ~first[n]).any()
    total = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in second.values()) == round(0.2 * total)


def test_deterministic() -> None:
    scores = {n: s.round(decimals=0) for n, s in _scores().items()}  # many ties
    a = allocate(scores, 0.4, "global")
    b = allocate({n: s.clone() for n, s in scores.items()}, 0.4, "global")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_nan_scores_are_pruned_first() -> None:
    scores = {"a": torch.tensor([float("nan"), 1.0, 2.0, float("nan")])}
    assert global_masks(scores, 0.5)["a"].tolist() == [False, True, True, False]
