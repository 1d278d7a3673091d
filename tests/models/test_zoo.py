"""Every registered model builds, runs forward and backward, and is reproducible."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunelab.errors import UserError
from prunelab.models import MODELS, build_model

# (in_channels, image_size, num_classes): MNIST-like and CIFAR-100-like.
SHAPES = [(1, 28, 10), (3, 32, 100)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS.names())
def test_forward_shape_and_backward(name: str, shape: tuple[int, int, int]) -> None:
    channels, size, classes = shape
    torch.manual_seed(0)
    model = build_model(name, channels, size, classes)
    logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, classes)
    logits.sum().backward()
    # Every parameter takes part in the forward, so every one gets a gradient.
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MODELS.names())
def test_same_seed_same_weights(name: str) -> None:
    torch.manual_seed(123)
    first = build_model(name, 3, 32, 10).state_dict()
    torch.manual_seed(123)
    second = build_model(name, 3, 32, 10).state_dict()
    torch.manual_seed(124)
    other = build_model(name, 3, 32, 10).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("name", MODELS.names())
def test_channels_last_matches_contiguous(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 3, 32, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS.names())
def test_convs_before_batchnorm_have_no_bias(name: str) -> None:
    model = build_model(name, 3, 32, 10)
    modules = list(model.modules())
    for layer, following in zip(modules, modules[1:]):
        if isinstance(layer, nn.Conv2d) and isinstance(following, nn.BatchNorm2d):
            assert layer.bias is None


def test_lenet300_parameter_count_is_exact() -> None:
    assert n_params(build_model("lenet300", 1, 28, 10)) == 266_610


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("resnet18", 11_100_000, 11_300_000),
        ("resnet20", 260_000, 280_000),
        ("conv2", 4_250_000, 4_350_000),
        ("vgg19", 19_900_000, 20_100_000),
    ],
)
def test_cifar10_parameter_counts(name: str, low: int, high: int) -> None:
    assert low <= n_params(build_model(name, 3, 32, 10)) <= high


def test_flatten_size_follows_image_size() -> None:
    # LeNet-5: 28 -> 14 -> 10 -> 5 and 32 -> 16 -> 12 -> 6 before the first Linear.
    assert build_model("lenet5", 1, 28, 10).classifier[1].in_features == 16 * 5 * 5
    assert build_model("lenet5", 3, 32, 10).classifier[1].in_features == 16 * 6 * 6


def count_max_pools(model: nn.Module) -> int:
    return sum(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_vgg_skips_pools_on_a_one_pixel_map() -> None:
    # 32 -> 16 -> 8 -> 4 -> 2 -> 1 uses all five; 28 -> 14 -> 7 -> 3 -> 1 needs four.
    assert count_max_pools(build_model("vgg11", 1, 32, 10)) == 5
    assert count_max_pools(build_model("vgg11", 1, 28, 10)) == 4
    # Even a tiny image builds and runs: later blocks work on a 1x1 map.
    assert build_model("vgg11", 1, 4, 10)(torch.randn(2, 1, 4, 4)).shape == (2, 10)


def test_unknown_model_and_too_small_image_are_user_errors() -> None:
    with pytest.raises(UserError, match="did you mean 'lenet5'"):
        build_model("lenet6", 1, 28, 10)
    with pytest.raises(UserError, match="at least 12x12"):
        build_model("lenet5", 1, 8, 10)
