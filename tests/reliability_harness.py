"""Kill ``prunelab run`` at random moments, resume it, and compare with an uninterrupted run.

Used by tests/test_reliability.py and runnable on its own for the figures of
docs/reliability.md::

    .venv/bin/python tests/reliability_harness.py --kills 20 --seed 0

Each attempt starts ``python -m prunelab run`` with one fault from
:mod:`prunelab.faults`: a SIGKILL before a random training step (mid-epoch),
right after a mask update, half-way through writing a checkpoint, or between
a finished run's files and its index row; or a SIGKILL from outside after a
random delay. The same command is started again until it finishes; its
result must then be bit-identical (weights sha256, every metric of every
epoch, FLOPs, steps) to a run that was never interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import write_tiny_fashion_mnist  # noqa: E402

from prunelab.runs.store import RunFolder  # noqa: E402

TINY = ["--set", "data.val_size=200", "--batch-size", "64", "--no-progress", "--threads", "1"]
STEPS_PER_EPOCH = 16  # 1000 training images / 64

# Multi-phase methods, kept short: progressive (one cycle, per-step mask updates),
# lottery (a stored dense run, then 4 prune-rewind-retrain rounds), sculpt (cyclic training, prune, final cycle).
METHODS: dict[str, list[str]] = {
    "progressive": ["--method", "progressive", "--epochs", "4", "--set", "method.update_every=4"],
    "lottery": ["--method", "lottery", "--epochs", "2", "--set", "method.rate=0.5"],
    "sculpt": ["--method", "sculpt", "--epochs", "2", "--set", "method.cycles=2"],
}
POINT_RANGES = {"step": (2, 5 * STEPS_PER_EPOCH), "mask": (1, 6), "checkpoint": (1, 3), "store": (1, 2)}
COMPARED = ("weights_sha256", "test_acc", "val_acc", "selected_test_acc", "selected_val_acc", "selected_epoch",
            "sparsity", "epochs", "steps", "train_flops", "dense_train_flops")


@dataclass
class Outcome:
    """What happened to one method's run under faults."""

    method: str
    kills: int = 0
    attempts: int = 0
    faults: list[str] = field(default_factory=list)
    identical: bool = False
    differences: list[str] = field(default_factory=list)


def run_command(method: str, store: Path, data: Path, fault: str | None = None) -> subprocess.Popen[str]:
    """Start ``prunelab run --json`` for ``method``, with ``fault`` in PRUNELAB_FAULT."""
    env = {k: v for k, v in os.environ.items() if k != "PRUNELAB_FAULT"}
    if fault and not fault.startswith("timed:"):
        env["PRUNELAB_FAULT"] = fault
    argv = [sys.executable, "-m", "prunelab", "run", *METHODS[method], "--json",
            "--data-dir", str(data), "--store", str(store), *TINY]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], fault: str | None) -> tuple[int, str, str]:
    """Wait for ``proc``; a ``timed:SECONDS`` fault SIGKILLs it from outside after that delay."""
    if fault and fault.startswith("timed:"):
        try:
            out, err = proc.communicate(timeout=float(fault.split(":")[1]))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate()
    else:
        out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def random_fault(rng: random.Random) -> str:
    """One fault: a SIGKILL at a random visit of a random point, or from outside after a random delay."""
    point = rng.choice([*POINT_RANGES, "timed"])
    if point == "timed":
        return f"timed:{rng.uniform(2.0, 6.0):.2f}"  # torch takes ~2 s to import: land inside the work
    low, high = POINT_RANGES[point]
    return f"kill:{point}:{rng.randint(low, high)}"


def summary_of(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def survive(
    method: str, root: Path, data: Path, kills: int, rng: random.Random, planned: Sequence[str] = ()
) -> Outcome:
    """Run ``method`` under faults until ``kills`` SIGKILLs landed, resuming after each.

    Faults are ``planned`` ones first, in order, then random ones. When a run
    finishes before its fault was reached, it is compared and the remaining
    kills go to a fresh store (a new round).
    """
    outcome = Outcome(method)
    queue = list(planned)
    reference = finished(method, root / f"reference-{method}", data)
    rounds = 0
    while outcome.kills < kills or rounds == 0:
        store = root / f"store-{method}-{rounds}"
        rounds += 1
        while True:
            fault = (queue.pop(0) if queue else random_fault(rng)) if outcome.kills < kills else None
            outcome.attempts += 1
            code, out, err = finish(run_command(method, store, data, fault), fault)
            if code == -signal.SIGKILL:
                outcome.kills += 1
                outcome.faults.append(fault or "")
                continue
            if code != 0:
                raise RuntimeError(f"{method} under {fault} exited {code}: {err.strip()[-500:]}")
            break
        outcome.differences += compare(reference, summary_of(out), root / f"reference-{method}", store)
    outcome.identical = not outcome.differences
    return outcome


def finished(method: str, store: Path, data: Path) -> dict[str, Any]:
    """The summary of ``method`` run to the end without faults."""
    code, out, err = finish(run_command(method, store, data), None)
    if code != 0:
        raise RuntimeError(f"{method} exited {code}: {err.strip()[-500:]}")
    return summary_of(out)


def compare(reference: dict[str, Any], resumed: dict[str, Any], reference_store: Path, store: Path) -> list[str]:
    """What differs between a resumed run and the uninterrupted one (empty: bit-identical)."""
    differences = [k for k in COMPARED if resumed.get(k) != reference.get(k)]
    rid = reference["run_id"]
    if resumed["run_id"] != rid:
        return [*differences, "run_id"]
    if RunFolder(store / rid).metrics() != RunFolder(reference_store / rid).metrics():
        differences.append("metrics.jsonl")
    leftovers = sorted(p.name for p in (store / rid).glob("checkpoint-*"))
    if leftovers:
        differences.append(f"checkpoints left: {leftovers}")
    return differences


def kill_and_resume(kills_per_method: dict[str, int], seed: int, root: Path) -> list[Outcome]:
    """The whole experiment under ``root``; returns one outcome per method."""
    data = write_tiny_fashion_mnist(root / "data")
    rng = random.Random(seed)
    return [survive(method, root, data, kills, rng) for method, kills in kills_per_method.items()]


def split(kills: int) -> dict[str, int]:
    """``kills`` spread over the methods as evenly as possible."""
    names = list(METHODS)
    return {m: kills // len(names) + (i < kills % len(names)) for i, m in enumerate(names)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs in all, spread over the methods")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunelab-kills-") as tmp:
        outcomes = kill_and_resume(split(args.kills), args.seed, Path(tmp))
    for o in outcomes:
        verdict = "bit-identical" if o.identical else f"DIFFERENT: {', '.join(o.differences)}"
        print(f"{o.method:12s} kills {o.kills:2d} attempts {o.attempts:2d}  {verdict}")
        print(f"{'':12s} faults: {' '.join(o.faults)}")
    total = sum(o.kills for o in outcomes)
    survived = sum(o.kills for o in outcomes if o.identical)
    print(f"{survived} of {total} kills survived bit-identical in {time.perf_counter() - started:.0f} s")
    if args.json:
        print(json.dumps({"kills": total, "survived": survived,
                          "methods": [o.__dict__ for o in outcomes]}))
    return 0 if survived == total else 1


if __name__ == "__main__":
    sys.exit(main())
