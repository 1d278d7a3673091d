"""Sweeps: grid expansion, store dedup, shared pretraining, failure isolation, worker processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from prunelab.cli import main
from prunelab.errors import UserError
from prunelab.runs.experiment import Runtime, data_identities
from prunelab.runs.store import Store
from prunelab.runs.executors.local import LocalExecutor
from prunelab.runs.sweep import expand, pretraining, read_sweep, sweep

TINY = "data.val_size: 200, train.batch_size: 100"


def _write(tmp_path: Path, grid: str, base: str = "") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base: {{epochs: 1, {TINY}{', ' + base if base else ''}}}\ngrid: {grid}\n")
    return path


def _runtime(tmp_path: Path, data: Path) -> Runtime:
    return Runtime(store=tmp_path / "store", data_dir=data, progress=False, download=False)


def test_expand_is_a_product_and_dense_points_collapse(tmp_path: Path) -> None:
    points = expand(read_sweep(_write(tmp_path, "{method: [dense, progressive], sparsity: [0.5, 0.9], seed: [0, 1]}"))).points
    assert len(points) == 8
    assert len({p.run_id for p in points}) == 6  # dense at 0.5 and 0.9 is one run per seed
    assert [(p.cfg.method.name, p.cfg.prune.sparsity, p.cfg.seed) for p in points][:3] == [
        ("dense", 0.0, 0), ("dense", 0.0, 1), ("dense", 0.0, 0)]


@pytest.mark.parametrize(("text", "fragment"), [
    ("base: {}\ngrid: {method: dense}\n", "must be a non-empty list"),
    ("base: {}\ngrid: {sparsity: [0.5, 1.5]}\n", "grid point prune.sparsity=1.5: sparsity must be in [0, 1)"),
    ("base: {}\ngrids: {}\n", "unknown sections"),
    ("base: {epoch: 3}\ngrid: {seed: [0]}\n", "did you mean 'train.epochs'"),
    ("grid: {method: [dense, lrr]}\nmethod_settings: {lrr: {rat: 0.1}}\n", "did you mean 'method.rate'"),
])
def test_bad_sweep_files(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        expand(read_sweep(path)).points
    assert fragment in str(info.value)


def test_method_settings_apply_to_their_method_only(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("grid: {method: [dense, lrr, lottery]}\nmethod_settings: {lrr: {rate: 0.5}}\n")
    cfgs = {p.cfg.method.name: p.cfg for p in expand(read_sweep(path)).points}
    assert cfgs["lrr"].method.settings.rate == 0.5 and cfgs["lottery"].method.settings.rate == 0.2


@pytest.mark.integration
def test_sweep_runs_then_skips_everything(tiny_data_dir: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, "{method: [dense, progressive], sparsity: [0.5, 0.9], seed: [0, 1]}")
    points = expand(read_sweep(path)).points
    first = sweep(points, _runtime(tmp_path, tiny_data_dir), LocalExecutor(2))
    assert (first.runs, first.done, first.skipped, first.failed) == (8, 6, 2, 0)
    records = Store(tmp_path / "store").records()
    assert len(records) == 6 and all(r.status == "ok" for r in records)
    second = sweep(points, _runtime(tmp_path, tiny_data_dir), LocalExecutor(2))
    assert (second.runs, second.done, second.skipped, second.failed) == (8, 0, 8, 0)

    # ... and the report of that store (through the CLI, as a user would).
    out = tmp_path / "report"
    assert main(["report", "--store", str(tmp_path / "store"), "--out", str(out)]) == 0
    assert (out / "report.md").stat().st_size > 0 and (out / "report.html").stat().st_size > 0
    plots = sorted(out.glob("*.png"))
    assert plots and all(p.stat().st_size > 1000 and p.with_suffix(".svg").exists() for p in plots)
    assert "progressive" in (out / "report.md").read_text()


@pytest.mark.integration
def test_shared_pretraining_runs_once_first(tiny_data_dir: Path, tmp_path: Path) -> None:
    points = expand(read_sweep(_write(tmp_path, "{method: [oneshot, lrr, lottery], sparsity: [0.5, 0.8]}"))).points
    assert len(pretraining(points, data_identities(["fashion-mnist"], Runtime(data_dir=tiny_data_dir)))) == 1
    result = sweep(points, _runtime(tmp_path, tiny_data_dir), LocalExecutor(2))
    assert (result.done, result.failed, result.pretrained) == (6, 0, 1)
    store = Store(tmp_path / "store")
    dense = [r for r in store.records() if r.method == "dense"]
    assert len(dense) == 1
    for r in store.records():
        if r.method != "dense":
            assert r.summary is not None and r.summary["reused_runs"] == [dense[0].run_id]


@pytest.mark.integration
def test_a_failing_run_does_not_stop_the_others(tiny_data_dir: Path, tmp_path: Path) -> None:
    points = expand(read_sweep(_write(tmp_path, "{method: [progressive], prune.exclude: [[], ['*']]}"))).points
    result = sweep(points, _runtime(tmp_path, tiny_data_dir), LocalExecutor(2))
    assert (result.done, result.failed) == (1, 1)
    failed = [r for r in Store(tmp_path / "store").records() if r.status == "failed"]
    assert len(failed) == 1 and "every prunable layer" in (failed[0].error or "")
    assert list(result.errors) == [failed[0].run_id]


def test_a_dataset_that_cannot_be_found_stops_the_sweep_before_anything_trains(
    tiny_data_dir: Path, tmp_path: Path
) -> None:
    points = expand(read_sweep(_write(tmp_path, "{dataset: [fashion-mnist, mnist], method: [dense]}"))).points
    with pytest.raises(UserError, match="does not hold the mnist files"):
        sweep(points, _runtime(tmp_path, tiny_data_dir), LocalExecutor(2))
    assert not (tmp_path / "store").exists() or not Store(tmp_path / "store").records()


@pytest.mark.integration
def test_cli_sweep_json_and_dry_run(tiny_data_dir: Path, tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, "{method: [snip], seed: [0, 1]}")
    common = ["--store", str(tmp_path / "store"), "--data-dir", str(tiny_data_dir), "--no-progress", "--json"]
    assert main(["sweep", str(path), "--dry-run", *common]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["state"] for r in plan["runs"]] == ["to run", "to run"] and plan["estimated_epochs"] == 2
    assert main(["sweep", str(path), "--workers", "1", *common]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: summary[k] for k in ("runs", "done", "skipped", "failed")} == {"runs": 2, "done": 2, "skipped": 0,
                                                                              "failed": 0}


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--cpus-per-run", "2"], "only --executor ray takes --cpus-per-run"),
    (["--address", "auto", "--gpus-per-run", "1"], "only --executor ray takes --address, --gpus-per-run"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--executor", "ray", "--workers", "2"], "--workers is for --executor local"),
    (["--executor", "ray", "--cpus-per-run", "0"], "--cpus-per-run must be at least 1"),
    (["--executor", "ray", "--gpus-per-run", "-1"], "--gpus-per-run must be at least 0"),
    (["--executor", "ray", "--address", "nowhere"], "--address must be 'auto' or HOST:PORT"),
])
def test_cli_sweep_executor_options(tmp_path: Path, capsys, flags: list[str], fragment: str) -> None:
    path = _write(tmp_path, "{method: [dense]}")
    assert main(["sweep", str(path), "--store", str(tmp_path / "store"), *flags]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_cli_sweep_on_ray_without_ray_says_how_to_install_it(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    path = _write(tmp_path, "{method: [dense]}")
    assert main(["sweep", str(path), "--executor", "ray", "--store", str(tmp_path / "store")]) == 2
    assert capsys.readouterr().err == (
        "prunelab: error: --executor ray needs Ray, which is not installed: pip install 'prunelab[ray]'\n")
    assert not (tmp_path / "store").exists() or Store(tmp_path / "store").records() == []
