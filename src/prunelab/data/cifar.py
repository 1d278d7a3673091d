"""Reading CIFAR-10/100 "python version" batches without trusting pickle.

The official batches are Python 2 pickles of dicts holding a numpy uint8 array
(``b"data"``, N x 3072) and a label list (``b"labels"`` for CIFAR-10,
``b"fine_labels"`` for CIFAR-100). Plain ``pickle.load`` would run any code a
tampered file names, so loading goes through :class:`_RestrictedUnpickler`,
whose ``find_class`` admits no real global at all. The names the real files
use to rebuild numpy arrays are answered with prunelab's own stand-ins below,
which only ever produce ``np.frombuffer`` views of validated sizes.

Batches are read from an extracted folder or straight out of the official
tarball (nothing is extracted to disk).
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import re
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from prunelab.data.sources import find_file
from prunelab.errors import UserError

IMAGE_SHAPE = (3, 32, 32)
_PIXELS = math.prod(IMAGE_SHAPE)
# The largest real batch (CIFAR-100 "train") is 155 MB; anything much larger
# is not a CIFAR batch and is refused before it is read into memory.
MAX_BATCH_BYTES = 512 << 20
# Only plain numeric dtypes, optionally with a byte-order prefix: 'u1', '<i8'.
_SIMPLE_DTYPE = re.compile(r"[<>|=]?[uif][1248]")


class _BadPickle(ValueError):
    """Internal: the pickle is well-formed but does not describe a CIFAR batch."""


class _StandIn:
    """A callable answered by ``find_class`` in place of a real global.

    It refuses BUILD (``__setstate__``) and has no ``__dict__``, so a pickle
    cannot use it to store attributes on prunelab objects.
    """

    __slots__ = ("qualname", "_build")

    def __init__(self, qualname: str, build: Callable[..., Any]) -> None:
        self.qualname = qualname
        self._build = build

    def __call__(self, *args: Any) -> Any:
        return self._build(*args)

    def __setstate__(self, state: Any) -> None:
        raise _BadPickle(f"it tries to modify {self.qualname}")


class _DtypePlaceholder:
    """What the pickle's ``numpy.dtype(...)`` call produces: a validated simple dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state is (version, byteorder, ...); only the byte order matters here.
        if not isinstance(state, tuple) or len(state) < 2:
            raise _BadPickle("it holds a malformed dtype state")
        order = _text(state[1], "dtype byte order")
        if order not in ("<", ">", "|", "="):
            raise _BadPickle(f"it holds an unknown byte order {order!r}")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


class _ArrayPlaceholder:
    """What ``_reconstruct(ndarray, ...)`` produces; BUILD fills in :attr:`array`."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # numpy's state: (version, shape, dtype, is_fortran, raw bytes); very old
        # files omit the version.
        if self.array is not None:
            raise _BadPickle("it sets the state of an array twice")
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _BadPickle("it holds a malformed array state")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _array_from_state(shape, dtype, fortran, raw)


def _array_from_state(shape: Any, dtype: Any, fortran: Any, raw: Any) -> np.ndarray:
    """Validate numpy's array state and view the raw bytes as that array."""
    if not isinstance(dtype, _DtypePlaceholder):
        raise _BadPickle("its array has no valid dtype")
    if not isinstance(shape, tuple) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _BadPickle(f"its array has an invalid shape {shape!r}")
    if not isinstance(raw, (bytes, bytearray)):
        raise _BadPickle("its array data is not raw bytes")
    expected = math.prod(shape) * dtype.dtype.itemsize  # checked before any allocation
    if len(raw) != expected:
        raise _BadPickle(f"its array of shape {shape} needs {expected} bytes but holds {len(raw)}")
    order = "F" if fortran else "C"
    return np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order=order)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayPlaceholder:
    """Stand-in for numpy's ``_reconstruct(ndarray, (0,), b'b')``."""
    if cls is not _NDARRAY:
        raise _BadPickle("it rebuilds an array of an unknown class")
    return _ArrayPlaceholder()


