"""From store records to report rows: filtering, variants, and per-(variant, sparsity) statistics.

A *variant* is a set of runs whose resolved configs are identical except for
the seed and the target sparsity; a *row* is one variant at one target
sparsity, aggregated over its seeds. Only runs with status ``ok`` enter rows.
Runs with a training budget (``train.budget``) form a table per budget, and
there a variant ignores what the budget decided (:data:`prunelab.methods.SPENT_FIELDS`:
each method's cycle length), so that one method is one variant at every budget.
"""

from __future__ import annotations

import difflib
import functools
import math
import statistics
from functools import cached_property
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prunelab.config.build import build_config
from prunelab.config.identity import to_dict
from prunelab.errors import UserError
from prunelab.methods import SPENT_FIELDS
from prunelab.runs.store import RunRecord
from prunelab.runs.summary import RunSummary

# Fields of the index row (and of every summary), usable in ``where`` as they are.
INDEX_FIELDS = ("run_id", "status", "method", "model", "dataset", "seed", "target_sparsity")
# Short names accepted in ``where``; the config's own aliases (config.ALIASES) plus the index name.
FILTER_ALIASES = {
    "sparsity": "target_sparsity",
    "epochs": "train.epochs",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
}
# Config paths that distinguish rows, seeds or tables, never variants.
NOT_VARIANT = ("seed", "prune.sparsity", "train.budget")


def normalize(value: Any) -> str:
    """A canonical string for comparing values: 0.9, "0.90" and "9e-1" all give "0.9"; 30 and "30.0" give "30"."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(normalize(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {normalize(v)}" for k, v in sorted(value.items())) + "}"
    text = str(value).strip()
    if text.lower() in ("none", "null"):
        return "none"
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text.lower()
    return str(int(number)) if number.is_integer() else repr(number)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Leaves of a nested config as dotted paths: {"train": {"lr": 0.1}} -> {"train.lr": 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _field_value(record: RunRecord, field: str, flat: Mapping[str, Any]) -> tuple[bool, Any]:
    if field in INDEX_FIELDS:
        return True, getattr(record, field)
    return (True, flat[field]) if field in flat else (False, None)


def config_path(field: str) -> str:
    """A field as the stored config spells it: ``method.power`` is ``method.settings.power`` there."""
    field = FILTER_ALIASES.get(field, field)
    if field.startswith("method.") and field != "method.name" and not field.startswith("method.settings."):
        return "method.settings." + field[len("method."):]
    return field


def user_path(path: str) -> str:
    """A stored config path as a user writes it (``--set method.power=3``): the inverse of :func:`config_path`."""
    return "method." + path[len("method.settings."):] if path.startswith("method.settings.") else path


# Filters that a dense run (the baseline) need not match to be shown: it has no method settings and no target.
_BASELINE_FREE = ("method", "target_sparsity")


def with_baseline(records: Iterable[RunRecord], kept: Sequence[RunRecord], where: Mapping[str, str] | None
                  ) -> list[RunRecord]:
    """``kept`` plus the dense runs of ``records`` that match every ``where`` field other than the method,
    the sparsity and method settings: the baseline is shown whatever the filter picks."""
    rest = {k: v for k, v in (where or {}).items()
            if config_path(k) not in _BASELINE_FREE and not config_path(k).startswith("method.settings.")}
    dense = [r for r in filter_records([r for r in records if r.method == "dense"], rest) if r not in kept]
    return [*kept, *dense]


def filter_records(records: Iterable[RunRecord], where: Mapping[str, str] | None) -> list[RunRecord]:
    """The records whose every ``where`` field equals its value (compared by :func:`normalize`).

    Fields: the index fields (method, model, dataset, seed, target_sparsity, status,
    run_id), dotted config paths (train.epochs, method.power or method.settings.power),
    and the aliases sparsity, epochs, lr, batch_size. A record lacking a config path
    does not match; a field that no record has is a :class:`UserError`.
    """
    records = list(records)
    if not where:
        return records
    flats = [flatten(r.config) for r in records]
    known = set(INDEX_FIELDS).union(*(f.keys() for f in flats)) if flats else set(INDEX_FIELDS)
    wanted: list[tuple[str, str]] = []
    for raw_field, value in where.items():
        field = config_path(raw_field)
        if records and field not in known:
            choices = sorted(known | set(FILTER_ALIASES))
            close = difflib.get_close_matches(raw_field, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"unknown report filter field {raw_field!r}{hint}; use method, model, dataset, seed, "
                "sparsity, epochs or a dotted config path such as train.lr"
            )
        wanted.append((field, normalize(value)))
    kept = []
    for record, flat in zip(records, flats):
        for field, value in wanted:
            present, actual = _field_value(record, field, flat)
            if not present or normalize(actual) != value:
                break
        else:
            kept.append(record)
    return kept


# ---------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None for fewer than 2 values."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def percent_pm(mean: float | None, std: float | None) -> str:
    """Accuracy fractions as ``89.14 ± 0.10`` (percent), ``n/a`` for what is missing."""
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f} ± " + (f"{100 * std:.2f}" if std is not None else "n/a")


def dense_epochs(summary: RunSummary) -> float | None:
    """Training cost as epochs of dense training of the same model: train_flops / (dense FLOPs per epoch)."""
    flops, dense, epochs = summary.train_flops, summary.dense_train_flops, summary.epochs
    if not flops or not dense or not epochs:
        return None
    return flops * epochs / dense


def _mean_of(values: Iterable[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.fmean(present) if present else None


@dataclass(frozen=True)
class Row:
    """One variant at one target sparsity, aggregated over its seeds (runs sorted by seed)."""

    model: str
    dataset: str
    method: str
    variant: tuple[tuple[str, str], ...]
    label: str
    target: float
    runs: tuple[RunRecord, ...]

    def run_of(self, seed: int) -> RunRecord | None:
        """This variant's run with ``seed``, if it has one."""
        return next((r for r in self.runs if r.seed == seed), None)

    @cached_property
    def summaries(self) -> list[RunSummary]:
        """The runs' summaries (by seed), parsed once for all the columns read from them."""
        return [RunSummary.from_dict(r.summary) for r in self.runs if r.summary is not None]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def achieved(self) -> float | None:
        return _mean_of(s.sparsity for s in self.summaries)

    @property
    def test(self) -> tuple[float | None, float | None]:
        """Final-epoch test accuracy (fraction): mean, sample std."""
        return mean_std([s.test_acc for s in self.summaries if s.test_acc is not None])

    @property
    def selected(self) -> tuple[float | None, float | None]:
        """Test accuracy of the validation-selected checkpoint: mean, sample std (over seeds that have one)."""
        return mean_std([s.selected_test_acc for s in self.summaries if s.selected_test_acc is not None])

    @property
    def n_selected(self) -> int:
        return sum(s.selected_test_acc is not None for s in self.summaries)

    @property
    def cost(self) -> float | None:
        """Mean training cost in dense-epoch equivalents."""
        return _mean_of(dense_epochs(s) for s in self.summaries)

    @property
    def epochs(self) -> float | None:
        return _mean_of(s.epochs for s in self.summaries)

    @property
    def flops(self) -> float | None:
        return _mean_of(s.train_flops for s in self.summaries)

    @property
    def wall(self) -> float | None:
        return _mean_of(s.wall_s for s in self.summaries)

    @property
    def itop(self) -> float | None:
        """Mean in-time over-parameterisation rate (runs stored before it was recorded have none)."""
        return _mean_of(s.itop_rate for s in self.summaries)

    @property
    def moved(self) -> float | None:
        """Mean number of connections (re)activated after the start of training."""
        return _mean_of(s.connections_moved for s in self.summaries)

    @property
    def reused(self) -> list[list[str]]:
        """Per run (by seed), the ids of stored runs whose cost it includes."""
        return [list(s.reused_runs or []) for s in self.summaries]


