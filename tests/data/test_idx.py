"""IDX reading: exact round trips, and every malformed file is a one-sentence UserError."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from prunelab.data.idx import read_idx, write_idx
from prunelab.errors import UserError


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_round_trip(tmp_path: Path, compressed: bool, dtype: str) -> None:
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    path = tmp_path / "a.idx"
    write_idx(path, array, gzip=compressed)
    loaded = read_idx(path)
    assert loaded.dtype == np.dtype(dtype).newbyteorder("=")
    assert loaded.shape == (2, 3, 5)
    np.testing.assert_array_equal(loaded, array)


def test_gzip_detected_by_magic_not_name(tmp_path: Path) -> None:
    labels = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "labels", labels, gzip=True)  # gzipped, no .gz name
    write_idx(tmp_path / "plain.gz", labels)  # plain, misleading .gz name
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), labels)


def test_on_disk_layout_is_big_endian_idx(tmp_path: Path) -> None:
    write_idx(tmp_path / "x", np.array([1, 258], dtype=np.int32))
    assert (tmp_path / "x").read_bytes() == bytes([0, 0, 0x0C, 1]) + struct.pack(">I2i", 2, 1, 258)


def _write_raw(path: Path, data: bytes, compressed: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if compressed else data)
    return path


def _header(code: int, *dims: int) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic number"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown data type code 0x07"),
        (b"\x00\x00\x08\x00", "unsupported number of dimensions 0"),
        (b"\x00\x00\x08\x05" + struct.pack(">5I", 1, 1, 1, 1, 1) + b"\x00", "dimensions 5"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 1), "header truncated"),
        (b"\x00\x00", "too short"),
        (
            _header(0x08, 60000, 28, 28) + bytes(1000),
            "truncated (expected 47040000 bytes of data, found 1000)",
        ),
        (_header(0x0C, 3) + bytes(12 + 1), "trailing data"),
    ],
)
@pytest.mark.parametrize("compressed", [False, True])
def test_malformed_files_are_user_errors(
    tmp_path: Path, data: bytes, reason: str, compressed: bool
) -> None:
    path = _write_raw(tmp_path / "bad", data, compressed)
    with pytest.raises(UserError) as caught:
        read_idx(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not a valid IDX file: ")
    assert reason in message
    assert "\n" not in message


@pytest.mark.parametrize("compressed", [False, True])
def test_hostile_huge_header_allocates_nothing(tmp_path: Path, compressed: bool) -> None:
    # 4 dims of 2**32-1 bytes would be ~3e38 bytes; it must fail fast, not try to allocate.
    huge = 0xFFFFFFFF
    path = _write_raw(
        tmp_path / "bomb", _header(0x0E, huge, huge, huge, huge) + bytes(64), compressed
    )
    with pytest.raises(UserError, match=r"truncated \(expected \d+ bytes of data, found 64\)"):
        read_idx(path)


def test_corrupted_gzip_is_user_error(tmp_path: Path) -> None:
    good = gzip.compress(_header(0x08, 100) + bytes(range(100)))
    path = _write_raw(tmp_path / "corrupt.gz", good[:10] + b"\xff" * 20 + good[30:])
    with pytest.raises(UserError, match="is not a valid IDX file"):
        read_idx(path)
    cut = _write_raw(tmp_path / "cut.gz", good[: len(good) // 2])
    with pytest.raises(UserError, match="is not a valid IDX file"):
        read_idx(cut)


def test_missing_file_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        read_idx(tmp_path / "nope")
