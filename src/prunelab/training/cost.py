"""FLOP accounting: what a forward pass, a training step or an evaluation costs.

Conventions (docs/methods.md, "Counting compute honestly"):

- FLOPs are what :class:`torch.utils.flop_counter.FlopCounterMode` counts for
  one forward pass of one sample: every matrix multiply and convolution of
  any module (attention included), one multiply-accumulate = 2 FLOPs; bias
  adds, normalisation, activations and pooling are not counted;
- each counted operation is attributed to the parameter among its matrix
  operands (a Linear's or convolution's weight, an attention projection,
  whatever a module's forward multiplies by), found by storage, so a weight
  used through a view or a slice (``in_proj_weight``) is still found;
  operations on activations alone (attention scores) are kept under
  :data:`UNATTRIBUTED` and stay dense;
- a sparse parameter costs its dense FLOPs times its density (the ideal a
  sparse kernel could reach, which is what the literature reports);
- a training step costs three forwards: the backward pass computes the
  gradients of both the inputs and the weights, each about one forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from prunelab.models.modes import eval_mode

# Forward + backward (input gradients + weight gradients), in forwards.
TRAIN_STEP_FORWARDS = 3
UNATTRIBUTED = "(activations)"
"""The key of FLOPs that no parameter takes part in (e.g. attention's query-key products)."""


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Forward FLOPs per sample of ``model``, by the parameter each operation multiplies by.

    ``input_shape`` excludes the batch dimension. One all-zero sample runs
    through ``model`` in eval mode under :class:`FlopCounterMode`, so the
    count follows whatever the forward really does: a layer called twice
    counts twice; one never called counts 0. Every parameter of two or more
    dimensions has a key (names as in ``model.named_parameters()``, tied
    weights under one name); :data:`UNATTRIBUTED` appears when some counted
    operation involves no parameter. The training flags of all modules are
    restored afterwards and no buffer (BatchNorm statistics) changes.
    """
    params = {name: p for name, p in model.named_parameters() if p.dim() >= 2}
    by_storage = {p.untyped_storage().data_ptr(): name for name, p in params.items()}
    flops = dict.fromkeys(params, 0)
    counter = FlopCounterMode(display=False, custom_mapping={
        op: _attributing(formula, by_storage, flops) for op, formula in flop_registry.items()
    })
    # Grad stays enabled: under no_grad nn.MultiheadAttention takes a fused fast path that the
    # counter has no formula for. Nothing is backpropagated, so no gradient is touched.
    with eval_mode(model), counter:
        model(torch.zeros((1, *input_shape), **_tensor_kwargs(model)))
    if flops.get(UNATTRIBUTED) == 0:
        del flops[UNATTRIBUTED]
    assert sum(flops.values()) == counter.get_total_flops()
    return flops


def _attributing(formula: Callable[..., int], by_storage: Mapping[int, str], flops: dict[str, int]
                 ) -> Callable[..., int]:
    """``formula`` (a FlopCounterMode formula taking the op's real arguments) that also adds its count
    to the parameter among the arguments, found by the storage it shares with the argument."""

    def count(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        value = formula(*args, out_val=out_val, **kwargs)
        key = next((by_storage[ptr] for ptr in _storages(args, kwargs) if ptr in by_storage), UNATTRIBUTED)
        flops[key] = flops.get(key, 0) + value
        return value

    count._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode passes tensors, not shapes
    return count


def _storages(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[int]:
    """The storage addresses of the tensor arguments of two or more dimensions, in argument order."""
    return [t.untyped_storage().data_ptr() for t in _tensors((args, kwargs)) if t.dim() >= 2 and t.numel() > 0]


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``obj``, looking into lists, tuples and dict values (an aten op's arguments)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _tensor_kwargs(model: nn.Module) -> dict[str, object]:
    """Device and floating dtype of ``model``'s first parameter (CPU float32 if none)."""
    param = next(model.parameters(), None)
    if param is None or not param.is_floating_point():
        return {}
    return {"device": param.device, "dtype": param.dtype}


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
