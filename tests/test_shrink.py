"""shrink removes exactly the dead units and keeps the function."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import max_diff, prune_
from prunelab.models import build_model
from prunelab.deploy.shrink import shrink


def _randomize_(model: nn.Module) -> nn.Module:
    """Nonzero biases and non-trivial BatchNorm statistics, so folding and BN slicing are exercised."""
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.uniform_(-0.5, 0.5)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _shrunk(model: nn.Module, *input_shape: int) -> nn.Module:
    """``shrink(model)``, checked to compute ``model``'s function on a random batch of ``input_shape``."""
    small = shrink(model)
    assert max_diff(model, small, torch.randn(*input_shape)) < 1e-5
    return small


def _assert_fc1_left_alone(model: nn.Module) -> None:
    """fc1's unit 0 feeds nothing through fc2, yet shrink must keep it: the model is not a plain chain."""
    torch.manual_seed(0)
    model = _randomize_(model)
    with torch.no_grad():
        model.fc2.weight[:, 0] = 0
    small = _shrunk(model, 3, 4)
    assert small.fc1.out_features == 6


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return _randomize_(nn.Sequential(OrderedDict(
        fc1=nn.Linear(6, 8), relu1=nn.ReLU(), fc2=nn.Linear(8, 5), relu2=nn.ReLU(), fc3=nn.Linear(5, 3),
    )))  # fmt: skip


def test_mlp_dead_units_removed_by_both_rules_and_folded() -> None:
    model = _mlp()
    with torch.no_grad():
        model.fc2.weight[:, [1, 4]] = 0  # (a) fc1 units 1, 4: nobody reads them
        model.fc1.weight[[2, 6]] = 0  # (b) fc1 units 2, 6: constant relu(bias), folded into fc2's bias
        model.fc1.bias[[2, 6]] = torch.tensor([0.7, 0.3])  # nonzero constants: folding must be exact
        model.fc3.weight[:, 3] = 0  # (a) fc2 unit 3
        model.fc2.weight[0] = 0  # (b) fc2 unit 0, constant relu(bias)
    small = _shrunk(model, 16, 6)
    assert small.fc1.weight.shape == (4, 6) and small.fc1.bias.shape == (4,)
    assert small.fc2.weight.shape == (3, 4) and small.fc2.bias.shape == (3,)
    assert small.fc3.weight.shape == (3, 3) and small.fc3.bias.shape == (3,)
    assert (small.fc1.in_features, small.fc1.out_features, small.fc2.in_features) == (6, 4, 4)


def test_removal_repeats_until_nothing_changes() -> None:
    model = _mlp()
    with torch.no_grad():
        model.fc2.weight[:, 0] = 0
        model.fc2.weight[4, 0] = 1.0  # fc1 unit 0 is read only by fc2 unit 4 ...
        model.fc3.weight[:, 4] = 0  # ... which nobody reads: once it goes, fc1 unit 0 is dead too
    small = _shrunk(model, 16, 6)
    assert small.fc2.out_features == 4
    assert small.fc1.out_features == 7


def test_model_inputs_and_outputs_are_never_cut() -> None:
    model = _mlp()
    with torch.no_grad():
        model.fc1.weight[:, 2] = 0  # an input feature nobody reads
        model.fc3.weight[1] = 0  # an output with zero weights
    small = _shrunk(model, 4, 6)
    assert small.fc1.in_features == 6 and small.fc3.out_features == 3


def test_one_unit_is_kept_when_all_are_dead() -> None:
    model = _mlp()
    with torch.no_grad():
        model.fc2.weight.zero_()
    small = _shrunk(model, 4, 6)
    assert small.fc1.out_features == 1


def _convnet() -> nn.Sequential:
    """conv-bn-relu-pool-conv-bn-relu-flatten-linear on 3x8x8 inputs."""
    torch.manual_seed(0)
    return _randomize_(nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 8, 3, padding=1), bn1=nn.BatchNorm2d(8), relu1=nn.ReLU(), pool=nn.MaxPool2d(2),
        conv2=nn.Conv2d(8, 6, 3, padding=1), bn2=nn.BatchNorm2d(6), relu2=nn.ReLU(),
        flatten=nn.Flatten(), fc=nn.Linear(6 * 4 * 4, 5),
    )))  # fmt: skip


