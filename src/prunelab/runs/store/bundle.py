"""A run as it moves between stores: its index row and the bytes of its files.

A sweep on a Ray cluster trains each run in a private store on a worker node
and the driver imports the bundle, so only the driver ever writes the real
store. A bundle is checked before anything of it is written.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunelab.errors import UserError
from prunelab.io import sha256_hex
from prunelab.runs.store.index import RunRecord
from prunelab.runs.store.layout import BUNDLE_FILES, CHECKSUMMED, FINISHED_FILES, MASK, RUN_ID


@dataclass(frozen=True)
class RunBundle:
    """One run as it moves between stores: its index row and its files' bytes by name (no checkpoints)."""

    record: RunRecord
    files: dict[str, bytes]


def check_bundle(bundle: RunBundle) -> None:
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
        if sha256_hex(bundle.files[name]) != expected:
            raise UserError(f"run bundle {rid} is damaged ({name} does not match its {key})")
