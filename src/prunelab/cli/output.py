"""What the ``prunelab`` command prints: a run's summary and plain tables (``--json`` prints JSON instead)."""

from __future__ import annotations

import math
from typing import Any

from prunelab.io import json_text
from prunelab.runs.summary import RunSummary


def fmt(value: Any) -> str:
    """One table cell: floats to 4 decimals (0.0000 beside 0.9000; 4 significant digits when large, whole
    numbers from 1 as integers), None and NaN as -."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value.is_integer() and abs(value) >= 1:
            return f"{value:.4g}" if abs(value) >= 1e5 else str(int(value))
        return f"{value:.4g}" if abs(value) >= 1e5 else f"{value:.4f}"
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    """A run's summary as aligned lines, or as one JSON object."""
    s = RunSummary.from_dict(summary)
    if as_json:  # in this version's form, also for a summary stored by an older one
        print(json_text(s.as_dict()))
        return
    rows = [
        ("run", s.run_id), ("method", s.method), ("model", s.model), ("dataset", s.dataset), ("seed", s.seed),
        ("target sparsity", s.target_sparsity), ("sparsity (from weights)", s.sparsity),
        *([("channel sparsity", s.channel_sparsity), ("channel cuts", len(s.channel_cuts or []))]
          if s.channel_sparsity is not None else []),
        ("test accuracy (final)", s.test_acc), ("val accuracy (final)", s.val_acc),
        ("test accuracy (val-selected)", s.selected_test_acc), ("selected epoch", s.selected_epoch),
        ("epochs trained", s.epochs), *([("budget (epochs)", s.budget)] if s.budget is not None else []),
        ("optimizer steps", s.steps), ("wall time (s)", s.wall_s),
        ("training FLOPs", s.train_flops), ("dense-equivalent FLOPs", s.dense_train_flops),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {fmt(value)}")
    for note in s.notes or []:
        print(f"note: {note}")


def print_table(rows: list[dict[str, Any]]) -> None:
    """Rows of equal keys as a left-aligned table with a header line."""
    if not rows:
        print("(none)")
        return
    keys = list(rows[0])
    cells = [[fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
