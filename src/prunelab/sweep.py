"""Sweeps: a grid over config fields, expanded into runs and executed by local processes or on Ray.

A sweep file::

    base: {model: lenet300, dataset: fashion-mnist, epochs: 2}
    grid: {method: [dense, progressive], sparsity: [0.5, 0.9], seed: [0, 1]}

``base`` and ``grid`` take any config key (dotted, or the short aliases).
Every grid point becomes a resolved config; points that resolve to the same
run (``dense`` at two sparsities) are one run. Runs already in the store are
skipped. Dense pretraining that several runs share is trained first, once.
A failing run is recorded in the store with its error; the others go on.

What to run and how it went is decided here; where runs execute is an
:data:`Executor`: :class:`LocalExecutor` (worker processes on this machine)
or ``prunelab.ray_executor.RayExecutor`` (tasks on a Ray cluster).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from prunelab.config import RunConfig, build_config, flatten, read_yaml_tree, run_id, to_dict
from prunelab.errors import UserError
from prunelab.experiment import Runtime, dense_config, headline, run
from prunelab.methods import METHODS
from prunelab.store import Store


@dataclass(frozen=True)
class Point:
    """One grid point: its raw settings, resolved config, run id and plan."""

    raw: dict[str, Any]
    cfg: RunConfig
    run_id: str
    epochs: float
    pretrained: bool


@dataclass(frozen=True)
class Outcome:
    """What happened to one run of the sweep."""

    run_id: str
    status: str  # ok | failed
    error: str | None = None


@dataclass(frozen=True)
class SweepFile:
    """A parsed sweep file: base settings, the grid, and settings that apply to one method only."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    method_settings: dict[str, dict[str, Any]]


def read_sweep(path: Path) -> SweepFile:
    """The sections of a sweep file, flattened to dotted keys.

    ``method_settings: {iterative: {patience: 2}}`` sets ``method.patience``
    only on grid points whose method is ``iterative`` (other methods have no
    such setting).
    """
    tree = read_yaml_tree(path)
    unknown = set(tree) - {"base", "grid", "method_settings"}
    if unknown:
        raise UserError(
            f"sweep file {path} has unknown sections {sorted(unknown)}; use 'base', 'grid' and 'method_settings'"
        )
    base, grid, per_method = (tree.get(k) or {} for k in ("base", "grid", "method_settings"))
    if not all(isinstance(x, Mapping) for x in (base, grid, per_method)):
        raise UserError(f"'base', 'grid' and 'method_settings' in {path} must be mappings")
    flat_grid = flatten(grid)
    for key, values in flat_grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"grid key {key!r} in {path} must be a non-empty list of values, got {values!r}")
    settings = {}
    for method, values in per_method.items():
        if not isinstance(values, Mapping):
            raise UserError(f"method_settings.{method} in {path} must be a mapping of that method's settings")
        settings[str(method)] = {f"method.{k}": v for k, v in flatten(values).items()}
    return SweepFile(flatten(base), flat_grid, settings)


def expand(spec: SweepFile) -> list[Point]:
    """Every grid point (product over grid keys in file order) as a validated, planned run."""
    points = []
    keys = list(spec.grid)
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        raw = {**spec.base, **dict(zip(keys, values))}
        raw.update(spec.method_settings.get(str(raw.get("method.name", "progressive")), {}))
        try:
            cfg = build_config(raw)
        except UserError as exc:
            where = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
            raise UserError(f"grid point {where}: {exc}") from None
        plan = METHODS.get(cfg.method.name).plan(cfg)
        points.append(Point(raw, cfg, run_id(cfg), plan.epochs, plan.pretrained))
    return points


def pretrained_dense(cfg: RunConfig) -> RunConfig | None:
    """The dense run ``cfg``'s method starts from, or None if it trains from scratch."""
    return dense_config(cfg) if METHODS.get(cfg.method.name).plan(cfg).pretrained else None


def pretraining(points: Sequence[Point]) -> list[RunConfig]:
    """The dense runs that pretrained methods will ask for, once each (they run first)."""
    needed: dict[str, RunConfig] = {}
    for p in points:
        if p.pretrained:
            dense = dense_config(p.cfg)
            needed.setdefault(run_id(dense), dense)
    return list(needed.values())


