"""Moving a run between stores (what a Ray sweep does): exact files, idempotent, hostile bundles refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from prunelab.config.build import build_config
from prunelab.errors import UserError
from prunelab.runs.experiment import Runtime, run
from prunelab.runs.store import BUNDLE_FILES, RunBundle, Store


@pytest.fixture
def exported(tiny_data_dir: Path, tmp_path: Path) -> RunBundle:
    """A finished 1-epoch progressive run, exported from the store it was trained in."""
    cfg = build_config({"method.name": "progressive", "train.epochs": 1, "data.val_size": 200,
                        "train.batch_size": 100})
    runtime = Runtime(store=tmp_path / "a", data_dir=tiny_data_dir, progress=False, download=False)
    summary, _ = run(cfg, runtime)
    return Store(tmp_path / "a").export_run(summary["run_id"])


def test_round_trip_is_exact_and_import_is_idempotent(exported: RunBundle, tmp_path: Path) -> None:
    rid = exported.record.run_id
    assert sorted(exported.files) == sorted(BUNDLE_FILES)  # no checkpoints, no lock
    target = Store(tmp_path / "b")
    assert target.import_run(exported) is True
    for name in BUNDLE_FILES:
        assert (tmp_path / "b" / rid / name).read_bytes() == (tmp_path / "a" / rid / name).read_bytes()
    assert target.get(rid) == exported.record
    assert target.export_run(rid) == exported

    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b" / rid).iterdir()}
    assert target.import_run(exported) is False  # already finished here: nothing is touched
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b" / rid).iterdir()} == mtimes
    assert target.get(rid) == exported.record
    assert Store(tmp_path / "a").import_run(exported) is False


def test_a_finished_run_replaces_a_failed_one(exported: RunBundle, tmp_path: Path) -> None:
    record = dataclasses.replace(exported.record, status="failed", summary=None, error="worker lost")
    failed = RunBundle(record, {"config.json": exported.files["config.json"]})
    target = Store(tmp_path / "b")
    assert target.import_run(failed) is True
    stored = target.get(record.run_id)
    assert stored is not None and (stored.status, stored.error) == ("failed", "worker lost")
    assert target.import_run(exported) is True
    assert target.get(record.run_id) == exported.record


def _damaged(bundle: RunBundle, how: str) -> RunBundle:
    files = dict(bundle.files)
    if how == "traversal":
        files["../x"] = b"evil"
    elif how == "unexpected":
        files["notes.txt"] = b"hello"
    elif how == "checkpoint":
        files["checkpoint-000001.pt"] = b"stale"
    elif how == "missing":
        del files["weights.pt"]
    elif how == "weights":
        files["weights.pt"] = files["weights.pt"][:-1] + bytes([files["weights.pt"][-1] ^ 1])
    elif how == "run_id":
        return RunBundle(dataclasses.replace(bundle.record, run_id="../../x"), files)
    return RunBundle(bundle.record, files)


@pytest.mark.parametrize(("how", "fragment"), [
    ("traversal", "unexpected files ['../x']"),
    ("unexpected", "unexpected files ['notes.txt']"),
    ("checkpoint", "unexpected files ['checkpoint-000001.pt']"),
    ("missing", "lacks ['weights.pt']"),
    ("weights", "does not match its weights_sha256"),
    ("run_id", "malformed run id"),
])
def test_bad_bundles_are_refused_and_write_nothing(exported: RunBundle, tmp_path: Path, how: str,
                                                   fragment: str) -> None:
    target = Store(tmp_path / "c" / "store")
    with pytest.raises(UserError) as info:
        target.import_run(_damaged(exported, how))
    assert fragment in str(info.value)
    assert target.records() == []
    assert sorted(p.name for p in (tmp_path / "c").rglob("*")) == ["index.sqlite", "store"]
