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
or ``prunelab.runs.executors.ray.RayExecutor`` (tasks on a Ray cluster).

A grid is refused, from its axis lengths and before anything is built, when it
has more than :data:`MAX_POINTS` points (``prunelab sweep --max-points N``
raises the limit). Local workers end when the sweep driver dies, even by
SIGKILL. A worker that dies (the OOM killer) fails its own run only: the other
runs go to a fresh pool (see :class:`LocalExecutor`).

Fault injection (``prunelab.faults``) reaches every worker through the
environment; with ``PRUNELAB_FAULT_RUN=RUN_ID`` also set, a local worker
applies ``PRUNELAB_FAULT`` only while it runs that run, each time it runs it.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from prunelab.config.build import build_config, flatten, read_yaml_tree
from prunelab.config.identity import run_id, to_dict
from prunelab.config.schema import RunConfig
from prunelab.errors import Diverged, UserError
from prunelab.runs.experiment import Runtime, data_identities, dense_config, headline, identify, run
from prunelab.faults import ENV as FAULT_ENV
from prunelab.methods import METHODS
from prunelab.runs.store import Store

MAX_POINTS = 10_000
"""The most grid points a sweep may have unless ``max_points`` (``--max-points``) says otherwise.

Expanding validates every point (about a millisecond each), and a sweep that
large is more often a typo than a plan."""

FAULT_RUN_ENV = "PRUNELAB_FAULT_RUN"
"""Set to a run id, a local worker applies ``PRUNELAB_FAULT`` only while it runs that run."""


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
    status: str  # ok | failed | diverged
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


def grid_size(spec: SweepFile) -> int:
    """How many points the grid has: the product of its axis lengths (nothing is expanded)."""
    return math.prod(len(values) for values in spec.grid.values())


def check_size(spec: SweepFile, max_points: int | None = None) -> int:
    """The grid's size; one sentence if it is above ``max_points`` (default :data:`MAX_POINTS`)."""
    limit = MAX_POINTS if max_points is None else max_points
    if limit < 1:
        raise UserError(f"--max-points must be at least 1, got {limit}")
    size = grid_size(spec)
    if size > limit:
        raise UserError(f"the sweep grid has {size:,} grid points, more than the limit of {limit:,}; "
                        f"shrink the grid or raise the limit with prunelab sweep --max-points {size}")
    return size


def iter_points(spec: SweepFile) -> Iterator[Point]:
    """Every grid point (product over grid keys in file order), built one by one as asked for."""
    keys = list(spec.grid)
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        yield _point(spec, keys, values)


def _point(spec: SweepFile, keys: Sequence[str], values: Sequence[Any]) -> Point:
    """The grid point ``keys = values`` over the base settings, validated and planned."""
    raw = {**spec.base, **dict(zip(keys, values))}
    raw.update(spec.method_settings.get(str(raw.get("method.name", "progressive")), {}))
    try:
        cfg = build_config(raw)
    except UserError as exc:
        where = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
        raise UserError(f"grid point {where}: {exc}") from None
    plan = METHODS.get(cfg.method.name).plan(cfg)
    return Point(raw, cfg, run_id(cfg), plan.epochs, plan.pretrained)


def expand(spec: SweepFile, max_points: int | None = None) -> list[Point]:
    """Every grid point as a validated, planned run, once the grid's size is checked (:func:`check_size`).

    Their ``run_id`` is the id on each dataset's official files; :func:`identified`
    gives the ids on the data actually at hand.
    """
    check_size(spec, max_points)
    return list(iter_points(spec))


def identified(points: Sequence[Point], runtime: Runtime) -> tuple[list[Point], Runtime]:
    """``points`` with the run ids of the data ``runtime`` finds, and ``runtime`` knowing that data.

    The ids cover the data (:func:`prunelab.config.run_id`): each dataset the
    grid names is read and checksummed once, here, before anything trains.
    """
    runtime = data_identities(dict.fromkeys(p.cfg.data.dataset for p in points), runtime)
    return [replace(p, run_id=identify(p.cfg, runtime)) for p in points], runtime


def pretrained_dense(cfg: RunConfig) -> RunConfig | None:
    """The dense run ``cfg``'s method starts from, or None if it trains from scratch."""
    return dense_config(cfg) if METHODS.get(cfg.method.name).plan(cfg).pretrained else None


def pretraining(points: Sequence[Point], runtime: Runtime) -> dict[str, RunConfig]:
    """The dense runs that pretrained methods will ask for, by run id, once each (they run first)."""
    needed: dict[str, RunConfig] = {}
    for p in points:
        if p.pretrained:
            dense = dense_config(p.cfg)
            needed.setdefault(identify(dense, runtime), dense)
    return needed


