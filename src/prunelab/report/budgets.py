"""The matched-budget view: every method given the same total training, compared budget by budget.

Runs with ``train.budget`` form one table per budget (:func:`prunelab.report.tables.build_tables`); this
section puts a (model, dataset)'s budget tables side by side: accuracy against budget, one panel per
sparsity, and one table of mean accuracy and the difference to the reference method at each budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prunelab.report import plots
from prunelab.report.document import Block, Heading, Image, Para, TableBlock
from prunelab.report.stats import compare_cells
from prunelab.report.tables import Table, percent_pm

SHORT = {"better": "better", "worse": "worse"}  # any other verdict is "no detectable difference"


def budget_sections(tables: Sequence[Table], out: Path, reference: str, written: list[Path]) -> list[Block]:
    """One section per (model, dataset) that has budget tables (none when no run has a budget)."""
    groups: dict[tuple[str, str], list[Table]] = {}
    for table in tables:
        if table.budget is not None:
            groups.setdefault((table.model, table.dataset), []).append(table)
    blocks: list[Block] = []
    for (model, dataset), mine in groups.items():
        blocks += _section(model, dataset, sorted(mine, key=lambda t: t.budget or 0), out, reference, written)
    return blocks


def _section(model: str, dataset: str, tables: Sequence[Table], out: Path, reference: str,
             written: list[Path]) -> list[Block]:
    labels = list(dict.fromkeys(label for t in tables for label in t.labels))
    colors = plots.colors_for(labels)
    stem = f"{model}_{dataset}_accuracy_vs_budget".replace("/", "-")
    written += plots.save(plots.accuracy_vs_budget(tables, colors), out, stem)
    budgets = [t.budget for t in tables]
    headers = ["method / variant", "target sparsity"]
    for b in budgets:
        headers += [f"{b} ep: final test acc. (%)", f"{b} ep: vs {reference} (points, 95% CI)"]
    keys = list(dict.fromkeys((r.label, r.target) for t in tables for r in t.rows))
    keys.sort(key=lambda k: (k[1] > 0, k[1], k[0]))
    cells = []
    for label, target in keys:
        line = [label, plots.pct(target)]
        for table in tables:
            row = next((r for r in table.rows_of(label) if r.target == target), None)
            if row is None:
                line += ["—", "—"]
                continue
            difference, verdict = compare_cells(table, row, reference)
            line.append(f"{percent_pm(*row.test)} ({len(row.runs)})")
            line.append(difference if difference in ("—", "n/a")
                        else f"{difference} {SHORT.get(verdict, 'n.d.')}")
        cells.append(tuple(line))
    return [
        Heading(2, f"{model} on {dataset}: matched budgets"),
        Para(f"Every method trained for the same total budget ({', '.join(map(str, budgets))} epochs, dense "
             "pretraining included), spent by its rule (docs/methods.md, section 9). Each cell: final test "
             f"accuracy, mean ± sample std (seeds), and the difference of means to {reference} at the same "
             "budget and sparsity with Welch's 95% interval: better or worse when the interval excludes 0, "
             "n.d. (no detectable difference) when it does not. — : no run (a budget that leaves the "
             "method's cycles under one epoch is skipped by the sweep)."),
        Image(out, stem, "Final test accuracy against the training budget, one panel per target sparsity "
                         "(mean ± sample std over seeds); dense dashed"),
        TableBlock(tuple(headers), tuple(cells)),
    ]
