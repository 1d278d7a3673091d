"""What prunelab writes and reads back: strict JSON, atomic writes, sha256 digests, torch files without pickle.

A leaf of the package: it imports nothing of prunelab but the errors and the
fault points, so every layer can write files the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import UserError
from prunelab.faults import fault_point


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no NaN), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON (keys sorted; non-finite floats written as null, never as a bare NaN)."""
    return json.dumps(finite_or_none(obj), sort_keys=True, indent=indent, allow_nan=False)


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as hex, the digest every checksum prunelab records is written in."""
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes, fault: str | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename.

    A crash leaves either the old file or the new one, never half of one. A
    failed write (a full disk, a read-only folder) removes the temporary
    file, leaves any previous ``path`` as it was, and raises a one-sentence
    :class:`UserError`. ``fault`` names the fault point half-way through the
    write (see :mod:`prunelab.faults`).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; results are meant to be shared
            half = len(data) // 2
            f.write(data[:half])
            if fault is not None:
                fault_point(fault)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror}; files written before are intact") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def torch_bytes(obj: Any) -> bytes:
    """What ``torch.save(obj)`` writes, as bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically."""
    atomic_write_bytes(path, torch_bytes(obj))


def torch_loads(data: bytes, path: Path) -> Any:
    """``torch.load`` of bytes read from ``path`` with ``weights_only=True``: tensors and plain containers,
    never code; anything else is one sentence naming ``path``."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any failure means the file is not ours or is damaged)
        raise UserError(f"{path} is not a valid prunelab file ({type(exc).__name__})") from None

