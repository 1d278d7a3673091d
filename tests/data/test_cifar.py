"""CIFAR batches: exact round trips, and pickles that try to run code never do."""

from __future__ import annotations

import builtins
import gzip
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from prunelab.data.cifar import load_cifar_batch, read_cifar_batches, write_cifar_batch
from prunelab.errors import UserError

LABEL_KEYS = {"cifar10": b"labels", "cifar100": b"fine_labels"}


def _batch(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    return images, rng.integers(0, classes, size=n)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_round_trip_from_file_and_bytes(tmp_path: Path, dataset: str) -> None:
    images, labels = _batch(7, 100, seed=1)
    path = tmp_path / "batch"
    write_cifar_batch(path, images, labels, LABEL_KEYS[dataset])
    for source in (path, path.read_bytes()):
        got_images, got_labels = load_cifar_batch(source, LABEL_KEYS[dataset])
        assert got_images.dtype == np.uint8 and got_images.shape == (7, 3, 32, 32)
        assert got_labels.dtype == np.int64
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)


def _layout(dataset: str) -> tuple[str, list[str], list[str]]:
    if dataset == "cifar10":
        return "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
    return "cifar-100-python", ["train"], ["test"]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_read_batches_from_folder_and_tarball(tmp_path: Path, dataset: str) -> None:
    folder, train, test = _layout(dataset)
    (tmp_path / folder).mkdir()
    written = {}
    for seed, name in enumerate(train + test):
        written[name] = _batch(3, 10, seed)
        write_cifar_batch(tmp_path / folder / name, *written[name], LABEL_KEYS[dataset])
    (tmp_path / folder / "meta").write_bytes(pickle.dumps({b"names": [b"x"]}, protocol=2))
    archive = tmp_path / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / folder, arcname=folder)
    expected_x = np.concatenate([written[name][0] for name in train])
    expected_y = np.concatenate([written[name][1] for name in train])
    for location in (tmp_path, archive):
        x, y = read_cifar_batches(location, folder, train, LABEL_KEYS[dataset])
        np.testing.assert_array_equal(x, expected_x)
        np.testing.assert_array_equal(y, expected_y)


def test_tarball_missing_member_is_user_error(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz"):
        pass
    with pytest.raises(UserError, match="lacks cifar-10-batches-py/test_batch"):
        read_cifar_batches(archive, "cifar-10-batches-py", ["test_batch"], b"labels")


def _py2_numpy_pickle(images: np.ndarray, labels: list[int]) -> bytes:
    """The opcodes Python 2 + old numpy wrote into the official CIFAR files.

    Strings are BINSTRING (bytes under encoding="bytes") and the array is
    rebuilt via numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype.
    """

    def short(value: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(value)]) + value

    def int2(value: int) -> bytes:  # BININT2
        return b"M" + struct.pack("<H", value)

    raw = images.reshape(len(images), -1).tobytes()
    # fmt: off
    array = b"".join([
        b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n",
        b"K\x00\x85", short(b"b"), b"\x87R",              # _reconstruct(ndarray, (0,), 'b')
        b"(K\x01", int2(len(images)), int2(3072), b"\x86",  # state: (1, (N, 3072),
        b"cnumpy\ndtype\n", short(b"u1"), b"K\x00K\x01\x87R",  # dtype('u1', 0, 1)
        b"(K\x03", short(b"|"), b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",  # + its state,
        b"\x89", b"T", struct.pack("<I", len(raw)), raw, b"tb",  # False, data); BUILD
    ])
    labels_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"".join([
        b"\x80\x02}(",
        short(b"batch_label"), short(b"training batch 1 of 5"),
        short(b"data"), array,
        short(b"labels"), labels_list,
        b"u.",
    ])
    # fmt: on


