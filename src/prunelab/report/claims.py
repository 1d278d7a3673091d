"""Claims: testable statements about methods (a claims file, e.g. ``studies/claims.yaml``), each checked
against the report's tables with Welch's 95% interval and given a verdict: holds, does not hold or
inconclusive, with the rows it rests on.

A claim compares variant ``a`` with variant ``b`` cell by cell; a cell is one table (no budget, or one
matched budget) at one target sparsity where both have runs. In a cell, with the interval [low, high]
of mean(a) - mean(b) in points of final test accuracy and the claim's margin m:

- ``within`` (|a - b| <= m): holds when -m <= low and high <= m; does not hold when low > m or high < -m;
- ``better`` (a - b > m): holds when low > m; does not hold when high < m;
- ``not_worse`` (a - b >= -m): holds when low > -m; does not hold when high < -m;
- otherwise, or with fewer than 2 seeds on a side, inconclusive.

``cheaper: true`` also asks that a's mean training cost (dense-epoch equivalents) be below b's; a cell
where it is not does not hold. Over its cells a claim holds when at least ``share`` of them hold (default
1: every one), does not hold when more than 1 - share of them do not, and is inconclusive otherwise
(also when the store has no cell for it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelab.config.build import read_yaml_tree
from prunelab.errors import UserError
from prunelab.report.document import Block, Heading, Para, TableBlock
from prunelab.report.stats import Comparison, accuracies, welch
from prunelab.report.tables import Row, Table, config_path, normalize, percent_pm, recipe

TESTS = ("within", "better", "not_worse")
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
_KEYS = {"id", "seed", "text", "a", "b", "test", "margin", "sparsity", "budget", "cheaper", "share"}


@dataclass(frozen=True)
class Claim:
    """One testable statement: ``a`` against ``b`` by ``test`` with ``margin`` (points)."""

    id: str
    text: str
    a: Mapping[str, str]
    b: Mapping[str, str]
    test: str
    source: str = ""
    margin: float = 0.0
    sparsity: tuple[float, float] = (0.0, 1.0)
    budget: str | tuple[int, ...] = "none"
    """``none`` (tables without a budget), ``matched`` (every budget's table) or the budgets to use."""
    cheaper: bool = False
    share: float = 1.0


@dataclass(frozen=True)
class Cell:
    """One table and sparsity where both sides of a claim have runs, and what they say there."""

    table: Table
    target: float
    a: Row
    b: Row
    comparison: Comparison | None
    verdict: str
    why: str = ""


@dataclass(frozen=True)
class Verdict:
    """A claim with its cells and the verdict over them."""

    claim: Claim
    cells: list[Cell] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if not self.cells:
            return INCONCLUSIVE
        holding = sum(c.verdict == HOLDS for c in self.cells) / len(self.cells)
        failing = sum(c.verdict == FAILS for c in self.cells) / len(self.cells)
        if failing > 1 - self.claim.share + 1e-9:
            return FAILS
        return HOLDS if holding >= self.claim.share - 1e-9 else INCONCLUSIVE


# ---------------------------------------------------------------- reading


def read_claims(path: Path) -> list[Claim]:
    """The claims of the YAML file at ``path`` (a mapping with a list ``claims``), each checked."""
    items = read_yaml_tree(Path(path), "claims file").get("claims")
    if not isinstance(items, list) or not items:
        raise UserError(f"{path} must be a mapping with a non-empty list 'claims'")
    claims = [_claim(item, k, path) for k, item in enumerate(items)]
    seen = [c.id for c in claims]
    if len(set(seen)) != len(seen):
        raise UserError(f"claim ids in {path} must be unique, got {sorted(i for i in set(seen) if seen.count(i) > 1)}")
    return claims


def _claim(item: Any, k: int, path: Path) -> Claim:
    where = f"claim {k + 1} of {path}"
    if not isinstance(item, Mapping):
        raise UserError(f"{where} must be a mapping")
    unknown = sorted(set(item) - _KEYS)
    missing = sorted({"id", "text", "a", "b", "test"} - set(item))
    if unknown or missing:
        raise UserError(f"{where}: " + (f"unknown keys {unknown}" if unknown else f"missing keys {missing}")
                        + f"; a claim has {', '.join(sorted(_KEYS))}")
    if item["test"] not in TESTS:
        raise UserError(f"{where}: test must be one of {', '.join(TESTS)}, got {item['test']!r}")
    try:
        low, high = (float(v) for v in item.get("sparsity", (0.0, 1.0)))
        margin, share = float(item.get("margin", 0.0)), float(item.get("share", 1.0))
    except (TypeError, ValueError):
        raise UserError(f"{where}: sparsity must be [low, high], margin and share numbers") from None
    if not (0 <= low <= high <= 1 and margin >= 0 and 0 < share <= 1):
        raise UserError(f"{where}: needs 0 <= sparsity low <= high <= 1, margin >= 0 and share in (0, 1]")
    return Claim(str(item["id"]), str(item["text"]), _selector(item["a"], where), _selector(item["b"], where),
                 item["test"], str(item.get("seed", "")), margin, (low, high), _budget(item.get("budget", "none"),
                 where), bool(item.get("cheaper", False)), share)


def _selector(value: Any, where: str) -> dict[str, str]:
    """``progressive`` or ``{method: iterative, method.schedule: hybrid}`` as field -> normalized value."""
    selector = {"method": value} if isinstance(value, str) else value
    if not isinstance(selector, Mapping) or "method" not in selector:
        raise UserError(f"{where}: a and b must be a method name or a mapping with a method")
    return {str(k): normalize(v) for k, v in selector.items()}


def _budget(value: Any, where: str) -> str | tuple[int, ...]:
    if value in ("none", "matched", None):
        return value or "none"
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise UserError(f"{where}: budget must be none, matched or a list of budgets in epochs, got {value!r}")
    return tuple(values)


# ---------------------------------------------------------------- checking


def matches(row: Row, selector: Mapping[str, str]) -> bool:
    """Whether ``row``'s method and config have every value of ``selector``."""
    variant = dict(row.variant)
    return all(row.method == value if key == "method" else variant.get(config_path(key)) == value
               for key, value in selector.items())


def _tables_for(claim: Claim, tables: Sequence[Table]) -> list[Table]:
    if claim.budget == "none":
        return [t for t in tables if t.budget is None]
    if claim.budget == "matched":
        return [t for t in tables if t.budget is not None]
    return [t for t in tables if t.budget in claim.budget]


def check(claim: Claim, tables: Sequence[Table]) -> Verdict:
    """The claim's cells in ``tables`` and their verdicts."""
    cells = []
    low, high = claim.sparsity
    for table in _tables_for(claim, tables):
        for a in (r for r in table.rows if matches(r, claim.a) and low - 1e-9 <= r.target <= high + 1e-9):
            if a.method == "dense":
                continue
            if claim.b.get("method") == "dense":
                bs = [r for r in table.rows
                      if r.method == "dense" and recipe(r.variant) == recipe(a.variant) and matches(r, claim.b)]
            else:
                bs = [r for r in table.rows if r.target == a.target and matches(r, claim.b)]
            cells += [_cell(claim, table, a, b) for b in bs if b is not a]
    return Verdict(claim, cells)


def _cell(claim: Claim, table: Table, a: Row, b: Row) -> Cell:
    found = welch(accuracies(a), accuracies(b))
    if claim.cheaper:
        if a.cost is None or b.cost is None:
            return Cell(table, a.target, a, b, found, INCONCLUSIVE, "training cost not recorded")
        if a.cost >= b.cost:
            return Cell(table, a.target, a, b, found, FAILS,
                        f"not cheaper: {a.cost:.1f} vs {b.cost:.1f} dense epochs")
    if found is None:
        return Cell(table, a.target, a, b, None, INCONCLUSIVE, "needs 2 seeds on each side")
    return Cell(table, a.target, a, b, found, _verdict(claim, 100 * found.low, 100 * found.high))


def _verdict(claim: Claim, low: float, high: float) -> str:
    """The cell's verdict from the interval of a - b in points."""
    m = claim.margin
    if claim.test == "within":
        return HOLDS if -m <= low and high <= m else FAILS if low > m or high < -m else INCONCLUSIVE
    bound = m if claim.test == "better" else -m
    return HOLDS if low > bound else FAILS if high < bound else INCONCLUSIVE


def describe(claim: Claim) -> str:
    """What the claim tests, in words: ``a - b within ±0.1 points at sparsity 70%-85%, no budget``."""
    relation = {"within": f"within ±{claim.margin:g} points of", "better": f"more than {claim.margin:g} points above",
                "not_worse": f"at most {claim.margin:g} points below"}[claim.test]
    low, high = claim.sparsity
    where = "every sparsity" if (low, high) == (0.0, 1.0) else f"sparsity {100 * low:g}%-{100 * high:g}%"
    budget = {"none": "equal cycle length (no budget)", "matched": "every matched budget"}.get(
        claim.budget if isinstance(claim.budget, str) else "",
        f"budgets {', '.join(map(str, claim.budget))}")
    text = f"{_name(claim.a)} {relation} {_name(claim.b)}, at {where}, {budget}"
    if claim.cheaper:
        text += f", and cheaper than {_name(claim.b)}"
    if claim.share < 1:
        text += f"; in at least {100 * claim.share:g}% of the cells"
    return text


def _name(selector: Mapping[str, str]) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in selector.items() if k != "method")
    return selector["method"] + (f" ({rest})" if rest else "")


