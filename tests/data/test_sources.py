"""Locating files (search order, file rule) and downloading them from a local server."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from prunelab.data.sources import RemoteFile, default_cache_root, find_file, locate, search_folders
from prunelab.errors import UserError

FILES = ["a-idx1-ubyte", "b-idx3-ubyte"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PRUNELAB_DATA", "PRUNELAB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)


def _fill(folder: Path, names: list[str] = FILES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def test_search_order_env_system_cache_and_data_dir_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, env_dir = tmp_path / "data", tmp_path / "env"
    system, cache = tmp_path / "system", tmp_path / "cache"
    given = _fill(data_dir / "ds")
    places = [_fill(env_dir / "ds"), _fill(system / "ds"), _fill(cache / "ds")]
    monkeypatch.setenv("PRUNELAB_DATA", str(env_dir))
    assert locate("ds", FILES, data_dir, None, system_root=system, cache_root=cache) == given
    (given / FILES[0]).unlink()
    # --data-dir lacking a file is an error, never a fall-back to the other copies.
    with pytest.raises(UserError, match=f"data directory {data_dir} does not hold the ds files: {FILES[0]} is missing"):
        locate("ds", FILES, data_dir, None, system_root=system, cache_root=cache)

    def found() -> Path:
        return locate("ds", FILES, None, None, system_root=system, cache_root=cache)

    for expected in places:
        assert found() == expected
        for name in FILES:
            (expected / name).unlink()
    with pytest.raises(UserError, match="could not find the ds files .* downloading is off"):
        found()


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_data_dir_holding_something_else_than_a_file_is_an_error(tmp_path: Path, kind: str) -> None:
    folder = _fill(tmp_path / "data" / "ds", FILES[1:])
    odd = folder / FILES[0]
    os.mkfifo(odd) if kind == "fifo" else odd.mkdir()
    what = "is a folder, not a file" if kind == "folder" else "is not a regular file"
    with pytest.raises(UserError, match=f"{odd} {what}"):
        locate("ds", FILES, tmp_path / "data", None, system_root=tmp_path / "sys", cache_root=tmp_path / "c")


def test_folder_itself_and_subfolder_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system, cache = tmp_path / "system", tmp_path / "cache"
    flat = _fill(tmp_path / "flat")
    assert locate("ds", FILES, flat, None, system_root=system, cache_root=cache) == flat
    monkeypatch.setenv("PRUNELAB_DATA", str(flat))
    assert locate("ds", FILES, None, None, system_root=system, cache_root=cache) == flat
    # The dataset subfolder wins over the folder itself (MNIST and Fashion-MNIST share names).
    sub = _fill(flat / "ds")
    assert locate("ds", FILES, flat, None, system_root=system, cache_root=cache) == sub


def test_gz_rule(tmp_path: Path) -> None:
    _fill(tmp_path, ["a-idx1-ubyte.gz", "b-idx3-ubyte"])
    assert find_file(tmp_path, "a-idx1-ubyte") == tmp_path / "a-idx1-ubyte.gz"
    assert find_file(tmp_path, "b-idx3-ubyte") == tmp_path / "b-idx3-ubyte"
    assert find_file(tmp_path, "b-idx3-ubyte.gz") is None  # a .gz name means exactly that file
    assert (
        locate("ds", FILES, tmp_path, None, system_root=tmp_path / "s", cache_root=tmp_path / "c")
        == tmp_path
    )


def test_missing_data_dir_or_env_dir_is_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UserError, match=f"data directory {tmp_path / 'nope'} does not exist"):
        search_folders("ds", tmp_path / "nope")
    monkeypatch.setenv("PRUNELAB_DATA", str(tmp_path / "gone"))
    with pytest.raises(UserError, match=r"\$PRUNELAB_DATA .*gone does not exist"):
        search_folders("ds", None)


def test_cache_root_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "prunelab" / "datasets"
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "pc"))
    assert default_cache_root() == tmp_path / "pc"
    assert search_folders("ds", None, system_root=tmp_path / "sys") == [
        tmp_path / "sys" / "ds",
        tmp_path / "pc" / "ds",
    ]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server over a folder: (base URL, folder)."""
    root = tmp_path / "served"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _serve(root: Path, name: str, data: bytes) -> str:
    (root / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_download_lands_in_cache(tmp_path: Path, server: tuple[str, Path]) -> None:
    base, root = server
    remote = [
        RemoteFile(
            f"{name}.gz", f"{base}{name}.gz", _serve(root, f"{name}.gz", name.encode() * 1000)
        )
        for name in FILES
    ]
    cache = tmp_path / "cache"
    folder = locate("ds", FILES, None, remote, system_root=tmp_path / "sys", cache_root=cache)
    assert folder == cache / "ds"
    for name in FILES:
        assert (folder / f"{name}.gz").read_bytes() == name.encode() * 1000
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{name}.gz" for name in FILES)
    # Found in the cache now: no second download even with the server gone.
    (root / f"{FILES[0]}.gz").unlink()
    assert (
        locate("ds", FILES, None, remote, system_root=tmp_path / "sys", cache_root=cache) == folder
    )


def test_checksum_mismatch_leaves_nothing(tmp_path: Path, server: tuple[str, Path]) -> None:
    base, root = server
    actual = _serve(root, "f.gz", b"tampered")
    remote = [RemoteFile("f.gz", f"{base}f.gz", "0" * 64)]
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as caught:
        locate("ds", ["f"], None, remote, system_root=tmp_path / "sys", cache_root=cache)
    message = str(caught.value)
    assert f"sha256 {actual}, expected {'0' * 64}" in message
    assert list((cache / "ds").iterdir()) == []


def test_http_error_is_one_sentence(tmp_path: Path, server: tuple[str, Path]) -> None:
    base, _ = server
    remote = [RemoteFile("f.gz", f"{base}missing.gz", "0" * 64)]
    with pytest.raises(UserError, match=r"could not download ds \(f.gz from .*: HTTP 404"):
        locate("ds", ["f"], None, remote, system_root=tmp_path / "sys", cache_root=tmp_path / "c")
    assert list((tmp_path / "c" / "ds").iterdir()) == []


def test_closed_port_is_one_sentence(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, now closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/train-images-idx3-ubyte.gz"
    remote = [RemoteFile("train-images-idx3-ubyte.gz", url, "0" * 64)]
    with pytest.raises(UserError) as caught:
        locate(
            "fashion-mnist",
            ["train-images-idx3-ubyte"],
            None,
            remote,
            system_root=tmp_path / "sys",
            cache_root=tmp_path / "c",
        )
    message = str(caught.value)
    assert message.startswith(
        f"could not download fashion-mnist (train-images-idx3-ubyte.gz from {url}: "
    )
    assert message.endswith(
        "you seem to be offline: put the files in --data-dir DIR or $PRUNELAB_DATA"
    )
    assert "\n" not in message
    assert list((tmp_path / "c" / "fashion-mnist").iterdir()) == []
