"""What data a run read: the files, their checksums and the split sizes.

A stored result may be reused only for the same config *and* the same data,
so the data a run reads is part of its identity. :class:`DataIdentity` is
computed when the files are read: each file's sha256 (of its decompressed
contents, so a gzipped and a plain copy of the same file agree) and size,
and whether every file is one of the dataset's official files, recognised by
their published checksums. Official files leave the run id as it always was;
any other data adds the digest of its files to the run id
(:func:`prunelab.config.run_id`).
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelab.errors import UserError

_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class DataFile:
    """One file a run read: its logical name, where it was, and its checksums."""

    name: str
    path: str
    sha256: str  # of the contents, decompressed if the file is gzipped
    size: int  # bytes of the contents
    canonical: bool  # one of the dataset's official files (by a published checksum)


@dataclass(frozen=True)
class DataIdentity:
    """The files of one dataset as read, and the sizes of the splits made from them."""

    dataset: str
    files: tuple[DataFile, ...]
    train: int
    val: int
    test: int

    @property
    def canonical(self) -> bool:
        """Whether every file is an official one (then the run id does not depend on the data)."""
        return all(f.canonical for f in self.files)

    @property
    def sha256(self) -> str:
        """One digest over the names and contents of all files, in reading order."""
        text = "\n".join(f"{f.name} {f.sha256}" for f in self.files)
        return hashlib.sha256(text.encode()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        """What ``config.json`` and ``summary.json`` record under ``data``."""
        return {
            "dataset": self.dataset,
            "canonical": self.canonical,
            "sha256": self.sha256,
            "files": [
                {"name": f.name, "path": f.path, "sha256": f.sha256, "size": f.size, "canonical": f.canonical}
                for f in self.files
            ],
            "split": {"train": self.train, "val": self.val, "test": self.test},
        }

    def describe(self) -> str:
        """One line for the start of a run: the split sizes and where the data came from."""
        where = "the official files" if self.canonical else f"non-official files, data sha256 {self.sha256[:12]}"
        folders = sorted({str(Path(f.path).parent) for f in self.files})
        return (
            f"data: {self.dataset}, {self.train} train / {self.val} validation / {self.test} test images "
            f"from {', '.join(folders)} ({where})"
        )


def digest_file(name: str, path: Path, official: Mapping[str, frozenset[str]]) -> DataFile:
    """Checksum ``path`` (read as ``name``) and check it against the ``official`` digests.

    ``official`` maps a logical file name to accepted digests, each written
    ``sha256:<hex>`` (of the contents), ``gz-sha256:<hex>`` (of the gzipped
    file as published) or ``md5:<hex>`` (of the contents).
    """
    raw = hashlib.sha256()
    content, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    size = 0
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == _GZIP_MAGIC
            f.seek(0)
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                raw.update(chunk)
        stream = gzip.open(path, "rb") if gzipped else open(path, "rb")
        with stream:
            for chunk in iter(lambda: stream.read(_CHUNK), b""):
                content.update(chunk)
                md5.update(chunk)
                size += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read {path} to checksum it: {exc}") from None
    accepted = official.get(name, frozenset())
    digests = {f"sha256:{content.hexdigest()}", f"md5:{md5.hexdigest()}"}
    if gzipped:
        digests.add(f"gz-sha256:{raw.hexdigest()}")
    return DataFile(name, str(path), content.hexdigest(), size, bool(digests & accepted))
