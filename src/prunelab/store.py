"""The result store: an SQLite index (WAL) plus one folder per run.

Layout under the store root::

    index.sqlite               one row per run: id, status, headline fields, summary
    <run_id>/config.json       the resolved config
    <run_id>/metrics.jsonl     one record per epoch (a resumed epoch may repeat; the last wins)
    <run_id>/weights.pt        final weights (state_dict), loadable with weights_only=True
    <run_id>/mask.pt           final masks {name: bool tensor}
    <run_id>/summary.json      what `prunelab show` prints
    <run_id>/checkpoint.pt     the last epoch's checkpoint (removed when the run finishes)

Every file is written to a temporary name, flushed to disk and renamed, so a
crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import UserError

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; results are meant to be shared
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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
        """Checkpointer: keep the latest state."""
        atomic_torch_save(self.path / "checkpoint.pt", state)

    def load(self) -> dict[str, Any] | None:
        """Checkpointer: the latest state, if any."""
        path = self.path / "checkpoint.pt"
        return safe_torch_load(path) if path.exists() else None

    def drop_checkpoint(self) -> None:
        (self.path / "checkpoint.pt").unlink(missing_ok=True)


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
        except sqlite3.DatabaseError as exc:
            raise UserError(f"the run index {self.index} is unusable: {exc}") from None
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
            db.execute(
                "UPDATE runs SET status=?, summary=?, error=NULL, updated=? WHERE run_id=?",
                (summary["status"], json.dumps(summary, sort_keys=True), time.time(), run_id),
            )

    def mark(self, run_id: str, status: str, error: str | None = None) -> None:
        """Set a run's status (``failed``, ``interrupted``) with an optional error message."""
        with self._connect() as db:
            db.execute(
                "UPDATE runs SET status=?, error=?, updated=? WHERE run_id=?",
                (status, error, time.time(), run_id),
            )


def _record(row: tuple[Any, ...]) -> RunRecord:
    (run_id, status, method, model, dataset, target, seed, config, summary, error, created, updated) = row
    return RunRecord(
        run_id, status, method, model, dataset, target, seed, json.loads(config),
        json.loads(summary) if summary else None, error, created, updated,
    )
