"""Experiment trackers (`--log tensorboard|mlflow|csv`): every epoch of metrics.jsonl, once, exactly."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prunelab.cli import main
from prunelab.config.build import build_config
from prunelab.integrations.trackers import CSV_FILE, TENSORBOARD_DIR, EpochTrackers, TrackedRun, fields
from prunelab.runs.experiment import Runtime
from prunelab.runs.store import RunFolder

from conftest import interrupted_then_resumed

TINY = ["--set", "data.val_size=200", "--batch-size", "64", "--no-progress"]
ALL = ["--log", "tensorboard", "--log", "csv", "--log", "mlflow"]


@pytest.fixture(autouse=True)
def _local_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default local MLflow store, whatever the environment of the test says."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


def _metrics(store: Path, rid: str) -> list[dict[str, Any]]:
    return RunFolder(store / rid).metrics()


def _numeric(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _as_csv_strings(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """What csv.DictReader gives back for ``records`` written exactly (floats by repr)."""
    return [{k: str(r[k]) for k in fields(records)} for r in records]


def _tensorboard(store: Path, rid: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(store / rid / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow_runs(store: Path, rid: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("prunelab")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`prunelab.run_id` = '{rid}'")


def _mlflow_history(store: Path, mlflow_run: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}/mlflow.db")
    keys = client.get_run(mlflow_run).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run, k)) for k in keys}


def _expected(records: list[dict[str, Any]], cast: Any = float) -> dict[str, list[tuple[int, float]]]:
    """Per numeric field, (step, value) for each epoch: the step counts the run's epochs from 1."""
    out: dict[str, list[tuple[int, float]]] = {}
    for step, record in enumerate(records, start=1):
        for key, value in _numeric(record).items():
            out.setdefault(key, []).append((step, cast(value)))
    return out


def _needs_tracker_packages() -> None:
    pytest.importorskip("tensorboard")  # the optional extra prunelab[trackers]
    pytest.importorskip("mlflow")


def _check_all_trackers(store: Path, rid: str) -> None:
    """CSV, TensorBoard and MLflow each hold every epoch of metrics.jsonl once, with its exact values."""
    records = _metrics(store, rid)
    assert _csv_rows(store / rid / CSV_FILE) == _as_csv_strings(records)
    # TensorBoard keeps scalars as float32: exactly the float32 of each value.
    assert _tensorboard(store, rid) == _expected(records, lambda v: float(np.float32(v)))
    runs = _mlflow_runs(store, rid)
    assert len(runs) == 1 and runs[0].info.run_name == rid and runs[0].info.status == "FINISHED"
    assert _mlflow_history(store, runs[0].info.run_id) == _expected(records)
    config = json.loads((store / rid / "config.json").read_text())
    assert runs[0].data.params["train.lr"] == str(config["train"]["lr"])
    assert runs[0].data.params["method.name"] == config["method"]["name"]


@pytest.mark.integration
def test_run_logs_every_epoch_to_every_tracker(tiny_data_dir: Path, tmp_path: Path, capsys) -> None:
    _needs_tracker_packages()
    store = tmp_path / "store"
    argv = ["run", "--epochs", "2", "--data-dir", str(tiny_data_dir), "--store", str(store), "--json", *TINY]
    assert main([*argv, *ALL]) == 0
    rid = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_id"]
    records = _metrics(store, rid)
    assert [(r["cycle"], r["epoch"]) for r in records] == [(0, 1), (0, 2)]
    _check_all_trackers(store, rid)
    assert len(_csv_rows(store / rid / CSV_FILE)) == 2
    assert set(_tensorboard(store, rid)) == set(_numeric(records[0]))  # every numeric field, phase left out

    # `prunelab metrics --csv` prints the very text the run's CSV holds.
    assert main(["metrics", rid[:6], "--store", str(store), "--csv"]) == 0
    assert capsys.readouterr().out == (store / rid / CSV_FILE).read_text()

    # Answered from the store: nothing is logged again.
    before = {p: p.read_bytes() for p in (store / rid).rglob("*") if p.is_file() and p.name != ".lock"}
    assert main([*argv, *ALL]) == 0
    assert "already in the store" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in (store / rid).rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    _check_all_trackers(store, rid)


