"""A sparse safetensors format: every tensor in its smallest exact encoding.

A file is an ordinary safetensors file (no pickle anywhere) whose header says
how to rebuild each tensor of a state dict:

- ``dense``: stored as is, under its own name;
- ``bitmask``: ``NAME::bits``, one bit per element marking the nonzero ones
  (packed, first element in the most significant bit, as ``numpy.packbits``),
  and ``NAME::values``, the nonzero elements in order, in the tensor's dtype;
- ``csr``: the tensor seen as a matrix (rows = its first dimension; a scalar or
  a vector is one row), with ``NAME::indptr`` (row pointers, int32 or int64),
  ``NAME::indices`` (the column of each nonzero, in the smallest integer type
  that holds them) and ``NAME::values``.

"Zero" means all bits zero, except that a floating-point -0.0 is a zero too:
pruning by multiplication (``torch.nn.utils.prune``, and prunelab runs stored
before pruned weights were made +0.0) leaves -0.0 wherever a weight was
negative, and counting those as nonzero would make such files dense. Their signs are kept in ``NAME::zero_signs``, one
bit per zero element, stored only when at least one zero is negative. Values
are moved as raw bits, so every tensor comes back bit-identical, NaN payloads
included. The encoding of each tensor is the one with the fewest bytes, each
extra stored tensor counted with its header entry; ties go to dense.

The header's string metadata holds ``prunelab.format``,
``prunelab.format_version``, ``prunelab.tensors`` (JSON: name -> encoding,
shape, dtype, negative_zeros) and the caller's own entries.

Loading bounds its memory. A CSR tensor of any shape takes a few bytes, so a
hostile header could ask for terabytes. Before decoding anything,
:func:`load_sparse` computes from the header an upper bound of the bytes each
tensor's decoding allocates beyond the file's own tensors: its output, its
1-byte flags (nonzeros; zero signs and negative zeros if it has any -0.0) and
its temporaries (the check of its values; a CSR tensor's int64 row pointers,
row ids and positions), all counted as if alive at once, on top of the
outputs of the tensors decoded before it (see ``_decode_bytes``). The file is
refused, naming the tensor, when that exceeds ``max(4 GiB, 4096 x the file's
size)``: no real pruned model comes close, while a 453-byte file asking for a
``[1, 2**32]`` tensor does. The decoder uses only operations whose memory
that bound covers: masked scatters and fills, no boolean sums or boolean
indexing, whose int64 temporaries are eight times the tensor.
"""

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

from prunelab.errors import UserError
from prunelab.io import atomic_write_bytes

FORMAT = "prunelab-sparse"
VERSION = "1"
ENCODINGS = ("dense", "bitmask", "csr")  # in order of preference when sizes tie

_FORMAT_KEY = "prunelab.format"
_VERSION_KEY = "prunelab.format_version"
_TENSORS_KEY = "prunelab.tensors"
_RESERVED_PREFIX = "prunelab."
_ENTRY_KEYS = {"encoding", "shape", "dtype", "negative_zeros"}
_SEP = "::"
_PARTS = {"dense": ("",), "bitmask": ("bits", "values"), "csr": ("indptr", "indices", "values")}
# A safetensors header entry ("NAME::values":{"dtype":..,"shape":[..],"data_offsets":[..,..]})
# takes about this many bytes; counting it keeps tiny tensors dense.
_ENTRY_BYTES = 96
# A hostile header could describe a terabyte tensor whose CSR form takes a few bytes; refuse
# to let decoding allocate more than this many times the file's size (at least 4 GiB).
_MAX_EXPANSION = 4096
_MIN_DECODE_LIMIT = 4 << 30
# Decoding memory per element of a bitmask or CSR tensor beyond its output: 1-byte flags for
# the nonzeros and, when it has -0.0 among its zeros, for the unpacked signs and the negative zeros.
_FLAG_BYTES = 1
_SIGN_FLAG_BYTES = 2
# Per stored value: the check that none is zero (its bits masked, then compared).
_VALUE_CHECK_BYTES = 1
# Per CSR nonzero: int64 row ids turned into positions, an int64 copy of the column
# indices, and the check that positions rise. Per CSR row: int64 pointers, their
# differences (and the flags checking them), and the cumulative sum repeat_interleave takes.
_CSR_NNZ_BYTES = 8 + 8 + 1
_CSR_ROW_BYTES = 8 + 8 + 1 + 8

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint64, torch.uint32, torch.uint16,
        torch.uint8, torch.bool,
    )
}  # fmt: skip
# Same-sized signed integers: every element is handled as raw bits through them.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
_POINTER_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------- state dicts


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


# ---------------------------------------------------------------- sizes and the choice


