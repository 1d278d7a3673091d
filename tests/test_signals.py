"""SIGTERM, SIGHUP and a burst of Ctrl-C end a run as Ctrl-C does: one sentence, a resumable run."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

TINY = ["--set", "data.val_size=200", "--batch-size", "64", "--no-progress", "--epochs", "200"]


def _start(store: Path, data: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "prunelab", "run", "--method", "dense", "--store", str(store),
                             "--data-dir", str(data), *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_checkpoint(store: Path, process: subprocess.Popen[str], timeout: float = 90.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(store.glob("*/checkpoint-*.pt"))
        if found:
            return found[0].parent
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint was written in time")


def _status(store: Path, rid: str) -> str:
    with sqlite3.connect(store / "index.sqlite") as db:
        return db.execute("SELECT status FROM runs WHERE run_id = ?", (rid,)).fetchone()[0]


def _sentences(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if not line.startswith("prunelab: data:")]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_interrupt_like_ctrl_c(tiny_data_dir: Path, tmp_path: Path, signum: int, code: int) -> None:
    store = tmp_path / "store"
    process = _start(store, tiny_data_dir)
    folder = _wait_for_checkpoint(store, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    lines = _sentences(err)
    assert process.returncode == code and "Traceback" not in err
    name = signal.Signals(signum).name
    assert len(lines) == 1 and lines[0].startswith(f"prunelab: {name}: run {folder.name} interrupted; its checkpoint")
    assert _status(store, folder.name) == "interrupted"
    assert list(folder.glob("checkpoint-*.pt"))


def test_a_burst_of_ctrl_c_prints_no_traceback(tiny_data_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    process = _start(store, tiny_data_dir)
    folder = _wait_for_checkpoint(store, process)
    for _ in range(3):
        process.send_signal(signal.SIGINT)
        time.sleep(0.005)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert len(_sentences(err)) == 1
    assert _status(store, folder.name) == "interrupted"
