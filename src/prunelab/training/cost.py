"""FLOP accounting: what a forward pass, a training step or an evaluation costs.

Conventions (methods.md, "Counting compute honestly"):

- one multiply-accumulate (MAC) is 2 FLOPs;
- only Conv and Linear layers are counted, keyed by the name of their
  ``weight`` parameter, because those are the tensors pruning makes sparse;
  bias adds, BatchNorm, activations and pooling are left out (they are a
  few percent of the total and do not shrink with sparsity);
- a sparse layer costs its dense FLOPs times its density (the ideal a sparse
  kernel could reach, which is what the literature reports);
- a training step costs three forwards: the backward pass computes the
  gradients of both the inputs and the weights, each about one forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_COUNTED = (nn.Linear, *_CONVS, *_TRANSPOSED_CONVS)

ForwardHook = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]

# Forward + backward (input gradients + weight gradients), in forwards.
TRAIN_STEP_FORWARDS = 3


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Forward FLOPs per sample of every Conv and Linear layer of ``model``.

    ``input_shape`` excludes the batch dimension. The count is measured by
    running one all-zero sample through ``model`` (eval mode, no grad) with
    forward hooks, so it follows whatever the forward really does: a layer
    called twice counts twice, one never called counts 0. Keys are the
    names of the layers' weights as in ``model.named_parameters()``; layers
    that share one weight add up under that weight's name. The training
    flags of all modules are restored afterwards.
    """
    weight_names = {id(param): name for name, param in model.named_parameters()}
    flops: dict[str, int] = {}
    handles: list[RemovableHandle] = []
    for module_name, module in model.named_modules():
        if not isinstance(module, _COUNTED):
            continue
        key = weight_names.get(id(module.weight), _join(module_name, "weight"))
        flops.setdefault(key, 0)
        handles.append(module.register_forward_hook(_make_counter(flops, key)))
    try:
        with _eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *input_shape), **_tensor_kwargs(model)))
    finally:
        for handle in handles:
            handle.remove()
    return flops


def _make_counter(flops: dict[str, int], key: str) -> ForwardHook:
    """A forward hook adding the FLOPs of one call of its module to ``flops[key]``."""

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        flops[key] += 2 * _macs(module, inputs[0], output)

    return hook


def _macs(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Multiply-accumulates of one call of a Conv or Linear ``module`` (batch of 1)."""
    if isinstance(module, nn.Linear):
        # Every output value is a dot product over in_features inputs; extra
        # leading dims (sequences) simply multiply the number of outputs.
        return y.numel() * module.in_features
    kernel = math.prod(module.kernel_size)
    if isinstance(module, _TRANSPOSED_CONVS):
        # Each input value is scattered through the kernel to the channels of its group.
        return x.numel() * (module.out_channels // module.groups) * kernel
    # Each output value sums over its group's input channels times the kernel.
    return y.numel() * (module.in_channels // module.groups) * kernel


def _join(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` at the root (the way torch names parameters)."""
    return f"{prefix}.{name}" if prefix else name


def _tensor_kwargs(model: nn.Module) -> dict[str, object]:
    """Device and floating dtype of ``model``'s first parameter (CPU float32 if none)."""
    param = next(model.parameters(), None)
    if param is None or not param.is_floating_point():
        return {}
    return {"device": param.device, "dtype": param.dtype}


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, then restore every submodule's own training flag."""
    # model.train(flag) would set all submodules alike; a model may
    # deliberately keep some (e.g. frozen BN) in eval while training.
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def sparse_forward_flops(layer_flops: Mapping[str, int], densities: Mapping[str, float]) -> float:
    """Forward FLOPs per sample when layer ``name`` keeps ``densities[name]`` of its weights.

    Layers absent from ``densities`` count as dense. A density for a name that
    is not in ``layer_flops`` or outside [0, 1] is a bug and raises ValueError.
    """
    unknown = sorted(set(densities) - set(layer_flops))
    if unknown:
        raise ValueError(f"densities given for layers with no FLOP count: {unknown}")
    total = 0.0
    for name, flops in layer_flops.items():
        density = densities.get(name, 1.0)
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density of {name!r} must be in [0, 1], got {density}")
        total += flops * density
    return total


def train_step_flops(
    layer_flops: Mapping[str, int], densities: Mapping[str, float], batch_size: int
) -> float:
    """FLOPs of one training step on ``batch_size`` samples: forward + backward (2x forward)."""
    return TRAIN_STEP_FORWARDS * batch_size * sparse_forward_flops(layer_flops, densities)


def dense_train_step_flops(layer_flops: Mapping[str, int], batch_size: int) -> float:
    """FLOPs of the same training step with every layer dense (the dense-equivalent count)."""
    return train_step_flops(layer_flops, {}, batch_size)


def eval_flops(
    layer_flops: Mapping[str, int], densities: Mapping[str, float], n_samples: int
) -> float:
    """FLOPs of evaluating ``n_samples`` samples (forward only)."""
    return n_samples * sparse_forward_flops(layer_flops, densities)
