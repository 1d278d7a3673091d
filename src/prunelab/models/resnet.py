"""CIFAR ResNets: ResNet-20/32/56 (He et al. 2016) and the CIFAR variant of ResNet-18.

Both families share one :class:`BasicBlock` and one :class:`ResNet` body and
differ only in stem width, stage widths and blocks per stage. Every
shortcut that changes shape is a 1x1 conv + BN (He et al.'s option B, which
the lottery-ticket framework uses for ResNet-20 too) rather than zero
padding, so every layer is a Conv or Linear that pruning can see.
The network ends in global average pooling, so any image size works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunelab.models.registry import MODELS


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    """A bias-free conv (BN supplies the shift) followed by BatchNorm; 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, out_channels, 3, stride)
        self.conv2 = conv_bn(out_channels, out_channels, 3, 1)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = conv_bn(in_channels, out_channels, 1, stride) if changes_shape else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = torch.relu(self.conv1(x))
        out = self.conv2(out)
        identity = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(out + identity)


class ResNet(nn.Module):
    """Stem conv, stages of BasicBlocks (stride 2 from the second on), pool, Linear."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int],
        blocks_per_stage: Sequence[int],
    ) -> None:
        super().__init__()
        self.stem = conv_bn(in_channels, widths[0], 3, 1)
        stages: list[nn.Module] = []
        channels = widths[0]
        for index, (width, blocks) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            first_stride = 1 if index == 0 else 2
            strides = [first_stride] + [1] * (blocks - 1)
            stage = [BasicBlock(channels if i == 0 else width, width, s) for i, s in enumerate(strides)]
            stages.append(nn.Sequential(*stage))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        out = self.stages(torch.relu(self.stem(x)))
        # Global average pooling: the classifier's input size is independent
        # of the image size, which is what lets one builder take 28 or 32.
        return self.fc(out.mean(dim=(2, 3)))


def cifar_resnet(depth: int, in_channels: int, num_classes: int) -> ResNet:
    """ResNet-``depth`` for CIFAR: widths 16/32/64, (depth - 2) / 6 blocks per stage."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
    blocks = (depth - 2) // 6
    return ResNet(in_channels, num_classes, (16, 32, 64), (blocks, blocks, blocks))


@MODELS.register("resnet20", summary="ResNet-20 for CIFAR (He et al. 2016), 0.27M parameters")
def resnet20(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """ResNet-20: 3 stages of 3 BasicBlocks."""
    return cifar_resnet(20, in_channels, num_classes)


@MODELS.register("resnet32", summary="ResNet-32 for CIFAR (He et al. 2016), 0.47M parameters")
def resnet32(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """ResNet-32: 3 stages of 5 BasicBlocks."""
    return cifar_resnet(32, in_channels, num_classes)


@MODELS.register("resnet56", summary="ResNet-56 for CIFAR (He et al. 2016), 0.86M parameters")
def resnet56(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """ResNet-56: 3 stages of 9 BasicBlocks."""
    return cifar_resnet(56, in_channels, num_classes)


@MODELS.register("resnet18", summary="ResNet-18, CIFAR variant (3x3 stem, no max pool), 11.2M")
def resnet18(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """ResNet-18 with a stride-1 3x3 stem and no max pool, as usual on 32x32 images."""
    return ResNet(in_channels, num_classes, (64, 128, 256, 512), (2, 2, 2, 2))