def test_python2_numpy_format_of_the_real_files() -> None:
    images, labels = _batch(4, 10, seed=3)
    data = _py2_numpy_pickle(images, labels.tolist())
    # The hand-written stream is what numpy itself unpickles to the same array...
    trusted = pickle.loads(data, encoding="bytes")
    np.testing.assert_array_equal(trusted[b"data"], images.reshape(4, -1))
    # ...and the restricted loader reads it without numpy's globals.
    got_images, got_labels = load_cifar_batch(data, b"labels")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


class _ShellPayload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.sentinel}",)


class _ExecPayload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return builtins.exec, (f"open({str(self.sentinel)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [_ShellPayload, _ExecPayload])
def test_code_execution_payload_never_runs(tmp_path: Path, payload: type) -> None:
    sentinel = tmp_path / "SENTINEL"
    images, labels = _batch(2, 10, seed=0)
    batch = {b"data": images.reshape(2, -1), b"labels": labels.tolist(), b"x": payload(sentinel)}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UserError) as caught:
        load_cifar_batch(path, b"labels")
    message = str(caught.value)
    assert message.startswith(f"{path} is not a CIFAR batch: it refers to ")
    assert message.endswith("which prunelab refuses to load")
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        # A real global smuggled through protocol 4's STACK_GLOBAL.
        (pickle.dumps(print, protocol=4), "refers to builtins.print"),
        # Our stand-ins cannot be misused: BUILD on one, or a huge shape with little data.
        (b"\x80\x02cnumpy\ndtype\n}b.", "tries to modify numpy.dtype"),
        (b"\x80\x02K\x00.", "holds a int, not a dict"),
        (b"\x80\x02cnumpy\ndtype\nU\x01OK\x00K\x01\x87R.", "not a simple numeric type"),
        (b"\x80\x02}.", "has no 'data' entry"),
        (b"\x80\x02}(", "not a CIFAR batch"),
    ],
)
def test_hostile_or_broken_streams_are_user_errors(stream: bytes, reason: str) -> None:
    with pytest.raises(UserError, match="is not a CIFAR batch") as caught:
        load_cifar_batch(stream, b"labels")
    assert reason in str(caught.value)


def test_array_state_claiming_more_data_than_it_holds() -> None:
    images, labels = _batch(2, 10, seed=0)
    data = _py2_numpy_pickle(images, labels.tolist())
    # Claim 65535 x 3072 images while holding 2: refused before any allocation.
    hostile = data.replace(b"K\x01M\x02\x00M\x00\x0c", b"K\x01M\xff\xffM\x00\x0c", 1)
    assert hostile != data
    with pytest.raises(UserError, match=r"needs 201323520 bytes but holds 6144"):
        load_cifar_batch(hostile, b"labels")


@pytest.mark.parametrize(
    ("batch", "reason"),
    [
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "not uint8 (N, 3072)"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "not uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "not a list of integers"),
        ({b"data": [1, 2], b"labels": [0, 1]}, "'data' entry is not a numpy array"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "no 'labels' entry"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [2**70]}, "too large for labels"),
    ],
)
def test_wrong_contents_are_user_errors(batch: dict, reason: str) -> None:
    with pytest.raises(UserError, match="is not a CIFAR batch") as caught:
        load_cifar_batch(pickle.dumps(batch, protocol=2), b"labels")
    assert reason in str(caught.value)


def test_label_array_accepted() -> None:
    images, labels = _batch(3, 100, seed=0)
    batch = {b"data": images.reshape(3, -1), b"fine_labels": labels.astype(np.int64)}
    _, got = load_cifar_batch(pickle.dumps(batch, protocol=2), b"fine_labels")
    np.testing.assert_array_equal(got, labels)


def test_gzipped_batch_file(tmp_path: Path) -> None:
    images, labels = _batch(2, 10, seed=0)
    write_cifar_batch(tmp_path / "b", images, labels, b"labels")
    (tmp_path / "b.gz").write_bytes(gzip.compress((tmp_path / "b").read_bytes()))
    got_images, got_labels = load_cifar_batch(tmp_path / "b.gz", b"labels")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
