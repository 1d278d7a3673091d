"""Saving: each tensor of a state dict in its smallest exact encoding (see the package docstring)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from prunelab.deploy.sparse_format.layout import (
    DTYPES, ENCODINGS, ENTRY_BYTES, FORMAT, FORMAT_KEY, PARTS, RESERVED_PREFIX, SEP, TENSORS_KEY, VERSION,
    VERSION_KEY, as_bits, grid, index_dtype, packed_size, pointer_dtype, zeros_of,
)
from prunelab.errors import UserError
from prunelab.io import atomic_write_bytes


def plain_state_dict(model_or_state: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Compact, contiguous CPU copies of a model's (or a state dict's) tensors.

    ``torch.nn.utils.prune``'s ``X_orig`` / ``X_mask`` pairs are baked into
    ``X`` (pruned entries +0.0), so the result loads into the plain model.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise UserError(f"state entry names must be strings, got {name!r}")
        if not isinstance(value, Tensor):
            raise UserError(f"state entry {name!r} is a {type(value).__name__}, not a tensor")
        stem = name.removesuffix("_orig")
        if name.endswith("_mask") and f"{name.removesuffix('_mask')}_orig" in state:
            continue
        if name.endswith("_orig") and f"{stem}_mask" in state:
            value = torch.where(state[f"{stem}_mask"].bool(), value, torch.zeros((), dtype=value.dtype))
            name = stem
        # A copy, not .contiguous(): a view would drag its whole storage into the file.
        out[name] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return out


def _sizes(shape: Sequence[int], dtype: torch.dtype, nnz: int, negative_zeros: int) -> dict[str, int]:
    numel = math.prod(shape)
    item = dtype.itemsize
    rows, cols = grid(shape)
    signs = packed_size(numel - nnz) if negative_zeros else 0
    return {
        "dense": numel * item,
        "bitmask": packed_size(numel) + nnz * item + signs,
        "csr": (rows + 1) * pointer_dtype(numel).itemsize + nnz * (index_dtype(cols).itemsize + item) + signs,
    }


def _choose(sizes: Mapping[str, int], negative_zeros: int) -> str:
    def cost(encoding: str) -> int:
        entries = len(PARTS[encoding]) + (1 if negative_zeros and encoding != "dense" else 0)
        return sizes[encoding] + ENTRY_BYTES * entries

    return min(ENCODINGS, key=cost)  # min keeps the first of equals: dense wins ties


def _stats(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(raw bits, zero flags, negative-zero flags) of a tensor."""
    bits = as_bits(t.detach().to("cpu").contiguous())
    return (bits, *zeros_of(bits, t.dtype))


def encoding_sizes(tensor: Tensor) -> dict[str, int]:
    """Bytes of tensor data each encoding stores for ``tensor`` (safetensors header not counted)."""
    _, zero, negative = _stats(tensor)
    return _sizes(tuple(tensor.shape), tensor.dtype, int((~zero).sum()), int(negative.sum()))


def choose_encoding(tensor: Tensor) -> str:
    """The encoding :func:`save_sparse` picks for ``tensor``: fewest bytes, header entries included."""
    _, zero, negative = _stats(tensor)
    n_negative = int(negative.sum())
    return _choose(_sizes(tuple(tensor.shape), tensor.dtype, int((~zero).sum()), n_negative), n_negative)


def _pack(flags: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(flags.numpy()))


def _encode(name: str, t: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The stored tensors of one state entry and its header description."""
    bits, zero, negative = _stats(t)
    nnz, n_negative = int((~zero).sum()), int(negative.sum())
    encoding = _choose(_sizes(tuple(t.shape), t.dtype, nnz, n_negative), n_negative)
    entry = {"encoding": encoding, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
             "negative_zeros": 0 if encoding == "dense" else n_negative}
    if encoding == "dense":
        return {name: t}, entry
    keep = ~zero
    parts = {"values": bits[keep].view(t.dtype)}
    if encoding == "bitmask":
        parts["bits"] = _pack(keep)
    else:
        rows, cols = grid(t.shape)
        position = keep.nonzero().reshape(-1)
        indptr = torch.zeros(rows + 1, dtype=torch.int64)
        indptr[1:] = torch.bincount(position // max(cols, 1), minlength=rows).cumsum(0)
        parts["indptr"] = indptr.to(pointer_dtype(t.numel()))
        parts["indices"] = (position % max(cols, 1)).to(index_dtype(cols))
    if n_negative:
        parts["zero_signs"] = _pack(negative[zero])
    return {f"{name}{SEP}{part}": value for part, value in parts.items()}, entry


def save_sparse(
    model_or_state: nn.Module | Mapping[str, Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a model's (or a state dict's) tensors to ``path`` in the sparse safetensors format.

    Each tensor is stored dense, as a bitmask + values, or as CSR, whichever
    takes fewest bytes; :func:`load_sparse` restores it bit for bit.
    ``metadata`` (strings only) goes into the file's header, e.g. the run id.
    The file is written to a temporary name and renamed.
    """
    user = dict(metadata or {})
    for key, value in user.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UserError(f"sparse file metadata must map strings to strings, got {key!r}: {value!r}")
        if key.startswith(RESERVED_PREFIX):
            raise UserError(f"metadata key {key!r} is reserved: keys starting with {RESERVED_PREFIX!r} are prunelab's")
    tensors: dict[str, Tensor] = {}
    table: dict[str, dict[str, Any]] = {}
    for name, t in plain_state_dict(model_or_state).items():
        if t.dtype not in DTYPES.values():
            raise UserError(f"tensor {name!r} has dtype {t.dtype}, which the sparse format cannot store")
        parts, table[name] = _encode(name, t)
        clash = tensors.keys() & parts.keys()
        if clash:
            raise UserError(f"tensor name {sorted(clash)[0]!r} collides with a stored part of another tensor")
        tensors.update(parts)
    header = {**user, FORMAT_KEY: FORMAT, VERSION_KEY: VERSION, TENSORS_KEY: json.dumps(table)}
    atomic_write_bytes(Path(path), safetensors.torch.save(tensors, metadata=header))
