"""Sweeps on Ray (``--executor ray``): the local executor's runs and results, only the driver writing the store."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # a local Ray instance and its worker processes

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'prunelab[ray]'): --executor ray untested")

import prunelab.runs.executors.ray  # noqa: E402 (after the skip)
from prunelab.cli import main  # noqa: E402
from prunelab.config.schema import RunConfig  # noqa: E402
from prunelab.runs.experiment import Runtime, data_identities, identify  # noqa: E402
from prunelab.runs.executors.ray import RayExecutor, run_in_temp_store  # noqa: E402
from prunelab.runs.store import BUNDLE_FILES, RunBundle, Store  # noqa: E402
from prunelab.runs.sweep import Outcome, expand, identified, pretrained_dense, read_sweep, sweep  # noqa: E402

BASE = "epochs: 1, data.val_size: 200, train.batch_size: 100"


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    """One local Ray instance for the whole module (starting one takes a few seconds)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level=logging.ERROR)
    yield
    ray.shutdown()


def _sweep_file(tmp_path: Path, grid: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"base: {{{BASE}}}\ngrid: {grid}\n")
    return path


def _runtime(tmp_path: Path, data: Path) -> Runtime:
    return Runtime(store=tmp_path / "store", data_dir=data, progress=False, download=False)


def _configs(path: Path) -> list[RunConfig]:
    return [p.cfg for p in expand(read_sweep(path)).points]


def test_ray_sweep_stores_runs_skips_them_again_and_matches_local(tiny_data_dir: Path, tmp_path: Path,
                                                                  capsys) -> None:
    path = _sweep_file(tmp_path, "{method: [dense, progressive], sparsity: [0.9], seed: [0, 1]}")
    common = ["--data-dir", str(tiny_data_dir), "--no-download", "--no-progress", "--threads", "1", "--json"]
    on_ray = ["sweep", str(path), "--executor", "ray", "--store", str(tmp_path / "ray"), *common]
    assert main(on_ray) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first == {"runs": 4, "done": 4, "skipped": 0, "failed": 0, "diverged": 0, "pretrained": 0, "errors": {}}
    records = Store(tmp_path / "ray").records()
    assert len(records) == 4 and all(r.status == "ok" and r.summary is not None for r in records)
    for r in records:
        folder = tmp_path / "ray" / r.run_id
        assert sorted(p.name for p in folder.iterdir() if p.name != ".lock") == sorted(BUNDLE_FILES)
        assert json.loads((folder / "summary.json").read_text()) == r.summary
        assert torch.load(folder / "weights.pt", weights_only=True)  # a plain, non-empty state_dict

    assert main(on_ray) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (second["done"], second["skipped"], second["failed"]) == (0, 4, 0)

    # The same configs in local worker processes give the same weights, bit for bit.
    assert main(["sweep", str(path), "--workers", "2", "--store", str(tmp_path / "local"), *common]) == 0
    local = {r.run_id: r.summary["weights_sha256"] for r in Store(tmp_path / "local").records()}
    assert {r.run_id: r.summary["weights_sha256"] for r in records} == local


def test_a_failing_run_is_stored_failed_and_the_others_go_on(tiny_data_dir: Path, tmp_path: Path) -> None:
    points = expand(read_sweep(_sweep_file(tmp_path, "{method: [progressive], prune.exclude: [[], ['*']]}"))).points
    result = sweep(points, _runtime(tmp_path, tiny_data_dir), RayExecutor())
    assert (result.done, result.failed) == (1, 1)
    failed = [r for r in Store(tmp_path / "store").records() if r.status == "failed"]
    assert len(failed) == 1 and failed[0].config["prune"]["exclude"] == ["*"]
    assert "every prunable layer of lenet300 is excluded" in (failed[0].error or "")
    assert list(result.errors) == [failed[0].run_id]


def test_a_task_whose_worker_dies_is_stored_failed(tiny_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def dies_on_seed_1(cfg: RunConfig, runtime: Runtime, seed: RunBundle | None) -> tuple[Outcome, list[RunBundle]]:
        if cfg.seed == 1:
            os._exit(1)  # as a segfault or the kernel's OOM killer would end it
        return run_in_temp_store(cfg, runtime, seed)

    # A local function, so Ray ships it by value to the workers.
    monkeypatch.setattr(prunelab.runs.executors.ray, "run_in_temp_store", dies_on_seed_1)
    points = expand(read_sweep(_sweep_file(tmp_path, "{method: [dense], seed: [0, 1]}"))).points
    result = sweep(points, _runtime(tmp_path, tiny_data_dir), RayExecutor())
    assert (result.done, result.failed) == (1, 1)
    [failed] = [r for r in Store(tmp_path / "store").records() if r.status == "failed"]
    assert failed.seed == 1 and (failed.error or "").startswith("Ray task failed: ")


def test_pruned_runs_reuse_the_stored_dense_run_on_the_worker(tiny_data_dir: Path, tmp_path: Path,
                                                              monkeypatch) -> None:
    runtime = _runtime(tmp_path, tiny_data_dir)
    first = sweep(expand(read_sweep(_sweep_file(tmp_path, "{method: [oneshot], sparsity: [0.5]}"))).points,
                  runtime, RayExecutor())
    assert (first.done, first.failed, first.pretrained) == (1, 0, 1)  # the dense run went first
    store = Store(tmp_path / "store")
    [dense] = [r for r in store.records() if r.method == "dense"]

    # The driver imports every run a task sends back; a task that trained the dense run again would send it too.
    imported: list[str] = []
    import_run = Store.import_run
    monkeypatch.setattr(Store, "import_run", lambda self, bundle: imported.append(bundle.record.run_id)
                        or import_run(self, bundle))
    points = expand(read_sweep(_sweep_file(tmp_path, "{method: [oneshot], sparsity: [0.5, 0.8]}", "more.yaml"))).points
    points, _ = identified(points, runtime)  # the ids on the tiny data
    second = sweep(points, runtime, RayExecutor())
    assert (second.done, second.skipped, second.failed, second.pretrained) == (1, 1, 0, 0)
    assert imported == [points[1].run_id]
    assert store.get(dense.run_id) == dense  # untouched, `updated` included
    oneshot = [r for r in store.records() if r.method == "oneshot"]
    assert len(oneshot) == 2 and all(r.summary and r.summary["reused_runs"] == [dense.run_id] for r in oneshot)


def test_a_task_without_its_dense_run_trains_it_and_sends_it_back(tiny_data_dir: Path, tmp_path: Path) -> None:
    [cfg] = _configs(_sweep_file(tmp_path, "{method: [oneshot], sparsity: [0.5]}"))
    dense = pretrained_dense(cfg)
    assert dense is not None
    runtime = data_identities(["fashion-mnist"], _runtime(tmp_path, tiny_data_dir))
    outcome, made = run_in_temp_store(cfg, runtime, None)  # in this process
    assert outcome == Outcome(identify(cfg, runtime), "ok")
    assert sorted(b.record.run_id for b in made) == sorted([identify(cfg, runtime), identify(dense, runtime)])
    assert all(b.record.status == "ok" and "weights.pt" in b.files for b in made)
