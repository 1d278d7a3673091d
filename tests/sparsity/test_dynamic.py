"""Dynamic sparse training's parts on cases computed by hand: drop and regrow, the cosine fraction, ITOP."""

from __future__ import annotations

import math

import pytest
import torch

from prunelab.sparsity.dynamic import MaskHistory, cosine_fraction, drop_and_grow


def test_drop_the_smallest_active_regrow_the_highest_scores_per_layer() -> None:
    weights = {"a": torch.tensor([0.5, -0.1, 0.0, 0.0, 2.0, -0.3]), "b": torch.tensor([[1.0, 0.0], [0.0, 0.2]])}
    masks = {"a": torch.tensor([True, True, False, False, True, True]), "b": torch.tensor([[True, False], [False, True]])}
    grow = {"a": torch.tensor([0.0, 9.0, 5.0, 7.0, 0.0, 0.0]), "b": torch.tensor([[0.0, 3.0], [4.0, 0.0]])}
    new, grown = drop_and_grow(weights, masks, 0.5, grow)
    # a: 4 active, floor(2.0) = 2 dropped: |-0.1| and |-0.3|; regrown: the best scores outside the
    # remaining {0, 4}: position 1 (9.0, just dropped: it stays, not new) and 3 (7.0, new).
    assert new["a"].tolist() == [True, True, False, True, True, False]
    # b: 2 active, 1 dropped (0.2 at [1, 1]); regrown [1, 0] (4.0).
    assert new["b"].tolist() == [[True, False], [True, False]]
    assert grown == 2
    assert all(int(new[n].sum()) == int(masks[n].sum()) for n in masks)  # every layer keeps its count


def test_counts_round_down_or_up_and_ties_go_to_the_lower_index() -> None:
    weights = {"w": torch.ones(10)}  # all tied
    masks = {"w": torch.tensor([True] * 5 + [False] * 5)}
    grow = {"w": torch.tensor([0.0] * 5 + [1.0] * 5)}  # the inactive positions tie above the others
    down, _ = drop_and_grow(weights, masks, 0.3, grow)
    # floor(0.3 * 5) = 1: the tied active weight of highest index goes, the lowest inactive index comes.
    assert down["w"].tolist() == [True, True, True, True, False, True, False, False, False, False]
    up, grown = drop_and_grow(weights, masks, 0.3, grow, round_up=True)  # ceil(1.5) = 2
    assert up["w"].tolist() == [True, True, True, False, False, True, True, False, False, False]
    assert grown == 2
    same, grown = drop_and_grow(weights, masks, 0.3, {"w": torch.zeros(10)})
    assert torch.equal(same["w"], masks["w"]) and grown == 0  # the dropped weight wins the tie: it stays
    none, grown = drop_and_grow(weights, masks, 0.1, grow)  # floor(0.5) = 0: nothing moves
    assert torch.equal(none["w"], masks["w"]) and grown == 0


def test_cosine_fraction() -> None:
    assert cosine_fraction(0.3, 0, 100) == pytest.approx(0.3)
    assert cosine_fraction(0.3, 50, 100) == pytest.approx(0.15)
    assert cosine_fraction(0.3, 25, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_fraction(0.3, 100, 100) == 0.0 and cosine_fraction(0.3, 150, 100) == 0.0


def test_itop_rate_and_moved_connections_by_hand() -> None:
    dense = {"w": torch.ones(8, dtype=torch.bool)}
    history = MaskHistory(dense)
    first = {"w": torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)}
    history.installed(first)  # before any step: the dense start never trained, it does not count
    history.stepped()
    second = {"w": torch.tensor([1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)}
    history.installed(second)
    third = {"w": torch.tensor([1, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)}
    history.installed(third)  # `second` was never trained under: position 2 does not count
    history.stepped()
    assert history.itop_rate() == 3 / 8  # positions 0, 1, 3
    assert history.moved == 2  # position 2 came in, then position 3
    restored = MaskHistory(dense)
    restored.load_state_dict(history.state_dict(), third)
    assert restored.itop_rate() == 3 / 8 and restored.moved == 2
    pretrained = MaskHistory(dense)
    pretrained.pretrained()  # starts from a trained dense network
    pretrained.installed(first)
    assert pretrained.itop_rate() == 1.0
