"""The model zoo: every network prunelab can train, by name.

Importing this package imports each family module, which registers its
builders in :data:`MODELS`; :func:`build_model` is the one way to get a
ready-to-train network.
"""

from __future__ import annotations

from torch import nn

# Imported for their registrations; the names are re-exported for convenience.
from prunelab.models import convnets, lenet, resnet, vgg
from prunelab.models.init import init_weights
from prunelab.models.modes import eval_mode
from prunelab.models.registry import MODELS, ModelBuilder

__all__ = ["MODELS", "ModelBuilder", "build_model", "eval_mode", "init_weights"]
_FAMILIES = (lenet, convnets, resnet, vgg)


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Build model ``name`` for images of ``in_channels`` x ``image_size`` squared and
    ``num_classes`` classes, with the default Kaiming initialisation applied.

    Seed ``torch.manual_seed`` first for reproducible weights. Unknown names and
    images too small for the model raise :class:`prunelab.errors.UserError`.
    """
    model = MODELS.get(name)(in_channels, image_size, num_classes)
    init_weights(model)
    return model