def _grid(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, columns) of the matrix CSR sees: rows = first dimension; scalars and vectors are one row."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def _index_dtype(cols: int) -> torch.dtype:
    """The smallest integer type holding every column index 0..cols-1."""
    return next(d for d in _INDEX_DTYPES if cols - 1 <= torch.iinfo(d).max)


def _pointer_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


def _packed(n: int) -> int:
    return (n + 7) // 8


def _bits(t: Tensor) -> Tensor:
    """The elements of a contiguous tensor as same-sized integers, flattened (a view, no copy)."""
    return t.reshape(-1).view(_BITS[t.element_size()])


def _zero_flags(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """Which elements count as zero: all bits 0, or for floating types all but the sign bit."""
    if dtype.is_floating_point:
        return (bits & torch.iinfo(bits.dtype).max) == 0
    return bits == 0


def _zeros(bits: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Which elements count as zero, and which of those are -0.0 (floating types only)."""
    zero = _zero_flags(bits, dtype)
    if dtype.is_floating_point:
        return zero, zero & (bits == torch.iinfo(bits.dtype).min)
    return zero, torch.zeros_like(zero)


def _sizes(shape: Sequence[int], dtype: torch.dtype, nnz: int, negative_zeros: int) -> dict[str, int]:
    numel = math.prod(shape)
    item = dtype.itemsize
    rows, cols = _grid(shape)
    signs = _packed(numel - nnz) if negative_zeros else 0
    return {
        "dense": numel * item,
        "bitmask": _packed(numel) + nnz * item + signs,
        "csr": (rows + 1) * _pointer_dtype(numel).itemsize + nnz * (_index_dtype(cols).itemsize + item) + signs,
    }


def _choose(sizes: Mapping[str, int], negative_zeros: int) -> str:
    def cost(encoding: str) -> int:
        entries = len(_PARTS[encoding]) + (1 if negative_zeros and encoding != "dense" else 0)
        return sizes[encoding] + _ENTRY_BYTES * entries

    return min(ENCODINGS, key=cost)  # min keeps the first of equals: dense wins ties


def _stats(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(raw bits, zero flags, negative-zero flags) of a tensor."""
    bits = _bits(t.detach().to("cpu").contiguous())
    return (bits, *_zeros(bits, t.dtype))


def encoding_sizes(tensor: Tensor) -> dict[str, int]:
    """Bytes of tensor data each encoding stores for ``tensor`` (safetensors header not counted)."""
    _, zero, negative = _stats(tensor)
    return _sizes(tuple(tensor.shape), tensor.dtype, int((~zero).sum()), int(negative.sum()))


def choose_encoding(tensor: Tensor) -> str:
    """The encoding :func:`save_sparse` picks for ``tensor``: fewest bytes, header entries included."""
    _, zero, negative = _stats(tensor)
    n_negative = int(negative.sum())
    return _choose(_sizes(tuple(tensor.shape), tensor.dtype, int((~zero).sum()), n_negative), n_negative)


# ---------------------------------------------------------------- saving


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
        rows, cols = _grid(t.shape)
        position = keep.nonzero().reshape(-1)
        indptr = torch.zeros(rows + 1, dtype=torch.int64)
        indptr[1:] = torch.bincount(position // max(cols, 1), minlength=rows).cumsum(0)
        parts["indptr"] = indptr.to(_pointer_dtype(t.numel()))
        parts["indices"] = (position % max(cols, 1)).to(_index_dtype(cols))
    if n_negative:
        parts["zero_signs"] = _pack(negative[zero])
    return {f"{name}{_SEP}{part}": value for part, value in parts.items()}, entry


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
        if key.startswith(_RESERVED_PREFIX):
            raise UserError(f"metadata key {key!r} is reserved: keys starting with {_RESERVED_PREFIX!r} are prunelab's")
    tensors: dict[str, Tensor] = {}
    table: dict[str, dict[str, Any]] = {}
    for name, t in plain_state_dict(model_or_state).items():
        if t.dtype not in _DTYPES.values():
            raise UserError(f"tensor {name!r} has dtype {t.dtype}, which the sparse format cannot store")
        parts, table[name] = _encode(name, t)
        clash = tensors.keys() & parts.keys()
        if clash:
            raise UserError(f"tensor name {sorted(clash)[0]!r} collides with a stored part of another tensor")
        tensors.update(parts)
    header = {**user, _FORMAT_KEY: FORMAT, _VERSION_KEY: VERSION, _TENSORS_KEY: json.dumps(table)}
    atomic_write_bytes(Path(path), safetensors.torch.save(tensors, metadata=header))


# ---------------------------------------------------------------- loading


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
    if not isinstance(meta, dict) or meta.get(_FORMAT_KEY) != FORMAT:
        raise UserError(f"{path} is not a prunelab sparse file (its header has no {_FORMAT_KEY}={FORMAT!r})")
    if meta.get(_VERSION_KEY) != VERSION:
        raise _bad(path, f"format version {meta.get(_VERSION_KEY)!r} is not the one this prunelab reads ({VERSION})")
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
        table = json.loads(meta[_TENSORS_KEY])
    except (KeyError, ValueError, RecursionError):
        raise _bad(path, f"its header has no readable {_TENSORS_KEY} table") from None
    if not isinstance(table, dict):
        raise _bad(path, f"{_TENSORS_KEY} is not a JSON object")
    for name, entry in table.items():
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise _bad(path, f"tensor {name!r} is not described by exactly {sorted(_ENTRY_KEYS)}")
        if entry["encoding"] not in ENCODINGS:
            raise _bad(path, f"tensor {name!r} has the unknown encoding {entry['encoding']!r}")
        if entry["dtype"] not in _DTYPES:
            raise _bad(path, f"tensor {name!r} has the unknown dtype {entry['dtype']!r}")
        if not _valid_shape(entry["shape"]):
            raise _bad(path, f"tensor {name!r} has the invalid shape {entry['shape']!r}")
        # Only a sparse encoding of a floating type can have -0.0 among its zeros.
        can_have = entry["encoding"] != "dense" and _DTYPES[entry["dtype"]].is_floating_point
        if not _count(entry["negative_zeros"]) or (entry["negative_zeros"] and not can_have):
            raise _bad(path, f"tensor {name!r} has an invalid negative_zeros count {entry['negative_zeros']!r}")
    return table


def _stored_names(name: str, entry: Mapping[str, Any]) -> list[str]:
    if entry["encoding"] == "dense":
        return [name]
    parts = [*_PARTS[entry["encoding"]], *(["zero_signs"] if entry["negative_zeros"] else [])]
    return [f"{name}{_SEP}{part}" for part in parts]


def _part(
    path: Path, stored: Mapping[str, Tensor], name: str, part: str, dtypes: Sequence[torch.dtype], length: int
) -> Tensor:
    """One stored part of a tensor, checked to be 1-D of ``length`` elements of one of ``dtypes``."""
    t = stored[f"{name}{_SEP}{part}"]
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
    packed = _part(path, stored, name, part, (torch.uint8,), _packed(n)).numpy()
    if n % 8 and packed[-1] & (0xFF >> (n % 8)):  # the last byte's bits after the n-th
        raise _bad(path, f"tensor {name!r} has padding bits set in its {part}")
    return torch.from_numpy(np.unpackbits(packed, count=n).view(bool))


def _csr_positions(path: Path, stored: Mapping[str, Tensor], name: str, shape: Sequence[int]) -> Tensor:
    """The flat positions of a CSR tensor's nonzeros, after checking its pointers and indices."""
    numel = math.prod(shape)
    rows, cols = _grid(shape)
    indptr = _part(path, stored, name, "indptr", _POINTER_DTYPES, rows + 1).to(torch.int64)
    counts = indptr.diff()
    nnz = int(indptr[-1])
    if int(indptr[0]) != 0 or bool((counts < 0).any()) or nnz > numel:
        raise _bad(path, f"tensor {name!r} has row pointers that do not rise from 0 to at most {numel}")
    indices = _part(path, stored, name, "indices", _INDEX_DTYPES, nnz)
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
    numel, item = math.prod(entry["shape"]), _DTYPES[entry["dtype"]].itemsize
    flags = _FLAG_BYTES + (_SIGN_FLAG_BYTES if entry["negative_zeros"] else 0)
    nnz = stored[f"{name}{_SEP}values"].numel()
    peak = numel * (item + flags) + nnz * (item + _VALUE_CHECK_BYTES)
    if entry["encoding"] == "csr":
        rows, _ = _grid(entry["shape"])
        indices = stored[f"{name}{_SEP}indices"].numel()
        peak += indices * _CSR_NNZ_BYTES + (rows + 1) * _CSR_ROW_BYTES
    return numel * item, peak


def _check_memory(path: Path, table: Mapping[str, Mapping[str, Any]], stored: Mapping[str, Tensor],
                  file_size: int) -> None:
    """Refuse, naming the tensor, a file whose decoding would allocate more than the limit."""
    limit = max(_MIN_DECODE_LIMIT, _MAX_EXPANSION * file_size)
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
    dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
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
    values = _bits(_part(path, stored, name, "values", (dtype,), nnz))
    if bool(_zero_flags(values, dtype).any()):
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
    return {k: v for k, v in meta.items() if not k.startswith(_RESERVED_PREFIX)}
