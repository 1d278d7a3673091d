"""Sweeps under stress: huge grids, a SIGKILLed driver, a worker killed in the middle of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import prunelab
from prunelab.cli import main
from prunelab.errors import UserError
from prunelab.runs.experiment import Runtime
from prunelab.faults import ENV as FAULT_ENV
from prunelab.runs.store import Store
from prunelab.runs.executors.local import FAULT_RUN_ENV, LocalExecutor
from prunelab.runs.sweep import (
    MAX_POINTS,
    expand,
    grid_size,
    identified,
    iter_points,
    read_sweep,
)

TINY = "data.val_size: 200, train.batch_size: 100"
SRC = Path(prunelab.__file__).resolve().parents[1]  # where the driver subprocess imports prunelab from


def _write(tmp_path: Path, grid: dict[str, list[object]], base: str = "epochs: 1") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"base: {{{base}, {TINY}}}\ngrid: {json.dumps(grid)}\n")  # JSON is YAML
    return path


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Raise TimeoutError in the block after ``seconds`` (a hang becomes a failure)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------ grid size


def _million(tmp_path: Path) -> Path:
    return _write(tmp_path, {"seed": list(range(1000)), "lr": [0.001 * (i + 1) for i in range(1000)]})


def test_a_huge_grid_is_refused_at_once_from_its_axis_lengths(tmp_path: Path) -> None:
    spec = read_sweep(_million(tmp_path))
    assert grid_size(spec) == 10**6
    with _deadline(5), pytest.raises(UserError) as info:
        expand(spec)
    message = str(info.value)
    assert "1,000,000 grid points" in message and f"{MAX_POINTS:,}" in message and "--max-points" in message
    assert message.count(". ") == 0 and "\n" not in message  # one sentence


def test_cli_dry_run_of_a_huge_grid_fails_fast_in_one_line(tmp_path: Path, capsys) -> None:
    with _deadline(5):
        code = main(["sweep", str(_million(tmp_path)), "--dry-run", "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2 and "1,000,000 grid points" in err and err.count("\n") == 1


def test_max_points_raises_or_lowers_the_limit(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, {"method": ["dense", "snip"], "seed": list(range(6))})
    spec = read_sweep(path)
    assert len(expand(spec, max_points=12).points) == 12
    with pytest.raises(UserError, match="12 grid points, more than the limit of 11"):
        expand(spec, max_points=11)
    common = ["--dry-run", "--json", "--store", str(tmp_path / "store")]
    assert main(["sweep", str(path), "--max-points", "11", *common]) == 2
    assert "more than the limit of 11" in capsys.readouterr().err
    assert main(["sweep", str(path), "--max-points", "12", *common]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]) == 12
    assert main(["sweep", str(path), "--max-points", "0", *common]) == 2
    assert "--max-points must be at least 1, got 0" in capsys.readouterr().err


def test_iter_points_is_lazy_and_in_expand_order(tmp_path: Path) -> None:
    with _deadline(5):
        first = next(iter_points(read_sweep(_million(tmp_path))))
    assert (first.cfg.seed, first.cfg.train.lr) == (0, 0.001)
    spec = read_sweep(_write(tmp_path, {"method": ["dense", "progressive"], "sparsity": [0.5, 0.9]}))
    assert list(iter_points(spec)) == expand(spec).points


# ------------------------------------------------------------------ the driver dies


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc/*/stat; /proc/PID/task/*/children may be absent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an orphan may wait for a reaper that never comes)."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]) != "Z"
    except OSError:
        return False


def _wait_for(condition: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_sigkilled_driver(tiny_data_dir: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, {"method": ["dense"]}, base="epochs: 50")
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "prunelab", "sweep", str(path), "--workers", "1", "--store", str(store),
         "--data-dir", str(tiny_data_dir), "--no-download", "--no-progress"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    children: list[int] = []
    try:
        _wait_for(lambda: any(store.glob("*/config.json")) or driver.poll() is not None, 120, "the run to start")
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()
        children = _children(driver.pid)  # the worker and multiprocessing's resource tracker
        assert children
        driver.kill()
        driver.wait()
        end = time.monotonic() + 10
        while any(_alive(p) for p in children) and time.monotonic() < end:
            time.sleep(0.2)
        assert not [p for p in children if _alive(p)], "children of the killed driver still run"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid in children:  # leave nothing behind when the test fails
            if _alive(pid) and "multiprocessing" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                os.kill(pid, signal.SIGKILL)
        log.close()


# ------------------------------------------------------------------ a worker dies


@pytest.mark.integration
def test_a_killed_worker_fails_its_run_only(tiny_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    runtime = Runtime(store=tmp_path / "store", data_dir=tiny_data_dir, progress=False, download=False)
    points, runtime = identified(expand(read_sweep(_write(tmp_path, {"method": ["dense"], "seed": [0, 1, 2]}))).points,
                                 runtime)
    configs = [p.cfg for p in points]
    victim = points[1].run_id
    monkeypatch.setenv(FAULT_ENV, "kill:step:1")  # SIGKILL at the first training step ...
    monkeypatch.setenv(FAULT_RUN_ENV, victim)  # ... of this run only, each time it runs
    outcomes = list(LocalExecutor(2)(configs, runtime))
    assert sorted(o.status for o in outcomes) == ["failed", "ok", "ok"]
    failed = next(o for o in outcomes if o.status == "failed")
    assert failed.run_id == victim and "worker process died" in (failed.error or "")
    status = {r.run_id: r.status for r in Store(tmp_path / "store").records()}
    assert status == {points[0].run_id: "ok", victim: "failed", points[2].run_id: "ok"}
