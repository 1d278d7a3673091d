"""Conv-2, Conv-4 and Conv-6 of the lottery-ticket paper (Frankle & Carbin 2019).

VGG-like stacks of 3x3 convolutions (with biases, no BatchNorm) in pairs,
each pair followed by a 2x2 max pool: [64, 64], then [128, 128], then
[256, 256]; a 256-256 fully connected classifier follows.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from prunelab.models.registry import MODELS, require_min_size

_PAIR_WIDTHS = (64, 128, 256)


def conv_net(in_channels: int, image_size: int, num_classes: int, pairs: int) -> nn.Sequential:
    """A Conv-(2 x ``pairs``) network; ``features`` then ``classifier`` like the paper's."""
    layers: list[nn.Module] = []
    channels = in_channels
    for width in _PAIR_WIDTHS[:pairs]:
        for _ in range(2):
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.MaxPool2d(2))
    # Padded convs keep the size; each pool halves it (rounding down).
    side = image_size // 2**pairs
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * side * side, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, num_classes),
    )
    return nn.Sequential(OrderedDict(features=nn.Sequential(*layers), classifier=classifier))


@MODELS.register("conv2", summary="Conv-2: lottery-ticket [64,64,pool] + 256-256 classifier")
def conv2(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Conv-2 (4.3M parameters on CIFAR-10)."""
    require_min_size("conv2", image_size, 2)
    return conv_net(in_channels, image_size, num_classes, pairs=1)


@MODELS.register("conv4", summary="Conv-4: lottery-ticket [64,64,pool,128,128,pool] + classifier")
def conv4(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Conv-4 (2.43M parameters on CIFAR-10)."""
    require_min_size("conv4", image_size, 4)
    return conv_net(in_channels, image_size, num_classes, pairs=2)


@MODELS.register("conv6", summary="Conv-6: lottery-ticket three conv pairs + 256-256 classifier")
def conv6(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Conv-6 (2.26M parameters on CIFAR-10).

    The paper's table says 1.7M, but its own layer list adds up to 2.26M.
    """
    require_min_size("conv6", image_size, 8)
    return conv_net(in_channels, image_size, num_classes, pairs=3)
