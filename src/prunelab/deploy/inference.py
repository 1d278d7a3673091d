"""Faster CPU inference for pruned models: smaller dense layers, then sparse kernels.

:func:`sparse_inference` turns a pruned model (zeros baked into its weights)
into one that computes the same function faster: dead neurons and channels
are cut out structurally (:func:`prunelab.deploy.shrink.shrink`), then every large
enough ``nn.Linear`` whose weight is sparse enough becomes a
:class:`SparseLinear`, a sparse CSR matrix times the input.

The result is for inference only: it is in eval mode, its parameters do not
require gradients, and training it (or putting it back in train mode, where
BatchNorm would use batch statistics of the cut layers) is not supported.

Measured on this project's 2-core CPU (torch 2.13, MKL sparse kernels), the
CSR product beats the dense one for a layer of 300x784 or more once about
85% of its weights are zero (batch 1 and 64); below roughly 100k weights the
sparse kernel's fixed cost per call outweighs its savings at batch 1 even at
98% sparsity (256x256: 0.9x), so such layers stay dense.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from prunelab.errors import UserError
from prunelab.deploy.shrink import shrink as shrink_model
from prunelab.models.modes import eval_mode
from prunelab.models.outputs import ExampleInput, as_inputs, call, max_abs_difference, output_tensors, within
from prunelab.sparsity.channel_cut import remove_channels
from prunelab.sparsity.channels import dead_channels, find_groups

DEFAULT_THRESHOLD = 0.85
"""Weight sparsity at or above which a Linear layer gets the sparse kernel (measured crossover)."""
DEFAULT_MIN_WEIGHTS = 100_000
"""Linear layers with fewer weights stay dense: the sparse kernel's per-call cost dominates them."""

_BETA_WARNING = "Sparse CSR tensor support is in beta"
_TOLERANCE = 1e-5  # max abs difference allowed on example_input, per unit of output scale


@contextmanager
def _csr_beta_quiet() -> Iterator[None]:
    """Silence torch's "sparse CSR support is in beta" warning, which says nothing to our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BETA_WARNING, category=UserWarning)
        yield


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as a sparse CSR matrix with int32 indices.

    The CSR parts are buffers (they move with ``.to()`` and are saved in the
    state dict); the CSR tensor built on them is cached, and rebuilt when the
    buffers are replaced (``.to()``, ``load_state_dict``, copying), since CSR
    tensors cannot be deep-copied or pickled themselves. The product is
    computed as ``(W x^T + b)^T``: the kernel wants the sparse matrix on the
    left. Its output is a transposed view, so element-wise ops keep that
    layout and a following SparseLinear gets ``x^T`` without a copy.
    Inference only: no gradients flow to the weights.
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Store ``weight`` (out_features, in_features; dense, zeros dropped) and ``bias``."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with _csr_beta_quiet():
            csr = weight.detach().to_sparse_csr()
        # int32 indices: measured faster than int64 here (MKL's sparse BLAS is 32-bit indexed).
        self.register_buffer("crow_indices", csr.crow_indices().to(torch.int32))
        self.register_buffer("col_indices", csr.col_indices().to(torch.int32))
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._refresh()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """A SparseLinear computing what ``linear`` computes (its current weights)."""
        return cls(linear.weight, linear.bias)

    @property
    def density(self) -> float:
        """Fraction of the weights that are stored (nonzero)."""
        return self.values.numel() / (self.out_features * self.in_features)

    def weight_csr(self) -> torch.Tensor:
        """The weight as a sparse CSR tensor (out_features, in_features), sharing the buffers."""
        return self._csr

    def _refresh(self) -> None:
        """Rebuild the cached CSR tensor on the current buffers (a view of them: no copy)."""
        with _csr_beta_quiet():
            self._csr = torch.sparse_csr_tensor(
                self.crow_indices,
                self.col_indices,
                self.values,
                (self.out_features, self.in_features),
                check_invariants=False,  # the parts come from a valid CSR tensor
            )
        # Measured: building the CSR tensor and silencing its warning on every call cost ~7 us,
        # a quarter of a batch-1 call of a 784x300 layer; so it is built only here.

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> SparseLinear:
        """Apply ``fn`` to the buffers (``.to()``, ``.double()``, ...), then rebuild the cache."""
        super()._apply(fn, recurse)
        self._refresh()
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def __getstate__(self) -> dict[str, Any]:
        """State for copying and pickling, without the cache (CSR tensors have no storage to copy)."""
        state = self.__dict__.copy()
        del state["_csr"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._refresh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``x`` of shape (..., in_features)."""
        leading = x.shape[:-1]
        columns = x.reshape(-1, self.in_features).t()
        if self.bias is None:
            out = torch.mm(self._csr, columns)
        else:
            out = torch.addmm(self.bias.unsqueeze(1), self._csr, columns)
        return out.t().reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        """Sizes and density, as nn.Linear shows its sizes."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={self.density:.4f}")  # fmt: skip


def sparsify_linears(model: nn.Module, threshold: float, min_weights: int = DEFAULT_MIN_WEIGHTS) -> int:
    """Replace, in place, each ``nn.Linear`` of ``model`` with at least ``min_weights``
    weights and weight sparsity at or above ``threshold`` by a :class:`SparseLinear`.

    Only exact ``nn.Linear`` instances are swapped: subclasses may have their
    own forward, and layers such as MultiheadAttention's output projection
    are read by their parent without being called. Returns the number swapped.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) is nn.Linear
                and child.weight.numel() >= min_weights
                and _sparse_enough(child.weight, threshold)
            ):
                setattr(parent, name, SparseLinear.from_linear(child).train(child.training))
                swapped += 1
    return swapped