def _make_dtype(name: Any, align: Any = False, copy: Any = True) -> _DtypePlaceholder:
    """Stand-in for ``numpy.dtype('u1', False, True)``: simple numeric dtypes only."""
    text = _text(name, "dtype")
    if not _SIMPLE_DTYPE.fullmatch(text):
        raise _BadPickle(f"it uses the dtype {text!r}, which is not a simple numeric type")
    return _DtypePlaceholder(np.dtype(text))


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: how Python 3 writes bytes at pickle protocol 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _BadPickle("it encodes text in an unexpected way")
    return text.encode("latin1")


def _not_callable(*args: Any) -> Any:
    raise _BadPickle("it calls numpy.ndarray directly")


_NDARRAY = _StandIn("numpy.ndarray", _not_callable)
_RECONSTRUCT = _StandIn("numpy _reconstruct", _reconstruct)
_DTYPE = _StandIn("numpy.dtype", _make_dtype)
# Exactly the globals that pickled numpy uint8/int arrays need (numpy < 2 wrote
# numpy.core, numpy >= 2 writes numpy._core), plus the bytes encoder Python 3
# uses at protocol 2. Everything else is refused.
_STAND_INS: dict[tuple[str, str], _StandIn] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("_codecs", "encode"): _StandIn("_codecs.encode", _latin1_encode),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build containers, bytes, str, numbers and numpy arrays only."""

    def __init__(self, data: bytes, source_name: str) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.source_name = source_name

    def find_class(self, module: str, name: str) -> Any:
        stand_in = _STAND_INS.get((module, name))
        if stand_in is None:
            raise UserError(
                f"{self.source_name} is not a CIFAR batch: it refers to {module}.{name}, "
                "which prunelab refuses to load"
            )
        return stand_in


def load_cifar_batch(
    source: bytes | Path, label_key: bytes, name: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load one CIFAR batch safely: images uint8 (N, 3, 32, 32) and labels int64 (N,).

    ``source`` is a batch file (plain or gzipped) or its bytes; ``label_key`` is
    ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). ``name`` is
    how error messages refer to the source (the path by default).
    """
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), name or "CIFAR batch data"
    else:
        data, name = _read_batch_file(Path(source)), name or str(source)
    batch = _unpickle(data, name)
    try:
        return _images_and_labels(batch, label_key)
    except _BadPickle as exc:
        raise UserError(f"{name} is not a CIFAR batch: {exc}") from None


def _read_batch_file(path: Path) -> bytes:
    """The bytes of a batch file, decompressed if it is gzipped (by magic, not name)."""
    try:
        if path.stat().st_size > MAX_BATCH_BYTES:
            raise UserError(f"{path} is not a CIFAR batch: it is larger than any CIFAR batch")
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            with gzip.open(io.BytesIO(data)) as stream:
                data = _read_at_most(stream, MAX_BATCH_BYTES + 1)
            if len(data) > MAX_BATCH_BYTES:
                raise UserError(f"{path} is not a CIFAR batch: it is larger than any CIFAR batch")
        return data
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"could not read the CIFAR batch {path}: {exc}") from None


def _read_at_most(stream: BinaryIO, limit: int) -> bytes:
    """Up to ``limit`` bytes, in chunks, so a gzip bomb costs no more than ``limit``."""
    data = bytearray()
    while len(data) < limit and (chunk := stream.read(min(8 << 20, limit - len(data)))):
        data += chunk
    return bytes(data)


def _unpickle(data: bytes, name: str) -> Any:
    """Run the restricted unpickler; any failure is the file's fault, told in one sentence."""
    try:
        result = _RestrictedUnpickler(data, name).load()
    except UserError:
        raise
    # Parsing untrusted bytes can fail in many ways (bad opcodes, wrong argument
    # types to our stand-ins, truncation); each one means "not a CIFAR batch".
    except Exception as exc:  # noqa: BLE001
        reason = " ".join(str(exc).split()) or type(exc).__name__  # keep it one line
        raise UserError(f"{name} is not a CIFAR batch: {reason}") from None
    return result


