"""ERK allocation: densities follow Evci et al.'s formula, cap at 1; the counts are exact."""

from __future__ import annotations

import math

import pytest
import torch

from prunelab.sparsity.allocate import ALLOCATIONS, allocate, erk_densities, layer_counts

SHAPES = {
    "conv1": torch.Size((16, 3, 3, 3)),
    "conv2": torch.Size((32, 16, 3, 3)),
    "fc1": torch.Size((64, 512)),
    "fc2": torch.Size((10, 64)),
}


def _raw(shape: torch.Size) -> float:
    return sum(shape) / math.prod(shape)


def _scores(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(shape, generator=g) for n, shape in SHAPES.items()}


def _total(shapes: dict[str, torch.Size]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def test_erk_is_registered() -> None:
    assert "erk" in ALLOCATIONS


def test_densities_follow_the_formula_when_no_layer_is_capped() -> None:
    densities = erk_densities(SHAPES, 0.05)
    assert all(0.0 < d < 1.0 for d in densities.values())
    names = list(SHAPES)
    for a in names:
        for b in names:
            # One factor for all layers: density ratios are the ratios of (sum dims) / (prod dims).
            assert densities[a] / densities[b] == pytest.approx(
                _raw(SHAPES[a]) / _raw(SHAPES[b]), rel=1e-12
            )
    kept = sum(densities[n] * math.prod(s) for n, s in SHAPES.items())
    assert kept == pytest.approx(0.05 * _total(SHAPES), rel=1e-12)


def test_layer_above_one_is_made_dense_and_factor_solved_again() -> None:
    shapes = {"tiny": torch.Size((2, 2)), "big": torch.Size((100, 100))}
    # Raw: tiny 4/4 = 1, big 200/1e4 = 0.02; factor 5002/204 = 24.5 puts tiny at 24.5 > 1.
    densities = erk_densities(shapes, 0.5)
    assert densities["tiny"] == 1.0
    assert densities["big"] == pytest.approx((0.5 * 10004 - 4) / 10000, rel=1e-12)


def test_capping_repeats_until_no_layer_exceeds_one() -> None:
    shapes = {
        "tiny": torch.Size((2, 2)),
        "mid": torch.Size((10, 10)),
        "big": torch.Size((100, 100)),
    }
    # d * N = 1111.44. First factor 1111.44 / 224 = 4.96: only tiny exceeds (mid at 0.2 * 4.96 < 1).
    # Second factor (1111.44 - 4) / 220 = 5.03: now mid exceeds too. Third: big alone.
    densities = erk_densities(shapes, 0.11)
    assert densities["tiny"] == 1.0 and densities["mid"] == 1.0
    assert densities["big"] == pytest.approx((0.11 * 10104 - 104) / 10000, rel=1e-12)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_extreme_densities(density: float) -> None:
    densities = erk_densities(SHAPES, density)
    assert all(d == pytest.approx(density, abs=1e-12) for d in densities.values())


@pytest.mark.parametrize("density", [-0.1, 1.5])
def test_density_outside_unit_interval_is_rejected(density: float) -> None:
    with pytest.raises(ValueError):
        erk_densities(SHAPES, density)


@pytest.mark.parametrize("density", [0.0, 0.003, 0.01, 0.1, 0.37, 0.5, 0.9, 0.999, 1.0])
def test_allocate_erk_exact_total_and_per_layer_counts(density: float) -> None:
    scores = _scores(0)
    masks = allocate(scores, density, "erk")
    assert sum(int(m.sum()) for m in masks.values()) == round(density * _total(SHAPES))
    densities = erk_densities(SHAPES, density)
    for name, m in masks.items():
        assert m.dtype == torch.bool and m.shape == SHAPES[name]
        # Largest-remainder rounding: each layer is within one weight of its exact ERK count.
        assert abs(int(m.sum()) - densities[name] * m.numel()) < 1.0


def test_allocate_erk_keeps_the_top_scores_of_each_layer() -> None:
    scores = _scores(3)
    masks = allocate(scores, 0.2, "erk")
    partial = [n for n, m in masks.items() if m.any() and not m.all()]
    assert partial == ["conv1", "conv2", "fc1"]  # fc2 is dense at 0.2
    for name in partial:
        m = masks[name]
        assert scores[name][m].min() >= scores[name][~m].max()


def test_erk_monotone_with_current_masks() -> None:
    first = allocate(_scores(1), 0.5, "erk")
    second = allocate(_scores(2), 0.2, "erk", current=first)
    for n in SHAPES:
        assert not (second[n] & ~first[n]).any()
    assert sum(int(m.sum()) for m in second.values()) == round(0.2 * _total(SHAPES))


def test_erk_with_binding_caps_stays_exact() -> None:
    # A global mask leaves the small layers with few active weights; ERK asks more of
    # them than they have, so the shortfall moves to other layers and the total stays exact.
    scores = _scores(4)
    scores["conv1"] = scores["conv1"] - 10.0  # conv1 loses globally
    first = allocate(scores, 0.5, "global")
    assert int(first["conv1"].sum()) == 0
    second = allocate(_scores(5), 0.3, "erk", current=first)
    assert int(second["conv1"].sum()) == 0
    for n in SHAPES:
        assert not (second[n] & ~first[n]).any()
    assert sum(int(m.sum()) for m in second.values()) == round(0.3 * _total(SHAPES))


def test_layer_counts_caps_redistribute_the_shortfall() -> None:
    sizes = {"a": 10, "b": 10, "c": 10}
    densities = {"a": 0.5, "b": 0.5, "c": 0.5}
    counts = layer_counts(sizes, densities, 15, caps={"a": 2, "b": 10, "c": 10})
    assert counts["a"] == 2 and sum(counts.values()) == 15
    # Nothing more to hand out than the caps hold: the total falls short instead of overflowing.
    assert layer_counts(sizes, densities, 15, caps={"a": 1, "b": 1, "c": 1}) == {
        "a": 1,
        "b": 1,
        "c": 1,
    }