def work(cfg: RunConfig, runtime: Runtime) -> Outcome:
    """Run one config (in a worker); any failure becomes an Outcome (the store has it too)."""
    try:
        summary, _ = run(cfg, runtime)
        return Outcome(summary["run_id"], "ok")
    except UserError as exc:
        status = "diverged" if isinstance(exc, Diverged) else "failed"
        return Outcome(identify(cfg, runtime), status, str(exc))
    except Exception as exc:  # noqa: BLE001 (a bug in one run must not stop the sweep)
        return Outcome(identify(cfg, runtime), "failed", f"{type(exc).__name__}: {exc}")


def record_crash(store: Store, cfg: RunConfig, runtime: Runtime, error: str) -> Outcome:
    """Store ``cfg``'s run as failed with ``error`` when its worker died before it could say so."""
    rid = identify(cfg, runtime)
    if store.get(rid) is None:  # it died before the run was registered
        store.begin(rid, to_dict(cfg), headline(cfg))
    store.mark(rid, "failed", error)
    return Outcome(rid, "failed", error)


# An executor runs configs wherever it runs them and yields one Outcome per config as each ends;
# by then the run is in the store at runtime.store (finished or failed).
Executor = Callable[[Sequence[RunConfig], Runtime], Iterator[Outcome]]


@dataclass(frozen=True)
class LocalExecutor:
    """Runs configs in ``workers`` local processes (each run uses its config's ``train.threads``).

    When a worker dies (SIGKILL, the OOM killer), the pool is broken and every
    unfinished run in it fails with it; which run's worker died is unknown. The
    runs that had started are then run again, each alone in a one-worker pool
    (all at once): one whose worker dies there too is recorded failed. The runs
    that had not started go to a fresh pool.
    """

    workers: int

    def __call__(self, configs: Sequence[RunConfig], runtime: Runtime) -> Iterator[Outcome]:
        runtime = replace(runtime, progress=False)
        pending = list(configs)
        while pending:
            started, pending = yield from _pool_round(pending, runtime, self.workers)
            yield from _alone(started, runtime)


def _pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that end when this process dies."""
    # spawn, not fork: a forked child would inherit torch's thread pools in an undefined state.
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                               initargs=(os.getpid(),))


def _pool_round(
    configs: Sequence[RunConfig], runtime: Runtime, workers: int
) -> Generator[Outcome, None, tuple[list[RunConfig], list[RunConfig]]]:
    """Run ``configs`` in one pool, yielding outcomes; returns the runs a broken pool left unfinished.

    Returned: (the runs that had started, the runs that had not), in ``configs`` order. Each
    worker leaves a marker file per run it starts, so the two are told apart after the break.
    """
    broken: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="prunelab-sweep-") as marks, _pool(workers) as pool:
        futures = {pool.submit(_work_in_worker, c, runtime, marks): c for c in configs}
        for future in as_completed(futures):
            if isinstance(future.exception(), BrokenProcessPool):
                broken.add(identify(futures[future], runtime))  # run again: alone if it had started, else in a new pool
            else:
                yield _outcome(future, futures[future], runtime)
        began = {marker.name for marker in Path(marks).iterdir()}
    return _split([c for c in configs if identify(c, runtime) in broken], began, workers, runtime)


def _split(
    unfinished: list[RunConfig], began: set[str], workers: int, runtime: Runtime
) -> tuple[list[RunConfig], list[RunConfig]]:
    """(suspects, the rest) of a broken pool's unfinished runs: the suspects are the started ones.

    A worker that died between runs leaves no started run: the next ``workers`` in line are the
    suspects then, so that every broken pool settles at least one run and the sweep ends.
    """
    started = [c for c in unfinished if identify(c, runtime) in began] or unfinished[:workers]
    chosen = {identify(c, runtime) for c in started}
    return started, [c for c in unfinished if identify(c, runtime) not in chosen]


def _alone(configs: Sequence[RunConfig], runtime: Runtime) -> Iterator[Outcome]:
    """Run each config in a one-worker pool of its own, all at once; a worker that dies is its run's."""
    with ExitStack() as stack:
        futures: dict[Future[Outcome], RunConfig] = {}
        for cfg in configs:
            futures[stack.enter_context(_pool(1)).submit(_work_in_worker, cfg, runtime, None)] = cfg
        for future in as_completed(futures):
            yield _outcome(future, futures[future], runtime)


