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

import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
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
from prunelab.io import json_text

CHECKPOINT_MAGIC = b"PRUNELAB-CHECKPOINT-1\n"
KEEP_CHECKPOINTS = 2
# The store's file names, here and nowhere else.
INDEX = "index.sqlite"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
WEIGHTS = "weights.pt"
MASK = "mask.pt"
SUMMARY = "summary.json"
# What a run bundle may carry: a run's files less its checkpoints and lock. A finished run has at
# least FINISHED_FILES (metrics.jsonl only once it has trained an epoch).
BUNDLE_FILES = (CONFIG, METRICS, WEIGHTS, MASK, SUMMARY)
FINISHED_FILES = (CONFIG, WEIGHTS, MASK, SUMMARY)
# Stored artifacts and the summary field holding the sha256 they were written with.
CHECKSUMMED = {WEIGHTS: "weights_sha256", MASK: "mask_sha256"}
RUN_ID = re.compile(r"[0-9a-f]{12}")
# A failed index write with less free space than this is reported as a full disk.
DISK_FULL_BYTES = 1 << 20

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


def checkpoint_owner(run_id: str, config: dict[str, Any]) -> str:
    """What a run's checkpoints record as their owner: its id and the sha256 of its config (data included)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return f"{run_id}/{digest[:16]}"


class RunFolder:
    """The files of one run; also the trainer's checkpointer.

    ``owner`` (see :func:`checkpoint_owner`) is written into every checkpoint;
    a checkpoint with another owner (copied from another run, or written for
    another config or other data) is refused and set aside, never resumed.
    """

    def __init__(self, path: Path, owner: str | None = None) -> None:
        self.path = path
        self.owner = owner
        path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_bytes(self.path / name, (json_text(obj, indent=2) + "\n").encode())

    def write_torch(self, name: str, obj: Any) -> str:
        """``torch.save`` ``obj`` to ``name`` atomically; returns the sha256 of the bytes written."""
        data = _torch_bytes(obj)
        atomic_write_bytes(self.path / name, data)
        return hashlib.sha256(data).hexdigest()

    def remove_temporaries(self) -> None:
        """Delete the temporary files a killed writer left (``.NAME.XXXX.tmp``); call with the run lock held."""
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def append_metrics(self, record: dict[str, Any]) -> None:
        # Appending one short line is effectively atomic; a torn last line is skipped on read.
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json_text(record) + "\n")

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
        payload = _torch_bytes({**state, "owner": self.owner})
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
                state = load_checkpoint(path)
                if state.get("owner") != self.owner:
                    raise UserError(
                        f"checkpoint {path} belongs to {state.get('owner') or 'an unknown run'}, "
                        f"not to this run ({self.owner}); it was set aside as {path.name}.damaged"
                    )
                return state
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
    """The SQLite index and the run folders under one root.

    The index is a cache of the run folders: when it is missing or empty
    while run folders exist, it is rebuilt from them (:meth:`rebuild`); a
    damaged index is refused in one sentence, never silently replaced.
    ``readonly`` opens an existing store for reading only (``list``, ``show``,
    ``export``, ``report``), so a store on a read-only medium can be read.
    """

    def __init__(self, root: Path, readonly: bool = False) -> None:
        self.root = Path(root)
        self.readonly = readonly
        self.index = self.root / INDEX
        if readonly:
            if not self.index.is_file() or self.index.stat().st_size == 0:
                if self._run_folders():
                    raise UserError(f"the run index {self.index} is missing and the store is read-only, "
                                    "so it cannot be rebuilt; run `prunelab store rebuild` where it is writable")
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the store at {self.root}: {exc.strerror}") from None
        lost = not self.index.exists() or self.index.stat().st_size == 0
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
        if lost and self._run_folders():
            found = self.rebuild()
            RunFolder.notify(f"the run index {self.index} was missing or empty; rebuilt it from {found} run folders")

    @classmethod
    def reader(cls, root: Path) -> Store:
        """The store at ``root`` opened for reading only when it exists, else created (nothing to read yet)."""
        root = Path(root)
        return cls(root, readonly=(root / INDEX).is_file() and not os.access(root, os.W_OK))

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            if self.readonly:
                # immutable: a read-only medium cannot hold the WAL's shared-memory file.
                db = sqlite3.connect(f"{self.index.resolve().as_uri()}?mode=ro&immutable=1", uri=True, timeout=60.0)
            else:
                db = sqlite3.connect(self.index, timeout=60.0)
        except sqlite3.Error as exc:
            raise UserError(f"cannot open the run index {self.index}: {exc}") from None
        try:
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        except (sqlite3.DatabaseError, OSError) as exc:  # corrupted, locked too long, disk full
            raise self._index_error(exc) from None
        finally:
            db.close()

    def _index_error(self, exc: Exception) -> UserError:
        """One sentence for a failed index operation: a full disk said as such, damage with its remedy."""
        text = str(exc)
        if "full" in text or "I/O error" in text or getattr(exc, "errno", None) == errno.ENOSPC:
            try:
                free = shutil.disk_usage(self.root).free
            except OSError:
                free = None
            if "full" in text or (free is not None and free < DISK_FULL_BYTES):
                return UserError(f"the disk holding the store {self.root} is full (No space left on device); "
                                 "the index was not changed: free some space and run the same command again")
        if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
            return UserError(f"the run index {self.index} is damaged ({text}); nothing was changed: "
                             "`prunelab store rebuild` sets it aside and rebuilds it from the run folders")
        return UserError(f"cannot use the run index {self.index}: {text}")

    def folder(self, run_id: str, owner: str | None = None) -> RunFolder:
        return RunFolder(self.root / run_id, owner)

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
        """Register a run as running (keeping its creation time if it existed) and write its config.

        ``config`` is what ``config.json`` holds (the index keeps it without
        ``data_identity``). Call with the run's lock held: temporary files a
        killed writer left in the folder are removed.
        """
        folder = self.folder(run_id, checkpoint_owner(run_id, config))
        folder.remove_temporaries()
        folder.write_json(CONFIG, config)
        self._upsert(run_id, "running", head, _index_config(config), None, None, time.time())
        return folder

    def _upsert(self, run_id: str, status: str, head: dict[str, Any], config: dict[str, Any],
                summary: dict[str, Any] | None, error: str | None, created: float) -> None:
        """Insert or update a run's row (an existing row keeps its creation time)."""
        with self._connect() as db:
            db.execute(
                """INSERT INTO runs (run_id, status, method, model, dataset, target_sparsity, seed,
                                     config, summary, error, created, updated)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(run_id) DO UPDATE SET status=excluded.status, summary=excluded.summary,
                       error=excluded.error, updated=excluded.updated""",
                (run_id, status, head["method"], head["model"], head["dataset"], head["target_sparsity"],
                 head["seed"], json_text(config), json_text(summary) if summary is not None else None,
                 error, created, time.time()),
            )

    def finish(self, run_id: str, summary: dict[str, Any]) -> None:
        """Store a run's summary (``status`` ok or diverged): ``summary.json`` first, then the index row."""
        self.folder(run_id).write_json(SUMMARY, summary)
        with self._connect() as db:
            fault_point("store")
            db.execute(
                "UPDATE runs SET status=?, summary=?, error=?, updated=? WHERE run_id=?",
                (summary["status"], json_text(summary), summary.get("error"), time.time(), run_id),
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
        """The summary of ``run_id`` if the store holds it finished (status ok) and intact, else None.

        Intact: ``summary.json`` says what the index says and every
        checksummed artifact matches the sha256 it was written with. A damaged
        run raises a :class:`UserError` naming it; it is never used.
        """
        record = self.get(run_id)
        if record is None or record.status != "ok" or record.summary is None:
            return None
        self.verify(record)
        return record.summary

    def verify(self, record: RunRecord) -> None:
        """Raise one sentence naming the run unless its summary file and artifacts match what was recorded."""
        folder = self.root / record.run_id
        try:
            on_disk = json.loads((folder / SUMMARY).read_text())
        except (OSError, ValueError):
            on_disk = None
        if on_disk != record.summary:
            raise _damaged(record.run_id, f"{SUMMARY} is missing or differs from the index")
        for name in CHECKSUMMED:
            self.read_artifact(record, name)

    def read_artifact(self, record: RunRecord, name: str) -> bytes:
        """The bytes of a finished run's ``weights.pt`` or ``mask.pt``, checked against their recorded sha256.

        Runs stored before masks had a recorded checksum are checked for
        consistency instead: every weight the mask removes must be 0.
        """
        assert record.summary is not None
        path = self.root / record.run_id / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _damaged(record.run_id, f"{name} cannot be read ({exc.strerror})") from None
        expected = record.summary.get(CHECKSUMMED[name])
        if expected is None and name == MASK:
            _check_legacy_mask(record.run_id, _load_bytes(data, path), self.load_weights(record.run_id))
        elif hashlib.sha256(data).hexdigest() != expected:
            raise _damaged(record.run_id, f"{name} does not match its recorded sha256")
        return data

    def _finished_record(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        if record is None:
            raise UserError(f"no run {run_id!r} in the store at {self.root}")
        if record.status != "ok" or record.summary is None:
            raise UserError(f"run {run_id} has no result (status {record.status})")
        return record

    def load_weights(self, run_id: str) -> dict[str, torch.Tensor]:
        """A finished run's final weights (state_dict), checked against their recorded sha256."""
        record = self._finished_record(run_id)
        return _load_bytes(self.read_artifact(record, WEIGHTS), self.root / run_id / WEIGHTS)

    def load_masks(self, run_id: str) -> dict[str, torch.Tensor]:
        """A finished run's final masks ``{param name: bool tensor}``, checked."""
        record = self._finished_record(run_id)
        masks = _load_bytes(self.read_artifact(record, MASK), self.root / run_id / MASK)
        return {k: v.bool() for k, v in masks.items()}

    def _run_folders(self) -> list[Path]:
        """Folders under the root named like run ids that hold a config."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if RUN_ID.fullmatch(p.name) and (p / CONFIG).is_file())

    @classmethod
    def repaired(cls, root: Path) -> tuple[Store, int]:
        """The store at ``root`` with its index rebuilt from the run folders, and how many they are.

        A damaged index file is first set aside (renamed ``index.sqlite.damaged-<time>``, kept).
        """
        index = Path(root) / INDEX
        try:
            with sqlite3.connect(index) as db:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for suffix in ("", "-wal", "-shm"):
                old = Path(root) / f"{INDEX}{suffix}"
                if old.exists():
                    old.replace(Path(root) / f"{INDEX}{suffix}.damaged-{stamp}")
            RunFolder.notify(f"set the damaged run index aside as {INDEX}.damaged-{stamp}")
        store = cls(root)
        return store, store.rebuild()

    def rebuild(self) -> int:
        """Rebuild the index rows from the run folders; returns how many runs it holds.

        A folder whose summary and artifacts verify is ``ok`` (or
        ``diverged``); one with a summary that does not verify is ``failed``
        with the reason; one without a summary is ``interrupted`` (running it
        again resumes from its checkpoints, if any).
        """
        folders = self._run_folders()
        for path in folders:
            self._restore_row(path)
        return len(folders)

    def _restore_row(self, path: Path) -> None:
        """Put the index row of the run in ``path`` back (see :meth:`rebuild`)."""
        rid = path.name
        try:
            config = json.loads((path / CONFIG).read_text())
            head = _headline_of(config)
        except (OSError, ValueError, KeyError, TypeError):
            RunFolder.notify(f"skipped {path}: its {CONFIG} is unreadable")
            return
        created = (path / CONFIG).stat().st_mtime
        summary = _read_json(path / SUMMARY)
        status, error = "interrupted", "found without a result when the index was rebuilt"
        if isinstance(summary, dict) and summary.get("status") in ("ok", "diverged"):
            status, error = summary["status"], summary.get("error")
            self._upsert(rid, status, head, _index_config(config), summary, error, created)
            try:
                if status == "ok":
                    self.verify(_record_of(rid, status, head, config, summary, created))
                return
            except UserError as exc:
                status, error = "failed", str(exc)
        self._upsert(rid, status, head, _index_config(config), None, error, created)

    def mark(self, run_id: str, status: str, error: str | None = None) -> None:
        """Set a run's status (``failed``, ``interrupted``) with an optional error message."""
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET status=?, error=?, updated=? WHERE run_id=?",
                (status, error, time.time(), run_id),
            )


def _damaged(run_id: str, what: str) -> UserError:
    return UserError(
        f"run {run_id} in the store is damaged: its {what}; it was not used "
        f"(move the folder {run_id} out of the store to train the run again)"
    )


def _load_bytes(data: bytes, path: Path) -> Any:
    """``torch.load`` of verified bytes with ``weights_only=True``."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any failure means the file is not ours or is damaged)
        raise UserError(f"{path} is not a valid prunelab file ({type(exc).__name__})") from None


def _check_legacy_mask(run_id: str, masks: Any, weights: dict[str, torch.Tensor]) -> None:
    """A mask without a recorded sha256 must fit the weights: same names and shapes, removed weights 0."""
    if not isinstance(masks, dict):
        raise _damaged(run_id, f"{MASK} does not hold masks")
    for name, mask in masks.items():
        weight = weights.get(name)
        if not isinstance(mask, torch.Tensor) or weight is None or mask.shape != weight.shape:
            raise _damaged(run_id, f"{MASK} does not fit its weights ({name})")
        if bool((weight[~mask.bool()] != 0).any()):
            raise _damaged(run_id, f"{MASK} removes weights of {name} that are not 0")


def _index_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the index keeps it: ``config.json`` less the data identity."""
    return {k: v for k, v in config.items() if k != "data_identity"}


def _headline_of(config: dict[str, Any]) -> dict[str, Any]:
    """The index's headline fields from a stored config."""
    return {"method": config["method"]["name"], "model": config["model"]["name"],
            "dataset": config["data"]["dataset"], "target_sparsity": float(config["prune"]["sparsity"]),
            "seed": int(config["seed"])}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _record_of(run_id: str, status: str, head: dict[str, Any], config: dict[str, Any],
               summary: dict[str, Any], created: float) -> RunRecord:
    return RunRecord(run_id, status, head["method"], head["model"], head["dataset"], head["target_sparsity"],
                     head["seed"], _index_config(config), summary, summary.get("error"), created, created)


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
    for name, key in CHECKSUMMED.items():
        expected = bundle.record.summary.get(key)
        if expected is None and name == MASK:
            continue  # stored before masks had a checksum: checked against the weights when read
        if hashlib.sha256(bundle.files[name]).hexdigest() != expected:
            raise UserError(f"run bundle {rid} is damaged ({name} does not match its {key})")


def _record(row: tuple[Any, ...]) -> RunRecord:
    (run_id, status, method, model, dataset, target, seed, config, summary, error, created, updated) = row
    return RunRecord(
        run_id, status, method, model, dataset, target, seed, json.loads(config),
        json.loads(summary) if summary else None, error, created, updated,
    )
