"""Results you can trust: data identity, verified reads, divergence, a rebuildable index, sane splits, threads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_fashion_mnist

from prunelab.cli import main
from prunelab.config.build import build_config
from prunelab.config.identity import run_id
from prunelab.data import load_splits
from prunelab.runs.store import INDEX, Store

TINY = ["--set", "data.val_size=200", "--batch-size", "64", "--no-progress", "--epochs", "2"]
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def _run(capsys: pytest.CaptureFixture[str], store: Path, data: Path, *extra: str) -> tuple[int, dict, str]:
    """``prunelab run --json``: exit code, the JSON of the last stdout line, stderr."""
    code = main(["run", "--store", str(store), "--data-dir", str(data), *TINY, "--json", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


def _fault(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    """Inject ``PRUNELAB_FAULT=spec`` into this process, its visit counts reset."""
    import prunelab.faults as faults

    faults._visits.clear()
    monkeypatch.setenv("PRUNELAB_FAULT", spec)


def _errors(err: str) -> list[str]:
    """The lines of stderr other than the data line every run starts with."""
    return [line for line in err.strip().splitlines() if not line.startswith("prunelab: data:")]


# ------------------------------------------------------------------ the data is part of a run's identity


def test_other_data_is_another_run_and_is_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_tiny_fashion_mnist(tmp_path / "a", seed=0)
    b = write_tiny_fashion_mnist(tmp_path / "b", seed=7)  # same format and sizes, other images
    store = tmp_path / "store"
    code_a, first, err = _run(capsys, store, a)
    assert code_a == 0 and "1000 train / 200 validation / 300 test images" in err
    code_b, second, err = _run(capsys, store, b)
    assert code_b == 0 and "already in the store" not in err
    assert first["run_id"] != second["run_id"]
    cfg = build_config({"train.epochs": 2, "data.val_size": 200, "train.batch_size": 64})
    assert run_id(cfg) not in (first["run_id"], second["run_id"])  # tiny data is not the official files
    identity = first["data_identity"]
    assert identity["canonical"] is False and identity["split"] == {"train": 1000, "val": 200, "test": 300}
    assert [f["name"] for f in identity["files"]] == [
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    config = json.loads((store / first["run_id"] / "config.json").read_text())
    assert config["data_identity"] == identity
    assert "data_identity" not in Store(store).get(first["run_id"]).config  # type: ignore[union-attr]
    # The same data again is the same run, answered from the store.
    code, again, err = _run(capsys, store, a)
    assert code == 0 and again["run_id"] == first["run_id"] and "already in the store" in err


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="the real Fashion-MNIST is not installed")
def test_the_official_files_keep_the_run_ids() -> None:
    identity = load_splits("fashion-mnist", REAL_FASHION, download=False).identity
    assert identity is not None and identity.canonical
    # The study's dense 10-epoch seed-0 run (docs/results) keeps its id.
    cfg = build_config({"method.name": "dense", "train.epochs": 10, "model.name": "lenet300"})
    assert run_id(cfg, identity) == run_id(cfg) == "1df0e5edebed"


# ------------------------------------------------------------------ stored files are verified on every read


@pytest.fixture
def finished(tmp_path: Path, tiny_data_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    store = tmp_path / "store"
    code, summary, _ = _run(capsys, store, tiny_data_dir)
    assert code == 0
    return store, summary["run_id"]


def _flip(path: Path, at: int = 400, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["weights.pt", "mask.pt", "summary.json"])
def test_a_changed_file_is_never_used(finished: tuple[Path, str], tiny_data_dir: Path, tmp_path: Path,
                                      name: str, capsys: pytest.CaptureFixture[str]) -> None:
    store, rid = finished
    path = store / rid / name
    if name == "summary.json":
        summary = json.loads(path.read_text())
        path.write_text(json.dumps({**summary, "test_acc": 0.99}))
    else:
        _flip(path)
    before = path.read_bytes()
    code, answer, err = _run(capsys, store, tiny_data_dir)
    assert code == 2 and answer["status"] == "error"
    assert _errors(err) == [f"prunelab: error: {answer['error']}"]
    assert f"run {rid} in the store is damaged" in answer["error"] and name in answer["error"]
    for command in (["show", rid], ["export", rid, "--format", "dense", "--out", str(tmp_path / "x.pt")]):
        assert main([*command, "--store", str(store)]) == 2
        assert f"run {rid} in the store is damaged" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    assert path.read_bytes() == before  # nothing stored is lost or rewritten


def test_dense_weights_copied_over_a_sparse_run_are_refused(
    tmp_path: Path, tiny_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    _, sparse, _ = _run(capsys, store, tiny_data_dir)
    _, dense, _ = _run(capsys, store, tiny_data_dir, "--method", "dense")
    shutil.copy(store / dense["run_id"] / "weights.pt", store / sparse["run_id"] / "weights.pt")
    assert main(["export", sparse["run_id"], "--format", "sparse", "--out", str(tmp_path / "s.safetensors"),
                 "--store", str(store)]) == 2
    assert "weights.pt does not match its recorded sha256" in capsys.readouterr().err
    assert not (tmp_path / "s.safetensors").exists()


def test_a_damaged_pretraining_run_is_not_trained_from(
    tmp_path: Path, tiny_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    _, dense, _ = _run(capsys, store, tiny_data_dir, "--method", "dense")
    _flip(store / dense["run_id"] / "weights.pt")
    code, answer, _ = _run(capsys, store, tiny_data_dir, "--method", "oneshot")
    assert code == 2 and f"run {dense['run_id']} in the store is damaged" in answer["error"]


def test_a_checkpoint_of_another_run_is_refused(
    tmp_path: Path, tiny_data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    _fault(monkeypatch, "sigint:step:20")  # in the second epoch: one checkpoint
    assert main(["run", "--store", str(store), "--data-dir", str(tiny_data_dir), *TINY, "--method", "dense"]) == 130
    other = next(p for p in (store).iterdir() if p.is_dir())
    (checkpoint,) = other.glob("checkpoint-*.pt")
    _fault(monkeypatch, "sigint:step:1")
    assert main(["run", "--store", str(store), "--data-dir", str(tiny_data_dir), *TINY]) == 130
    capsys.readouterr()
    monkeypatch.delenv("PRUNELAB_FAULT")
    target = next(p for p in store.iterdir() if p.is_dir() and p != other)
    shutil.copy(checkpoint, target / checkpoint.name)
    code, resumed, err = _run(capsys, store, tiny_data_dir)
    assert code == 0 and f"belongs to {other.name}/" in err and (target / f"{checkpoint.name}.damaged").exists()
    _, fresh, _ = _run(capsys, tmp_path / "fresh", tiny_data_dir)
    assert resumed["weights_sha256"] == fresh["weights_sha256"]  # trained from the start, not from the stranger


# ------------------------------------------------------------------ divergence is a failure


@pytest.mark.parametrize("extra", [["--lr", "1e6"], ["--set", "train.lr=1e9"]])
def test_divergence_is_stored_as_diverged(
    tmp_path: Path, tiny_data_dir: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    store = tmp_path / "store"
    code, answer, err = _run(capsys, store, tiny_data_dir, *extra)
    assert code == 2 and answer["status"] == "diverged" and answer["epoch"] == 1 and answer["step"] >= 1
    assert "training diverged: the loss was" in answer["error"] and "lower the learning rate" in answer["error"]
    (record,) = Store(store).records()
    assert record.status == "diverged" and record.error == answer["error"].removeprefix(f"run {record.run_id}: ")
    assert not list((store / record.run_id).glob("checkpoint-*"))
    # Asked again, the stored divergence is the answer; nothing trains.
    code, again, err = _run(capsys, store, tiny_data_dir, *extra)
    assert code == 2 and again["status"] == "diverged" and "is stored as diverged" in again["error"]
    assert main(["list", "runs", "--json", "--store", str(store)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "diverged" and row["test_acc"] is None


def test_json_output_never_holds_nan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prunelab.io import json_text

    text = json_text({"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads(text) == {"a": None, "b": [None, 1.5]}


# ------------------------------------------------------------------ the index can be rebuilt


@pytest.mark.parametrize("loss", ["deleted", "truncated"])
def test_a_lost_index_is_rebuilt_from_the_run_folders(
    tmp_path: Path, tiny_data_dir: Path, capsys: pytest.CaptureFixture[str], loss: str
) -> None:
    store = tmp_path / "store"
    _, sparse, _ = _run(capsys, store, tiny_data_dir)
    _, dense, _ = _run(capsys, store, tiny_data_dir, "--method", "dense")
    _run(capsys, store, tiny_data_dir, "--lr", "1e6")
    before = {r.run_id: (r.status, r.summary) for r in Store(store).records()}
    for suffix in ("", "-wal", "-shm"):
        path = store / f"{INDEX}{suffix}"
        if loss == "deleted":
            path.unlink(missing_ok=True)
        elif path.exists():
            path.write_bytes(b"")
    assert main(["list", "runs", "--json", "--store", str(store)]) == 0
    out, err = capsys.readouterr()
    assert "rebuilt it from 3 run folders" in err
    assert {r["run_id"]: r["status"] for r in json.loads(out)} == {rid: s for rid, (s, _) in before.items()}
    assert {r.run_id: (r.status, r.summary) for r in Store(store).records()} == before
    code, again, err = _run(capsys, store, tiny_data_dir)
    assert code == 0 and again == sparse and "already in the store" in err  # nothing retrained


def test_a_damaged_index_is_refused_then_rebuilt_on_request(
    finished: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    store, rid = finished
    for suffix in ("-wal", "-shm"):
        (store / f"{INDEX}{suffix}").unlink(missing_ok=True)
    (store / INDEX).write_bytes(b"this is not an SQLite database, but it is not empty either" * 100)
    assert main(["list", "runs", "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is damaged" in err[0] and "prunelab store rebuild" in err[0]
    assert (store / INDEX).read_bytes().startswith(b"this is not")  # never silently replaced
    assert main(["store", "rebuild", "--store", str(store)]) == 0
    assert "1 ok" in capsys.readouterr().out
    assert [p.name.startswith(f"{INDEX}.damaged-") for p in store.iterdir() if "damaged" in p.name] == [True]
    assert Store(store).get(rid).status == "ok"  # type: ignore[union-attr]


def test_rebuild_marks_a_damaged_run_failed(finished: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    store, rid = finished
    _flip(store / rid / "weights.pt")
    (store / INDEX).unlink()
    assert main(["list", "runs", "--json", "--store", str(store)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "failed"
    assert "weights.pt does not match" in (Store(store).get(rid).error or "")  # type: ignore[union-attr]


# ------------------------------------------------------------------ splits are checked and said


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--set", "data.val_size=1199"], "leaves 1 of the 1200 training images"),
     (["--set", "data.val_size=1000", "--batch-size", "256"], "fewer than one batch of 256"),
     (["--set", "data.val_size=0"], "data.val_size must be at least 1")],
)
def test_bad_splits_are_one_sentence(tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     args: list[str], message: str) -> None:
    code = main(["run", "--store", str(tmp_path / "s"), "--data-dir", str(tiny_data_dir), *TINY, *args])
    lines = _errors(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and message in lines[0]


def test_small_training_sets_hold_out_ten_percent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_tiny_fashion_mnist(tmp_path / "d", n_train=8000, n_test=100)
    args = ["run", "--store", str(tmp_path / "s"), "--data-dir", str(data), "--batch-size", "500", "--epochs", "1",
            "--no-progress", "--method", "dense"]
    assert main(args) == 0
    assert "7200 train / 800 validation / 100 test images" in capsys.readouterr().err


# ------------------------------------------------------------------ the thread count


def test_the_thread_count_is_part_of_the_config(tiny_data_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # whatever the process's default, a run uses train.threads
        _, a, _ = _run(capsys, tmp_path / "a", tiny_data_dir)
        torch.set_num_threads(1)
        _, b, _ = _run(capsys, tmp_path / "b", tiny_data_dir)
        _, c, _ = _run(capsys, tmp_path / "a", tiny_data_dir, "--threads", "2")
    finally:
        torch.set_num_threads(previous)
    assert a["weights_sha256"] == b["weights_sha256"] and a["threads"] == b["threads"] == 1
    assert c["run_id"] != a["run_id"] and c["threads"] == 2  # another count is another run, never a reuse
    assert run_id(build_config({"train.threads": 1})) == run_id(build_config({}))


# ------------------------------------------------------------------ the store's rough edges


def test_temporaries_left_by_a_kill_are_removed(tiny_data_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    _fault(monkeypatch, "sigint:step:1")
    assert main(["run", "--store", str(store), "--data-dir", str(tiny_data_dir), *TINY]) == 130
    monkeypatch.delenv("PRUNELAB_FAULT")
    folder = next(p for p in store.iterdir() if p.is_dir())
    for name in (".checkpoint-000003.pt.abc123.tmp", ".summary.json.xyz.tmp"):
        (folder / name).write_bytes(b"half a file")
    code, _, _ = _run(capsys, store, tiny_data_dir)
    assert code == 0 and not list(store.rglob("*.tmp"))


def test_a_full_disk_during_the_index_write_is_said_as_such(
    finished: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = finished
    import prunelab.runs.store.index as store_module

    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    s = Store(store)
    with pytest.raises(Exception) as caught:
        with s.index.connect():
            raise sqlite3.OperationalError("disk I/O error")
    assert "is full (No space left on device)" in str(caught.value)


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[Path]:
    """``folder`` seen through a read-only view: a read-only bind mount as root, else its write bits off."""
    view = folder.with_name(folder.name + "-ro")
    view.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True).returncode == 0
        if not mounted or subprocess.run(["mount", "-o", "remount,ro,bind", str(view)]).returncode != 0:
            if mounted:
                subprocess.run(["umount", str(view)])
            pytest.skip("a read-only bind mount is not allowed here")
        try:
            yield view
        finally:
            subprocess.run(["umount", str(view)], check=True)
        return
    view.rmdir()
    paths = [folder, *folder.rglob("*")]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield folder
    finally:
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_a_read_only_store_can_be_read(finished: tuple[Path, str], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    store, rid = finished
    with _read_only(store) as view:
        with pytest.raises(OSError):
            (view / "probe").write_bytes(b"")
        assert main(["list", "runs", "--json", "--store", str(view)]) == 0
        assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [rid]
        assert main(["show", rid, "--store", str(view)]) == 0
        assert main(["export", rid, "--format", "dense", "--out", str(tmp_path / "w.pt"), "--store", str(view)]) == 0
        assert main(["report", "--out", str(tmp_path / "report"), "--store", str(view)]) == 0
    assert (tmp_path / "w.pt").stat().st_size > 0 and (tmp_path / "report" / "report.html").is_file()