def _outcome(future: Future[Outcome], cfg: RunConfig, runtime: Runtime) -> Outcome:
    """The finished future's outcome, or a crash record for ``cfg`` if its worker could not send one."""
    try:
        return future.result()
    except BrokenProcessPool as exc:  # in a pool of its own: the worker died running this very run
        error = ("worker process died running this run alone, after its shared pool broke "
                 f"(killed, e.g. out of memory): {exc}")
    except Exception as exc:  # noqa: BLE001 (the result could not come back: record it, go on)
        error = f"worker process died: {type(exc).__name__}: {exc}"
    return record_crash(Store(runtime.store), cfg, runtime, error)


# ---------------------------------------------------------------- in the worker processes

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_fault_spec: str | None = None  # this worker's PRUNELAB_FAULT while PRUNELAB_FAULT_RUN scopes it


def _init_worker(parent: int) -> None:
    """Pool initializer: end this worker when ``parent`` (the sweep driver) dies; scope faults."""
    global _fault_spec
    _die_with(parent)
    if os.environ.get(FAULT_RUN_ENV):
        _fault_spec = os.environ.pop(FAULT_ENV, None)


def _die_with(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies: PR_SET_PDEATHSIG on Linux, and a watching thread.

    The death signal comes when the parent *thread* that spawned us ends, and it is not set at
    all outside Linux; the thread checks the parent's pid every second wherever we run.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL))
        except (OSError, AttributeError):
            pass  # no prctl: the thread below still ends us
    if os.getppid() != parent:  # the parent died before the death signal was set
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="prunelab-parent-watch", daemon=True).start()


def _watch_parent(parent: int, interval: float = 1.0) -> None:
    """Exit this process at once when its parent is no longer ``parent`` (it died, we were adopted)."""
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


def _work_in_worker(cfg: RunConfig, runtime: Runtime, marks: str | None) -> Outcome:
    """:func:`work` in a pool worker: leave a marker in ``marks`` that it started, arm scoped faults."""
    rid = identify(cfg, runtime)
    if marks is not None:
        Path(marks, rid).touch()
    if _fault_spec is not None:
        if os.environ.get(FAULT_RUN_ENV) == rid:
            os.environ[FAULT_ENV] = _fault_spec
        else:
            os.environ.pop(FAULT_ENV, None)
    return work(cfg, runtime)


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
        bar.set_postfix(failed=sum(o.status != "ok" for o in outcomes))
    bar.close()
    return outcomes


@dataclass(frozen=True)
class SweepResult:
    """Counts over grid points: each is done (trained now), skipped (already stored), failed or diverged.

    A diverged run (its loss stopped being finite) has no result; it is
    counted apart from the failed ones and its error says where it diverged.
    """

    runs: int
    done: int
    skipped: int
    failed: int
    pretrained: int
    errors: dict[str, str]
    diverged: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "done": self.done, "skipped": self.skipped, "failed": self.failed,
                "diverged": self.diverged, "pretrained": self.pretrained, "errors": self.errors}


def sweep(
    points: Sequence[Point],
    runtime: Runtime,
    executor: Executor,
    progress: bool | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> SweepResult:
    """Run every point not yet in the store with ``executor``; shared dense pretraining first."""
    points, runtime = identified(points, runtime)
    store = Store(runtime.store)
    stored = {r.run_id for r in store.records() if r.status == "ok"}
    todo = {p.run_id: p.cfg for p in points if p.run_id not in stored}
    shared = pretraining(points, runtime)
    first = [c for rid, c in shared.items() if rid not in stored]  # some may be grid points too
    rest = [c for rid, c in todo.items() if rid not in shared]
    log(f"{len(points)} grid points: {len(todo)} runs to train, the rest already stored or repeated"
        + (f"; {len(first)} shared dense pretraining runs go first" if first else ""))
    outcomes = execute(first, runtime, executor, progress, "pretraining")
    outcomes += execute(rest, runtime, executor, progress)
    by_id = {o.run_id: o for o in outcomes}
    counts = {"ok": 0, "failed": 0, "diverged": 0, "skipped": 0}
    counted: set[str] = set()
    for p in points:
        outcome = by_id.get(p.run_id)
        if outcome is None or p.run_id in counted:
            counts["skipped"] += 1  # stored before this sweep, or the same run as an earlier grid point
        else:
            counts[outcome.status] += 1
        counted.add(p.run_id)
    grid_ids = {p.run_id for p in points}
    errors = {o.run_id: o.error or "" for o in outcomes if o.status != "ok"}
    pretrained = sum(1 for o in outcomes if o.run_id not in grid_ids and o.status == "ok")
    return SweepResult(len(points), counts["ok"], counts["skipped"], counts["failed"], pretrained, errors,
                       counts["diverged"])