def _images_and_labels(batch: Any, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Check the unpickled dict and pull out images (N, 3, 32, 32) and labels (N,)."""
    if not isinstance(batch, dict):
        raise _BadPickle(f"it holds a {type(batch).__name__}, not a dict")
    for key in (b"data", label_key):
        if key not in batch:
            raise _BadPickle(f"it has no {key.decode()!r} entry")
    data = _as_array(batch[b"data"], "data")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise _BadPickle(f"its data is {data.dtype} {data.shape}, not uint8 (N, {_PIXELS})")
    labels = _labels(batch[label_key], label_key.decode())
    if len(labels) != len(data):
        raise _BadPickle(f"it has {len(data)} images but {len(labels)} labels")
    # Own, writable memory: the pickle's bytes are read-only.
    images = np.array(data.reshape((len(data),) + IMAGE_SHAPE), copy=True)
    return images, labels


def _labels(value: Any, key: str) -> np.ndarray:
    """Labels as int64: the real files hold a list of ints, re-pickled ones an array."""
    if isinstance(value, list):
        if not all(_is_int(label) for label in value):
            raise _BadPickle(f"its {key!r} entry is not a list of integers")
        try:
            return np.array(value, dtype=np.int64)
        except OverflowError:
            raise _BadPickle(f"its {key!r} entry holds integers too large for labels") from None
    array = _as_array(value, key)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise _BadPickle(f"its {key!r} entry is not a 1-D integer array")
    return array.astype(np.int64)


def _as_array(value: Any, key: str) -> np.ndarray:
    """The array a placeholder was built into."""
    if not isinstance(value, _ArrayPlaceholder) or value.array is None:
        raise _BadPickle(f"its {key!r} entry is not a numpy array")
    return value.array


def _text(value: Any, what: str) -> str:
    """A short ASCII str from a pickle's str or (Python 2) bytes."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str) or len(value) > 8:
        raise _BadPickle(f"it holds an invalid {what}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_cifar_batches(
    location: Path, folder: str, names: Sequence[str], label_key: bytes
) -> tuple[np.ndarray, np.ndarray]:
    """Load and concatenate the batches ``names`` (e.g. ``data_batch_1``..``5``).

    ``location`` is either the official tarball (read without extracting) or a
    directory holding the extracted ``folder`` (e.g. ``cifar-10-batches-py``).
    """
    if location.is_dir():
        pairs = [
            load_cifar_batch(_batch_path(location / folder, name), label_key) for name in names
        ]
    else:
        members = _read_tar_members(location, [f"{folder}/{name}" for name in names])
        pairs = [
            load_cifar_batch(data, label_key, name=f"{location}:{member}")
            for member, data in members.items()
        ]
    images = np.concatenate([images for images, _ in pairs])
    labels = np.concatenate([labels for _, labels in pairs])
    return images, labels


def _batch_path(folder: Path, name: str) -> Path:
    """The extracted batch ``name`` in ``folder`` (or its gzipped copy, per the file rule)."""
    path = find_file(folder, name)
    if path is None:
        raise UserError(f"{folder} does not hold the CIFAR batch {name}")
    return path


def _read_tar_members(archive: Path, wanted: Sequence[str]) -> dict[str, bytes]:
    """The bytes of the ``wanted`` members, in the order asked for, in one pass.

    Iterating once (instead of ``getmember`` per name) matters: seeking
    backwards in a .tar.gz restarts decompression from the beginning.
    """
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if member.name not in wanted or member.name in found:
                    continue
                if not member.isfile() or member.size > MAX_BATCH_BYTES:
                    raise UserError(f"{archive}: {member.name} is not a regular batch file")
                stream = tar.extractfile(member)
                assert stream is not None  # isfile() guarantees a stream
                found[member.name] = stream.read()
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{archive} is not a readable CIFAR archive: {exc}") from None
    missing = [name for name in wanted if name not in found]
    if missing:
        raise UserError(f"{archive} is not a complete CIFAR archive: it lacks {', '.join(missing)}")
    return {name: found[name] for name in wanted}


def write_cifar_batch(
    path: Path, images: np.ndarray, labels: Sequence[int], label_key: bytes
) -> None:
    """Write a batch the way the official files are laid out (for tests).

    A dict with a numpy uint8 ``b"data"`` array (N x 3072) and a label list,
    pickled at protocol 2 like the originals.
    """
    images = np.asarray(images, dtype=np.uint8)
    batch = {
        b"batch_label": b"written by prunelab",
        b"data": images.reshape(len(images), -1),
        label_key: [int(label) for label in labels],
    }
    Path(path).write_bytes(pickle.dumps(batch, protocol=2))
