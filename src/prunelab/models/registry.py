"""The model registry, kept apart from ``__init__`` so family modules can import it.

A builder takes ``(in_channels, image_size, num_classes)`` and returns an
untrained ``nn.Module``; :func:`prunelab.models.build_model` applies the
default initialisation afterwards, so builders need not care about init.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from prunelab.errors import UserError
from prunelab.registry import Registry

ModelBuilder = Callable[[int, int, int], nn.Module]

MODELS: Registry[ModelBuilder] = Registry[ModelBuilder]("model")


def require_min_size(model: str, image_size: int, minimum: int) -> None:
    """Raise a :class:`UserError` when ``image_size`` is below what ``model`` can take."""
    if image_size < minimum:
        raise UserError(
            f"model {model!r} needs images of at least {minimum}x{minimum} pixels, got {image_size}"
        )