@dataclass(frozen=True)
class Table:
    """All rows of one (model, dataset, budget), sorted by method (dense first), variant label, sparsity.

    ``budget`` is the runs' ``train.budget`` in epochs, None for runs without one (their cycle
    length is then part of each variant)."""

    model: str
    dataset: str
    rows: tuple[Row, ...]
    budget: int | None = None

    @property
    def title(self) -> str:
        """``lenet300 on fashion-mnist``, with ``, budget 40 epochs`` for a budget's table."""
        return f"{self.model} on {self.dataset}" + (f", budget {self.budget} epochs" if self.budget else "")

    @property
    def labels(self) -> list[str]:
        """Variant labels in row order, each once."""
        return list(dict.fromkeys(r.label for r in self.rows))

    def rows_of(self, label: str) -> list[Row]:
        return [r for r in self.rows if r.label == label]

    @property
    def targets(self) -> list[float]:
        return sorted({r.target for r in self.rows})


def method_rank(method: str) -> tuple[int, str]:
    """Sort key: dense first, then alphabetical (the report knows no method registry)."""
    return (0 if method == "dense" else 1, method)


def budget_of(record: RunRecord) -> int | None:
    """The run's ``train.budget`` (None without one)."""
    budget = record.config.get("train", {}).get("budget")
    return None if budget is None else int(budget)


@functools.cache
def _defaults(method: str) -> dict[str, Any]:
    """Every config path of ``method`` at its default, as this version writes configs ({} for a method
    this version does not know)."""
    try:
        return flatten(to_dict(build_config({"method.name": method})))
    except UserError:
        return {}


