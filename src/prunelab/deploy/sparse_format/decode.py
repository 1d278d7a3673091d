"""Loading: every header entry checked and the memory decoding takes bounded before anything is decoded."""

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
    CSR_NNZ_BYTES, CSR_ROW_BYTES, DTYPES, ENCODINGS, ENTRY_KEYS, FLAG_BYTES, FORMAT, FORMAT_KEY, INDEX_DTYPES,
    MAX_EXPANSION, MIN_DECODE_LIMIT, PARTS, POINTER_DTYPES, RESERVED_PREFIX, SEP, SIGN_FLAG_BYTES, TENSORS_KEY,
    VALUE_CHECK_BYTES, VERSION, VERSION_KEY, as_bits, grid, packed_size, zero_flags,
)
from prunelab.errors import UserError


def _bad(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a valid prunelab sparse file: {why}")


def _read(path: Path, limit: int | None = None) -> bytes:
    """The file's bytes (the first ``limit`` of them when given)."""
    try:
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def _header_length(path: Path, head: bytes, size: int) -> int:
    """The JSON header's length from a safetensors file's first 8 bytes, checked against its size."""
    if size < 8:
        raise UserError(f"{path} is not a safetensors file (only {size} bytes)")
    n = int.from_bytes(head[:8], "little")
    if n > size - 8:
        raise UserError(f"{path} is truncated or is not a safetensors file (its header would need {n} bytes)")
    return n


def _metadata(path: Path, header_bytes: bytes) -> dict[str, str]:
    """The header's string metadata, checked to be this format and version."""
    try:
        header = json.loads(header_bytes)
    except (ValueError, RecursionError):
        raise UserError(f"{path} is not a safetensors file (its header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get(FORMAT_KEY) != FORMAT:
        raise UserError(f"{path} is not a prunelab sparse file (its header has no {FORMAT_KEY}={FORMAT!r})")
    if meta.get(VERSION_KEY) != VERSION:
        raise _bad(path, f"format version {meta.get(VERSION_KEY)!r} is not the one this prunelab reads ({VERSION})")
    if not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "its header metadata holds a value that is not a string")
    return meta


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _valid_shape(shape: Any) -> bool:
    """A list of counts whose nonzero ones multiply to an int64 (so torch can index and shape it)."""
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        return False
    return math.prod(d for d in shape if d) <= torch.iinfo(torch.int64).max


def _table(path: Path, meta: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The per-tensor descriptions, every field checked."""
    try:
        table = json.loads(meta[TENSORS_KEY])
    except (KeyError, ValueError, RecursionError):
        raise _bad(path, f"its header has no readable {TENSORS_KEY} table") from None
    if not isinstance(table, dict):
        raise _bad(path, f"{TENSORS_KEY} is not a JSON object")
    for name, entry in table.items():
        if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
            raise _bad(path, f"tensor {name!r} is not described by exactly {sorted(ENTRY_KEYS)}")
        if entry["encoding"] not in ENCODINGS:
            raise _bad(path, f"tensor {name!r} has the unknown encoding {entry['encoding']!r}")
        if entry["dtype"] not in DTYPES:
            raise _bad(path, f"tensor {name!r} has the unknown dtype {entry['dtype']!r}")
        if not _valid_shape(entry["shape"]):
            raise _bad(path, f"tensor {name!r} has the invalid shape {entry['shape']!r}")
        # Only a sparse encoding of a floating type can have -0.0 among its zeros.
        can_have = entry["encoding"] != "dense" and DTYPES[entry["dtype"]].is_floating_point
        if not _count(entry["negative_zeros"]) or (entry["negative_zeros"] and not can_have):
            raise _bad(path, f"tensor {name!r} has an invalid negative_zeros count {entry['negative_zeros']!r}")
    return table


def _stored_names(name: str, entry: Mapping[str, Any]) -> list[str]:
    if entry["encoding"] == "dense":
        return [name]
    parts = [*PARTS[entry["encoding"]], *(["zero_signs"] if entry["negative_zeros"] else [])]
    return [f"{name}{SEP}{part}" for part in parts]


def _part(
    path: Path, stored: Mapping[str, Tensor], name: str, part: str, dtypes: Sequence[torch.dtype], length: int
) -> Tensor:
    """One stored part of a tensor, checked to be 1-D of ``length`` elements of one of ``dtypes``."""
    t = stored[f"{name}{SEP}{part}"]
    if t.dtype not in dtypes or tuple(t.shape) != (length,):
        expected = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise _bad(path, f"tensor {name!r} has {part} of {t.dtype} {list(t.shape)}, expected {length} {expected}")
    return t


def _count_true(flags: Tensor) -> int:
    """The number of set flags; numpy counts them in place, while torch's sum of a bool
    tensor makes an int64 copy eight times its size."""
    return int(np.count_nonzero(flags.numpy()))


def _unpack(path: Path, stored: Mapping[str, Tensor], name: str, part: str, n: int) -> Tensor:
    """``n`` flags (1 byte each) from a packed-bits part; padding bits must be 0."""
    packed = _part(path, stored, name, part, (torch.uint8,), packed_size(n)).numpy()
    if n % 8 and packed[-1] & (0xFF >> (n % 8)):  # the last byte's bits after the n-th
        raise _bad(path, f"tensor {name!r} has padding bits set in its {part}")
    return torch.from_numpy(np.unpackbits(packed, count=n).view(bool))


def _csr_positions(path: Path, stored: Mapping[str, Tensor], name: str, shape: Sequence[int]) -> Tensor:
    """The flat positions of a CSR tensor's nonzeros, after checking its pointers and indices."""
    numel = math.prod(shape)
    rows, cols = grid(shape)
    indptr = _part(path, stored, name, "indptr", POINTER_DTYPES, rows + 1).to(torch.int64)
    counts = indptr.diff()
    nnz = int(indptr[-1])
    if int(indptr[0]) != 0 or bool((counts < 0).any()) or nnz > numel:
        raise _bad(path, f"tensor {name!r} has row pointers that do not rise from 0 to at most {numel}")
    indices = _part(path, stored, name, "indices", INDEX_DTYPES, nnz)
    if nnz and (int(indices.min()) < 0 or int(indices.max()) >= cols):
        raise _bad(path, f"tensor {name!r} has a column index outside 0..{cols - 1}")
    position = torch.repeat_interleave(counts).mul_(cols).add_(indices)  # row id * cols + column
    if bool((position[1:] <= position[:-1]).any()):
        raise _bad(path, f"tensor {name!r} has column indices that do not rise within a row")
    return position


def _csr_keep(path: Path, stored: Mapping[str, Tensor], name: str, shape: Sequence[int]) -> Tensor:
    """The nonzero flags a CSR tensor describes."""
    keep = torch.zeros(math.prod(shape), dtype=torch.bool)
    return keep.index_fill_(0, _csr_positions(path, stored, name, shape), True)


def _decode_bytes(stored: Mapping[str, Tensor], name: str, entry: Mapping[str, Any]) -> tuple[int, int]:
    """(bytes of the decoded tensor, most bytes its decoding allocates, output included), from sizes alone.

    Dense tensors are returned as loaded, so they cost nothing more. The bound is
    what the decoder's operations allocate, every temporary counted as alive at once.
    """
    if entry["encoding"] == "dense":
        return 0, 0
    numel, item = math.prod(entry["shape"]), DTYPES[entry["dtype"]].itemsize
    flags = FLAG_BYTES + (SIGN_FLAG_BYTES if entry["negative_zeros"] else 0)
    nnz = stored[f"{name}{SEP}values"].numel()
    peak = numel * (item + flags) + nnz * (item + VALUE_CHECK_BYTES)
    if entry["encoding"] == "csr":
        rows, _ = grid(entry["shape"])
        indices = stored[f"{name}{SEP}indices"].numel()
        peak += indices * CSR_NNZ_BYTES + (rows + 1) * CSR_ROW_BYTES
    return numel * item, peak


def _check_memory(path: Path, table: Mapping[str, Mapping[str, Any]], stored: Mapping[str, Tensor],
                  file_size: int) -> None:
    """Refuse, naming the tensor, a file whose decoding would allocate more than the limit."""
    limit = max(MIN_DECODE_LIMIT, MAX_EXPANSION * file_size)
    decoded = 0
    for name, entry in table.items():
        size, peak = _decode_bytes(stored, name, entry)
        if decoded + peak > limit:
            raise _bad(path, f"decoding its {entry['encoding']} tensor {name!r} of {entry['dtype']} "
                             f"{entry['shape']} would take up to {decoded + peak} bytes of memory, "
                             f"implausibly many for a {file_size}-byte file (the limit is {limit})")
        decoded += size


def _decode(path: Path, stored: Mapping[str, Tensor], name: str, entry: Mapping[str, Any]) -> Tensor:
    """One tensor of the state dict, rebuilt bit for bit from its stored parts."""
    dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
    if entry["encoding"] == "dense":
        t = stored[name]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise _bad(path, f"tensor {name!r} is stored as {t.dtype} {list(t.shape)} "
                             f"but described as {entry['dtype']} {list(shape)}")
        return t
    numel = math.prod(shape)
    if entry["encoding"] == "bitmask":
        keep = _unpack(path, stored, name, "bits", numel)
    else:
        keep = _csr_keep(path, stored, name, shape)
    nnz = _count_true(keep)
    values = as_bits(_part(path, stored, name, "values", (dtype,), nnz))
    if bool(zero_flags(values, dtype).any()):
        raise _bad(path, f"tensor {name!r} lists a zero among its nonzero values")
    bits = torch.zeros(numel, dtype=values.dtype)
    bits.masked_scatter_(keep, values)  # unlike bits[keep] = values, no int64 index of the nonzeros
    if entry["negative_zeros"]:
        _restore_negative_zeros(path, stored, name, entry, bits, keep)
    return bits.view(dtype).reshape(shape)


def _restore_negative_zeros(
    path: Path, stored: Mapping[str, Tensor], name: str, entry: Mapping[str, Any], bits: Tensor, keep: Tensor
) -> None:
    """Set the sign bit of the zeros that ``zero_signs`` marks; ``keep`` (the nonzero flags) is used up."""
    zero = torch.logical_not(keep, out=keep)  # in place: the flags now mark the zeros
    signs = _unpack(path, stored, name, "zero_signs", _count_true(zero))
    if _count_true(signs) != entry["negative_zeros"]:
        raise _bad(path, f"tensor {name!r} has {_count_true(signs)} zero signs set, "
                         f"not the {entry['negative_zeros']} its description says")
    negative = torch.zeros_like(zero).masked_scatter_(zero, signs)
    bits.masked_fill_(negative, torch.iinfo(bits.dtype).min)  # the sign bit alone: -0.0


def _load_into(path: Path, model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """``model.load_state_dict(state, strict=True)``, with a mismatch told in one sentence."""
    expected = model.state_dict()
    wrong = [k for k in expected if k not in state] + [k for k in state if k not in expected]
    wrong += [k for k in expected if k in state and expected[k].shape != state[k].shape]
    if wrong:
        raise UserError(f"{path} does not fit the model: {len(wrong)} tensors are missing, "
                        f"unexpected or of another shape (first: {wrong[0]!r})")
    model.load_state_dict(state, strict=True)


def load_sparse(path: Path, model: nn.Module | None = None) -> dict[str, Tensor]:
    """The state dict stored by :func:`save_sparse` at ``path``, bit-identical to what was saved.

    With ``model``, the state is also loaded into it (strictly). Never
    unpickles; every header field is checked, and a damaged, truncated,
    tampered or foreign file raises :class:`UserError` naming the file, as does
    one whose decoding would allocate more than ``max(4 GiB, 4096 x its size)``
    (see the module docstring).
    """
    path = Path(path)
    data = _read(path)
    n = _header_length(path, data, len(data))
    table = _table(path, _metadata(path, data[8 : 8 + n]))
    try:
        stored = safetensors.torch.load(data)
    except Exception as exc:  # noqa: BLE001 (any failure means a damaged file)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is truncated or damaged ({reason})") from None
    names = [s for name, entry in table.items() for s in _stored_names(name, entry)]
    if len(set(names)) != len(names) or set(names) != set(stored):
        raise _bad(path, "its stored tensors do not match its description")
    _check_memory(path, table, stored, len(data))
    state = {name: _decode(path, stored, name, entry) for name, entry in table.items()}
    if model is not None:
        _load_into(path, model, state)
    return state


def read_metadata(path: Path) -> dict[str, str]:
    """The caller's metadata stored by :func:`save_sparse` (prunelab's own keys left out); reads only the header."""
    path = Path(path)
    head = _read(path, 8)
    size = path.stat().st_size
    n = _header_length(path, head, size)
    meta = _metadata(path, _read(path, 8 + n)[8:])
    return {k: v for k, v in meta.items() if not k.startswith(RESERVED_PREFIX)}
