"""Comparing a variant with a reference method over seeds: the difference of mean final test accuracy,
its 95% confidence interval by Welch's t (unequal variances; scipy) and a verdict in words."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

from prunelab.report.tables import Row, Table

#: The method every variant is compared with unless the report is told otherwise.
REFERENCE = "progressive"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Comparison:
    """Mean test accuracy of a variant minus the reference's (fractions), with Welch's 95% interval."""

    difference: float
    low: float
    high: float
    seeds: int
    """The fewer of the two seed counts."""

    @property
    def verdict(self) -> str:
        """``better`` or ``worse`` when the interval excludes 0, else no detectable difference."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return f"no detectable difference at {self.seeds} seeds"


def welch(values: Sequence[float], reference: Sequence[float]) -> Comparison | None:
    """``values`` against ``reference`` (one accuracy per seed each); None with fewer than 2 seeds on a side.

    When neither side varies, the interval is the difference itself (every seed agrees).
    """
    if len(values) < 2 or len(reference) < 2:
        return None
    difference = sum(values) / len(values) - sum(reference) / len(reference)
    seeds = min(len(values), len(reference))
    if len(set(values)) == 1 and len(set(reference)) == 1:
        return Comparison(difference, difference, difference, seeds)
    with warnings.catch_warnings():
        # One side without spread (seeds that agree to the last digit) makes scipy warn of precision
        # loss in its moments; the interval is still Welch's, with that side's variance 0.
        warnings.simplefilter("ignore", RuntimeWarning)
        interval = stats.ttest_ind(values, reference, equal_var=False).confidence_interval(CONFIDENCE)
    low, high = float(interval.low), float(interval.high)
    if math.isnan(low) or math.isnan(high):
        return None
    return Comparison(difference, low, high, seeds)


def reference_row(table: Table, target: float, method: str) -> Row | None:
    """The reference method's row at ``target``: its plain variant when it has one, else its first."""
    rows = [r for r in table.rows if r.method == method and r.target == target]
    return next((r for r in rows if r.label == method), rows[0] if rows else None)


def accuracies(row: Row) -> list[float]:
    """The row's final test accuracies, one per seed (fractions)."""
    return [s.test_acc for s in row.summaries if s.test_acc is not None]


def compare_cells(table: Table, row: Row, method: str) -> tuple[str, str]:
    """The difference cell (points, with the 95% interval) and the verdict cell of ``row`` against ``method``."""
    if row.method == method or row.method == "dense":
        return "—", "—"
    reference = reference_row(table, row.target, method)
    if reference is None:
        return "n/a", f"no {method} run at this sparsity"
    found = welch(accuracies(row), accuracies(reference))
    if found is None:
        return "n/a", "needs 2 seeds on each side"
    return (f"{100 * found.difference:+.2f} [{100 * found.low:+.2f}, {100 * found.high:+.2f}]", found.verdict)
