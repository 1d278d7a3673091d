"""N:M structure: parsing, groups along the input dimension, exact N:M masks and the ramp towards them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunelab
from prunelab.errors import UserError
from prunelab.sparsity.allocate import allocate
from prunelab.sparsity.structure import NM, check_groupable, nm_top, nm_violations, parse_structure


def _scores(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # A Linear (out 6, in 8), a conv (out 4, in 8, 3x3) and an RNN-like (out 12, in 4) weight.
    return {"fc": torch.randn(6, 8, generator=g), "conv": torch.randn(4, 8, 3, 3, generator=g),
            "rnn": torch.randn(12, 4, generator=g)}


def _group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept weights per group of m consecutive input weights, counted by explicit indexing."""
    counts = []
    for out in range(mask.shape[0]):
        for pos in torch.cartesian_prod(*[torch.arange(s) for s in mask.shape[2:]]).reshape(-1, len(mask.shape) - 2) \
                if mask.dim() > 2 else [()]:
            column = mask[(out, slice(None), *[int(i) for i in pos])]
            counts += [int(column[g : g + m].sum()) for g in range(0, len(column), m)]
    return torch.tensor(counts)


@pytest.mark.parametrize("text, expected", [("unstructured", None), ("channel", None), ("2:4", NM(2, 4)),
                                            ("1:16", NM(1, 16))])
def test_parse_structure(text: str, expected: NM | None) -> None:
    assert parse_structure(text) == expected


@pytest.mark.parametrize("text", ["channel!", "4:2", "0:4", "2:2", "2:", "a:b", "2:4:8", " 2:4", "1:999", "1:257"])
def test_parse_structure_refuses_in_one_sentence(text: str) -> None:
    with pytest.raises(UserError, match="prune.structure"):
        parse_structure(text)


def test_nm_top_keeps_exactly_n_per_group_along_the_input_dimension() -> None:
    for name, s in _scores().items():
        keep = nm_top(s, NM(2, 4))
        assert keep.shape == s.shape and keep.dtype == torch.bool
        assert _group_counts(keep, 4).tolist() == [2] * (s.numel() // 4), name
        # The kept two are the largest of their group.
        groups = s.movedim(1, -1).reshape(-1, 4)
        kept = keep.movedim(1, -1).reshape(-1, 4)
        assert bool((groups[kept].reshape(-1, 2).min(1).values >= groups[~kept].reshape(-1, 2).max(1).values).all())


def test_nm_top_groups_conv_input_channels_at_each_kernel_position() -> None:
    s = torch.zeros(1, 4, 2, 2)
    s[0, :, 0, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # one group: the 4 input channels at kernel (0, 0)
    s[0, :, 1, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    keep = nm_top(s, NM(2, 4))
    assert keep[0, :, 0, 0].tolist() == [True, True, False, False]
    assert keep[0, :, 1, 1].tolist() == [False, False, True, True]


def test_nm_top_ties_go_to_the_lower_index() -> None:
    keep = nm_top(torch.ones(2, 8), NM(1, 4))
    assert keep[0].tolist() == [True, False, False, False, True, False, False, False]


@pytest.mark.parametrize("scheme", ["global", "layerwise", "erk"])
def test_allocate_at_n_over_m_gives_the_nm_masks_whatever_the_allocation(scheme: str) -> None:
    scores = _scores()
    masks = allocate(scores, 0.5, scheme, structure="2:4")
    for name, s in scores.items():
        assert torch.equal(masks[name], nm_top(s, NM(2, 4))), name


@pytest.mark.parametrize("scheme", ["global", "layerwise"])
def test_a_monotone_ramp_ends_exactly_nm_and_keeps_the_top_n_on_the_way(scheme: str) -> None:
    scores = _scores(1)
    total = sum(s.numel() for s in scores.values())
    masks = None
    for density in (0.9, 0.8, 0.7, 0.6, 0.5):
        new = allocate(scores, density, scheme, masks, structure="2:4")
        assert sum(int(m.sum()) for m in new.values()) == round(density * total)
        for name, m in new.items():
            assert (_group_counts(m, 4) >= 2).all(), (density, name)
            if masks is not None:
                assert not (m & ~masks[name]).any()  # monotone
        masks = new
    assert all((_group_counts(m, 4) == 2).all() for m in masks.values())


def test_allocate_refuses_a_density_below_n_over_m() -> None:
    with pytest.raises(ValueError, match="below"):
        allocate(_scores(), 0.4, "global", structure="2:4")


def test_groups_that_cannot_be_formed_are_named_with_the_fix() -> None:
    with pytest.raises(UserError, match=r"conv1\.weight is not a multiple of 4; leave them out with "
                                        r"--set 'prune.exclude=\[conv1\]'"):
        check_groupable({"conv1.weight": torch.Size([6, 1, 5, 5]), "fc.weight": torch.Size([10, 8])}, NM(2, 4))


def test_nm_violations_counts_groups_with_too_many_nonzeros() -> None:
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert nm_violations({"w": w}, NM(2, 4)) == {"w": 1}
    assert nm_violations({"w": w}, NM(3, 4)) == {}


def test_prune_api_gives_nm_weights_and_refuses_another_sparsity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    masks = prunelab.prune(model, 0.5, structure="2:4")
    weights = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    assert nm_violations(weights, NM(2, 4)) == {}
    assert all(int(m.sum()) * 2 == m.numel() for m in masks.values())
    with pytest.raises(UserError, match="its sparsity is 0.5, not 0.9; pass sparsity=0.5"):
        prunelab.prune(model, 0.9, structure="2:4")


def test_progressive_pruner_ramps_to_exact_nm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = prunelab.ProgressivePruner(model, opt, 0.75, start=0, end=3, steps_per_epoch=2, structure="1:4")
    for _ in range(8):
        loss = model(torch.randn(5, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    assert pruner.sparsity == 0.75
    assert nm_violations({"0.weight": model[0].weight, "2.weight": model[2].weight}, NM(1, 4)) == {}
