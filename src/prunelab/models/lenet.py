"""LeNet-300-100 and LeNet-5, the small MNIST-era networks of the pruning literature."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from prunelab.models.registry import MODELS, require_min_size


@MODELS.register("lenet300", summary="LeNet-300-100: fully connected 300-100 (LeCun et al. 1998)")
def lenet300(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """LeNet-300-100: flatten, Linear 300, ReLU, Linear 100, ReLU, Linear classes."""
    inputs = in_channels * image_size * image_size
    # Named layers (fc1.weight, ...) so exclusions and reports read like the papers.
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        fc1=nn.Linear(inputs, 300),
        relu1=nn.ReLU(inplace=True),
        fc2=nn.Linear(300, 100),
        relu2=nn.ReLU(inplace=True),
        fc3=nn.Linear(100, num_classes),
    ))  # fmt: skip


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling; the classifier width follows the image size."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        # padding 2 keeps the first conv's output at the input size (28 -> 28,
        # the classic 32x32 LeNet input after padding); the second conv is
        # unpadded, so each side shrinks by 4 before the second pool.
        side = (image_size // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        return self.classifier(self.features(x))


@MODELS.register("lenet5", summary="LeNet-5: two 5x5 convs + 120-84 classifier (LeCun et al. 1998)")
def lenet5(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """LeNet-5 for ``image_size`` >= 12 (the smallest size whose second pool is non-empty)."""
    require_min_size("lenet5", image_size, 12)
    return LeNet5(in_channels, image_size, num_classes)
