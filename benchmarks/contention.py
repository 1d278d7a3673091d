"""How much a run slows down when one other CPU-bound process shares the machine.

The default job (``prunelab run``, default settings, shortened to ``--epochs``
epochs, each a full pass over Fashion-MNIST) is timed alone and beside one
competing busy process, in interleaved rounds (alone, beside, alone, ...), in
fresh stores so that every round trains. The time compared is the run's own
training wall time (``wall_s`` of its summary), not Python's start-up. The
slowdown is the median over rounds of (beside / alone).

For comparison the same is measured with ``--threads 2`` (torch's own default
on a 2-core machine, and prunelab's default before ``train.threads`` was 1):
with two OpenMP threads, one of them shares a core with the competitor and the
other waits for it at every parallel region.

    python benchmarks/contention.py            # table
    python benchmarks/contention.py --json     # + one JSON object as the last line
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _busy() -> None:
    """One CPU-bound competitor: a pure Python loop (one core, no threads of its own)."""
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def _train_seconds(epochs: int, extra: list[str]) -> float:
    """Training wall time of one fresh default run."""
    with tempfile.TemporaryDirectory(prefix="prunelab-contention-") as store:
        cmd = [sys.executable, "-m", "prunelab", "run", "--epochs", str(epochs), "--store", store,
               "--no-progress", "--json", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the benchmark run failed: {done.stderr.strip()}")
        return float(json.loads(done.stdout.strip().splitlines()[-1])["wall_s"])


def _round(epochs: int, extra: list[str]) -> tuple[float, float]:
    """(alone, beside a busy process) training seconds of one round."""
    alone = _train_seconds(epochs, extra)
    competitor = multiprocessing.get_context("spawn").Process(target=_busy, daemon=True)
    competitor.start()
    try:
        beside = _train_seconds(epochs, extra)
    finally:
        competitor.kill()
        competitor.join()
    return alone, beside


def measure(epochs: int, rounds: int, extra: list[str]) -> dict[str, object]:
    """Median slowdown over ``rounds`` interleaved rounds, with the raw times."""
    pairs = [_round(epochs, extra) for _ in range(rounds)]
    return {
        "slowdown": statistics.median(b / a for a, b in pairs),
        "alone_s": [round(a, 3) for a, _ in pairs],
        "beside_s": [round(b, 3) for _, b in pairs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the default job per timing (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--no-compare", action="store_true", help="skip the --threads 2 comparison")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    load_before = os.getloadavg()
    default = measure(args.epochs, args.rounds, [])
    result: dict[str, object] = {
        "slowdown": default["slowdown"], "default": default, "cores": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before], "epochs": args.epochs, "rounds": args.rounds,
    }
    if not args.no_compare:
        result["threads2"] = measure(args.epochs, args.rounds, ["--threads", "2"])
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"machine: {os.cpu_count()} cores, load average before {load_before[0]:.2f}")
    print(f"default job ({args.epochs} epoch(s)), slowdown beside one busy process: {default['slowdown']:.2f}x "
          f"(alone {default['alone_s']} s, beside {default['beside_s']} s)")
    if "threads2" in result:
        t2 = result["threads2"]
        assert isinstance(t2, dict)
        print(f"the same with --threads 2: {t2['slowdown']:.2f}x (alone {t2['alone_s']} s, beside {t2['beside_s']} s)")
    if args.json:
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
