"""VGG-11/16/19 with BatchNorm, in the CIFAR form of the pruning literature.

Conv3x3-BN-ReLU layers with 2x2 max pools between blocks, then global average
pooling and one Linear(512, classes) head (the lottery-ticket framework's
CIFAR VGG), instead of ImageNet VGG's three large fully connected layers.

Pooling rule for small images: a max pool is skipped when the feature map is
already 1x1 (a 2x2 pool would have nothing to reduce). On 32x32 inputs all
five pools run (32 -> 1); on 28x28 the fifth is skipped (28 -> 14 -> 7 -> 3
-> 1). Convs are padded, so any image size >= 1 builds; below about 8x8 the
later blocks simply run on a 1x1 map.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from prunelab.models.registry import MODELS

# Conv widths per block; each block ends in a max pool.
_BLOCKS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}


def vgg(
    blocks: tuple[tuple[int, ...], ...], in_channels: int, image_size: int, num_classes: int
) -> nn.Sequential:
    """A BN VGG with the given blocks; ``features``, then ``pool``, then ``classifier``."""
    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for widths in blocks:
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        if side > 1:
            layers.append(nn.MaxPool2d(2))
            side //= 2
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*layers),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            classifier=nn.Linear(channels, num_classes),
        )
    )


@MODELS.register("vgg11", summary="VGG-11 with BatchNorm, global pool + one Linear head")
def vgg11(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """VGG-11-BN (9.2M parameters on CIFAR-10)."""
    return vgg(_BLOCKS["vgg11"], in_channels, image_size, num_classes)


@MODELS.register("vgg16", summary="VGG-16 with BatchNorm, global pool + one Linear head")
def vgg16(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """VGG-16-BN (14.7M parameters on CIFAR-10)."""
    return vgg(_BLOCKS["vgg16"], in_channels, image_size, num_classes)


@MODELS.register("vgg19", summary="VGG-19 with BatchNorm, global pool + one Linear head")
def vgg19(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """VGG-19-BN (20.0M parameters on CIFAR-10)."""
    return vgg(_BLOCKS["vgg19"], in_channels, image_size, num_classes)