def interval_text(comparison: Comparison | None) -> str:
    """``+0.12 [-0.30, +0.54]`` in points, or n/a."""
    if comparison is None or math.isnan(comparison.difference):
        return "n/a"
    c = comparison
    return f"{100 * c.difference:+.2f} [{100 * c.low:+.2f}, {100 * c.high:+.2f}]"


# ---------------------------------------------------------------- the report's section


def claims_section(claims: Sequence[Claim], tables: Sequence[Table], source: str) -> list[Block]:
    """The Claims section: every claim's verdict in one table, then the cells each rests on."""
    verdicts = [check(c, tables) for c in claims]
    blocks: list[Block] = [
        Heading(2, "Claims"),
        Para(f"The claims of `{source}`, each checked on the runs above: per cell (one table, one target "
             "sparsity), Welch's 95% interval of the difference of mean final test accuracy (a - b, points) "
             "against the claim's margin: holds when the interval lies inside the claim, does not hold when "
             "it lies outside it, inconclusive when it straddles the boundary or a side has fewer than 2 "
             "seeds. Over its cells a claim holds when (its share of) every cell holds, does not hold when "
             "a cell (beyond its share) does not, and is inconclusive otherwise or without runs."),
        TableBlock(("claim", "seed", "tested as", "verdict", "cells (holds / does not / inconclusive)"), tuple(
            (f"{v.claim.id}: {v.claim.text}", v.claim.source, describe(v.claim), v.verdict, _counts(v))
            for v in verdicts)),
    ]
    for v in verdicts:
        blocks.append(Heading(3, f"{v.claim.id}: {v.verdict}"))
        if not v.cells:
            blocks.append(Para("No runs in this report for both sides of this claim."))
            continue
        blocks.append(TableBlock(
            ("table", "sparsity", "a", "b", "a - b (points, 95% CI)", "cost a / b (dense epochs)", "verdict"),
            tuple((c.table.title, f"{100 * c.target:g}%", _side(c.a), _side(c.b), interval_text(c.comparison),
                   _costs(c), c.verdict + (f" ({c.why})" if c.why else "")) for c in v.cells)))
    return blocks


def _counts(v: Verdict) -> str:
    return " / ".join(str(sum(c.verdict == kind for c in v.cells)) for kind in (HOLDS, FAILS, INCONCLUSIVE))


def _side(row: Row) -> str:
    return f"{row.label}: {percent_pm(*row.test)} ({len(row.runs)} seeds)"


def _costs(cell: Cell) -> str:
    a, b = cell.a.cost, cell.b.cost
    return "n/a" if a is None or b is None else f"{a:.1f} / {b:.1f}"
