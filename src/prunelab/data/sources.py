"""Finding dataset files on disk, or downloading and verifying them.

With ``data_dir`` (the ``--data-dir`` option) the files must be in
``data_dir/<dataset>`` or ``data_dir`` itself: nothing else is searched and
nothing is downloaded, so a folder that lacks a file (or holds a FIFO or a
folder in its place) is an error, never a silent fall-back to other data.
Without it, the search order (first folder holding every file wins) is:

1. ``$PRUNELAB_DATA/<dataset>``, then ``$PRUNELAB_DATA``;
2. ``/usr/share/datasets/<dataset>`` (system-wide copies, e.g. Debian packages);
3. the user cache ``<cache root>/<dataset>``, where the cache root is
   ``$PRUNELAB_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/prunelab/datasets``.

The subfolder is tried before the folder itself because MNIST and
Fashion-MNIST use the same file names: a shared data root is unambiguous only
through its subfolders.

File rule: a folder holds the file ``name`` when ``name`` exists there or, for
a name not ending in ``.gz``, when ``name.gz`` does (readers detect gzip by
its magic bytes, so either copy reads the same). Names may contain a
subfolder, like ``cifar-10-batches-py/data_batch_1``.

Downloads go only to the user cache, through a temporary file in the same
folder that is renamed into place after its sha256 matches, so an interrupted
or tampered download never looks like a finished one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from prunelab.errors import UserError

SYSTEM_ROOT = Path("/usr/share/datasets")
DATA_ENV = "PRUNELAB_DATA"
CACHE_ENV = "PRUNELAB_CACHE"
DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20
_HINT = "put the files in --data-dir DIR or $PRUNELAB_DATA"


@dataclass(frozen=True)
class RemoteFile:
    """A file to download: the name it is saved under, its URL and its sha256 (hex)."""

    name: str
    url: str
    sha256: str


def default_cache_root() -> Path:
    """``$PRUNELAB_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/prunelab/datasets``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "prunelab" / "datasets"


def search_folders(
    dataset: str,
    data_dir: Path | None,
    system_root: Path = SYSTEM_ROOT,
    cache_root: Path | None = None,
) -> list[Path]:
    """The folders searched for ``dataset``, in order (see the module docstring).

    Raises :class:`UserError` if ``data_dir`` or ``$PRUNELAB_DATA`` is given but
    is not a directory: a mistyped path should not silently fall through.
    """
    if data_dir is not None:
        return _root_and_subfolder(Path(data_dir).expanduser(), dataset, "data directory")
    folders: list[Path] = []
    env_dir = os.environ.get(DATA_ENV)
    if env_dir:
        folders += _root_and_subfolder(Path(env_dir).expanduser(), dataset, f"${DATA_ENV}")
    folders.append(system_root / dataset)
    folders.append((cache_root or default_cache_root()) / dataset)
    return folders


def _root_and_subfolder(root: Path, dataset: str, what: str) -> list[Path]:
    if not root.is_dir():
        raise UserError(f"the {what} {root} does not exist or is not a directory")
    return [root / dataset, root]


def find_file(folder: Path, name: str) -> Path | None:
    """The copy of ``name`` in ``folder`` (``name`` itself, else ``name.gz``), or None."""
    candidates = [folder / name]
    if not name.endswith(".gz"):
        candidates.append(folder / f"{name}.gz")
    return next((path for path in candidates if path.is_file()), None)


def _what_is_wrong(folders: Sequence[Path], name: str) -> str:
    """Why none of ``folders`` holds ``name``: missing, or something other than a regular file there."""
    for folder in folders:
        for path in (folder / name, folder / f"{name}.gz"):
            if path.is_dir():
                return f"{path} is a folder, not a file"
            if path.exists() or path.is_symlink():
                return f"{path} is not a regular file"
    return f"{name} is missing"


