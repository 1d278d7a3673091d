"""A model's inputs and outputs of any kind, seen as flat sequences of tensors.

Models return a tensor, a tuple or list (an LSTM's ``(output, (h, c))``), a
dict, or a Hugging Face ``ModelOutput`` (an ``OrderedDict`` subclass holding
only the fields that are set, with ``to_tuple()``). Whatever checks or
compares outputs (:func:`prunelab.sparse_inference`, the ONNX export check,
the default loss of the data-driven criteria) goes through
:func:`output_tensors`, so every kind is handled the same way, without
importing transformers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

from torch import Tensor, nn

from prunelab.errors import UserError

#: One input tensor, or the positional inputs of a model taking several.
ExampleInput = Union[Tensor, Sequence[Tensor]]


def output_tensors(output: object) -> list[Tensor]:
    """The tensors of ``output``, flattened depth-first in a fixed order.

    A tensor is itself; a mapping (dict, ``ModelOutput``) gives its values in
    insertion order, a tuple or list its items in order, and any other object
    with ``to_tuple()`` that tuple. Everything else (None, numbers, strings)
    holds no tensor and is skipped. The order is the one ``torch.onnx`` and
    ``torch.utils._pytree`` flatten outputs in, so the ONNX graph's outputs
    line up with this list.
    """
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        items: Sequence[object] = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = output
    elif callable(getattr(output, "to_tuple", None)):
        items = output.to_tuple()  # type: ignore[attr-defined]
    else:
        return []
    return [tensor for item in items for tensor in output_tensors(item)]


def as_inputs(example: ExampleInput) -> tuple[Tensor, ...]:
    """``example`` as the tuple of positional inputs a model is called with (a tensor, or a tuple/list
    of tensors); one-sentence :class:`UserError` for anything else."""
    inputs = (example,) if isinstance(example, Tensor) else example
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise UserError(f"example_input must be a tensor or a tuple of tensors, got {type(example).__name__}")
    return tuple(inputs)


def call(model: nn.Module, example: ExampleInput) -> object:
    """``model`` applied to ``example``'s tensors as positional inputs."""
    return model(*as_inputs(example))


def max_abs_difference(expected: Sequence[Tensor], actual: Sequence[Tensor]) -> tuple[float, float]:
    """The largest ``|expected - actual|`` over paired tensors and the largest ``|expected|`` (for a
    tolerance relative to the output's scale), both 0.0 when there are no elements.

    Raises ValueError saying what differs when the number of tensors or a shape differs.
    """
    if len(expected) != len(actual):
        raise ValueError(f"{len(actual)} output tensors instead of {len(expected)}")
    error = scale = 0.0
    for index, (want, got) in enumerate(zip(expected, actual)):
        if tuple(want.shape) != tuple(got.shape):
            raise ValueError(f"output {index} has shape {tuple(got.shape)} instead of {tuple(want.shape)}")
        if want.numel():
            # float64 on the CPU: integer and boolean outputs compare too, and rounding adds nothing.
            want64, got64 = want.detach().cpu().double(), got.detach().cpu().double()
            error = max(error, float((want64 - got64).abs().max()))
            scale = max(scale, float(want64.abs().max()))
    return error, scale


def within(error: float, scale: float, tolerance: float) -> bool:
    """Whether ``error`` is at most ``tolerance``, times ``scale`` when that exceeds 1: absolute for
    outputs of order 1, relative for larger ones (summation order changes rounding). NaN is never within."""
    return error <= tolerance * max(1.0, scale)

