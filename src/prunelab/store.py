"""The result store: an SQLite index (WAL) plus one folder per run.

Layout under the store root::

    index.sqlite               one row per run: id, status, headline fields, summary
    <run_id>/config.json       the resolved config
    <run_id>/metrics.jsonl     one record per epoch (a resumed epoch may repeat; the last wins)
    <run_id>/weights.pt        final weights (state_dict), loadable with weights_only=True
    <run_id>/mask.pt           final masks {name: bool tensor}
    <run_id>/summary.json      what `prunelab show` prints
    <run_id>/checkpoint-NNNNNN.pt  the last two epochs' checkpoints (removed when the run finishes)
    <run_id>/.lock             held (flock) by the process training the run

Every file is written to a temporary name, flushed to disk and renamed, so a
crash leaves either the old file or the new one, never half of one. A
checkpoint also carries the sha256 of its contents: one that fails the check
is set aside (renamed ``*.damaged``) and the run resumes from the one before.
The run lock is an advisory ``flock``: the kernel releases it when its holder
dies, so a killed process never leaves a stale lock behind.

A run moves between stores as a :class:`RunBundle` (its index row and the
bytes of its files, checkpoints left out): a sweep on a Ray cluster trains
each run in a private store on a worker node and the driver imports the
bundle, so only the driver ever writes the real store.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import UserError
from prunelab.faults import fault_point

CHECKPOINT_MAGIC = b"PRUNELAB-CHECKPOINT-1\n"
KEEP_CHECKPOINTS = 2
# What a run bundle may carry: a run's files less its checkpoints and lock. A finished run has at
# least FINISHED_FILES (metrics.jsonl only once it has trained an epoch).
BUNDLE_FILES = ("config.json", "metrics.jsonl", "weights.pt", "mask.pt", "summary.json")
FINISHED_FILES = ("config.json", "weights.pt", "mask.pt", "summary.json")
RUN_ID = re.compile(r"[0-9a-f]{12}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    method TEXT NOT NULL,
    model TEXT NOT NULL,
    dataset TEXT NOT NULL,
    target_sparsity REAL NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    summary TEXT,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
)
"""


def atomic_write_bytes(path: Path, data: bytes, fault: str | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename.

    A failed write (a full disk, a read-only folder) removes the temporary
    file, leaves any previous ``path`` as it was, and raises a one-sentence
    :class:`UserError`. ``fault`` names the fault point half-way through the
    write (see :mod:`prunelab.faults`).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; results are meant to be shared
            half = len(data) // 2
            f.write(data[:half])
            if fault is not None:
                fault_point(fault)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror}; files written before are intact") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically."""
    atomic_write_bytes(path, _torch_bytes(obj))


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any failure means the file is not ours or is damaged)
        raise UserError(f"{path} is not a valid prunelab file ({type(exc).__name__})") from None


@dataclass(frozen=True)
class RunRecord:
    """One row of the index."""

    run_id: str
    status: str
    method: str
    model: str
    dataset: str
    target_sparsity: float
    seed: int
    config: dict[str, Any]
    summary: dict[str, Any] | None
    error: str | None
    created: float
    updated: float


@dataclass(frozen=True)
class RunBundle:
    """One run as it moves between stores: its index row and its files' bytes by name (no checkpoints)."""

    record: RunRecord
    files: dict[str, bytes]


