"""Batching in-memory tensors, with augmentation as whole-batch tensor ops.

The datasets fit in memory, so a batch is one index into the full tensor and
augmentation is a handful of vectorized ops per batch: no DataLoader, no
worker processes, no per-sample Python. All randomness is drawn from the
caller's CPU ``torch.Generator`` in a fixed order (order of samples, then per
batch: crop offsets, flip coins, affine parameters), so one seed gives
bit-identical batches on any device, and saving the generator's state is
enough to resume an epoch exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prunelab.errors import UserError

MAX_ROTATE_DEGREES = 180.0
MAX_TRANSLATE = 0.5


@dataclass(frozen=True)
class Augment:
    """Random training-time augmentation; the defaults do nothing.

    ``crop_padding``: pad each side by this many pixels (zeros, i.e. the dataset
    mean once images are normalized) and crop back at a random offset.
    ``hflip``: mirror each image left-right with probability 1/2.
    ``rotate``: rotate by a uniform angle in [-rotate, rotate] degrees.
    ``translate``: shift by a uniform fraction in [-translate, translate] of the
    image size, independently along each axis.
    """

    crop_padding: int = 0
    hflip: bool = False
    rotate: float = 0.0
    translate: float = 0.0

    def __post_init__(self) -> None:
        if not _is_number(self.crop_padding, whole=True) or self.crop_padding < 0:
            raise UserError(
                f"augment.crop_padding must be a whole number >= 0, got {self.crop_padding!r}"
            )
        if not isinstance(self.hflip, bool):
            raise UserError(f"augment.hflip must be true or false, got {self.hflip!r}")
        if not _is_number(self.rotate) or not 0.0 <= self.rotate <= MAX_ROTATE_DEGREES:
            raise UserError(
                f"augment.rotate must be between 0 and {MAX_ROTATE_DEGREES:g} degrees, "
                f"got {self.rotate!r}"
            )
        if not _is_number(self.translate) or not 0.0 <= self.translate <= MAX_TRANSLATE:
            raise UserError(
                f"augment.translate must be a fraction between 0 and {MAX_TRANSLATE:g}, "
                f"got {self.translate!r}"
            )

    @property
    def is_identity(self) -> bool:
        """True when no augmentation is asked for (the hot path skips all work)."""
        return (
            self.crop_padding == 0
            and not self.hflip
            and self.rotate == 0.0
            and self.translate == 0.0
        )


def num_batches(n: int, batch_size: int) -> int:
    """How many batches an epoch of ``n`` samples has (the last may be partial)."""
    _check_batch_size(batch_size)
    return math.ceil(n / batch_size)


def eval_batches(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of ``(x, y)`` in order, as views (no copies)."""
    _check_batch_size(batch_size)
    _check_pair(x, y)
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def train_batches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator, augment: Augment
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled, augmented batches; every sample appears exactly once.

    ``generator`` must be a CPU generator; random numbers are drawn on the CPU
    and moved to ``x.device``.
    """
    _check_batch_size(batch_size)
    _check_pair(x, y)
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for start in range(0, len(x), batch_size):
        index = order[start : start + batch_size]
        xb, yb = x[index], y[index]
        if not augment.is_identity:
            xb = augment_batch(xb, generator, augment)
        yield xb, yb


def augment_batch(x: Tensor, generator: torch.Generator, augment: Augment) -> Tensor:
    """Apply ``augment`` to a batch (N, C, H, W), drawing randomness from ``generator``."""
    if augment.crop_padding > 0:
        x = random_crop(x, augment.crop_padding, generator)
    if augment.hflip:
        x = random_hflip(x, generator)
    if augment.rotate > 0.0 or augment.translate > 0.0:
        x = random_affine(x, augment.rotate, augment.translate, generator)
    return x


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``padding`` and crop each sample back at its own random offset.

    Two gathers (rows, then columns) pick each sample's window from the padded
    batch, keeping NCHW layout; with ``padding == 0`` this is the identity.
    """
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each sample left-right with probability 1/2."""
    coins = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(coins.to(x.device)[:, None, None, None], x.flip(3), x)


def random_affine(x: Tensor, rotate: float, translate: float, generator: torch.Generator) -> Tensor:
    """Rotate by up to ``rotate`` degrees and shift by up to ``translate`` of the size.

    One ``affine_grid`` + ``grid_sample`` for the whole batch; pixels brought
    in from outside the image are zeros.
    """
    n = len(x)
    uniform = torch.rand(3, n, generator=generator, dtype=torch.float64) * 2 - 1  # in [-1, 1)
    angle = uniform[0] * math.radians(rotate)
    # affine_grid works in [-1, 1] coordinates, where the image spans 2 units.
    shift = uniform[1:] * (2 * translate)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1
    ).to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _is_number(value: object, whole: bool = False) -> bool:
    """An int (or, unless ``whole``, a float) that is not a bool."""
    kinds = (int,) if whole else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")


def _check_pair(x: Tensor, y: Tensor) -> None:
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
