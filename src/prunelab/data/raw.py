"""The two on-disk layouts prunelab reads, each turning files into raw arrays.

:class:`IdxFiles` is the MNIST family (four IDX files); :class:`CifarArchive`
is the CIFAR "python version" (a tarball of pickled batches, or its extracted
folder). Both produce :class:`RawData`: uint8 images (N, C, H, W) and int64
labels, still unvalidated against a dataset's shape and class count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prunelab.data.cifar import read_cifar_batches
from prunelab.data.identity import DataFile, digest_file
from prunelab.data.idx import read_idx
from prunelab.data.sources import RemoteFile, find_file, holds, locate, search_folders

# Logical file name -> accepted digests ("sha256:...", "gz-sha256:...", "md5:..."): see data.identity.
Official = Mapping[str, frozenset[str]]


@dataclass(frozen=True)
class RawData:
    """Images uint8 (N, C, H, W) and labels int64 (N,) of both official splits."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    files: tuple[DataFile, ...] = ()  # what was read, with checksums (the run's data identity)


@dataclass(frozen=True)
class IdxFiles:
    """Four IDX files; names are given without ``.gz`` (either copy is found)."""

    train_images: str
    train_labels: str
    test_images: str
    test_labels: str
    remote: tuple[RemoteFile, ...]
    official: Official = field(default_factory=dict)

    def read(self, dataset: str, data_dir: Path | None, download: bool) -> RawData:
        """Locate (or download) the files, read them and checksum them."""
        names = [self.train_images, self.train_labels, self.test_images, self.test_labels]
        folder = locate(dataset, names, data_dir, self.remote if download else None)
        paths = [_found(folder, name) for name in names]
        arrays = [read_idx(path) for path in paths]  # validated first: a hostile file is never hashed
        files = tuple(digest_file(name, path, self.official) for name, path in zip(names, paths))
        # IDX images are (N, H, W): one channel.
        return RawData(arrays[0][:, None], _int64(arrays[1]), arrays[2][:, None], _int64(arrays[3]), files)


@dataclass(frozen=True)
class CifarArchive:
    """The CIFAR python tarball, or the ``folder`` it extracts to."""

    archive: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    remote: RemoteFile
    official: Official = field(default_factory=dict)

    def read(self, dataset: str, data_dir: Path | None, download: bool) -> RawData:
        """Find an extracted folder or the tarball (downloading it if allowed), read and checksum it."""
        location = self._find(dataset, data_dir)
        if location is None:
            remote = (self.remote,) if download else None
            location = locate(dataset, [self.archive], data_dir, remote) / self.archive
        train = read_cifar_batches(location, self.folder, self.train, self.label_key)
        test = read_cifar_batches(location, self.folder, self.test, self.label_key)
        return RawData(train[0], train[1], test[0], test[1], self._digests(location))

    def _digests(self, location: Path) -> tuple[DataFile, ...]:
        if not location.is_dir():
            return (digest_file(self.archive, location, self.official),)
        names = [f"{self.folder}/{name}" for name in self.train + self.test]
        return tuple(digest_file(name, _found(location, name), self.official) for name in names)

    def _find(self, dataset: str, data_dir: Path | None) -> Path | None:
        """The first search folder's extracted copy or tarball, whichever it holds.

        Checking both per folder keeps the search order meaningful: a tarball
        in ``--data-dir`` beats an extracted copy in the cache.
        """
        extracted = [f"{self.folder}/{name}" for name in self.train + self.test]
        for folder in search_folders(dataset, data_dir):
            if holds(folder, extracted):
                return folder
            if (folder / self.archive).is_file():
                return folder / self.archive
        return None


def _found(folder: Path, name: str) -> Path:
    path = find_file(folder, name)
    assert path is not None, "locate() returned a folder lacking the file"
    return path


def _int64(labels: np.ndarray) -> np.ndarray:
    return labels.astype(np.int64)