class RunFolder:
    """The files of one run; also the trainer's checkpointer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_bytes(self.path / name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        # Appending one short line is effectively atomic; a torn last line is skipped on read.
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        """Per-epoch records, one per (cycle, epoch): a record repeated by a resume keeps its last copy."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        latest: dict[tuple[int, int], dict[str, Any]] = {}
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            latest[(record.get("cycle", 0), record.get("epoch", 0))] = record
        return [latest[k] for k in sorted(latest)]

    def save(self, state: dict[str, Any]) -> None:
        """Checkpointer: write the state with its checksum, keep it and the one before."""
        payload = _torch_bytes(state)
        sequence = max((_sequence(p) for p in self.checkpoints()), default=0) + 1
        data = CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload
        atomic_write_bytes(self.path / f"checkpoint-{sequence:06d}.pt", data, fault="checkpoint")
        for old in self.checkpoints()[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)

    def load(self) -> dict[str, Any] | None:
        """Checkpointer: the newest checkpoint that passes its checksum, if any.

        A damaged one is reported in one sentence, renamed ``*.damaged`` (kept
        for inspection) and the one before it is tried.
        """
        for path in reversed(self.checkpoints()):
            try:
                return load_checkpoint(path)
            except UserError as exc:
                path.replace(path.with_name(path.name + ".damaged"))
                self.notify(f"{exc}; resuming from the checkpoint before it")
        return None

    def checkpoints(self) -> list[Path]:
        """This run's checkpoint files, oldest first."""
        return sorted(self.path.glob("checkpoint-[0-9][0-9][0-9][0-9][0-9][0-9].pt"))

    def drop_checkpoint(self) -> None:
        for path in self.checkpoints():
            path.unlink(missing_ok=True)

    @staticmethod
    def notify(message: str) -> None:
        """Tell the user about something the run recovered from (one line on stderr)."""
        print(f"prunelab: {message}", file=sys.stderr, flush=True)


def _sequence(path: Path) -> int:
    return int(path.stem.rpartition("-")[2])


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state after checking its format and sha256; never executes code.

    Raises a one-sentence :class:`UserError` for a truncated, corrupted or foreign file.
    """
    data = path.read_bytes()
    head = len(CHECKPOINT_MAGIC)
    if not data.startswith(CHECKPOINT_MAGIC) or len(data) < head + 32:
        raise UserError(f"checkpoint {path} is not a prunelab checkpoint or is truncated")
    digest, payload = data[head : head + 32], data[head + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise UserError(f"checkpoint {path} is damaged (its checksum does not match)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (a checksummed file that torch refuses is not ours)
        raise UserError(f"checkpoint {path} holds something other than tensors ({type(exc).__name__})") from None


class Store:
    """The SQLite index and the run folders under one root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the store at {self.root}: {exc.strerror}") from None
        self.index = self.root / "index.sqlite"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.index, timeout=60.0)
        except sqlite3.Error as exc:
            raise UserError(f"cannot open the run index {self.index}: {exc}") from None
        try:
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        except (sqlite3.DatabaseError, OSError) as exc:  # corrupted, locked too long, disk full
            raise UserError(f"cannot use the run index {self.index}: {exc}") from None
        finally:
            db.close()

    def folder(self, run_id: str) -> RunFolder:
        return RunFolder(self.root / run_id)

    def get(self, run_id: str) -> RunRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _record(row) if row else None

    def resolve_id(self, prefix: str) -> str:
        """The full id of the one run whose id starts with ``prefix``."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT run_id FROM runs WHERE run_id LIKE ? ESCAPE '\\'",
                (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",),
            ).fetchall()
        if len(rows) == 1:
            return rows[0][0]
        if not rows:
            raise UserError(f"no run {prefix!r} in the store at {self.root}")
        raise UserError(f"run id prefix {prefix!r} matches {len(rows)} runs; give more characters")

    def records(self) -> list[RunRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY created").fetchall()
        return [_record(r) for r in rows]

    def begin(self, run_id: str, config: dict[str, Any], head: dict[str, Any]) -> RunFolder:
        """Register a run as running (keeping its creation time if it existed) and write its config."""
        folder = self.folder(run_id)
        folder.write_json("config.json", config)
        now = time.time()
        with self._connect() as db:
            db.execute(
                """INSERT INTO runs (run_id, status, method, model, dataset, target_sparsity, seed,
                                     config, created, updated)
                   VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(run_id) DO UPDATE SET status='running', error=NULL, updated=excluded.updated""",
                (run_id, head["method"], head["model"], head["dataset"], head["target_sparsity"],
                 head["seed"], json.dumps(config, sort_keys=True), now, now),
            )
        return folder

    def finish(self, run_id: str, summary: dict[str, Any]) -> None:
        self.folder(run_id).write_json("summary.json", summary)
        with self._connect() as db:
            fault_point("store")
            db.execute(
                "UPDATE runs SET status=?, summary=?, error=NULL, updated=? WHERE run_id=?",
                (summary["status"], json.dumps(summary, sort_keys=True), time.time(), run_id),
            )

    @contextmanager
    def lock(self, run_id: str, on_wait: Callable[[str], None] = RunFolder.notify) -> Iterator[None]:
        """Hold the run's lock for the block, waiting (and saying so) while another process holds it.

        An advisory ``flock`` on ``<run_id>/.lock``: released by the kernel when
        the holder exits or dies, so there is no stale lock to clean up.
        """
        path = self.root / run_id / ".lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot create the run lock {path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                on_wait(f"run {run_id} is being trained by another process (pid {holder}); waiting for it")
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def export_run(self, run_id: str) -> RunBundle:
        """The run's index row and the bytes of its files (those of :data:`BUNDLE_FILES` it has)."""
        record = self.get(run_id)
        if record is None:
            raise UserError(f"no run {run_id!r} in the store at {self.root}")
        folder = self.root / run_id
        files = {name: (folder / name).read_bytes() for name in BUNDLE_FILES if (folder / name).exists()}
        return RunBundle(record, files)

    def import_run(self, bundle: RunBundle) -> bool:
        """Add a run exported from another store; returns False (and does nothing) if it is stored as ok.

        The files are written atomically first and the index row last, in one
        transaction, so a crash in between leaves the run not finished here
        (a later sweep runs it again), never a finished row without its files.
        A bundle naming a file outside :data:`BUNDLE_FILES`, a malformed run id,
        a finished run lacking a file or whose weights do not match their
        checksum is refused with a :class:`UserError`.
        """
        record = bundle.record
        _check_bundle(bundle)
        if self.finished(record.run_id) is not None:
            return False
        with self.lock(record.run_id):
            if self.finished(record.run_id) is not None:  # imported or trained by another process meanwhile
                return False
            folder = self.folder(record.run_id)
            for name, data in bundle.files.items():
                atomic_write_bytes(folder.path / name, data)
            if record.status == "ok":
                folder.drop_checkpoint()  # left by an earlier attempt here, which the import finishes
            with self._connect() as db:
                db.execute(
                    """INSERT INTO runs (run_id, status, method, model, dataset, target_sparsity, seed,
                                         config, summary, error, created, updated)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT(run_id) DO UPDATE SET status=excluded.status, summary=excluded.summary,
                           error=excluded.error, updated=excluded.updated""",
                    (record.run_id, record.status, record.method, record.model, record.dataset,
                     record.target_sparsity, record.seed, json.dumps(record.config, sort_keys=True),
                     json.dumps(record.summary, sort_keys=True) if record.summary is not None else None,
                     record.error, record.created, record.updated),
                )
        return True

    def finished(self, run_id: str) -> dict[str, Any] | None:
        """The summary of ``run_id`` if the store holds it finished (status ok), else None."""
        record = self.get(run_id)
        return record.summary if record is not None and record.status == "ok" else None

    def mark(self, run_id: str, status: str, error: str | None = None) -> None:
        """Set a run's status (``failed``, ``interrupted``) with an optional error message."""
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET status=?, error=?, updated=? WHERE run_id=?",
                (status, error, time.time(), run_id),
            )


