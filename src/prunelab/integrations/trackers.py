"""Experiment trackers: every epoch record of a run reaches TensorBoard, MLflow or a CSV file as it happens.

``prunelab run --log NAME`` (and ``prunelab sweep``) hand each epoch record to
the trackers right after it is appended to the run's ``metrics.jsonl``:
``csv`` writes ``<run folder>/metrics.csv``, ``tensorboard`` event files in
``<run folder>/tensorboard/``, ``mlflow`` one MLflow run named after the run id
(its config as params) at ``--mlflow-uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<store>/mlflow.db``. A record's step is its position among the
run's epochs, across cycles. A resumed run first replays the epochs stored
before the one it trains again, so no epoch appears twice. A tracker that fails
is dropped with one line: it never stops or changes a run. Each backend imports
its package only when used (``pip install 'prunelab[trackers]'``); the user
guide (docs/guide.md) describes it all.
"""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from prunelab.errors import UserError
from prunelab.io import atomic_write_bytes
from prunelab.registry import Registry

#: How to get every tracker's package.
INSTALL = "pip install 'prunelab[trackers]'"
#: Where the trackers write, relative to a run's folder.
CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
#: The local MLflow store in the store's root, used when no tracking URI is given.
MLFLOW_DB = "mlflow.db"
MLFLOW_EXPERIMENT = "prunelab"

# MLflow refuses larger batches in one request.
_MLFLOW_PARAMS_PER_BATCH = 100
_MLFLOW_METRICS_PER_BATCH = 1000

Record = Mapping[str, Any]


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker knows of the run it follows: its id, folder, store and config (``config.json``)."""

    run_id: str
    folder: Path
    store: Path
    config: Mapping[str, Any]
    mlflow_uri: str | None = None


class Tracker(Protocol):
    """One backend following one run: built for the run, replays its earlier epochs, logs each new one."""

    def start(self, history: Sequence[tuple[int, Record]]) -> None:
        """Begin, holding exactly ``history`` (step, record): the epochs stored before this attempt."""

    def log(self, step: int, record: Record) -> None:
        """One new epoch record, at ``step``."""

    def close(self, status: str) -> None:
        """End: ``FINISHED``, ``FAILED`` or ``KILLED`` (interrupted)."""


#: The backends by name: each entry is a class taking a :class:`TrackedRun`.
TRACKERS: Registry[type[Any]] = Registry("tracker")


def record_key(record: Record) -> tuple[int, int]:
    """Which epoch a record is: (cycle, epoch), the key ``metrics.jsonl`` deduplicates on."""
    return int(record.get("cycle", 0)), int(record.get("epoch", 0))


def numeric(record: Record) -> dict[str, float]:
    """The record's numeric fields (booleans and text left out), as floats."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


#: The fields that say which epoch a record is: the first columns of every table of epochs.
EPOCH_FIELDS = ("cycle", "phase", "epoch")


def fields(records: Iterable[Record]) -> list[str]:
    """Every field of ``records``: :data:`EPOCH_FIELDS` first, then the others by name.

    One order whatever the records' own (``metrics.jsonl`` stores its keys sorted), so the CSV a run
    writes as it trains and the one ``prunelab metrics --csv`` prints afterwards are the same text.
    """
    present = {k for r in records for k in r}
    return [k for k in EPOCH_FIELDS if k in present] + sorted(present - set(EPOCH_FIELDS))


