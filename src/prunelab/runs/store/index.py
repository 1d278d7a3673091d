"""The store's SQLite index (WAL, one transaction per call): one row per run.

The index is a cache of the run folders (:meth:`Store.rebuild` restores it
from them). Every failure of SQLite is one sentence: a full disk said as
such, a damaged index with its remedy.
"""

from __future__ import annotations

import errno
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelab.errors import UserError
from prunelab.faults import fault_point
from prunelab.io import json_text
from prunelab.runs.store.checkpoints import notify
from prunelab.runs.store.layout import INDEX
from prunelab.runs.summary import RunSummary

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

    @property
    def result(self) -> RunSummary | None:
        """The typed summary of a finished (``ok``) run; None for any other status."""
        return RunSummary.from_dict(self.summary) if self.status == "ok" and self.summary is not None else None

    @property
    def budget(self) -> int | None:
        """The run's ``train.budget`` from its config (None: no budget, or a config stored before budgets)."""
        return self.config.get("train", {}).get("budget")


class Index:
    """The index file ``index.sqlite`` of the store at ``root``; ``readonly`` opens it immutable."""

    def __init__(self, root: Path, readonly: bool = False) -> None:
        self.root = root
        self.path = root / INDEX
        self.readonly = readonly

    def lost(self) -> bool:
        """True when the index file is missing or empty (to be rebuilt from the run folders)."""
        return not self.path.is_file() or self.path.stat().st_size == 0

    def create(self) -> None:
        """Create the table if it is not there, in WAL mode."""
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection holding one transaction: committed on success, rolled back on error."""
        try:
            if self.readonly:
                # immutable: a read-only medium cannot hold the WAL's shared-memory file.
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, timeout=60.0)
            else:
                db = sqlite3.connect(self.path, timeout=60.0)
        except sqlite3.Error as exc:
            raise UserError(f"cannot open the run index {self.path}: {exc}") from None
        try:
            with db:
                yield db
        except (sqlite3.DatabaseError, OSError) as exc:  # corrupted, locked too long, disk full
            raise self._error(exc) from None
        finally:
            db.close()

    def _error(self, exc: Exception) -> UserError:
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
            return UserError(f"the run index {self.path} is damaged ({text}); nothing was changed: "
                             "`prunelab store rebuild` sets it aside and rebuilds it from the run folders")
        return UserError(f"cannot use the run index {self.path}: {text}")

    def get(self, run_id: str) -> RunRecord | None:
        """The row of ``run_id``, if any."""
        with self.connect() as db:
            row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _record(row) if row else None

    def ids_starting(self, prefix: str) -> list[str]:
        """The run ids that start with ``prefix`` (taken literally, not as a LIKE pattern)."""
        with self.connect() as db:
            rows = db.execute(
                "SELECT run_id FROM runs WHERE run_id LIKE ? ESCAPE '\\'",
                (prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",),
            ).fetchall()
        return [r[0] for r in rows]

    def records(self) -> list[RunRecord]:
        """Every row, oldest first."""
        with self.connect() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY created").fetchall()
        return [_record(r) for r in rows]

    def put(self, record: RunRecord) -> None:
        """Insert ``record``, or update an existing row's status, summary, error and time (keeping its creation)."""
        with self.connect() as db:
            db.execute(
                """INSERT INTO runs (run_id, status, method, model, dataset, target_sparsity, seed,
                                     config, summary, error, created, updated)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(run_id) DO UPDATE SET status=excluded.status, summary=excluded.summary,
                       error=excluded.error, updated=excluded.updated""",
                (record.run_id, record.status, record.method, record.model, record.dataset,
                 record.target_sparsity, record.seed, json_text(record.config),
                 json_text(record.summary) if record.summary is not None else None,
                 record.error, record.created, record.updated),
            )

    def set_summary(self, run_id: str, summary: dict[str, Any]) -> None:
        """Record a finished run's summary and its status (``ok`` or ``diverged``)."""
        with self.connect() as db:
            fault_point("store")
            db.execute(
                "UPDATE runs SET status=?, summary=?, error=?, updated=? WHERE run_id=?",
                (summary["status"], json_text(summary), summary.get("error"), time.time(), run_id),
            )

    def mark(self, run_id: str, status: str, error: str | None = None) -> None:
        """Set a run's status (``failed``, ``interrupted``) with an optional error message."""
        with self.connect() as db:
            db.execute(
                "UPDATE runs SET status=?, error=?, updated=? WHERE run_id=?",
                (status, error, time.time(), run_id),
            )


def set_aside_if_damaged(root: Path) -> None:
    """Rename a damaged index file (and its WAL files) to ``index.sqlite.damaged-<time>``, kept."""
    index = root / INDEX
    try:
        with sqlite3.connect(index) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = root / f"{INDEX}{suffix}"
            if old.exists():
                old.replace(root / f"{INDEX}{suffix}.damaged-{stamp}")
        notify(f"set the damaged run index aside as {INDEX}.damaged-{stamp}")


def _record(row: tuple[Any, ...]) -> RunRecord:
    (run_id, status, method, model, dataset, target, seed, config, summary, error, created, updated) = row
    return RunRecord(
        run_id, status, method, model, dataset, target, seed, json.loads(config),
        json.loads(summary) if summary else None, error, created, updated,
    )
