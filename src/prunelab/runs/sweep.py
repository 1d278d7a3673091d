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
:data:`Executor`: ``prunelab.runs.executors.local.LocalExecutor`` (worker
processes on this machine) or ``prunelab.runs.executors.ray.RayExecutor``
(tasks on a Ray cluster).

A grid is refused, from its axis lengths and before anything is built, when it
has more than :data:`MAX_POINTS` points (``prunelab sweep --max-points N``
raises the limit).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from prunelab.config.build import build_config, flatten, read_yaml_tree
from prunelab.config.identity import run_id, to_dict
from prunelab.config.schema import RunConfig
from prunelab.errors import BudgetTooSmall, Diverged, UserError
from prunelab.runs.experiment import Runtime, data_identities, dense_config, headline, identify, run
from prunelab.methods import METHODS
from prunelab.runs.store import Store

MAX_POINTS = 10_000
"""The most grid points a sweep may have unless ``max_points`` (``--max-points``) says otherwise.

Expanding validates every point (about a millisecond each), and a sweep that
large is more often a typo than a plan."""


@dataclass(frozen=True)
class Point:
    """One grid point: its raw settings, resolved config, run id and plan."""

    raw: dict[str, Any]
    cfg: RunConfig
    run_id: str
    epochs: float
    pretrained: bool
    split: str = ""
    """How the epochs fall into cycles (:attr:`prunelab.methods.Plan.split`)."""


@dataclass(frozen=True)
class Unfit:
    """A grid point whose ``train.budget`` is too small for its method's cycles: skipped, said why."""

    where: str
    reason: str


@dataclass(frozen=True)
class Grid:
    """A sweep file's grid expanded: the points to run, and the points skipped as unfit for their budget."""

    points: list[Point]
    unfit: list[Unfit]


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


def iter_points(spec: SweepFile) -> Iterator[Point | Unfit]:
    """Every grid point (product over grid keys in file order), built one by one as asked for.

    A point whose budget leaves a cycle under one epoch (lottery's 12 rounds in a budget of 10) is
    :class:`Unfit`, not an error: a grid over budgets and methods keeps the points that fit."""
    keys = list(spec.grid)
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        yield _point(spec, keys, values)


def _point(spec: SweepFile, keys: Sequence[str], values: Sequence[Any]) -> Point | Unfit:
    """The grid point ``keys = values`` over the base settings, validated and planned."""
    raw = {**spec.base, **dict(zip(keys, values))}
    raw.update(spec.method_settings.get(str(raw.get("method.name", "progressive")), {}))
    where = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    try:
        cfg = build_config(raw)
    except BudgetTooSmall as exc:
        return Unfit(where, str(exc))
    except UserError as exc:
        raise UserError(f"grid point {where}: {exc}") from None
    plan = METHODS.get(cfg.method.name).plan(cfg)
    return Point(raw, cfg, run_id(cfg), plan.epochs, plan.pretrained, plan.split)


def expand(spec: SweepFile, max_points: int | None = None) -> Grid:
    """Every grid point as a validated, planned run (or unfit for its budget), once the grid's size is
    checked (:func:`check_size`).

    Their ``run_id`` is the id on each dataset's official files; :func:`identified`
    gives the ids on the data actually at hand.
    """
    check_size(spec, max_points)
    points: list[Point] = []
    unfit: list[Unfit] = []
    for p in iter_points(spec):
        if isinstance(p, Unfit):
            unfit.append(p)
        else:
            points.append(p)
    return Grid(points, unfit)


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
