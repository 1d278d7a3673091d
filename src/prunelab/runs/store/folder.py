"""The files of one run: config, metrics, weights, masks, summary, and its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prunelab.io import atomic_write_bytes, json_text, sha256_hex, torch_bytes
from prunelab.runs.store.checkpoints import Checkpoints, notify
from prunelab.runs.store.layout import METRICS


class RunFolder:
    """The files of one run; also the trainer's checkpointer (:class:`~prunelab.training.protocols.Checkpointer`).

    ``owner`` (see :func:`~prunelab.runs.store.checkpoints.checkpoint_owner`)
    is written into every checkpoint; a checkpoint with another owner (copied
    from another run, or written for another config or other data) is refused
    and set aside, never resumed.
    """

    def __init__(self, path: Path, owner: str | None = None) -> None:
        self.path = path
        self.owner = owner
        self._checkpoints = Checkpoints(path, owner)
        path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, obj: Any) -> None:
        """Write ``obj`` as strict, indented JSON to ``name`` atomically."""
        atomic_write_bytes(self.path / name, (json_text(obj, indent=2) + "\n").encode())

    def write_torch(self, name: str, obj: Any) -> str:
        """``torch.save`` ``obj`` to ``name`` atomically; returns the sha256 of the bytes written."""
        data = torch_bytes(obj)
        atomic_write_bytes(self.path / name, data)
        return sha256_hex(data)

    def remove_temporaries(self) -> None:
        """Delete the temporary files a killed writer left (``.NAME.XXXX.tmp``); call with the run lock held."""
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one epoch's record to the metrics file."""
        # Appending one short line is effectively atomic; a torn last line is skipped on read.
        with open(self.path / METRICS, "a") as f:
            f.write(json_text(record) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        """Per-epoch records, one per (cycle, epoch): a record repeated by a resume keeps its last copy."""
        return read_metrics(self.path)

    def save(self, state: dict[str, Any]) -> None:
        """Checkpointer: write the state with its checksum, keep it and the one before."""
        self._checkpoints.save(state)

    def load(self) -> dict[str, Any] | None:
        """Checkpointer: the newest intact checkpoint of this run, if any (damaged ones are set aside)."""
        return self._checkpoints.load()

    def checkpoints(self) -> list[Path]:
        """This run's checkpoint files, oldest first."""
        return self._checkpoints.paths()

    def drop_checkpoint(self) -> None:
        """Remove the run's checkpoints (it is finished)."""
        self._checkpoints.drop()

    @staticmethod
    def notify(message: str) -> None:
        """Tell the user about something the run recovered from (one line on stderr)."""
        notify(message)


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The per-epoch records of the run in ``folder``, one per (cycle, epoch), in order; a record
    repeated by a resume keeps its last copy (read only: nothing is created)."""
    path = folder / METRICS
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
