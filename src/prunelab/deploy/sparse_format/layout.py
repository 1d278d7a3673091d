"""The sparse format's constants and the bit-level helpers that saving and loading share."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

FORMAT = "prunelab-sparse"
VERSION = "1"
ENCODINGS = ("dense", "bitmask", "csr")  # in order of preference when sizes tie

FORMAT_KEY = "prunelab.format"
VERSION_KEY = "prunelab.format_version"
TENSORS_KEY = "prunelab.tensors"
RESERVED_PREFIX = "prunelab."
ENTRY_KEYS = {"encoding", "shape", "dtype", "negative_zeros"}
SEP = "::"
PARTS = {"dense": ("",), "bitmask": ("bits", "values"), "csr": ("indptr", "indices", "values")}
# A safetensors header entry ("NAME::values":{"dtype":..,"shape":[..],"data_offsets":[..,..]})
# takes about this many bytes; counting it keeps tiny tensors dense.
ENTRY_BYTES = 96
# A hostile header could describe a terabyte tensor whose CSR form takes a few bytes; refuse
# to let decoding allocate more than this many times the file's size (at least 4 GiB).
MAX_EXPANSION = 4096
MIN_DECODE_LIMIT = 4 << 30
# Decoding memory per element of a bitmask or CSR tensor beyond its output: 1-byte flags for
# the nonzeros and, when it has -0.0 among its zeros, for the unpacked signs and the negative zeros.
FLAG_BYTES = 1
SIGN_FLAG_BYTES = 2
# Per stored value: the check that none is zero (its bits masked, then compared).
VALUE_CHECK_BYTES = 1
# Per CSR nonzero: int64 row ids turned into positions, an int64 copy of the column
# indices, and the check that positions rise. Per CSR row: int64 pointers, their
# differences (and the flags checking them), and the cumulative sum repeat_interleave takes.
CSR_NNZ_BYTES = 8 + 8 + 1
CSR_ROW_BYTES = 8 + 8 + 1 + 8

DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint64, torch.uint32, torch.uint16,
        torch.uint8, torch.bool,
    )
}  # fmt: skip
# Same-sized signed integers: every element is handled as raw bits through them.
BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
POINTER_DTYPES = (torch.int32, torch.int64)


def grid(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, columns) of the matrix CSR sees: rows = first dimension; scalars and vectors are one row."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def index_dtype(cols: int) -> torch.dtype:
    """The smallest integer type holding every column index 0..cols-1."""
    return next(d for d in INDEX_DTYPES if cols - 1 <= torch.iinfo(d).max)


def pointer_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


def packed_size(n: int) -> int:
    return (n + 7) // 8


def as_bits(t: Tensor) -> Tensor:
    """The elements of a contiguous tensor as same-sized integers, flattened (a view, no copy)."""
    return t.reshape(-1).view(BITS[t.element_size()])


def zero_flags(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """Which elements count as zero: all bits 0, or for floating types all but the sign bit."""
    if dtype.is_floating_point:
        return (bits & torch.iinfo(bits.dtype).max) == 0
    return bits == 0


def zeros_of(bits: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Which elements count as zero, and which of those are -0.0 (floating types only)."""
    zero = zero_flags(bits, dtype)
    if dtype.is_floating_point:
        return zero, zero & (bits == torch.iinfo(bits.dtype).min)
    return zero, torch.zeros_like(zero)
