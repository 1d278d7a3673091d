"""Nothing lost, nothing executed: kills, damaged checkpoints, full disks, Ctrl-C, concurrent writers.

The random-kill experiment of docs/reliability.md is ``tests/reliability_harness.py``; here it
runs with one planned fault per point (and 20 random kills under ``-m slow``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import reliability_harness as harness
from prunelab.errors import UserError
from prunelab.runs.store import CHECKPOINT_MAGIC, RunFolder, Store, load_checkpoint

SENTINEL_CODE = "open({path!r}, 'w').write('ran')"


class Payload:
    """Unpickling this runs code: it must never happen."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (SENTINEL_CODE.format(path=str(self.sentinel)),))


def _state(value: float) -> dict[str, object]:
    return {"cycle": 0, "epoch": int(value), "model": {"w": torch.full((3,), value)}}


# ------------------------------------------------------------------ checkpoints


def test_checkpoints_keep_the_last_two_with_checksums(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    for value in (1.0, 2.0, 3.0):
        folder.save(_state(value))
    assert [p.name for p in folder.checkpoints()] == ["checkpoint-000002.pt", "checkpoint-000003.pt"]
    data = folder.checkpoints()[-1].read_bytes()
    assert data.startswith(CHECKPOINT_MAGIC)
    assert torch.equal(folder.load()["model"]["w"], torch.full((3,), 3.0))  # type: ignore[index]
    assert not list((tmp_path / "run").glob(".*tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "foreign"])
def test_damaged_checkpoint_falls_back_to_the_previous(tmp_path: Path, damage: str, capsys) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.save(_state(1.0))
    folder.save(_state(2.0))
    newest = folder.checkpoints()[-1]
    data = newest.read_bytes()
    damaged = {
        "truncate": data[: len(data) // 2],
        "flip": data[:-10] + bytes([data[-10] ^ 1]) + data[-9:],
        "empty": b"",
        "foreign": pickle.dumps({"model": 1}),
    }[damage]
    newest.write_bytes(damaged)
    state = folder.load()
    assert state is not None and state["epoch"] == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint-000002.pt" in err[0] and "resuming from the checkpoint before it" in err[0]
    assert (tmp_path / "run" / "checkpoint-000002.pt.damaged").read_bytes() == damaged  # kept, set aside
    folder.save(_state(3.0))  # numbering goes on after the set-aside file
    assert folder.load()["epoch"] == 3  # type: ignore[index]


def test_all_checkpoints_damaged_means_start_over(tmp_path: Path, capsys) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.save(_state(1.0))
    folder.save(_state(2.0))
    for path in folder.checkpoints():
        path.write_bytes(path.read_bytes()[:-1])
    assert folder.load() is None
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_pickle_payload_never_runs(tmp_path: Path) -> None:
    import hashlib

    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(Payload(sentinel))
    bare = tmp_path / "bare.pt"
    bare.write_bytes(payload)
    checksummed = tmp_path / "checksummed.pt"  # a valid checksum does not make a payload loadable
    checksummed.write_bytes(CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload)
    torch_file = tmp_path / "torch.pt"
    torch.save({"x": Payload(sentinel)}, torch_file)
    with_magic = tmp_path / "with_magic.pt"
    inner = torch_file.read_bytes()
    with_magic.write_bytes(CHECKPOINT_MAGIC + hashlib.sha256(inner).digest() + inner)
    for path in (bare, checksummed, with_magic):
        with pytest.raises(UserError, match="checkpoint"):
            load_checkpoint(path)
    assert not sentinel.exists()


@pytest.mark.integration
def test_run_with_a_payload_checkpoint_resumes_from_the_good_one(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A planted payload as the newest checkpoint is set aside; the run ends as if nothing happened."""
    import hashlib

    reference = _cli(tmp_path / "ref", tiny_data_dir)
    store = tmp_path / "store"
    killed = _cli(store, tiny_data_dir, fault="kill:checkpoint:3", check=False)
    assert killed.returncode == -signal.SIGKILL
    rid = reference.summary["run_id"]
    sentinel = tmp_path / "pwned"
    inner = pickle.dumps(Payload(sentinel))
    (store / rid / "checkpoint-000003.pt").write_bytes(CHECKPOINT_MAGIC + hashlib.sha256(inner).digest() + inner)
    resumed = _cli(store, tiny_data_dir)
    assert not sentinel.exists()
    assert "checkpoint-000003.pt" in resumed.stderr and "resuming from the checkpoint before it" in resumed.stderr
    assert resumed.summary["weights_sha256"] == reference.summary["weights_sha256"]


# ------------------------------------------------------------------ kills, full disks, Ctrl-C


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        lines = proc.stdout.strip().splitlines()
        self.summary = json.loads(lines[-1]) if proc.returncode == 0 and lines else {}


def _argv(store: Path, data: Path, method: str = "progressive") -> list[str]:
    return [sys.executable, "-m", "prunelab", "run", *harness.METHODS[method], "--json",
            "--data-dir", str(data), "--store", str(store), *harness.TINY]


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PRUNELAB_FAULT"}
    return env | ({"PRUNELAB_FAULT": fault} if fault else {})


def _cli(store: Path, data: Path, fault: str | None = None, check: bool = True) -> Result:
    proc = subprocess.run(_argv(store, data), env=_env(fault), capture_output=True, text=True, timeout=600)
    result = Result(proc)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _status(store: Path, rid: str) -> str:
    record = Store(store).get(rid)
    assert record is not None
    return record.status


PLANNED = {
    "progressive": ["kill:mask:3", "kill:checkpoint:2", "kill:step:20"],
    "lottery": ["kill:store:1", "kill:step:40"],
    "sculpt": ["kill:checkpoint:4", "kill:store:1"],
}


@pytest.mark.integration
@pytest.mark.parametrize("method", sorted(PLANNED))
def test_planned_kills_resume_bit_identical(tiny_data_dir: Path, tmp_path: Path, method: str) -> None:
    """One SIGKILL at each kind of moment: mid-epoch, after a mask update, mid-checkpoint, mid-store-write."""
    planned = PLANNED[method]
    outcome = harness.survive(method, tmp_path, tiny_data_dir, len(planned), random.Random(0), planned)
    assert outcome.faults == planned  # every planned fault landed, in order
    assert outcome.differences == []


@pytest.mark.slow
def test_twenty_random_kills_resume_bit_identical(tmp_path: Path) -> None:
    outcomes = harness.kill_and_resume(harness.split(20), seed=0, root=tmp_path)
    assert sum(o.kills for o in outcomes) == 20
    assert [o.differences for o in outcomes] == [[], [], []]



def _sentences(stderr: str) -> list[str]:
    """stderr less the line every run starts with (its data and split sizes)."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("prunelab: data:")]


@pytest.mark.integration
@pytest.mark.parametrize("point", ["checkpoint", "store"])
def test_full_disk_is_one_sentence_and_loses_nothing(tiny_data_dir: Path, tmp_path: Path, point: str) -> None:
    reference = _cli(tmp_path / "ref", tiny_data_dir)
    rid = reference.summary["run_id"]
    store = tmp_path / "store"
    full = _cli(store, tiny_data_dir, fault=f"enospc:{point}:2" if point == "checkpoint" else "enospc:store:1",
                check=False)
    lines = _sentences(full.stderr)
    assert full.returncode == 2 and len(lines) == 1 and "Traceback" not in full.stderr
    assert "No space left on device" in lines[0]
    assert _status(store, rid) == "failed"
    assert not list((store / rid).glob(".*.tmp"))  # no half-written temporary file
    kept = [p.name for p in (store / rid).glob("checkpoint-*.pt")]
    assert kept == (["checkpoint-000001.pt"] if point == "checkpoint" else kept) and kept
    resumed = _cli(store, tiny_data_dir)  # space is back: the run resumes and ends as if never stopped
    assert resumed.summary["weights_sha256"] == reference.summary["weights_sha256"]
    assert _status(store, rid) == "ok"


@pytest.mark.integration
def test_ctrl_c_leaves_a_checkpoint_and_says_how_to_resume(tiny_data_dir: Path, tmp_path: Path) -> None:
    reference = _cli(tmp_path / "ref", tiny_data_dir)
    rid = reference.summary["run_id"]
    store = tmp_path / "store"
    stopped = _cli(store, tiny_data_dir, fault="sigint:step:40", check=False)  # in the third epoch
    lines = _sentences(stopped.stderr)
    assert stopped.returncode == 130 and len(lines) == 1 and "Traceback" not in stopped.stderr
    assert lines[0] == (f"prunelab: run {rid} interrupted; its checkpoint checkpoint-000002.pt is kept; "
                        "run the same command again to resume from it")
    assert _status(store, rid) == "interrupted"
    resumed = _cli(store, tiny_data_dir)
    assert resumed.summary["weights_sha256"] == reference.summary["weights_sha256"]


# ------------------------------------------------------------------ concurrency


def _write_rows(root: str, worker: int, runs: int) -> None:
    store = Store(Path(root))
    for i in range(runs):
        rid = f"w{worker:02d}r{i:03d}"
        head = {"method": "dense", "model": "lenet300", "dataset": "fashion-mnist", "target_sparsity": 0.0, "seed": i}
        store.begin(rid, {"worker": worker, "run": i}, head)
        store.finish(rid, {"status": "ok", "run_id": rid, "worker": worker})


@pytest.mark.integration
def test_eight_workers_writing_one_store_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_rows, args=(str(tmp_path), w, 25)) for w in range(8)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=300)
        assert process.exitcode == 0
    records = Store(tmp_path).records()
    ids = [r.run_id for r in records]
    assert len(ids) == 200 and len(set(ids)) == 200
    assert {r.status for r in records} == {"ok"}
    assert sorted(ids) == sorted(f"w{w:02d}r{i:03d}" for w in range(8) for i in range(25))
    assert all(r.summary == {"status": "ok", "run_id": r.run_id, "worker": int(r.run_id[1:3])} for r in records)


@pytest.mark.integration
def test_the_same_run_twice_at_once_is_trained_once(tiny_data_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    reference = _cli(tmp_path / "ref", tiny_data_dir)
    rid = reference.summary["run_id"]
    # Hold the run's lock as a first process would, start a second invocation, then let go.
    with Store(store).lock(rid):
        second = subprocess.Popen(_argv(store, tiny_data_dir), env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        time.sleep(8)  # it imports torch, then finds the lock taken and waits
        assert second.poll() is None
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0
    assert f"run {rid} is being trained by another process (pid {os.getpid()}); waiting for it" in err
    assert json.loads(out.strip().splitlines()[-1])["weights_sha256"] == reference.summary["weights_sha256"]
    # Two real invocations at once: both answer, the run's epochs are in metrics.jsonl once.
    store2 = tmp_path / "store2"
    procs = [subprocess.Popen(_argv(store2, tiny_data_dir), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    shas = {json.loads(o.strip().splitlines()[-1])["weights_sha256"] for o, _ in outs}
    assert shas == {reference.summary["weights_sha256"]}
    lines = (store2 / rid / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == reference.summary["epochs"]


@pytest.mark.integration
def test_a_killed_lock_holder_leaves_no_stale_lock(tiny_data_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    rid = "abcdef012345"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from prunelab.runs.store import Store\n"
         f"with Store(Path({str(store)!r})).lock({rid!r}):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    waited: list[str] = []
    started = time.perf_counter()
    with Store(store).lock(rid, on_wait=waited.append):
        pass
    assert waited == [] and time.perf_counter() - started < 5
