"""The default initialisation: Kaiming-normal weights, zero biases, identity BN."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunelab.models import MODELS, build_model, init_weights


def test_linear_weight_std_is_kaiming_fan_in() -> None:
    torch.manual_seed(0)
    first = build_model("lenet300", 1, 28, 10)[1]
    assert isinstance(first, nn.Linear)
    # 235,200 samples: the std estimate is within about 0.3% of the truth.
    expected = math.sqrt(2.0 / 784)
    assert first.weight.std().item() == pytest.approx(expected, rel=0.02)
    assert first.weight.mean().item() == pytest.approx(0.0, abs=expected * 0.01)


def test_conv_weight_std_is_kaiming_fan_out() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, kernel_size=3)
    init_weights(conv)
    expected = math.sqrt(2.0 / (128 * 3 * 3))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("name", MODELS.names())
def test_biases_zero_and_batchnorm_identity(name: str) -> None:
    model = build_model(name, 3, 32, 10)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.count_nonzero(module.bias) == 0
