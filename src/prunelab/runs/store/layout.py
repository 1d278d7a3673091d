"""The store's file names, here and nowhere else.

Layout under the store root::

    index.sqlite               one row per run: id, status, headline fields, summary
    <run_id>/config.json       the resolved config
    <run_id>/metrics.jsonl     one record per epoch (a resumed epoch may repeat; the last wins)
    <run_id>/weights.pt        final weights (state_dict), loadable with weights_only=True
    <run_id>/mask.pt           final masks {name: bool tensor}
    <run_id>/summary.json      what `prunelab show` prints
    <run_id>/checkpoint-NNNNNN.pt  the last two epochs' checkpoints (removed when the run finishes)
    <run_id>/.lock             held (flock) by the process training the run
"""

from __future__ import annotations

import re

INDEX = "index.sqlite"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
WEIGHTS = "weights.pt"
MASK = "mask.pt"
SUMMARY = "summary.json"
LOCK = ".lock"
CHECKPOINT_GLOB = "checkpoint-[0-9][0-9][0-9][0-9][0-9][0-9].pt"


def checkpoint_name(sequence: int) -> str:
    """The file name of a run's ``sequence``-th checkpoint."""
    return f"checkpoint-{sequence:06d}.pt"


# What a run bundle may carry: a run's files less its checkpoints and lock. A finished run has at
# least FINISHED_FILES (metrics.jsonl only once it has trained an epoch).
BUNDLE_FILES = (CONFIG, METRICS, WEIGHTS, MASK, SUMMARY)
FINISHED_FILES = (CONFIG, WEIGHTS, MASK, SUMMARY)
# Stored artifacts and the summary field holding the sha256 they were written with.
CHECKSUMMED = {WEIGHTS: "weights_sha256", MASK: "mask_sha256"}
RUN_ID = re.compile(r"[0-9a-f]{12}")
