"""A run's checkpoints: checksummed files, the last two kept, damaged or foreign ones set aside.

A checkpoint is ``CHECKPOINT_MAGIC``, the sha256 of the payload, then the
payload (``torch.save`` of the state, loaded back with ``weights_only=True``).
One that fails the check is renamed ``*.damaged`` (kept for inspection) and
the run resumes from the one before. Every checkpoint records its owner (the
run id and the sha256 of its config, data included), so one copied from
another run is refused, never resumed.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import UserError
from prunelab.io import atomic_write_bytes, torch_bytes
from prunelab.runs.store.layout import CHECKPOINT_GLOB, checkpoint_name

CHECKPOINT_MAGIC = b"PRUNELAB-CHECKPOINT-1\n"
KEEP_CHECKPOINTS = 2


def notify(message: str) -> None:
    """Tell the user about something the store recovered from (one line on stderr)."""
    print(f"prunelab: {message}", file=sys.stderr, flush=True)


def checkpoint_owner(run_id: str, config: dict[str, Any]) -> str:
    """What a run's checkpoints record as their owner: its id and the sha256 of its config (data included)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return f"{run_id}/{digest[:16]}"


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


class Checkpoints:
    """The checkpoints in one run folder, written for ``owner`` (see :func:`checkpoint_owner`)."""

    def __init__(self, folder: Path, owner: str | None) -> None:
        self.folder = folder
        self.owner = owner

    def paths(self) -> list[Path]:
        """This run's checkpoint files, oldest first."""
        return sorted(self.folder.glob(CHECKPOINT_GLOB))

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` with its checksum as the newest checkpoint; keep it and the one before."""
        payload = torch_bytes({**state, "owner": self.owner})
        sequence = max((_sequence(p) for p in self.paths()), default=0) + 1
        data = CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload
        atomic_write_bytes(self.folder / checkpoint_name(sequence), data, fault="checkpoint")
        for old in self.paths()[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)

    def load(self) -> dict[str, Any] | None:
        """The newest checkpoint that passes its checksum and belongs to this run, if any.

        A damaged or foreign one is reported in one sentence, renamed
        ``*.damaged`` and the one before it is tried.
        """
        for path in reversed(self.paths()):
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
                notify(f"{exc}; resuming from the checkpoint before it")
        return None

    def drop(self) -> None:
        """Remove every checkpoint (the run is finished)."""
        for path in self.paths():
            path.unlink(missing_ok=True)


def _sequence(path: Path) -> int:
    return int(path.stem.rpartition("-")[2])
