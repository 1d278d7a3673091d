"""Sweeps on a Ray cluster: every run is a Ray task, and only the driver writes the store.

A task trains its config into a private temporary store on whichever node Ray
places it, then sends back the run's index row and files as a
:class:`~prunelab.runs.store.RunBundle`; the driver imports the bundle into the
real store. The store therefore never sits on a network file system, where
SQLite's locking cannot be trusted, and a node needs only prunelab with its
dependencies and the dataset (at the same ``--data-dir`` path, or downloadable).
A pruned run that starts from a stored dense run gets that run's bundle with
its task, so the node reuses it instead of training it again.

Ray is imported only when used: it is an optional extra (``prunelab[ray]``).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prunelab.config.schema import RunConfig
from prunelab.errors import UserError
from prunelab.runs.experiment import Runtime, identify
from prunelab.runs.store import RunBundle, Store
from prunelab.runs.sweep import Outcome, pretrained_dense, record_crash, work


def _ray() -> Any:
    """The ``ray`` module, or a one-sentence UserError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray, which is not installed: pip install 'prunelab[ray]'") from None
    return ray


@contextmanager
def ray_session() -> Iterator[None]:
    """Scope for :class:`RayExecutor`: shuts down, at the end, the Ray session it opened inside.

    A session the caller opened before (``ray.init``) is left open. Raises the
    install hint at once if Ray is missing.
    """
    ray = _ray()
    opened_before = ray.is_initialized()
    try:
        yield
    finally:
        if not opened_before and ray.is_initialized():
            ray.shutdown()


def _connect(ray: Any, address: str | None) -> None:
    """Connect to the Ray cluster at ``address`` ('auto' or HOST:PORT), or start a local one if None.

    The local instance gets one CPU per core of this machine.
    """
    if address not in (None, "auto"):
        _check_reachable(address)
    try:
        ray.init(
            # "local" starts a fresh instance even when $RAY_ADDRESS names a cluster.
            address=address or "local",
            num_cpus=None if address else os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,  # the workers' output stays in Ray's log files, off the user's terminal
            configure_logging=True,
            logging_level=logging.ERROR,
        )
    except (ConnectionError, ValueError) as exc:
        reason = str(exc).strip().split(". ")[0].rstrip(".") or type(exc).__name__
        # Recent Ray clusters may require token authentication (~/.ray/auth_token); a driver given a
        # HOST:PORT address uses the token only when told to.
        hint = ("start one with `ray start --head`, or leave out --address to start Ray on this machine"
                if address == "auto" else "if it uses token authentication, set RAY_AUTH_MODE=token here")
        raise UserError(f"cannot connect to a Ray cluster at {address!r} ({reason}); {hint}") from None


def _split_address(address: str) -> tuple[str, int]:
    """HOST and PORT of a HOST:PORT address (a ray:// client address too)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address must be 'auto' or HOST:PORT, got {address!r}")
    return host, int(port)


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on (Ray itself retries for minutes)."""
    try:
        socket.create_connection(_split_address(address), timeout=10).close()
    except OSError as exc:
        raise UserError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); "
                        "is `ray start --head` running there?") from None


def run_in_temp_store(
    cfg: RunConfig, runtime: Runtime, seed: RunBundle | None
) -> tuple[Outcome, list[RunBundle]]:
    """A Ray task: run ``cfg`` in a private store holding ``seed``; its outcome and the runs it made.

    ``seed`` is the stored dense run ``cfg``'s method starts from (None if it
    needs none, or if that run is not stored: then the task trains it too, and
    sends it back with the rest).
    """
    with tempfile.TemporaryDirectory(prefix="prunelab-task-") as tmp:
        store = Store(Path(tmp))
        if seed is not None:
            store.import_run(seed)
        outcome = work(cfg, replace(runtime, store=Path(tmp)))
        seeded = seed.record.run_id if seed is not None else None
        made = [store.export_run(r.run_id) for r in store.records() if r.run_id != seeded]
    return outcome, made


@dataclass(frozen=True)
class RayExecutor:
    """Runs each config as a Ray task needing ``cpus`` CPUs and ``gpus`` GPUs (device cuda when gpus > 0).

    ``address``: the cluster ('auto' or HOST:PORT); None starts Ray on this
    machine. Ray is started or joined only when there is a run to do (unless
    the caller did it), so use the executor inside :func:`ray_session`, which
    shuts it down. A run that fails is stored as failed with its error, as is
    one whose task or node died; the others go on.
    """

    cpus: int = 1
    gpus: float = 0
    address: str | None = None

    def __post_init__(self) -> None:
        # Checked here, so that a bad setting fails before any work.
        if self.cpus < 1:
            raise UserError(f"--cpus-per-run must be at least 1, got {self.cpus}")
        if not 0 <= self.gpus < math.inf:
            raise UserError(f"--gpus-per-run must be at least 0, got {self.gpus}")
        if self.address not in (None, "auto"):
            _split_address(self.address)

    def __call__(self, configs: Sequence[RunConfig], runtime: Runtime) -> Iterator[Outcome]:
        ray = _ray()
        task_runtime = self._task_runtime(runtime)
        if not ray.is_initialized():
            _connect(ray, self.address)
        store = Store(runtime.store)
        task = ray.remote(run_in_temp_store).options(num_cpus=self.cpus, num_gpus=self.gpus)
        seeds: dict[str, Any] = {}  # dense run id -> its bundle in Ray's object store, sent once per node
        pending = {task.remote(c, task_runtime, _seed(ray, store, c, runtime, seeds)): c for c in configs}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            cfg = pending.pop(ref)
            try:
                outcome, bundles = ray.get(ref)
            except ray.exceptions.RayError as exc:  # its worker or node died, or it could not start
                yield record_crash(store, cfg, runtime, f"Ray task failed: {_describe(exc)}")
                continue
            for bundle in bundles:
                store.import_run(bundle)
            yield outcome

    def _task_runtime(self, runtime: Runtime) -> Runtime:
        """The runtime a task runs under: its device; paths made absolute for the workers."""
        if self.gpus == 0 and runtime.device == "cuda":
            raise UserError("on Ray a run gets a GPU through --gpus-per-run, not --device cuda")
        return replace(
            runtime,
            device="cuda" if self.gpus > 0 else runtime.device,
            progress=False,
            data_dir=runtime.data_dir.resolve() if runtime.data_dir is not None else None,
        )


def _seed(ray: Any, store: Store, cfg: RunConfig, runtime: Runtime, seeds: dict[str, Any]) -> Any:
    """The object ref of the stored dense run ``cfg`` starts from, or None."""
    dense = pretrained_dense(cfg)
    if dense is None:
        return None
    rid = identify(dense, runtime)
    if rid not in seeds:
        # Not stored if its pretraining failed: the task then tries to train it, as a local run would.
        seeds[rid] = ray.put(store.export_run(rid)) if store.finished(rid) is not None else None
    return seeds[rid]


def _describe(exc: Exception) -> str:
    """One line about a failed Ray task: the task's own exception when Ray wraps one."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
