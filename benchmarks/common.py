"""What the benchmarks share: synthetic data of a dataset's shape, interleaved timing of calls and of
whole runs. Timings are only ever compared side by side in one process, never across runs."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from prunelab.config.schema import RunConfig
from prunelab.data import DATASETS, DataSplits
from prunelab.runs.experiment import Runtime, run

ROUND_S = 0.01  # time per variant per round of a latency measurement


def synthetic_splits(dataset: str, n_train: int, n_eval: int = 500) -> DataSplits:
    """Random images of ``dataset``'s shape (normalized scale) and random labels; the content does not
    change the time a step takes."""
    spec = DATASETS.get(dataset)
    g = torch.Generator().manual_seed(2)

    def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (n, spec.channels, spec.image_size, spec.image_size)
        return torch.randn(shape, generator=g), torch.randint(0, spec.num_classes, (n,), generator=g)

    (tx, ty), (vx, vy), (ex, ey) = images(n_train), images(n_eval), images(n_eval)
    return DataSplits(tx, ty, vx, vy, ex, ey, spec)


def median_ratios(times: Mapping[str, list[float]], base: str) -> dict[str, float]:
    """Per variant, the median over rounds of (its time / ``base``'s time in the same round)."""
    return {k: statistics.median(t / b for t, b in zip(v, times[base], strict=True)) for k, v in times.items()}


def _calls_per_round(fn: Callable[[], object]) -> int:
    start = time.perf_counter()
    fn()
    return max(1, round(ROUND_S / max(time.perf_counter() - start, 1e-9)))


def interleaved_calls(variants: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, per round; every round times each variant for about 10 ms,
    in an order that rotates every round, so machine noise hits them alike."""
    for fn in variants.values():  # warm-up: allocator, kernels, thread pool
        for _ in range(3):
            fn()
    calls = {key: _calls_per_round(fn) for key, fn in variants.items()}
    times: dict[str, list[float]] = {key: [] for key in variants}
    order = list(variants)
    for r in range(rounds):
        for key in order[r % len(order):] + order[: r % len(order)]:
            start = time.perf_counter()
            for _ in range(calls[key]):
                variants[key]()
            times[key].append((time.perf_counter() - start) / calls[key])
    return times


def interleaved_runs(
    configs: Mapping[str, RunConfig], data: DataSplits, rounds: int, keep: Callable[[str, dict], None] | None = None
) -> dict[str, list[float]]:
    """Wall seconds of a whole ``prunelab run`` of each config (store, checkpoints and evaluation
    included), each in a fresh store, interleaved; round -1 is untimed (it pays the first run's
    imports and allocations). ``keep(key, summary)`` sees every timed run's summary."""
    times: dict[str, list[float]] = {k: [] for k in configs}
    order = list(configs)
    for r in range(-1, rounds):
        for key in order[r % len(order):] + order[: r % len(order)]:
            with tempfile.TemporaryDirectory() as store:
                start = time.perf_counter()
                summary, _ = run(configs[key], Runtime(store=Path(store), progress=False, download=False), data)
                if r >= 0:
                    times[key].append(time.perf_counter() - start)
                    if keep is not None:
                        keep(key, summary)
    return times
