"""FLOP counting: exact counts for known layers and exact step arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunelab.models import MODELS, build_model
from prunelab.training.cost import (
    UNATTRIBUTED,
    dense_train_step_flops,
    eval_flops,
    forward_flops,
    train_step_flops,
)


def test_lenet300_counts_every_layer_exactly() -> None:
    flops = forward_flops(build_model("lenet300", 1, 28, 10), (1, 28, 28))
    assert flops == {
        "fc1.weight": 2 * 784 * 300,
        "fc2.weight": 2 * 300 * 100,
        "fc3.weight": 2 * 100 * 10,
    }
    assert sum(flops.values()) == 2 * (784 * 300 + 300 * 100 + 100 * 10)


def test_conv2d_counts_output_size_times_kernel() -> None:
    # 3 -> 8 channels, 3x3 kernel, stride 2, no padding: 15x15 outputs on 32x32.
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2)
    assert forward_flops(conv, (3, 32, 32)) == {"weight": 2 * (8 * 15 * 15) * (3 * 3 * 3)}


def test_grouped_and_depthwise_convs_divide_by_groups() -> None:
    grouped = nn.Conv2d(8, 16, kernel_size=3, padding=1, groups=4, bias=False)
    assert forward_flops(grouped, (8, 10, 10)) == {"weight": 2 * (16 * 100) * (2 * 9)}
    depthwise = nn.Conv1d(6, 6, kernel_size=5, groups=6)
    assert forward_flops(depthwise, (6, 20)) == {"weight": 2 * (6 * 16) * 5}


def test_transposed_conv_counts_inputs_times_kernel() -> None:
    up = nn.ConvTranspose2d(4, 2, kernel_size=2, stride=2)
    assert forward_flops(up, (4, 5, 5)) == {"weight": 2 * (4 * 25) * 2 * 4}


class TwiceLinear(nn.Module):
    """Calls one Linear twice and owns one that is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.unused = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.relu(self.shared(x)))


def test_repeated_calls_add_up_and_unused_layers_count_zero() -> None:
    assert forward_flops(TwiceLinear(), (5,)) == {"shared.weight": 2 * 2 * 25, "unused.weight": 0}


def test_tied_weights_share_one_key() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    assert forward_flops(model, (4,)) == {"0.weight": 2 * 2 * 16}


def test_training_flags_are_restored() -> None:
    model = build_model("resnet20", 3, 32, 10).train()
    model.stem[1].eval()  # a deliberately frozen BN keeps its own flag
    before = [m.training for m in model.modules()]
    running_mean = model.stem[1].running_mean.clone()
    forward_flops(model, (3, 32, 32))
    assert [m.training for m in model.modules()] == before
    # Eval mode: the dummy forward left the BN statistics alone.
    assert torch.equal(model.stem[1].running_mean, running_mean)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_prunable_weight_is_counted(name: str) -> None:
    model = build_model(name, 3, 32, 10)
    flops = forward_flops(model, (3, 32, 32))
    prunable = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    assert set(flops) == prunable
    assert all(value > 0 for value in flops.values())


def test_train_step_arithmetic_is_exact() -> None:
    flops = {"a.weight": 1000, "b.weight": 200, "c.weight": 10}
    densities = {"a.weight": 0.25, "b.weight": 0.5}  # c absent: dense
    assert train_step_flops(flops, densities, batch_size=4) == 3 * 4 * (250 + 100 + 10)
    assert dense_train_step_flops(flops, batch_size=4) == 3 * 4 * 1210
    assert eval_flops(flops, densities, n_samples=7) == 7 * 360


def test_bad_densities_raise() -> None:
    with pytest.raises(ValueError, match="no FLOP count"):
        train_step_flops({"a.weight": 10}, {"a": 0.5}, batch_size=1)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        train_step_flops({"a.weight": 10}, {"a.weight": 1.5}, batch_size=1)


class Attention(nn.Module):
    """LayerNorm -> nn.MultiheadAttention -> Linear: every matrix product has operands that need gradients
    (the norm's affine weights make its output need one), so a real backward pass costs exactly two forwards."""

    def __init__(self, embed: int = 16, heads: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed)
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.head = nn.Linear(embed, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        a, _ = self.attn(h, h, h)
        return self.head(a.mean(1))


def test_attention_projections_and_scores_are_counted() -> None:
    tokens, embed = 7, 16
    flops = forward_flops(Attention(embed), (tokens, embed))
    assert flops == {
        "attn.in_proj_weight": 3 * 2 * tokens * embed * embed,  # q, k, v: slices of one weight
        "attn.out_proj.weight": 2 * tokens * embed * embed,  # called functionally, not as a module
        "head.weight": 2 * embed * 5,
        UNATTRIBUTED: 2 * 2 * tokens * tokens * embed,  # q k^T and attention x v, over all heads
    }
    # A sparse projection scales with its density; the scores do not.
    half = train_step_flops(flops, {"attn.in_proj_weight": 0.5}, batch_size=1)
    assert half == 3 * (sum(flops.values()) - flops["attn.in_proj_weight"] / 2)


def test_a_dense_training_step_costs_what_flop_counter_mode_counts() -> None:
    torch.manual_seed(0)
    model, batch = Attention(), 3
    x, y = torch.randn(batch, 7, 16), torch.randint(0, 5, (batch,))
    flops = forward_flops(model, (7, 16))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    assert dense_train_step_flops(flops, batch) == counter.get_total_flops()