def csv_text(records: Sequence[Record], header: Sequence[str] | None = None, with_header: bool = True) -> str:
    """``records`` as CSV (header line first unless ``with_header`` is False); floats written exactly (repr)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(header or fields(records)), lineterminator="\n")
    if with_header:
        writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def check_trackers(names: Iterable[str]) -> None:
    """Raise one sentence for an unknown tracker name or a tracker whose package is missing (before any work)."""
    for name in names:
        TRACKERS.get(name).require()


def _needs(module: str, name: str) -> UserError:
    return UserError(f"--log {name} needs the {module} package, which is not installed: {INSTALL}")


@TRACKERS.register("csv", "metrics.csv in the run's folder: one row per epoch")
class CsvTracker:
    """``<run folder>/metrics.csv``: rewritten with the history at the start, then one line appended per epoch."""

    def __init__(self, run: TrackedRun) -> None:
        self.path = run.folder / CSV_FILE
        self.rows: list[Record] = []
        self.header: list[str] = []

    @staticmethod
    def require() -> None:
        """Nothing to install: the standard library writes CSV."""

    def start(self, history: Sequence[tuple[int, Record]]) -> None:
        self.rows = [r for _, r in history]
        self._rewrite()

    def log(self, step: int, record: Record) -> None:
        self.rows.append(record)
        if set(record) <= set(self.header):
            with open(self.path, "a") as f:
                f.write(csv_text([record], self.header, with_header=False))
        else:  # a field the header lacks: the whole file again, with the wider header
            self._rewrite()

    def close(self, status: str) -> None:
        """Nothing held open: every line is written when its epoch ends."""

    def _rewrite(self) -> None:
        self.header = fields(self.rows)
        atomic_write_bytes(self.path, csv_text(self.rows, self.header).encode() if self.rows else b"")


@TRACKERS.register("tensorboard", "TensorBoard event files in the run's folder (tensorboard/)")
class TensorBoardTracker:
    """Scalars in ``<run folder>/tensorboard/``; the event files of an earlier attempt are replaced."""

    def __init__(self, run: TrackedRun) -> None:
        self.path = run.folder / TENSORBOARD_DIR
        self.writer: Any = None

    @staticmethod
    def require() -> None:
        """torch's SummaryWriter needs the tensorboard package."""
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise _needs("tensorboard", "tensorboard") from None

    def start(self, history: Sequence[tuple[int, Record]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # The history is written again below: old event files would show resumed epochs twice.
        for old in self.path.glob("events.out.tfevents.*"):
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(self.path))
        for step, record in history:
            self._write(step, record)
        self.writer.flush()

    def log(self, step: int, record: Record) -> None:
        self._write(step, record)
        self.writer.flush()  # as it happens, not every two minutes

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()

    def _write(self, step: int, record: Record) -> None:
        for key, value in numeric(record).items():
            self.writer.add_scalar(key, value, global_step=step)


@TRACKERS.register("mlflow", "an MLflow run (default store: mlflow.db in the store's root)")
class MlflowTracker:
    """One MLflow run per prunelab run; an earlier attempt's run of the same id and store is replaced."""

    def __init__(self, run: TrackedRun) -> None:
        self.run = run
        self.store = str(run.store.resolve())
        self.local = not (run.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        self.uri = run.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.store}/{MLFLOW_DB}"
        self.client: Any = None
        self.mlflow_run: str | None = None

    @staticmethod
    def require() -> None:
        """The client comes with mlflow (or mlflow-skinny, which needs sqlalchemy for a local store)."""
        try:
            from mlflow.tracking import MlflowClient  # noqa: F401
        except ImportError:
            raise _needs("mlflow", "mlflow") from None

    def start(self, history: Sequence[tuple[int, Record]]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        with self._lock(), _quiet("mlflow.store.db.utils", "alembic"):
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment = self._experiment()
            tags = {"prunelab.run_id": self.run.run_id, "prunelab.store": self.store}
            for earlier in self.client.search_runs(
                [experiment], filter_string=f"tags.`prunelab.run_id` = '{self.run.run_id}'"
            ):
                if earlier.data.tags.get("prunelab.store") == self.store:
                    self.client.delete_run(earlier.info.run_id)  # an earlier attempt: its epochs are replayed
            self.mlflow_run = self.client.create_run(experiment, run_name=self.run.run_id, tags=tags).info.run_id
            params = [Param(k, str(v)) for k, v in _flat(self.run.config).items()]
            for i in range(0, len(params), _MLFLOW_PARAMS_PER_BATCH):
                self.client.log_batch(self.mlflow_run, params=params[i:i + _MLFLOW_PARAMS_PER_BATCH])
            self._metrics(history)

    def log(self, step: int, record: Record) -> None:
        with self._lock():
            self._metrics([(step, record)])

    def close(self, status: str) -> None:
        if self.mlflow_run is not None:
            with self._lock():
                self.client.set_terminated(self.mlflow_run, status)

    def _experiment(self) -> str:
        """The experiment's id, created if missing (by another sweep worker meanwhile, too)."""
        from mlflow.exceptions import MlflowException

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        # A local store keeps artifacts beside it, not in ./mlruns of whatever folder prunelab runs in.
        location = Path(self.store, "mlartifacts").as_uri() if self.local else None
        try:
            return str(self.client.create_experiment(name, artifact_location=location))
        except MlflowException:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def _metrics(self, records: Sequence[tuple[int, Record]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, r in records for k, v in numeric(r).items()]
        for i in range(0, len(metrics), _MLFLOW_METRICS_PER_BATCH):
            self.client.log_batch(self.mlflow_run, metrics=metrics[i:i + _MLFLOW_METRICS_PER_BATCH])

    def _lock(self) -> AbstractContextManager[None]:
        """The local store's file lock: sweep workers share one SQLite file (and must not create it twice)."""
        return _flock(Path(self.store) / ".mlflow.lock") if self.local else nullcontext()


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block (released by the kernel if we die)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Silence INFO lines of ``loggers`` (MLflow says it creates its tables) for the block."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``train.lr``), the form MLflow params take."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class EpochTrackers:
    """The trackers of one run attempt: call it with each epoch record right after it is appended.

    ``stored``: the records ``metrics.jsonl`` held when the attempt began. The
    trackers start at the first new record, holding the stored records before
    it (a resumed epoch is trained again and logged once); one that fails is
    dropped with one line on stderr. Use as a context manager: the exit
    closes every tracker with the attempt's status.
    """

    def __init__(self, names: Sequence[str], run: TrackedRun, stored: Sequence[Record]) -> None:
        self.names = list(dict.fromkeys(names))
        self.run = run
        self.stored = list(stored)
        self.active: dict[str, Tracker] = {}
        self.started = False
        self.step = 0

    def __call__(self, record: Record) -> None:
        if not self.started:
            self._start(record_key(record))
        self.step += 1
        for name, tracker in list(self.active.items()):
            self._safely(name, tracker.log, self.step, record)

    def _start(self, first: tuple[int, int] | None) -> None:
        """Build and start every tracker with the stored records before ``first`` (all of them if None)."""
        self.started = True
        history = [r for r in self.stored if first is None or record_key(r) < first]
        self.step = len(history)
        numbered = list(enumerate(history, start=1))
        for name in self.names:
            try:
                tracker = TRACKERS.get(name)(self.run)
            except Exception as exc:  # noqa: BLE001 (a tracker never stops a run)
                self._drop(name, exc)
                continue
            self.active[name] = tracker
            self._safely(name, tracker.start, numbered)

    def _safely(self, name: str, call: Any, *args: Any) -> None:
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001 (a tracker never stops a run)
            self._drop(name, exc)

    def _drop(self, name: str, exc: Exception) -> None:
        self.active.pop(name, None)
        print(f"prunelab: tracker {name} stopped ({type(exc).__name__}: {exc}); the run goes on and "
              f"{self.run.folder / 'metrics.jsonl'} keeps every epoch", file=sys.stderr, flush=True)

    def close(self, status: str = "FINISHED") -> None:
        """Close every tracker; an attempt that finished without a new epoch still gets the stored ones.

        One that failed before its first new epoch logs nothing: the next attempt replays its epochs.
        """
        if not self.started and status == "FINISHED":
            self._start(None)
        for name, tracker in list(self.active.items()):
            self._safely(name, tracker.close, status)
        self.active.clear()

    def __enter__(self) -> EpochTrackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        self.close(status)


@contextmanager
def tracked(
    names: Sequence[str], run: TrackedRun, append: Callable[[Record], None], stored: Sequence[Record]
) -> Iterator[Callable[[Record], None]]:
    """The epoch log of a run attempt: ``append`` (to ``metrics.jsonl``), then the trackers ``names``.

    Without trackers it is ``append`` itself. ``stored``: what ``metrics.jsonl``
    held before the attempt (see :class:`EpochTrackers`).
    """
    if not names:
        yield append
        return
    with EpochTrackers(names, run, stored) as trackers:

        def log(record: Record) -> None:
            append(record)
            trackers(record)

        yield log