def test_conv_bn_dead_channels_removed() -> None:
    model = _convnet()
    with torch.no_grad():
        model.conv2.weight[:, [1, 5]] = 0  # (a) conv1 channels 1, 5
        # (b) conv1 channel 3 puts out relu(bn(bias)) = 0: removable despite conv2's padding.
        model.conv1.weight[3] = 0
        model.conv1.bias[3] = -1.0
        model.bn1.bias[3] = -0.5
        model.fc.weight[:, 4 * 16 : 5 * 16] = 0  # (a) conv2 channel 4: its 4x4 block of columns
        # (b) conv2 channel 2: constant relu(bn(bias)) > 0, folded into fc's bias (no padding there).
        model.conv2.weight[2] = 0
        model.conv2.bias[2] = 0.4
        model.bn2.bias[2] = 0.8
    small = _shrunk(model, 8, 3, 8, 8)
    assert small.conv1.weight.shape == (5, 3, 3, 3)
    assert small.bn1.running_mean.shape == (5,) and small.bn1.weight.shape == (5,)
    assert small.conv2.weight.shape == (4, 5, 3, 3)
    assert small.bn2.num_features == 4 and small.bn2.running_var.shape == (4,)
    assert small.fc.weight.shape == (5, 4 * 16)
    kept = [0, 1, 3, 5]  # conv2 channels left; fc's columns are their blocks, in order
    expected = model.fc.weight.reshape(5, 6, 16)[:, kept].reshape(5, -1)
    assert torch.equal(small.fc.weight, expected)


@pytest.mark.parametrize(("padding", "channels"), [(1, 4), (0, 3)])
def test_constant_channel_into_padded_conv_is_kept(padding: int, channels: int) -> None:
    torch.manual_seed(0)
    model = _randomize_(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=padding)))
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 0.5  # constant 0.5 inside, but the padded border of channel 1 reads 0
    small = _shrunk(model, 2, 2, 6, 6)
    assert small[0].out_channels == channels and small[2].in_channels == channels


def test_view_flatten_and_functional_relu_are_followed() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 2 * 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv(x))
            return self.fc(x.view(x.size(0), -1))

    torch.manual_seed(0)
    model = _randomize_(Net())
    with torch.no_grad():
        model.fc.weight[:, 4:8] = 0
    small = _shrunk(model, 2, 1, 4, 4)
    assert small.conv.out_channels == 3 and small.fc.in_features == 12


def test_a_value_used_twice_is_left_alone() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.fc2 = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc1(x))
            return self.fc2(h) + h

    _assert_fc1_left_alone(Net())


def test_untraceable_model_is_copied_unchanged() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = -x
            return self.fc2(self.fc1(x))

    model = Net()
    with torch.no_grad():
        model.fc2.weight[:, 0] = 0
    small = shrink(model.train())
    assert small.fc1.out_features == 6 and not small.training
    assert small.fc1.weight.data_ptr() != model.fc1.weight.data_ptr()


@pytest.mark.parametrize("density", [0.1, 0.02])
def test_lenet300_keeps_its_function_and_no_hidden_unit_is_dead(density: float) -> None:
    torch.manual_seed(0)
    model = prune_(build_model("lenet300", 1, 28, 10), density).eval()
    small = _shrunk(model, 32, 1, 28, 28)
    # Biases start at zero, so a unit with no incoming weights is constant 0: both rules apply to all.
    for producer, consumer in ((small.fc1, small.fc2), (small.fc2, small.fc3)):
        assert (producer.weight != 0).any(dim=1).all()
        assert (consumer.weight != 0).any(dim=0).all()
    assert small.fc1.in_features == 784 and small.fc3.out_features == 10


def test_resnet20_keeps_its_function() -> None:
    torch.manual_seed(0)
    model = _randomize_(prune_(build_model("resnet20", 3, 32, 10), 0.05))
    small = _shrunk(model, 2, 3, 32, 32)
    assert type(small) is type(model)


def test_a_weight_read_by_the_forward_itself_is_left_alone() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x))) + self.fc1.weight.sum()

    _assert_fc1_left_alone(Net())


def test_one_relu_module_shared_by_all_layers_is_followed() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 2)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))

    torch.manual_seed(0)
    model = _randomize_(Net())
    with torch.no_grad():
        model.fc2.weight[:, 0] = 0
        model.fc3.weight[:, 1] = 0
    small = _shrunk(model, 3, 4)
    assert (small.fc1.out_features, small.fc2.out_features) == (5, 4)
