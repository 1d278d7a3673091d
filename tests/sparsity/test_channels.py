"""Channel structure: groups from Torch-Pruning's graph, exact weight counts, removal equal to masking,
optimizer state carried over, and the channel criteria."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunelab.errors import UserError
from prunelab.models import MODELS, build_model
from prunelab.sparsity.channel_cut import WeightCount, choose_channels, remove_channels, zero_channels
from prunelab.sparsity.channels import Group, classifier_name, find_groups
from prunelab.sparsity.criteria import CRITERIA, Probe
from prunelab.sparsity.mask import prunable_parameters
from prunelab.sparsity.scores import Batch


def channel_scores(name: str, model: nn.Module, groups: list[Group], batches: list[Batch] = ()) -> list:
    """Channel scores by the registered criterion ``name``, as a method asks for them."""
    criterion = CRITERIA.get(name)
    criterion.check("channel")
    return criterion.channel(Probe(model, prunable_parameters(model), tuple(batches)), groups)


class Attention(nn.Module):
    """A small transformer-style classifier: the embedding width feeds LayerNorm and attention."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(28, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.ffn = nn.Linear(32, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.squeeze(1))
        h = self.norm(h + self.attn(h, h, h)[0])
        return self.out(torch.relu(self.ffn(h)).mean(1))


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "attention":
        return Attention().eval(), torch.randn(4, 1, 28, 28)
    channels, size = (3, 32) if name.startswith(("resnet", "vgg", "conv")) else (1, 28)
    model = build_model(name, channels, size, 10)
    for m in model.modules():  # BatchNorm far from its initial identity, so that a wrong cut shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    return model.eval(), torch.randn(4, channels, size, size)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in prunable_parameters(model).values())


@pytest.mark.parametrize("allocation", ["global", "layerwise"])
@pytest.mark.parametrize("name", [*MODELS.names(), "attention"])
def test_removed_network_computes_what_the_masked_one_does(name: str, allocation: str) -> None:
    model, x = _model(name)
    groups = find_groups(model, x[:1])
    prunable = prunable_parameters(model)
    # The attention model can only lose its feed-forward neurons: a lower target.
    keep = _count(model) // 2 if name != "attention" else int(_count(model) * 0.8)
    removal = choose_channels(model, groups, channel_scores("l2", model, groups), prunable, keep, allocation)
    masked, removed = copy.deepcopy(model), copy.deepcopy(model)
    zero_channels(masked, groups, removal)
    remove_channels(removed, groups, removal)
    assert _count(removed) <= keep  # never below the target sparsity
    assert _count(removed) == WeightCount(model, groups, prunable).total - _removed_by(model, groups, removal)
    with torch.no_grad():
        want, got = masked(x), removed(x)
    assert got.shape == want.shape == (4, 10)  # the classifier keeps its outputs
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _removed_by(model: nn.Module, groups: list, removal: dict) -> int:
    count = WeightCount(model, groups, prunable_parameters(model))
    before = count.total
    for i, g in enumerate(groups):
        for c in removal.get(g.root, ()):
            count.take(i, c)
    return before - count.total


def test_groups_follow_residuals_and_leave_norm_and_attention_alone() -> None:
    model, x = _model("resnet20")
    groups = {g.root: g for g in find_groups(model, x[:1])}
    residual = groups["stages.2.0.shortcut.0"]  # the last stage's residual stream, read by the classifier
    modules = {(m.module, m.side) for m in residual.members}
    assert {("stages.2.0.conv2.0", "out"), ("stages.2.2.conv2.1", "out"), ("fc", "in")} <= modules
    assert classifier_name(model, x[:1]) == "fc" and not any(("fc", "out") == (g.root, "out") for g in groups.values())
    attention, x = _model("attention")
    assert [g.root for g in find_groups(attention, x[:1])] == ["ffn"]