def _sparse_enough(weight: torch.Tensor, threshold: float) -> bool:
    """Whether ``weight``'s sparsity is at least ``threshold``, counted in weights as allocation
    counts them: pruning n weights to sparsity s keeps round((1 - s) * n), so the fraction of
    zeros can fall just short of s (251x347 at 0.9: 0.899997) and must still count as s."""
    return int(torch.count_nonzero(weight)) <= round((1 - threshold) * weight.numel())


def sparse_inference(
    model: nn.Module,
    threshold: float = DEFAULT_THRESHOLD,
    shrink: bool = True,
    example_input: ExampleInput | None = None,
    min_weights: int = DEFAULT_MIN_WEIGHTS,
) -> nn.Module:
    """A model computing the same function as ``model``, faster on CPU; for inference only.

    ``model`` holds its pruned weights as exact zeros (masks baked in). With
    ``shrink``, dead neurons and channels are removed first: with
    ``example_input``, every channel group (Torch-Pruning's dependency graph,
    residual additions included) whose output parameters are all zero, then
    (:func:`prunelab.deploy.shrink.shrink`; models torch.fx cannot trace skip this
    step) units on simple chains that are read with zero weights or put out
    a constant. Then Linear layers with at least ``min_weights`` weights and
    weight sparsity at or above ``threshold`` become :class:`SparseLinear`.
    Convolutions get no sparse kernel.

    The result is a new model in eval mode sharing no storage with ``model``,
    with no trainable parameters; call it under ``torch.no_grad()`` or
    ``torch.inference_mode()``. Its outputs equal ``model``'s (in eval mode) up
    to float rounding. With ``example_input`` (a tensor, or a tuple of the
    model's positional inputs), that is checked on it, for outputs of any
    kind (tensors, tuples, dicts, Hugging Face ``ModelOutput``s): a max abs
    difference above 1e-5 (times the largest output magnitude, when that
    exceeds 1) raises RuntimeError, which would be a bug in prunelab.
    """
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"threshold must be a weight sparsity in [0, 1], got {threshold}")
    if min_weights < 0:
        raise UserError(f"min_weights must be at least 0, got {min_weights}")
    result = shrink_model(_without_dead_channels(model, example_input)) if shrink else copy.deepcopy(model).eval()
    sparsify_linears(result, threshold, min_weights)
    result.requires_grad_(False)
    if example_input is not None:
        _check_same_function(model, result, example_input)
    return result


def _without_dead_channels(model: nn.Module, example_input: ExampleInput | None) -> nn.Module:
    """``model``, or (with an example input to trace) a copy without the channel groups whose every output
    parameter is zero, residual groups included (:func:`prunelab.sparsity.channels.dead_channels`)."""
    if example_input is None:
        return model
    inputs = as_inputs(example_input)
    if len(inputs) != 1:  # the channel tracer takes one input tensor; shrink still runs
        return model
    copied = copy.deepcopy(model).eval()
    try:
        groups = find_groups(copied, inputs[0][:1])
    except Exception:  # noqa: BLE001 (a model Torch-Pruning cannot trace keeps its channels; shrink still runs)
        return model
    remove_channels(copied, groups, dead_channels(copied, groups))
    return copied


def _check_same_function(model: nn.Module, result: nn.Module, example_input: ExampleInput) -> None:
    """Raise RuntimeError if ``result`` and ``model`` (in eval mode) differ on ``example_input``.

    Outputs of any kind compare tensor by tensor (:func:`prunelab.models.outputs.output_tensors`).
    """
    with torch.no_grad(), eval_mode(model):
        expected, actual = output_tensors(call(model, example_input)), output_tensors(call(result, example_input))
    try:
        error, scale = max_abs_difference(expected, actual)
    except ValueError as mismatch:
        raise RuntimeError(f"sparse_inference changed the model's outputs ({mismatch}); this is a bug in "
                           "prunelab, please report it with the model") from None
    if not within(error, scale, _TOLERANCE):
        raise RuntimeError(
            f"sparse_inference changed the model's output on example_input (max abs difference "
            f"{error:.3g}); this is a bug in prunelab, please report it with the model"
        )