def holds(folder: Path, files: Sequence[str]) -> bool:
    """Whether ``folder`` holds every one of ``files`` (by the file rule above)."""
    return all(find_file(folder, name) is not None for name in files)


def locate(
    dataset: str,
    files: Sequence[str],
    data_dir: Path | None,
    download: Sequence[RemoteFile] | None,
    system_root: Path = SYSTEM_ROOT,
    cache_root: Path | None = None,
) -> Path:
    """The first search folder holding all ``files``; downloads them if none does.

    With ``download=None`` nothing is fetched and a missing dataset is a
    :class:`UserError`. Downloaded files must satisfy ``files`` by the file rule.
    """
    folders = search_folders(dataset, data_dir, system_root, cache_root)
    for folder in folders:
        if holds(folder, files):
            return folder
    if data_dir is not None:
        problems = [_what_is_wrong(folders, name) for name in files if not any(find_file(f, name) for f in folders)]
        problems = problems or ["they are split between the two folders; put them all in one"]
        raise UserError(
            f"the data directory {data_dir} does not hold the {dataset} files: {'; '.join(problems)} "
            f"(looked in {' and '.join(str(f) for f in folders)})"
        )
    if download is None:
        searched = ", ".join(str(folder) for folder in folders)
        raise UserError(
            f"could not find the {dataset} files ({', '.join(files)}) in any of {searched}, "
            f"and downloading is off; {_HINT}"
        )
    cache = folders[-1]
    for remote in download:
        if not (cache / remote.name).is_file():
            fetch(dataset, remote, cache)
    if not holds(cache, files):
        raise UserError(
            f"the downloaded {dataset} files in {cache} lack some of {', '.join(files)}"
        )
    return cache


def fetch(dataset: str, remote: RemoteFile, folder: Path) -> Path:
    """Download ``remote`` into ``folder``, verify its sha256 and move it into place."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / remote.name
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".part"
    )
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as out:
            actual = _stream_to(remote, out, dataset)
        if actual != remote.sha256.lower():
            raise UserError(
                f"the download of {remote.url} is corrupted (sha256 {actual}, expected "
                f"{remote.sha256}); it was deleted, so try again or {_HINT}"
            )
        os.replace(temp, target)
    finally:
        # Whatever went wrong (checksum, network, Ctrl-C), leave no partial file.
        temp.unlink(missing_ok=True)
    return target


def _stream_to(remote: RemoteFile, out: BinaryIO, dataset: str) -> str:
    """Copy the URL's body into ``out`` with a progress bar; return its sha256 (hex).

    Only network failures are translated here; a failing disk write keeps its
    own OSError message rather than being blamed on the network.
    """
    digest = hashlib.sha256()
    with _open_url(remote, dataset) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{dataset}: {remote.name}") as bar:
            while chunk := _read_chunk(response, remote, dataset):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def _open_url(remote: RemoteFile, dataset: str) -> http.client.HTTPResponse:
    try:
        return urllib.request.urlopen(remote.url, timeout=DOWNLOAD_TIMEOUT_S)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _network_error(exc, remote, dataset) from None


def _read_chunk(response: http.client.HTTPResponse, remote: RemoteFile, dataset: str) -> bytes:
    try:
        return response.read(_CHUNK)
    except (http.client.HTTPException, OSError) as exc:
        raise _network_error(exc, remote, dataset) from None


def _network_error(exc: Exception, remote: RemoteFile, dataset: str) -> UserError:
    """One sentence for a failed download; "offline" only when no server answered."""
    where = f"{remote.name} from {remote.url}"
    if isinstance(exc, urllib.error.HTTPError):
        return UserError(
            f"could not download {dataset} ({where}: HTTP {exc.code} {exc.reason}); {_HINT}"
        )
    if isinstance(exc, urllib.error.URLError):
        return UserError(
            f"could not download {dataset} ({where}: {exc.reason}); you seem to be offline: {_HINT}"
        )
    return UserError(f"could not download {dataset} ({where}: {exc}); {_HINT}")
