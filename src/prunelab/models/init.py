"""The default weight initialisation of every model prunelab builds.

Kaiming-normal everywhere, as the seed paper's code does (``fan_out`` for
convolutions, the torchvision ResNet choice; ``fan_in`` for linear layers so
that activations keep their scale through the classifier). Biases start at
zero and BatchNorm starts as the identity, so the only randomness of a fresh
model is in its Conv and Linear weights and a seed fixes it completely.
"""

from __future__ import annotations

from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def init_weights(model: nn.Module) -> None:
    """Initialise ``model`` in place: Kaiming-normal weights, zero biases, identity BN."""
    # modules() visits layers in definition order, so the RNG draws (and
    # hence the weights for a given seed) do not depend on anything else.
    for module in model.modules():
        if isinstance(module, _CONVS):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            _zero_bias(module)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            _zero_bias(module)
        elif isinstance(module, _NORMS) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _zero_bias(module: nn.Module) -> None:
    """Zero ``module.bias`` when the layer has one (``bias=False`` layers have None)."""
    if module.bias is not None:
        nn.init.zeros_(module.bias)