@pytest.mark.integration
def test_a_resumed_run_logs_each_epoch_once(tiny_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    _needs_tracker_packages()
    cfg = build_config({"epochs": 3, "data.val_size": 200, "batch_size": 64})
    store = tmp_path / "store"
    runtime = Runtime(store=store, data_dir=tiny_data_dir, progress=False, download=False,
                      trackers=("csv", "tensorboard", "mlflow"))
    from prunelab.runs.experiment import load_data
    from prunelab.config.identity import run_id

    rid = run_id(cfg, load_data(cfg, runtime).identity)
    # Ctrl-C right after epoch 2 reached metrics.jsonl (before its checkpoint): the resume trains it again.
    summary = interrupted_then_resumed(cfg, runtime, monkeypatch, rid, lambda n, record: n == 2)
    assert summary["run_id"] == rid
    lines = (store / rid / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # epoch 2 twice in the file: the last copy counts
    assert [r["epoch"] for r in _metrics(store, rid)] == [1, 2, 3]
    _check_all_trackers(store, rid)  # one row, one scalar, one MLflow value per epoch


@pytest.mark.integration
def test_sweep_runs_log_their_own_csv(tiny_data_dir: Path, tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {epochs: 1, data.val_size: 200, batch_size: 64}\n"
                     "grid: {method: [dense, progressive]}\n")
    store = tmp_path / "store"
    assert main(["sweep", str(sweep), "--workers", "1", "--store", str(store), "--data-dir", str(tiny_data_dir),
                 "--no-progress", "--log", "csv", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["done"] == 2
    folders = [p for p in store.iterdir() if (p / "summary.json").is_file()]
    assert len(folders) == 2
    for folder in folders:
        assert _csv_rows(folder / CSV_FILE) == _as_csv_strings(_metrics(store, folder.name))


def _record(cycle: int, epoch: int, loss: float) -> dict[str, Any]:
    return {"cycle": cycle, "phase": "train", "epoch": epoch, "train_loss": loss, "kept": 10}


def test_trackers_start_from_the_stored_epochs_before_the_first_new_one(tmp_path: Path) -> None:
    """A resume replays what metrics.jsonl kept before the epoch it trains again, then logs the new ones."""
    stored = [_record(0, 1, 0.5), _record(0, 2, 0.25), _record(1, 1, 0.125)]
    run = TrackedRun("abcdef123456", tmp_path, tmp_path, {"seed": 0})
    with EpochTrackers(["csv"], run, stored) as trackers:
        trackers(_record(1, 1, 0.1))  # cycle 1, epoch 1 again: its stored copy is replaced
        trackers(_record(1, 2, 0.05))
        assert trackers.step == 4
    rows = _csv_rows(tmp_path / CSV_FILE)
    assert [(r["cycle"], r["epoch"], r["train_loss"]) for r in rows] == [
        ("0", "1", "0.5"), ("0", "2", "0.25"), ("1", "1", "0.1"), ("1", "2", "0.05")]
    assert list(rows[0]) == ["cycle", "phase", "epoch", "kept", "train_loss"]


def test_an_attempt_without_new_epochs_still_writes_the_stored_ones(tmp_path: Path) -> None:
    stored = [_record(0, 1, 0.5), _record(0, 2, 0.25)]
    with EpochTrackers(["csv"], TrackedRun("abcdef123456", tmp_path, tmp_path, {}), stored):
        pass  # killed after its last checkpoint: the resume only evaluates and stores
    assert len(_csv_rows(tmp_path / CSV_FILE)) == 2


def test_a_failing_tracker_never_stops_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    from prunelab.integrations.trackers import CsvTracker

    def broken(self: Any, step: int, record: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(CsvTracker, "log", broken)
    trackers = EpochTrackers(["csv"], TrackedRun("abcdef123456", tmp_path, tmp_path, {}), [])
    trackers(_record(0, 1, 0.5))
    trackers(_record(0, 2, 0.25))  # dropped after the first failure: said once
    trackers.close()
    err = capsys.readouterr().err
    assert err.count("tracker csv stopped (OSError: No space left on device)") == 1


@pytest.mark.parametrize(("name", "module"), [("tensorboard", "torch.utils.tensorboard"),
                                              ("mlflow", "mlflow.tracking")])
def test_a_missing_tracker_package_is_one_sentence(tmp_path: Path, monkeypatch, capsys, name: str,
                                                   module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    code = main(["run", "--epochs", "1", "--store", str(tmp_path / "s"), "--log", name, *TINY])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "s").exists()  # refused before anything was built
    assert err.strip() == (f"prunelab: error: --log {name} needs the {name} package, which is not installed: "
                           "pip install 'prunelab[trackers]'")


def test_unknown_tracker_is_one_sentence(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--log", "wandb", "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "argument --log: invalid choice: 'wandb'" in err and "tensorboard" in err


def test_log_on_ray_is_refused(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {epochs: 1}\ngrid: {seed: [0]}\n")
    assert main(["sweep", str(sweep), "--executor", "ray", "--log", "csv", "--store", str(tmp_path / "s")]) == 2
    assert "--log is for --executor local" in capsys.readouterr().err
