"""Reading and writing IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic (two zero bytes, a dtype code, the number of
dimensions), one big-endian uint32 per dimension, then the values in C order,
big-endian. The files are usually gzipped; compression is recognised by the
gzip magic bytes, never by the file name, so a decompressed copy that kept its
``.gz`` name (or the reverse) still reads.

Reading never trusts the header. Before anything is allocated, the data size
the dimensions declare is checked against :data:`MAX_DATA_BYTES` (2 GiB: no
real dataset in this format comes close, Fashion-MNIST's training images are
47 MB), the zero dimensions aside, so that ``0 x 4294967295 x 4294967295`` is
refused too while an empty ``0 x 28 x 28`` file reads as an empty array. A
plain file's declared size must also match the file's own size. A gzipped file
cannot be sized without decompressing it, so the limit is its only guard: a
gzip bomb whose header truthfully announces gigabytes is refused before a byte
of its data is decompressed. The payload is then read in chunks and at most
one byte more than the header promises, so the memory held is bounded by what
the file really contains, and byte-swapped in place (no second copy).
"""

from __future__ import annotations

import gzip as gzip_module
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from prunelab.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype codes; all multi-byte types are big-endian on disk.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MAX_NDIM = 4
# The most data bytes a header may declare (zero dimensions aside); see the module docstring.
MAX_DATA_BYTES = 2 << 30
# Big enough to amortise Python overhead, small enough that a truncated file
# never makes us hold much more than it contains.
_CHUNK = 8 << 20


class _Invalid(Exception):
    """Internal: why a file is not valid IDX (turned into a UserError at the edge)."""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into an array in native byte order.

    Raises :class:`UserError` naming ``path`` if the file is missing, is not
    IDX, declares more than :data:`MAX_DATA_BYTES` of data, or its payload
    does not have exactly the size its header announces.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    try:
        with path.open("rb") as probe:
            compressed = probe.read(2) == GZIP_MAGIC
        opener = gzip_module.open if compressed else open
        with opener(path, "rb") as stream:
            return _parse(stream, None if compressed else os.fstat(stream.fileno()).st_size)
    except _Invalid as exc:
        raise UserError(f"{path} is not a valid IDX file: {exc}") from None
    # Corrupt gzip streams surface as OSError (BadGzipFile), EOFError or zlib.error.
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path} is not a valid IDX file: {exc}") from None


def _parse(stream: BinaryIO, file_size: int | None) -> np.ndarray:
    """Parse header and payload from an open binary stream.

    ``file_size`` is the size of a plain file, None for a compressed stream.
    """
    dtype, dims = _read_header(stream)
    expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow
    if file_size is not None:
        _check_file_size(expected, file_size - 4 - 4 * len(dims))
    _check_limit(dtype, dims)
    return _to_array(_read_exactly(stream, expected), dtype, dims)


def _check_file_size(expected: int, found: int) -> None:
    """Compare a plain file's payload size with the header's claim, before reading it."""
    if found < expected:
        raise _Invalid(f"truncated (expected {expected} bytes of data, found {found})")
    if found > expected:
        raise _Invalid(f"trailing data (expected {expected} bytes of data, found {found})")


def _check_limit(dtype: np.dtype, dims: tuple[int, ...]) -> None:
    """Refuse dimensions whose data, zero dimensions aside, would exceed :data:`MAX_DATA_BYTES`."""
    size = math.prod(d for d in dims if d) * dtype.itemsize
    if size > MAX_DATA_BYTES:
        shape = " x ".join(map(str, dims))
        aside = ", not counting its zero dimensions" if 0 in dims else ""
        raise _Invalid(
            f"its dimensions {shape} describe {size} bytes of data{aside}, "
            f"more than the {MAX_DATA_BYTES} bytes this reader accepts"
        )


def _to_array(payload: bytearray, dtype: np.dtype, dims: tuple[int, ...]) -> np.ndarray:
    """The payload as an array of ``dims`` in native byte order, sharing the buffer."""
    array = np.frombuffer(payload, dtype=dtype).reshape(dims)
    if dtype.isnative:  # single bytes (the common case) and big-endian machines
        return array
    # Torch refuses non-native byte order; swap in place rather than copy.
    return array.byteswap(inplace=True).view(dtype.newbyteorder("="))


def _read_header(stream: BinaryIO) -> tuple[np.dtype, tuple[int, ...]]:
    """Validate the magic and read the dimensions."""
    magic = stream.read(4)
    if len(magic) < 4:
        raise _Invalid(f"too short for a header ({len(magic)} bytes)")
    if magic[0] != 0 or magic[1] != 0:
        raise _Invalid(f"bad magic number 0x{magic.hex()} (must start with two zero bytes)")
    if magic[2] not in _DTYPES:
        raise _Invalid(f"unknown data type code 0x{magic[2]:02x}")
    ndim = magic[3]
    if not 1 <= ndim <= _MAX_NDIM:
        raise _Invalid(f"unsupported number of dimensions {ndim} (must be 1 to {_MAX_NDIM})")
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise _Invalid(f"header truncated (expected {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    return _DTYPES[magic[2]], dims


def _read_exactly(stream: BinaryIO, expected: int) -> bytearray:
    """Read exactly ``expected`` bytes, checking that nothing follows them.

    The buffer grows only as real bytes arrive, so its size is bounded by the
    file, not by the header's claim.
    """
    payload = bytearray()
    while len(payload) <= expected:
        chunk = stream.read(min(_CHUNK, expected + 1 - len(payload)))
        if not chunk:
            break
        payload += chunk
    if len(payload) < expected:
        raise _Invalid(f"truncated (expected {expected} bytes of data, found {len(payload)})")
    if len(payload) > expected:
        raise _Invalid(f"trailing data (expected {expected} bytes of data, found more)")
    return payload


def write_idx(path: Path, array: np.ndarray, gzip: bool = False) -> None:
    """Write ``array`` as an IDX file (gzipped when ``gzip``); used to make test data."""
    code = _code_for(array.dtype)
    if not 1 <= array.ndim <= _MAX_NDIM:
        raise ValueError(f"IDX holds 1 to {_MAX_NDIM} dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    opener = gzip_module.open if gzip else open
    with opener(Path(path), "wb") as stream:
        stream.write(header)
        stream.write(body)


def _code_for(dtype: np.dtype) -> int:
    """The IDX type code of a numpy dtype (byte order ignored)."""
    for code, idx_dtype in _DTYPES.items():
        if idx_dtype.kind == dtype.kind and idx_dtype.itemsize == dtype.itemsize:
            return code
    raise ValueError(f"IDX cannot store dtype {dtype}")