def work(cfg: RunConfig, runtime: Runtime) -> Outcome:
    """Run one config (in a worker); any failure becomes an Outcome (the store has it too)."""
    try:
        summary, _ = run(cfg, runtime)
        return Outcome(summary["run_id"], "ok")
    except UserError as exc:
        return Outcome(run_id(cfg), "failed", str(exc))
    except Exception as exc:  # noqa: BLE001 (a bug in one run must not stop the sweep)
        return Outcome(run_id(cfg), "failed", f"{type(exc).__name__}: {exc}")


def record_crash(store: Store, cfg: RunConfig, error: str) -> Outcome:
    """Store ``cfg``'s run as failed with ``error`` when its worker died before it could say so."""
    rid = run_id(cfg)
    if store.get(rid) is None:  # it died before the run was registered
        store.begin(rid, to_dict(cfg), headline(cfg))
    store.mark(rid, "failed", error)
    return Outcome(rid, "failed", error)


# An executor runs configs wherever it runs them and yields one Outcome per config as each ends;
# by then the run is in the store at runtime.store (finished or failed).
Executor = Callable[[Sequence[RunConfig], Runtime], Iterator[Outcome]]


@dataclass(frozen=True)
class LocalExecutor:
    """Runs configs in ``workers`` local processes, each with cores // workers torch threads."""

    workers: int

    def __call__(self, configs: Sequence[RunConfig], runtime: Runtime) -> Iterator[Outcome]:
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        runtime = replace(runtime, threads=runtime.threads or threads, progress=False)
        # spawn, not fork: a forked child would inherit torch's thread pools in an undefined state.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=context) as pool:
            futures: dict[Future[Outcome], RunConfig] = {pool.submit(work, c, runtime): c for c in configs}
            for future in as_completed(futures):
                try:
                    yield future.result()
                except Exception as exc:  # noqa: BLE001 (a worker died: record it, go on)
                    error = f"worker process died: {type(exc).__name__}: {exc}"
                    yield record_crash(Store(runtime.store), futures[future], error)


def execute(
    configs: Sequence[RunConfig],
    runtime: Runtime,
    executor: Executor,
    progress: bool | None = None,
    desc: str = "sweep",
) -> list[Outcome]:
    """Run ``configs`` with ``executor`` under a progress bar; the outcomes in the order they ended."""
    if not configs:
        return []
    outcomes: list[Outcome] = []
    bar = tqdm(total=len(configs), desc=desc, unit="run", disable=None if progress is None else not progress)
    for outcome in executor(configs, runtime):
        outcomes.append(outcome)
        bar.update(1)
        bar.set_postfix(failed=sum(o.status == "failed" for o in outcomes))
    bar.close()
    return outcomes


@dataclass(frozen=True)
class SweepResult:
    """Counts over grid points: each is done (trained now), skipped (already stored) or failed."""

    runs: int
    done: int
    skipped: int
    failed: int
    pretrained: int
    errors: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "done": self.done, "skipped": self.skipped, "failed": self.failed,
                "pretrained": self.pretrained, "errors": self.errors}


def sweep(
    points: Sequence[Point],
    runtime: Runtime,
    executor: Executor,
    progress: bool | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> SweepResult:
    """Run every point not yet in the store with ``executor``; shared dense pretraining first."""
    store = Store(runtime.store)
    stored = {r.run_id for r in store.records() if r.status == "ok"}
    todo = {p.run_id: p.cfg for p in points if p.run_id not in stored}
    shared = {run_id(c): c for c in pretraining(points)}
    first = [c for rid, c in shared.items() if rid not in stored]  # some may be grid points too
    rest = [c for rid, c in todo.items() if rid not in shared]
    log(f"{len(points)} grid points: {len(todo)} runs to train, the rest already stored or repeated"
        + (f"; {len(first)} shared dense pretraining runs go first" if first else ""))
    outcomes = execute(first, runtime, executor, progress, "pretraining")
    outcomes += execute(rest, runtime, executor, progress)
    by_id = {o.run_id: o for o in outcomes}
    done = failed = skipped = 0
    counted: set[str] = set()
    for p in points:
        outcome = by_id.get(p.run_id)
        if outcome is None or p.run_id in counted:
            skipped += 1  # stored before this sweep, or the same run as an earlier grid point
        elif outcome.status == "ok":
            done += 1
        else:
            failed += 1
        counted.add(p.run_id)
    grid_ids = {p.run_id for p in points}
    errors = {o.run_id: o.error or "" for o in outcomes if o.status == "failed"}
    pretrained = sum(1 for o in outcomes if o.run_id not in grid_ids and o.status == "ok")
    return SweepResult(len(points), done, skipped, failed, pretrained, errors)
