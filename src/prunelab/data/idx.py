"""Reading and writing IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic (two zero bytes, a dtype code, the number of
dimensions), one big-endian uint32 per dimension, then the values in C order,
big-endian. The files are usually gzipped; compression is recognised by the
gzip magic bytes, never by the file name, so a decompressed copy that kept its
``.gz`` name (or the reverse) still reads.

Reading never trusts the header: the payload is read in chunks and at most one
byte more than the header promises, so a hostile header claiming terabytes
costs nothing but an error.
"""

from __future__ import annotations

import gzip as gzip_module
import math
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
# Big enough to amortise Python overhead, small enough that a truncated file
# never makes us hold much more than it contains.
_CHUNK = 8 << 20


class _Invalid(Exception):
    """Internal: why a file is not valid IDX (turned into a UserError at the edge)."""


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzipped) into an array in native byte order.

    Raises :class:`UserError` naming ``path`` if the file is missing, is not
    IDX, or its payload does not have exactly the size its header announces.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    try:
        with path.open("rb") as probe:
            compressed = probe.read(2) == GZIP_MAGIC
        opener = gzip_module.open if compressed else open
        with opener(path, "rb") as stream:
            return _parse(stream)
    except _Invalid as exc:
        raise UserError(f"{path} is not a valid IDX file: {exc}") from None
    # Corrupt gzip streams surface as OSError (BadGzipFile), EOFError or zlib.error.
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path} is not a valid IDX file: {exc}") from None


def _parse(stream: BinaryIO) -> np.ndarray:
    """Parse header and payload from an open binary stream."""
    dtype, dims = _read_header(stream)
    expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow
    payload = _read_exactly(stream, expected)
    array = np.frombuffer(payload, dtype=dtype).reshape(dims)
    # Torch refuses non-native byte order; uint8 (the common case) needs no copy.
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


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
