"""The result store: an SQLite index (WAL) plus one folder per run.

- :mod:`~prunelab.runs.store.layout`: the file names, here and nowhere else;
- :mod:`~prunelab.runs.store.index`: the SQLite index and :class:`RunRecord`;
- :mod:`~prunelab.runs.store.folder`: one run's files (:class:`RunFolder`);
- :mod:`~prunelab.runs.store.checkpoints`: checksummed checkpoints;
- :mod:`~prunelab.runs.store.bundle`: a run moving between stores (Ray);
- :mod:`~prunelab.runs.store.store`: :class:`Store`, which ties them together
  and verifies every read.
"""

from prunelab.runs.store.bundle import RunBundle
from prunelab.runs.store.checkpoints import CHECKPOINT_MAGIC, checkpoint_owner, load_checkpoint
from prunelab.runs.store.folder import RunFolder
from prunelab.runs.store.index import RunRecord
from prunelab.runs.store.layout import BUNDLE_FILES, CONFIG, INDEX, MASK, METRICS, SUMMARY, WEIGHTS
from prunelab.runs.store.store import Store

__all__ = [
    "BUNDLE_FILES", "CHECKPOINT_MAGIC", "CONFIG", "INDEX", "MASK", "METRICS", "SUMMARY", "WEIGHTS", "RunBundle",
    "RunFolder", "RunRecord", "Store", "checkpoint_owner", "load_checkpoint",
]
