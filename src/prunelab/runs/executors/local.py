"""The local executor: a sweep's runs in worker processes on this machine.

Workers are spawned (never forked: a forked child would inherit torch's
thread pools in an undefined state) and end when the sweep driver dies, even
by SIGKILL. A worker that dies (the OOM killer) fails its own run only: the
other runs go to a fresh pool (see :class:`LocalExecutor`).

Fault injection (``prunelab.faults``) reaches every worker through the
environment; with ``PRUNELAB_FAULT_RUN=RUN_ID`` also set, a worker applies
``PRUNELAB_FAULT`` only while it runs that run, each time it runs it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from prunelab.config.schema import RunConfig
from prunelab.faults import ENV as FAULT_ENV
from prunelab.runs.experiment import Runtime, identify
from prunelab.runs.store import Store
from prunelab.runs.sweep import Outcome, record_crash, work

FAULT_RUN_ENV = "PRUNELAB_FAULT_RUN"
"""Set to a run id, a local worker applies ``PRUNELAB_FAULT`` only while it runs that run."""


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