def _check_bundle(bundle: RunBundle) -> None:
    """Refuse a bundle that could write outside its run folder, or a finished run that is incomplete."""
    rid = bundle.record.run_id
    if not RUN_ID.fullmatch(rid):
        raise UserError(f"run bundle has a malformed run id {rid!r}; expected 12 hex digits")
    unexpected = sorted(set(bundle.files) - set(BUNDLE_FILES))
    if unexpected:
        raise UserError(f"run bundle {rid} holds unexpected files {unexpected}; allowed: {list(BUNDLE_FILES)}")
    if bundle.record.status != "ok":
        return
    missing = [name for name in FINISHED_FILES if name not in bundle.files]
    if missing or bundle.record.summary is None:
        raise UserError(f"run bundle {rid} is finished but lacks {missing or ['its summary']}")
    digest = hashlib.sha256(bundle.files["weights.pt"]).hexdigest()
    if digest != bundle.record.summary.get("weights_sha256"):
        raise UserError(f"run bundle {rid} is damaged (weights.pt does not match its weights_sha256)")


def _record(row: tuple[Any, ...]) -> RunRecord:
    (run_id, status, method, model, dataset, target, seed, config, summary, error, created, updated) = row
    return RunRecord(
        run_id, status, method, model, dataset, target, seed, json.loads(config),
        json.loads(summary) if summary else None, error, created, updated,
    )
