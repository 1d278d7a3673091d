"""Network slimming's L1 penalty on BatchNorm scales: exactly lambda * sign(gamma) added to their gradients."""

from __future__ import annotations

import torch
from torch import nn

from prunelab.config.build import build_config
from prunelab.config.identity import run_id
from prunelab.sparsity.mask import Masker, prunable_parameters
from prunelab.training.distributed import SINGLE
from prunelab.training.step import add_bn_l1, train_step


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -0.25, 0.0, 2.0]))
    return net


def test_the_penalty_adds_lambda_times_the_sign_of_each_scale() -> None:
    net = _net()
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    before = net[1].weight.grad.clone()
    bias_before = net[1].bias.grad.clone()
    add_bn_l1(net, 1e-4)
    assert torch.equal(net[1].weight.grad, before + 1e-4 * torch.tensor([1.0, -1.0, 0.0, 1.0]))
    assert torch.equal(net[1].bias.grad, bias_before)  # only the scales


def test_a_training_step_applies_it_before_the_optimizer() -> None:
    a, b = _net(), _net()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    for net, strength in ((a, 0.0), (b, 0.5)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        train_step(net, opt, Masker(prunable_parameters(net)), SINGLE, (x, y), "fp32", 0.0, bn_l1=strength)
    # Plain SGD: the scales differ by exactly lr * 0.5 * sign(gamma); everything else is the same.
    expect = a[1].weight.detach() - 0.1 * 0.5 * torch.tensor([1.0, -1.0, 0.0, 1.0])
    assert torch.allclose(b[1].weight.detach(), expect, atol=1e-7)
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(a[1].bias, b[1].bias)


def test_the_penalty_enters_the_run_id_only_when_set() -> None:
    assert run_id(build_config({"train.bn_l1": 0.0})) == run_id(build_config({}))
    assert run_id(build_config({"train.bn_l1": 1e-4})) != run_id(build_config({}))
