"""Batching and augmentation: coverage, determinism and exact per-op behaviour."""

from __future__ import annotations

import pytest
import torch

from prunelab.data.batches import (
    Augment,
    augment_batch,
    eval_batches,
    num_batches,
    random_crop,
    random_hflip,
    train_batches,
)
from prunelab.errors import UserError


def _data(n: int = 23, c: int = 3, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n * c * size * size, dtype=torch.float32).reshape(n, c, size, size)
    return x, torch.arange(n)


def _epoch(
    augment: Augment, seed: int, batch_size: int = 5
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _data()
    return list(train_batches(x, y, batch_size, torch.Generator().manual_seed(seed), augment))


@pytest.mark.parametrize("batch_size", [1, 5, 23, 100])
def test_num_batches(batch_size: int) -> None:
    assert num_batches(23, batch_size) == -(-23 // batch_size)
    assert num_batches(0, batch_size) == 0
    assert len(_epoch(Augment(), 0, batch_size)) == num_batches(23, batch_size)


def test_every_sample_exactly_once_per_epoch() -> None:
    x, _ = _data()
    batches = _epoch(Augment(), seed=3)
    assert [len(yb) for _, yb in batches] == [5, 5, 5, 5, 3]  # last partial batch kept
    labels = torch.cat([yb for _, yb in batches])
    assert sorted(labels.tolist()) == list(range(23))
    assert not torch.equal(labels, torch.arange(23))  # actually shuffled
    for xb, yb in batches:  # images stay with their labels, untouched
        assert torch.equal(xb, x[yb])


AUGMENTS = [
    Augment(),
    Augment(crop_padding=2, hflip=True),
    Augment(rotate=15.0, translate=0.1),
    Augment(crop_padding=1, hflip=True, rotate=10.0, translate=0.05),
]


@pytest.mark.parametrize("augment", AUGMENTS)
def test_same_seed_bit_identical_batches(augment: Augment) -> None:
    first, second = _epoch(augment, seed=7), _epoch(augment, seed=7)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = _epoch(augment, seed=8)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other, strict=True))


def test_identity_augment_draws_nothing() -> None:
    # The hot path must not consume randomness (or do work) beyond the permutation.
    x, y = _data()
    generator = torch.Generator().manual_seed(0)
    list(train_batches(x, y, 5, generator, Augment()))
    reference = torch.Generator().manual_seed(0)
    torch.randperm(23, generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())


def test_hflip_flips_exactly_the_chosen_samples() -> None:
    x, _ = _data(n=64)
    out = random_hflip(x, torch.Generator().manual_seed(1))
    flipped = [i for i in range(64) if torch.equal(out[i], torch.flip(x[i], dims=[2]))]
    kept = [i for i in range(64) if torch.equal(out[i], x[i])]
    assert sorted(flipped + kept) == list(range(64))  # each one or the other, exactly
    assert 10 < len(flipped) < 54
    coins = torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.5
    assert flipped == torch.nonzero(coins).flatten().tolist()


def test_crop_padding_zero_is_identity() -> None:
    x, _ = _data()
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(0)), x)


def test_crop_keeps_shape_and_picks_shifted_windows() -> None:
    x, _ = _data(n=40, c=2, size=6)
    padding = 2
    out = random_crop(x, padding, torch.Generator().manual_seed(5))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    for i in range(len(x)):  # each output is some window of its own padded image
        windows = [
            padded[i, :, r : r + 6, c : c + 6]
            for r in range(2 * padding + 1)
            for c in range(2 * padding + 1)
        ]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(out, x)


def test_affine_keeps_shape_and_zero_params_are_near_identity() -> None:
    x, _ = _data(n=4)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, g, Augment(rotate=30.0, translate=0.2))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out, x)
    # A tiny rotation/shift barely moves the pixels.
    small = augment_batch(x, torch.Generator().manual_seed(0), Augment(rotate=1e-6, translate=1e-6))
    assert torch.allclose(small, x, atol=1e-2)


def test_eval_batches_in_order() -> None:
    x, y = _data()
    batches = list(eval_batches(x, y, 10))
    assert [len(b[1]) for b in batches] == [10, 10, 3]
    assert torch.equal(torch.cat([b[0] for b in batches]), x)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop_padding": -1},
        {"crop_padding": 1.5},
        {"rotate": -1.0},
        {"rotate": 181.0},
        {"translate": -0.1},
        {"translate": 0.6},
        {"rotate": "15"},
        {"hflip": 1},
    ],
)
def test_augment_validation(kwargs: dict) -> None:
    with pytest.raises(UserError, match="augment\\."):
        Augment(**kwargs)


def test_bad_batch_size() -> None:
    with pytest.raises(UserError, match="batch_size"):
        num_batches(10, 0)
