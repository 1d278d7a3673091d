"""The store as pandas tables: :func:`load_runs` (one row per run) and :func:`load_metrics` (one row per epoch).

pandas is imported inside the functions: prunelab itself does not need it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunelab.errors import UserError
from prunelab.integrations.trackers import fields
from prunelab.runs.store import RunRecord, Store

if TYPE_CHECKING:
    import pandas as pd

#: The index fields every row of :func:`load_runs` starts with, in this order.
RUN_COLUMNS = ("run_id", "status", "method", "model", "dataset", "target_sparsity", "seed", "budget",
               "epochs", "created", "updated", "error")
#: The results every table of :func:`load_runs` has (NaN where a run has none), even an empty one's;
#: other numeric fields of the summaries (``channel_sparsity``, ``itop_rate``, ...) follow by name.
RESULT_COLUMNS = ("sparsity", "test_acc", "test_loss", "val_acc", "selected_epoch", "selected_val_acc",
                  "selected_test_acc", "steps", "wall_s", "train_flops", "dense_train_flops")


def _pandas() -> Any:
    """The pandas module, or one sentence saying how to get it."""
    try:
        import pandas
    except ImportError:
        raise UserError("prunelab.load_runs and load_metrics need pandas, which is not installed: "
                        "pip install pandas") from None
    return pandas


def run_row(record: RunRecord) -> dict[str, Any]:
    """One run as a flat row: its index fields, budget, and every numeric field of a finished run's summary."""
    row: dict[str, Any] = {
        "run_id": record.run_id, "status": record.status, "method": record.method, "model": record.model,
        "dataset": record.dataset, "target_sparsity": record.target_sparsity, "seed": record.seed,
        "budget": record.budget, "epochs": None, "created": record.created, "updated": record.updated,
        "error": record.error,
    }
    if record.result is not None:  # only a finished (ok) run has results; a diverged one has where it stopped
        assert record.summary is not None
        row.update({k: v for k, v in record.summary.items()
                    if k not in row and isinstance(v, (int, float)) and not isinstance(v, bool)})
        row["epochs"] = record.summary.get("epochs")
    return row


def load_runs(store: str | os.PathLike[str]) -> pd.DataFrame:
    """The runs of the store at ``store`` as a DataFrame, one row per run, oldest first.

    Columns: :data:`RUN_COLUMNS` (``created`` and ``updated`` as UTC timestamps),
    :data:`RESULT_COLUMNS`, then every other numeric field of the finished
    runs' summaries, by name (NaN where a run has none).
    Like ``prunelab list runs`` it reads the index: the files of each run are
    not checksummed here (:func:`load_metrics` and ``prunelab show`` do that).
    """
    pandas = _pandas()
    rows = [run_row(r) for r in Store.reader(Path(store)).records()]
    others = sorted({k for r in rows for k in r} - set(RUN_COLUMNS) - set(RESULT_COLUMNS))
    frame = pandas.DataFrame(rows, columns=[*RUN_COLUMNS, *RESULT_COLUMNS, *others])
    for column in ("created", "updated"):
        frame[column] = pandas.to_datetime(frame[column], unit="s", utc=True)
    return frame


def load_metrics(store: str | os.PathLike[str], run_id: str) -> pd.DataFrame:
    """The per-epoch records of one run (``metrics.jsonl``) as a DataFrame, one row per epoch.

    ``run_id``: the id or a unique prefix of it. A finished run's files are
    checked first, as ``prunelab show`` does; a running or interrupted run
    gives its epochs so far. Columns are the record's fields (``cycle``,
    ``phase``, ``epoch``, ``lr``, ``train_loss``, ..., ``mask_sparsity``).
    """
    pandas = _pandas()
    reader = Store.reader(Path(store))
    records = reader.metrics(reader.resolve_id(run_id))
    return pandas.DataFrame(records, columns=fields(records))
