"""A run's epochs as tables: `prunelab metrics`, `load_metrics` and `load_runs` (pandas)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pd = pytest.importorskip("pandas")  # an optional dependency of prunelab: load_runs and load_metrics need it

from prunelab.cli import main
from prunelab.runs.frames import RESULT_COLUMNS, RUN_COLUMNS, load_metrics, load_runs
from prunelab.runs.store import RunFolder, Store

from conftest import write_tiny_fashion_mnist

TINY = ["--set", "data.val_size=200", "--batch-size", "64", "--no-progress"]
FIRST = ["cycle", "phase", "epoch"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store holding one finished 2-epoch progressive run (trained once for the module), and its id."""
    root = tmp_path_factory.mktemp("metrics")
    data = write_tiny_fashion_mnist(root / "data")
    store = root / "store"
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        assert main(["run", "--epochs", "2", "--data-dir", str(data), "--store", str(store), "--json", *TINY]) == 0
    return store, json.loads(out.getvalue().strip().splitlines()[-1])["run_id"]


def _records(store: Path, rid: str) -> list[dict[str, Any]]:
    """metrics.jsonl, read line by line (this run was never interrupted: one line per epoch)."""
    return [json.loads(line) for line in (store / rid / "metrics.jsonl").read_text().splitlines()]


def _columns(records: list[dict[str, Any]]) -> list[str]:
    return FIRST + sorted(set(records[0]) - set(FIRST))


@pytest.mark.integration
def test_metrics_prints_the_epochs_as_csv_json_and_table(trained: tuple[Path, str], capsys) -> None:
    store, rid = trained
    records = _records(store, rid)
    assert len(records) == 2
    assert main(["metrics", rid[:5], "--store", str(store), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows == [{k: str(r[k]) for k in _columns(records)} for r in records]  # floats exact (repr)

    assert main(["metrics", rid, "--store", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == records

    assert main(["metrics", rid, "--store", str(store)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == _columns(records) and len(lines) == 3
    assert lines[1].split()[:3] == ["0", "train", "1"] and lines[2].split()[:3] == ["0", "train", "2"]


@pytest.mark.integration
def test_load_metrics_equals_metrics_jsonl(trained: tuple[Path, str]) -> None:
    store, rid = trained
    records = _records(store, rid)
    frame = load_metrics(store, rid[:4])
    assert list(frame.columns) == _columns(records)
    assert frame.to_dict("records") == [{k: r[k] for k in _columns(records)} for r in records]
    assert frame["epoch"].tolist() == [1, 2]


@pytest.mark.integration
def test_load_runs_has_one_row_per_run(trained: tuple[Path, str]) -> None:
    store, rid = trained
    summary = json.loads((store / rid / "summary.json").read_text())
    frame = load_runs(store)
    assert list(frame.columns[: len(RUN_COLUMNS) + len(RESULT_COLUMNS)]) == [*RUN_COLUMNS, *RESULT_COLUMNS]
    assert len(frame) == 1
    row = frame.iloc[0]
    assert (row["run_id"], row["status"], row["method"], row["model"]) == (rid, "ok", "progressive", "lenet300")
    assert row["target_sparsity"] == 0.9 and row["seed"] == 0 and row["epochs"] == 2 and row["budget"] is None
    for key in ("sparsity", "test_acc", "val_acc", "selected_test_acc", "train_flops", "dense_train_flops",
                "steps", "wall_s"):
        assert row[key] == summary[key]
    assert "weights_sha256" not in frame.columns  # numeric results only
    assert isinstance(row["created"], pd.Timestamp) and str(row["created"].tz) == "UTC"


def test_load_runs_of_an_empty_store(tmp_path: Path) -> None:
    frame = load_runs(tmp_path / "empty")
    assert frame.empty and list(frame.columns) == [*RUN_COLUMNS, *RESULT_COLUMNS]


@pytest.mark.integration
def test_metrics_of_a_damaged_run_is_refused(trained: tuple[Path, str], tmp_path: Path, capsys) -> None:
    store, rid = trained
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    weights = copy / rid / "weights.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit changed
    assert main(["metrics", rid, "--store", str(copy)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"run {rid} in the store is damaged" in err
    with pytest.raises(ValueError, match="is damaged"):
        load_metrics(copy, rid)


def test_metrics_of_a_run_still_training(tmp_path: Path, capsys) -> None:
    """A running run shows its epochs so far (nothing to verify yet); one without epochs shows none."""
    store = Store(tmp_path / "s")
    config = {"method": {"name": "dense"}, "model": {"name": "lenet300"}, "data": {"dataset": "mnist"},
              "prune": {"sparsity": 0.0}, "seed": 0, "train": {}}
    head = {"method": "dense", "model": "lenet300", "dataset": "mnist", "target_sparsity": 0.0, "seed": 0}
    folder: RunFolder = store.begin("0123456789ab", config, head)
    assert main(["metrics", "0123", "--store", str(store.root)]) == 0
    assert capsys.readouterr().out == "(none)\n"
    folder.append_metrics({"cycle": 0, "phase": "train", "epoch": 1, "val_acc": 0.5})
    assert main(["metrics", "0123", "--store", str(store.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"cycle": 0, "phase": "train", "epoch": 1, "val_acc": 0.5}]


@pytest.mark.parametrize("argv", [["metrics", "abcdef"], ["metrics", "abcdef", "--csv"]])
def test_metrics_of_an_unknown_run_is_one_sentence(tmp_path: Path, capsys, argv: list[str]) -> None:
    assert main([*argv, "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"prunelab: error: no run 'abcdef' in the store at {tmp_path / 's'}"
    with pytest.raises(ValueError, match="no run 'abcdef'"):
        load_metrics(tmp_path / "s", "abcdef")


def test_csv_and_json_together_is_one_sentence(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["metrics", "abcdef", "--csv", "--json", "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.strip() == "prunelab metrics: error: argument --json: not allowed with argument --csv"