def variant_key(record: RunRecord) -> tuple[tuple[str, str], ...]:
    """The config that makes the run's variant: all but :data:`NOT_VARIANT` and, under a budget, what
    the budget set. A field the run's config lacks (stored before the field existed) counts at its
    default: the run ids promise that a field added at its default changes nothing."""
    flat = {**_defaults(record.method), **flatten(record.config)}
    skip = NOT_VARIANT + (SPENT_FIELDS if budget_of(record) is not None else ())
    return tuple(sorted((k, normalize(v)) for k, v in flat.items() if k not in skip))


def _labels(keys: Sequence[tuple[tuple[str, str], ...]], method: str) -> dict[tuple, str]:
    """Method name plus the config fields whose values differ between these variants of ``method``."""
    dicts = [dict(k) for k in keys]
    paths = sorted(set().union(*dicts)) if dicts else []
    differing = [p for p in paths if len({d.get(p, "unset") for d in dicts}) > 1]
    labels = {}
    for key, d in zip(keys, dicts):
        parts = [f"{user_path(p)}={d.get(p, 'unset')}" for p in differing]
        labels[key] = f"{method} ({', '.join(parts)})" if parts else method
    return labels


def build_tables(records: Iterable[RunRecord]) -> list[Table]:
    """One :class:`Table` per (model, dataset, budget) of the ``ok`` records that carry a summary
    (tables without a budget first, then by budget)."""
    ok = [r for r in records if r.status == "ok" and r.summary is not None]
    reused = {i for r in ok for i in (r.result.reused_runs if r.result else [])}
    keys = sorted({(r.model, r.dataset, budget_of(r)) for r in ok}, key=lambda k: (k[0], k[1], k[2] or 0))
    tables = [_table([r for r in ok if (r.model, r.dataset, budget_of(r)) == key], reused, *key) for key in keys]
    return [t for t in tables if t.rows]


def _table(mine: Sequence[RunRecord], reused: set[str], model: str, dataset: str, budget: int | None) -> Table:
    groups: dict[tuple[str, tuple, float], list[RunRecord]] = {}
    for r in mine:
        groups.setdefault((r.method, variant_key(r), float(r.target_sparsity)), []).append(r)
    # Dense runs that are no pruned variant's baseline (a budget run's dense pretraining of a few
    # epochs) are the cost of other runs, not a result: they get no row. Without pruned runs beside
    # them, dense runs that other runs reused are that pretraining; a dense run of its own stays.
    recipes = [recipe(k) for m, k, _ in groups if m != "dense"]
    groups = {(m, k, t): runs for (m, k, t), runs in groups.items()
              if m != "dense" or (recipe(k) in recipes if recipes else not {r.run_id for r in runs} <= reused)}
    labels: dict[tuple, str] = {}
    for method in {m for m, _, _ in groups}:
        keys = list(dict.fromkeys(k for m, k, _ in groups if m == method))
        labels.update(_labels(keys, method))
    rows = [
        Row(model, dataset, method, key, labels[key], target, tuple(sorted(runs, key=lambda r: r.seed)))
        for (method, key, target), runs in groups.items()
    ]
    rows.sort(key=lambda r: (method_rank(r.method), r.label, r.target))
    return Table(model, dataset, tuple(rows), budget)


# The config paths that make a recipe: a variant is compared with the dense run that shares them.
RECIPE = ("train.", "data.", "model.")


def recipe(variant: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """A variant's training, data and model settings: what its dense baseline shares with it."""
    return {k: v for k, v in variant if k.startswith(RECIPE)}


def choose_sparsity(table: Table, wanted: float | None) -> float | None:
    """The target sparsity for per-layer views: ``wanted`` if the table has it, else None;
    by default the highest target that the most (non-dense) methods share."""
    targets = [t for t in table.targets if t > 0]
    if wanted is not None:
        return next((t for t in targets if math.isclose(t, wanted, abs_tol=1e-9)), None)
    if not targets:
        return None
    methods_at = {t: {r.method for r in table.rows if r.target == t and r.method != "dense"} for t in targets}
    return max(targets, key=lambda t: (len(methods_at[t]), t))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points on the front "best accuracy for at most this cost".

    A point is on the front when every point at most as costly is strictly less
    accurate (of exact duplicates the first is kept). Points with a NaN or None
    coordinate are ignored. The indices come in increasing cost.
    """
    valid = [
        i for i, (c, a) in enumerate(points)
        if c is not None and a is not None and not math.isnan(c) and not math.isnan(a)
    ]
    front: list[int] = []
    best = -math.inf
    for i in sorted(valid, key=lambda i: (points[i][0], -points[i][1], i)):
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
