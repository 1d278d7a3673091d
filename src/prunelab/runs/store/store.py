"""The result store: the SQLite index plus one folder per run, and the checks on every read.

Every file is written to a temporary name, flushed to disk and renamed
(:func:`prunelab.io.atomic_write_bytes`), so a crash leaves either the old
file or the new one. A finished run's weights and masks are read only after
their sha256 matches the one recorded in its summary. The run lock is an
advisory ``flock``: the kernel releases it when its holder dies, so a killed
process never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import UserError
from prunelab.io import atomic_write_bytes, sha256_hex, torch_loads
from prunelab.runs.store.bundle import RunBundle, check_bundle
from prunelab.runs.store.checkpoints import checkpoint_owner, notify
from prunelab.runs.store.folder import RunFolder, read_metrics
from prunelab.runs.store.index import Index, RunRecord, set_aside_if_damaged
from prunelab.runs.store.layout import BUNDLE_FILES, CHECKSUMMED, CONFIG, INDEX, LOCK, MASK, RUN_ID, SUMMARY, WEIGHTS


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
        self.index = Index(self.root, readonly)
        if readonly:
            if self.index.lost() and self._run_folders():
                raise UserError(f"the run index {self.index.path} is missing and the store is read-only, "
                                "so it cannot be rebuilt; run `prunelab store rebuild` where it is writable")
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the store at {self.root}: {exc.strerror}") from None
        lost = self.index.lost()
        self.index.create()
        if lost and self._run_folders():
            found = self.rebuild()
            notify(f"the run index {self.index.path} was missing or empty; rebuilt it from {found} run folders")

    @classmethod
    def reader(cls, root: Path) -> Store:
        """The store at ``root`` opened for reading only when it exists, else created (nothing to read yet)."""
        root = Path(root)
        return cls(root, readonly=(root / INDEX).is_file() and not os.access(root, os.W_OK))

    def folder(self, run_id: str, owner: str | None = None) -> RunFolder:
        """The folder of ``run_id`` (created if missing); ``owner`` is what its checkpoints record."""
        return RunFolder(self.root / run_id, owner)

    def get(self, run_id: str) -> RunRecord | None:
        """The index row of ``run_id``, if any."""
        return self.index.get(run_id)

    def records(self) -> list[RunRecord]:
        """Every run's index row, oldest first."""
        return self.index.records()

    def resolve_id(self, prefix: str) -> str:
        """The full id of the one run whose id starts with ``prefix``."""
        ids = self.index.ids_starting(prefix)
        if len(ids) == 1:
            return ids[0]
        if not ids:
            raise UserError(f"no run {prefix!r} in the store at {self.root}")
        raise UserError(f"run id prefix {prefix!r} matches {len(ids)} runs; give more characters")

    def begin(self, run_id: str, config: dict[str, Any], head: dict[str, Any]) -> RunFolder:
        """Register a run as running (keeping its creation time if it existed) and write its config.

        ``config`` is what ``config.json`` holds (the index keeps it without
        ``data_identity``). Call with the run's lock held: temporary files a
        killed writer left in the folder are removed.
        """
        folder = self.folder(run_id, checkpoint_owner(run_id, config))
        folder.remove_temporaries()
        folder.write_json(CONFIG, config)
        self.index.put(_record_of(run_id, "running", head, config, None, None, time.time()))
        return folder

    def finish(self, run_id: str, summary: dict[str, Any]) -> None:
        """Store a run's summary (``status`` ok or diverged): ``summary.json`` first, then the index row."""
        self.folder(run_id).write_json(SUMMARY, summary)
        self.index.set_summary(run_id, summary)

    def mark(self, run_id: str, status: str, error: str | None = None) -> None:
        """Set a run's status (``failed``, ``interrupted``) with an optional error message."""
        self.index.mark(run_id, status, error)

    @contextmanager
    def lock(self, run_id: str, on_wait: Callable[[str], None] = notify) -> Iterator[None]:
        """Hold the run's lock for the block, waiting (and saying so) while another process holds it.

        An advisory ``flock`` on ``<run_id>/.lock``: released by the kernel when
        the holder exits or dies, so there is no stale lock to clean up.
        """
        path = self.root / run_id / LOCK
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

    # ------------------------------------------------------------ moving runs between stores

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
        check_bundle(bundle)
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
            self.index.put(record)
        return True

    # ------------------------------------------------------------ verified reads

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
        if _read_json(self.root / record.run_id / SUMMARY) != record.summary:
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
            _check_legacy_mask(record.run_id, torch_loads(data, path), self.load_weights(record.run_id))
        elif sha256_hex(data) != expected:
            raise _damaged(record.run_id, f"{name} does not match its recorded sha256")
        return data

    def load_weights(self, run_id: str) -> dict[str, torch.Tensor]:
        """A finished run's final weights (state_dict), checked against their recorded sha256."""
        record = self._finished_record(run_id)
        return torch_loads(self.read_artifact(record, WEIGHTS), self.root / run_id / WEIGHTS)

    def load_masks(self, run_id: str) -> dict[str, torch.Tensor]:
        """A finished run's final masks ``{param name: bool tensor}``, checked."""
        record = self._finished_record(run_id)
        masks = torch_loads(self.read_artifact(record, MASK), self.root / run_id / MASK)
        return {k: v.bool() for k, v in masks.items()}

    def _finished_record(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        if record is None:
            raise UserError(f"no run {run_id!r} in the store at {self.root}")
        if record.status != "ok" or record.summary is None:
            raise UserError(f"run {run_id} has no result (status {record.status})")
        return record

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        """The per-epoch records of ``run_id`` (any status: a running run's epochs so far).

        A finished run's files must first pass :meth:`verify`, as for every other read of its result.
        """
        record = self.get(run_id)
        if record is None:
            raise UserError(f"no run {run_id!r} in the store at {self.root}")
        if record.status == "ok" and record.summary is not None:
            self.verify(record)
        return read_metrics(self.root / run_id)

    # ------------------------------------------------------------ rebuilding the index

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
        set_aside_if_damaged(Path(root))
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
            notify(f"skipped {path}: its {CONFIG} is unreadable")
            return
        created = (path / CONFIG).stat().st_mtime
        summary = _read_json(path / SUMMARY)
        status, error = "interrupted", "found without a result when the index was rebuilt"
        if isinstance(summary, dict) and summary.get("status") in ("ok", "diverged"):
            status, error = summary["status"], summary.get("error")
            record = _record_of(rid, status, head, config, summary, error, created)
            self.index.put(record)
            try:
                if status == "ok":
                    self.verify(record)
                return
            except UserError as exc:
                status, error = "failed", str(exc)
        self.index.put(_record_of(rid, status, head, config, None, error, created))


def _damaged(run_id: str, what: str) -> UserError:
    return UserError(
        f"run {run_id} in the store is damaged: its {what}; it was not used "
        f"(move the folder {run_id} out of the store to train the run again)"
    )


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
               summary: dict[str, Any] | None, error: str | None, created: float) -> RunRecord:
    """An index row; the index keeps the config without its ``data_identity`` (``config.json`` has it)."""
    index_config = {k: v for k, v in config.items() if k != "data_identity"}
    return RunRecord(run_id, status, head["method"], head["model"], head["dataset"], head["target_sparsity"],
                     head["seed"], index_config, summary, error, created, time.time())
