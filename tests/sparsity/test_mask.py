"""Masked training keeps pruned weights and their optimizer state exactly zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunelab.sparsity.allocate import global_masks
from prunelab.sparsity.mask import (
    Masker,
    collapsed_layers,
    mask_sparsity,
    prunable_parameters,
    weight_sparsity,
)
from prunelab.sparsity.scores import magnitude
from prunelab.training.optim import OptimSettings, build_optimizer


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def test_prunable_are_conv_and_linear_weights_only() -> None:
    assert list(prunable_parameters(_net())) == ["0.weight", "4.weight"]


def test_exclude_by_module_or_parameter_pattern() -> None:
    assert list(prunable_parameters(_net(), exclude=("4",))) == ["0.weight"]
    assert list(prunable_parameters(_net(), exclude=("0.*",))) == ["4.weight"]


def test_shared_weight_appears_once() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert list(prunable_parameters(model)) == ["0.weight"]


def _settings(name: str, nesterov: bool) -> OptimSettings:
    return OptimSettings(optimizer=name, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=5e-4,
                         betas=(0.9, 0.999), schedule="constant", milestones=(), gamma=0.1, warmup_epochs=0)


@pytest.mark.parametrize(("optimizer", "nesterov"), [("sgd", False), ("sgd", True), ("adam", False), ("adamw", False)])
def test_pruned_weights_and_state_stay_zero(optimizer: str, nesterov: bool) -> None:
    model = _net()
    params = prunable_parameters(model)
    opt = build_optimizer(model.parameters(), _settings(optimizer, nesterov))
    masker = Masker(params)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))
    for step in range(12):
        if step == 3:  # prune mid-training, when the optimizer state is already non-zero
            masker.set_masks(global_masks(magnitude(params), 0.3), opt)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        masker.apply_to_grads()
        opt.step()  # no re-masking of the weights: grads + zeroed state must suffice
        if step >= 3:
            for name, p in params.items():
                pruned = ~masker.masks[name]
                assert torch.count_nonzero(p[pruned]) == 0
                for value in opt.state[p].values():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        assert torch.count_nonzero(value[pruned]) == 0
    total = sum(p.numel() for p in params.values())
    kept = round(0.3 * total)
    assert mask_sparsity(masker.masks) == 1 - kept / total
    assert weight_sparsity(params) >= 1 - kept / total  # a kept weight may also happen to be 0


def test_collapsed_layers_are_reported() -> None:
    masks = {"a": torch.zeros(3, dtype=torch.bool), "b": torch.ones(2, dtype=torch.bool)}
    assert collapsed_layers(masks) == ["a"]