def test_global_stops_within_one_channel_of_the_target() -> None:
    model, x = _model("lenet300")
    groups = find_groups(model, x[:1])
    prunable = prunable_parameters(model)
    keep = 200_000
    removal = choose_channels(model, groups, channel_scores("magnitude", model, groups), prunable, keep, "global")
    removed = copy.deepcopy(model)
    remove_channels(removed, groups, removal)
    # One fc1 neuron holds 784 inputs and 100 outputs, one fc2 neuron 300 inputs and 10 outputs.
    assert keep - 884 < _count(removed) <= keep


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_state_and_gradients_follow_the_surviving_channels(optimizer: str) -> None:
    model, x = _model("lenet5")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd" else \
        torch.optim.Adam(model.parameters(), lr=0.01)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    conv = model.features[3]
    before_w, before_state = conv.weight.detach().clone(), {k: v.clone() for k, v in opt.state[conv.weight].items()}
    before_grad = conv.weight.grad.clone()
    groups = find_groups(model, x[:1])
    removal = {"features.3": [0, 5], "features.0": [2]}
    remove_channels(model, groups, removal, opt)
    out_keep = [c for c in range(16) if c not in (0, 5)]
    in_keep = [c for c in range(6) if c != 2]
    expect = before_w[out_keep][:, in_keep]
    assert torch.equal(conv.weight.detach(), expect) and torch.equal(conv.weight.grad, before_grad[out_keep][:, in_keep])
    state = opt.state[conv.weight]
    for key, value in before_state.items():
        assert torch.equal(state[key], value[out_keep][:, in_keep] if value.shape == before_w.shape else value)
    assert all(p in opt.state for p in model.parameters())  # every parameter the optimizer knows is the model's
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    assert conv.out_channels == 14 and conv.in_channels == 5
    assert model.classifier[1].in_features == 14 * 25
    opt.step()  # the optimizer runs on the smaller network


def test_bn_scale_needs_batchnorm_and_unknown_criteria_are_refused() -> None:
    model, x = _model("lenet300")
    groups = find_groups(model, x[:1])
    with pytest.raises(UserError, match="no prunable group of this model has a BatchNorm layer"):
        channel_scores("bn_scale", model, groups)
    with pytest.raises(UserError, match="criterion 'hessian' scores single weights"):
        channel_scores("hessian", model, groups)


def test_bn_scale_and_norm_scores_read_the_right_entries() -> None:
    model, x = _model("vgg11")
    groups = find_groups(model, x[:1])
    first = groups[0]
    bn = model.features[1]
    assert torch.allclose(channel_scores("bn_scale", model, groups)[0], bn.weight.detach().abs().double())
    conv = model.features[0]
    l1 = conv.weight.detach().abs().mean((1, 2, 3)).double()
    assert first.root == "features.0" and torch.allclose(channel_scores("magnitude", model, groups)[0], l1)


def test_taylor_is_the_squared_sum_of_w_times_grad_per_channel() -> None:
    model, x = _model("lenet300")
    groups = find_groups(model, x[:1])
    y = torch.tensor([0, 1, 2, 3])
    scores = channel_scores("taylor", model, groups, [(x, y)])
    nn.functional.cross_entropy(model(x), y).backward()
    fc1 = model.fc1
    assert groups[0].root == "fc1"
    expect = ((fc1.weight * fc1.weight.grad).sum(1) + fc1.bias * fc1.bias.grad).detach().double() ** 2
    assert torch.allclose(scores[0], expect)


def test_prune_channels_api_makes_the_model_smaller_and_keeps_training() -> None:
    import prunelab

    model, x = _model("resnet20")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    y = torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    before = _count(model)
    removal = prunelab.prune_channels(model, 0.5, x[:1], optimizer=opt)
    assert removal and _count(model) <= round(0.5 * before)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # the smaller network trains on
    opt.step()
    assert model(x).shape == (4, 10)
    with pytest.raises(UserError, match="whole channels cannot reach"):
        prunelab.prune_channels(model, 0.999, x[:1])
    with pytest.raises(UserError, match="prunelab.prune_channels removes whole channels"):
        prunelab.prune(model, 0.5, structure="channel")
