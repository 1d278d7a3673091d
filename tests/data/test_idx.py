"""IDX reading: exact round trips, and every malformed file is a one-sentence UserError."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from memory_cap import requires_proc, user_error_under_cap
from prunelab.data.idx import MAX_DATA_BYTES, read_idx, write_idx
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


@pytest.mark.parametrize(
    ("compressed", "reason"),
    [
        # A plain file is measured first: it is simply too short for its header.
        (False, r"truncated \(expected \d+ bytes of data, found 64\)"),
        # A gzipped one cannot be measured without decompressing it: the limit refuses it.
        (True, rf"describe \d+ bytes of data, more than the {MAX_DATA_BYTES} bytes"),
    ],
)
def test_hostile_huge_header_allocates_nothing(
    tmp_path: Path, compressed: bool, reason: str
) -> None:
    # 4 dims of 2**32-1 bytes would be ~3e38 bytes; it must fail fast, not try to allocate.
    huge = 0xFFFFFFFF
    path = _write_raw(
        tmp_path / "bomb", _header(0x0E, huge, huge, huge, huge) + bytes(64), compressed
    )
    with pytest.raises(UserError, match=reason):
        read_idx(path)


@pytest.mark.parametrize(
    ("compressed", "payload", "reason"),
    [
        (False, 0, "not counting its zero dimensions, more than the 2147483648 bytes"),
        (True, 0, "not counting its zero dimensions, more than the 2147483648 bytes"),
        (False, 64, "trailing data (expected 0 bytes of data, found 64)"),  # size checked first
        (True, 64, "not counting its zero dimensions, more than the 2147483648 bytes"),
    ],
)
def test_a_zero_dimension_does_not_hide_huge_ones(
    tmp_path: Path, compressed: bool, payload: int, reason: str
) -> None:
    huge = 0xFFFFFFFF  # 0 x huge x huge is 0 bytes, but numpy cannot even shape it
    path = _write_raw(tmp_path / "bad", _header(0x08, 0, huge, huge) + bytes(payload), compressed)
    with pytest.raises(UserError) as caught:
        read_idx(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not a valid IDX file: ")
    assert reason in message
    assert "\n" not in message


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize(("dtype", "shape"), [("u1", (0, 28, 28)), ("f8", (0, 3)), ("i2", (4, 0))])
def test_an_empty_file_reads_as_an_empty_array(
    tmp_path: Path, compressed: bool, dtype: str, shape: tuple[int, ...]
) -> None:
    path = tmp_path / "empty.idx"
    write_idx(path, np.zeros(shape, dtype=dtype), gzip=compressed)
    loaded = read_idx(path)
    assert loaded.shape == shape and loaded.dtype == np.dtype(dtype).newbyteorder("=")
    trailing = _write_raw(tmp_path / "trailing", _header(0x08, *shape) + b"\x00", compressed)
    with pytest.raises(UserError, match="trailing data"):
        read_idx(trailing)


def test_the_limit_is_inclusive(tmp_path: Path) -> None:
    at_limit = _write_raw(tmp_path / "at", _header(0x08, MAX_DATA_BYTES), compressed=True)
    with pytest.raises(UserError, match=rf"truncated \(expected {MAX_DATA_BYTES} bytes"):
        read_idx(at_limit)  # accepted by the limit, then found empty
    over = _write_raw(tmp_path / "over", _header(0x0B, MAX_DATA_BYTES // 2 + 1), compressed=True)
    with pytest.raises(UserError, match=rf"describe {MAX_DATA_BYTES + 2} bytes of data, more"):
        read_idx(over)


def test_byte_swapped_arrays_are_native_and_writable(tmp_path: Path) -> None:
    write_idx(tmp_path / "f", np.array([[1.5, -2.0]], dtype=">f8"))
    loaded = read_idx(tmp_path / "f")
    assert loaded.dtype.isnative and loaded.flags.writeable
    np.testing.assert_array_equal(loaded, [[1.5, -2.0]])


_READ = "from prunelab.data.idx import read_idx"
_IMAGE = 1024 * 1024  # one 1024 x 1024 uint8 image
_MEMBER_IMAGES = 64  # images per gzip member: 64 MiB of zeros, about 65 kB compressed


def _gzip_bomb(path: Path, images: int) -> Path:
    """A truthful gzipped IDX file of ``images`` zero 1024 x 1024 images.

    Written as concatenated gzip members (valid gzip, which ``gzip.open`` reads
    as one stream), one member compressed once and repeated: seconds faster
    than streaming gigabytes through zlib.
    """
    assert images % _MEMBER_IMAGES == 0
    member = gzip.compress(bytes(_MEMBER_IMAGES * _IMAGE), 9)
    with path.open("wb") as out:
        out.write(gzip.compress(_header(0x08, images, 1024, 1024)))
        for _ in range(images // _MEMBER_IMAGES):
            out.write(member)
    return path


def test_the_bomb_construction_is_a_valid_file(tmp_path: Path) -> None:
    small = read_idx(_gzip_bomb(tmp_path / "small.gz", 2 * _MEMBER_IMAGES))  # 128 MiB
    assert small.shape == (2 * _MEMBER_IMAGES, 1024, 1024) and not small.any()


@requires_proc
def test_a_gzip_bomb_is_refused_without_decompressing(tmp_path: Path) -> None:
    images = 6400  # 6.7 GB of data in a 6.5 MB file
    path = _gzip_bomb(tmp_path / "bomb.gz", images)
    assert path.stat().st_size < 8 << 20
    message = user_error_under_cap(_READ, "read_idx(Path(sys.argv[1]))", str(path))
    assert message == (
        f"{path} is not a valid IDX file: its dimensions {images} x 1024 x 1024 describe "
        f"{images * _IMAGE} bytes of data, more than the {MAX_DATA_BYTES} bytes this reader accepts"
    )


@requires_proc
def test_a_plain_file_as_big_as_its_header_says_is_still_limited(tmp_path: Path) -> None:
    path = tmp_path / "big.idx"
    with path.open("wb") as out:
        out.write(_header(0x08, MAX_DATA_BYTES + 1))
        out.truncate(8 + MAX_DATA_BYTES + 1)  # sparse on most file systems: no disk used
    message = user_error_under_cap(_READ, "read_idx(Path(sys.argv[1]))", str(path))
    assert f"describe {MAX_DATA_BYTES + 1} bytes of data, more than" in message


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
