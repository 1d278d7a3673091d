"""write_report: read the store, build the tables, figures and warnings, write Markdown and HTML."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from prunelab.errors import UserError
from prunelab.report import plots
from prunelab.report.budgets import budget_sections
from prunelab.report.claims import claims_section, read_claims
from prunelab.report.document import Block, Bullets, Heading, Image, Para, TableBlock, to_html, to_markdown
from prunelab.report.masks import iou_matrix, layer_densities, load_mask
from prunelab.report.references import Reference, references_for
from prunelab.report.stats import REFERENCE, compare_cells
from prunelab.report.tables import (
    Row, Table, build_tables, choose_sparsity, filter_records, percent_pm, recipe, with_baseline,
)
from prunelab.io import atomic_write_bytes
from prunelab.runs.store import INDEX, RunRecord, Store

MIN_SEEDS = 3

PROTOCOL = (
    "Protocol: accuracies are on the test split, reported two ways: at the final epoch, and at the "
    "checkpoint selected on the validation split (carved from the training set); the best test "
    "accuracy over epochs is never reported. Means are over seeds and ± is the sample standard "
    "deviation (ddof=1; n/a for one seed). Sparsity is measured from the weights, over prunable "
    "tensors. Training cost counts all the training a run needed, reused runs such as the dense "
    "pretraining included, in dense-epoch equivalents: training FLOPs divided by the FLOPs of one "
    "epoch of dense training of the same model. ITOP is the in-time over-parameterisation rate "
    "(Liu et al. 2021), the share of prunable weights active in at least one training step; moved "
    "counts the connections (re)activated after training started (dynamic sparse training)."
)

RESULT_HEADERS = (
    "method / variant", "target sparsity", "achieved sparsity", "seeds", "final test acc. (%)",
    "vs dense (points)", "val-selected test acc. (%)", "cost (dense epochs)", "epochs", "train FLOPs", "wall (s)",
    "reused runs", "ITOP (%)", "moved",
)


def write_report(
    store_root: Path,
    out: Path,
    where: Mapping[str, str] | None = None,
    layer_sparsity: float | None = None,
    reference: str = REFERENCE,
    claims: Path | None = None,
) -> list[Path]:
    """Write ``report.md``, a self-contained ``report.html`` and every plot (PNG and SVG) into ``out``.

    ``where`` keeps only matching runs (see :func:`~prunelab.report.filter_records`) and the dense
    runs of the same recipe (the baseline is always shown);
    ``layer_sparsity`` is the target sparsity of the per-layer and mask-overlap views
    (default: the highest one shared by the most methods); every variant's final test accuracy
    is compared with ``reference``'s at the same sparsity and budget (Welch's 95% interval, a verdict);
    ``claims``, a claims file (:mod:`prunelab.report.claims`), adds a Claims section with their verdicts.
    Runs with a training budget get a table per budget and a matched-budgets section.
    Returns the written paths.
    """
    checked = read_claims(claims) if claims is not None else []  # a bad claims file stops before any work
    store_root, out = Path(store_root), Path(out)
    if not (store_root / INDEX).exists():
        raise UserError(f"there is no run store at {store_root} (no {INDEX})")
    everything = Store.reader(store_root).records()
    records = filter_records(everything, where)
    if not records:
        raise UserError(f"no run in the store at {store_root} matches {_where_text(where)}")
    records = with_baseline(everything, records, where)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(records)
    written: list[Path] = []
    blocks: list[Block] = [Heading(1, "prunelab report"), Para(PROTOCOL), Para(_counts(store_root, records, where))]
    if claims is not None:
        blocks += claims_section(checked, tables, claims.name if claims.is_absolute() else str(claims))
    blocks += budget_sections(tables, out, reference, written)
    for table in tables:
        blocks += _table_section(table, store_root, out, layer_sparsity, written, reference)
    blocks += _warnings(records, tables)
    atomic_write_bytes(out / "report.md", to_markdown(blocks).encode())
    atomic_write_bytes(out / "report.html", to_html(blocks, "prunelab report").encode())
    return [*written, out / "report.md", out / "report.html"]


def _where_text(where: Mapping[str, str] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in where.items()) if where else "no filter"


def _counts(store_root: Path, records: Sequence[RunRecord], where: Mapping[str, str] | None) -> str:
    by_status: dict[str, int] = {}
    for r in records:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    counts = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
    # A report is meant to be shared: an absolute path would only name folders of this machine.
    shown = store_root.name if store_root.is_absolute() else store_root
    return f"Store: `{shown}`. Filter: {_where_text(where)}. Runs: {counts}."


# ---------------------------------------------------------------- formatting


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _epochs(value: float | None) -> str:
    if value is None:
        return "n/a"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _reused(row: Row) -> str:
    counts = sorted({len(ids) for ids in row.reused})
    return "n/a" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def _vs_dense(table: Table, row: Row) -> str:
    """Mean final test accuracy minus that of the dense run of the same recipe, in points ("n/a" without one)."""
    dense = [d for d in table.rows if d.method == "dense" and recipe(d.variant) == recipe(row.variant)]
    if row.method == "dense" or len(dense) != 1 or row.test[0] is None or dense[0].test[0] is None:
        return "n/a"
    return f"{100 * (row.test[0] - dense[0].test[0]):+.2f}"


def result_headers(reference: str = REFERENCE) -> tuple[str, ...]:
    """The results table's column names; the last two compare with the ``reference`` method."""
    return (*RESULT_HEADERS, f"vs {reference} (points, 95% CI)", f"vs {reference}: verdict")


def result_rows(table: Table, reference: str = REFERENCE) -> list[tuple[str, ...]]:
    """The cells of the results table, one tuple per row of ``table``."""
    cells = []
    for row in table.rows:
        selected = percent_pm(*row.selected)
        if 0 < row.n_selected < len(row.runs):
            selected += f" ({row.n_selected} seeds)"
        achieved = row.achieved
        cells.append((
            row.label, plots.pct(row.target), "n/a" if achieved is None else f"{100 * achieved:.2f}%",
            str(len(row.runs)), percent_pm(*row.test), _vs_dense(table, row), selected, _num(row.cost, ".1f"),
            _epochs(row.epochs),
            _num(row.flops, ".2e"), _num(row.wall, ".1f"), _reused(row),
            "n/a" if row.itop is None else f"{100 * row.itop:.1f}", _num(row.moved, ".0f"),
            *compare_cells(table, row, reference),
        ))
    return cells


# ---------------------------------------------------------------- one (model, dataset)


def _slug(table: Table) -> str:
    budget = f"_budget{table.budget}" if table.budget else ""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{table.model}_{table.dataset}{budget}")


def _table_section(
    table: Table, store_root: Path, out: Path, layer_sparsity: float | None, written: list[Path],
    reference: str = REFERENCE,
) -> list[Block]:
    slug, colors = _slug(table), plots.colors_for(table.labels)
    refs = references_for(table.model, table.dataset)
    blocks: list[Block] = [Heading(2, table.title), Heading(3, "Results"),
                           TableBlock(result_headers(reference), tuple(result_rows(table, reference)))]

    blocks.append(Heading(3, "Accuracy vs sparsity"))
    written += plots.save(plots.accuracy_vs_density(table, refs, colors), out, f"{slug}_accuracy_vs_sparsity")
    caption = ("Final-epoch test accuracy (mean ± sample std over seeds) against sparsity; "
               "dense as a line with a ± std band")
    if refs:
        caption += "; published numbers as black markers"
    blocks.append(Image(out, f"{slug}_accuracy_vs_sparsity", caption))
    blocks += _references(table, refs)

    blocks.append(Heading(3, "Accuracy vs training cost"))
    written += plots.save(plots.accuracy_vs_cost(table, colors), out, f"{slug}_accuracy_vs_cost")
    blocks.append(Image(out, f"{slug}_accuracy_vs_cost",
                        "Final-epoch test accuracy against training cost (dense-epoch equivalents, log), "
                        "one panel per target sparsity; the step line is the Pareto front "
                        "(best accuracy for at most that cost), its points circled"))

    blocks += _curves_section(table, store_root, out, layer_sparsity, colors, written)
    blocks += _mask_sections(table, store_root, out, layer_sparsity, colors, written)
    blocks += [Heading(3, "Runs"), TableBlock(
        ("method / variant", "target sparsity", "seed: run id", "reused runs (ids)"),
        tuple((row.label, plots.pct(row.target), ", ".join(f"{r.seed}: {r.run_id}" for r in row.runs),
               ", ".join(sorted({i for ids in row.reused for i in ids})) or "none")
              for row in table.rows))]
    return blocks


def _references(table: Table, refs: Sequence[Reference]) -> list[Block]:
    if not refs:
        if table.dataset == "fashion-mnist":
            return [Para("No published pruning table for Fashion-MNIST is known, so no published numbers "
                         "are overlaid: the methods are compared side by side on the same harness.")]
        return [Para(f"No published numbers for {table.model} on {table.dataset} are in the reference "
                     "table shipped with prunelab (`prunelab.report.references`).")]
    return [
        Para("Published numbers overlaid (other code, budgets and protocols: read the caveats before "
             "comparing):"),
        TableBlock(("source", "sparsity", "top-1 (%)", "training", "caveat"), tuple(
            (r.source, plots.pct(r.sparsity), f"{r.top1:.2f}" + (f" ± {r.std:.2f}" if r.std is not None else ""),
             r.training, r.caveat) for r in refs)),
    ]


def shared_seed(rows: Sequence[Row]) -> int:
    """One seed for every variant, so that views of single runs compare methods, not initialisations:
    the lowest seed they all have (else the lowest of any; variants without it are then named)."""
    seeds = [{r.seed for r in row.runs} for row in rows]
    common = set.intersection(*seeds) if seeds else set()
    return min(common or set().union(*seeds) or {0})


def _curves_section(
    table: Table, store_root: Path, out: Path, wanted: float | None,
    colors: Mapping[str, tuple[float, ...]], written: list[Path],
) -> list[Block]:
    """Validation accuracy and sparsity against epoch for the runs of one grid cell (one seed), dense included."""
    sparsity = choose_sparsity(table, wanted)
    if sparsity is None:
        return []
    rows = [r for r in table.rows if r.target == sparsity or r.method == "dense"]
    seed = shared_seed(rows)
    store = Store.reader(store_root)
    series = {}
    for row in rows:
        run = row.run_of(seed)
        records = store.folder(run.run_id).metrics() if run is not None else []
        if records:
            series[row.label] = records
    if not series:
        return []
    at, stem = plots.pct(sparsity), f"{_slug(table)}_epochs"
    written += plots.save(plots.epoch_curves(series, colors, f"{table.title}: the runs at "
                                             f"sparsity {at}, seed {seed}"), out, stem)
    return [Heading(3, f"Training curves at sparsity {at}"),
            Image(out, stem, f"Validation accuracy and the masks' sparsity after every epoch of each run at "
                             f"target sparsity {at} and of the dense run, seed {seed}")]


def _masks_of(rows: Sequence[Row], store: Store, seed: int) -> tuple[dict[str, dict], list[str]]:
    """The mask of each row's run of ``seed`` by label, and what could not be read (named, never drawn)."""
    masks: dict[str, dict] = {}
    missing = []
    for row in rows:
        run = row.run_of(seed)
        if run is None:
            missing.append(f"{row.label} (no run with seed {seed})")
            continue
        try:
            mask = load_mask(store, run.run_id)
        except UserError as exc:  # a damaged run is named, never drawn
            missing.append(f"`{run.run_id}` ({row.label}, seed {run.seed}: {exc})")
            continue
        if mask is None:
            missing.append(f"`{run.run_id}` ({row.label}, seed {run.seed})")
        else:
            masks[row.label] = mask
    return masks, missing


def _mask_sections(
    table: Table, store_root: Path, out: Path, wanted: float | None,
    colors: Mapping[str, tuple[float, ...]], written: list[Path],
) -> list[Block]:
    sparsity = choose_sparsity(table, wanted)
    if sparsity is None:
        targets = ", ".join(plots.pct(t) for t in table.targets if t > 0) or "none"
        why = (f"no runs at sparsity {plots.pct(wanted)} (pruned targets here: {targets})"
               if wanted is not None else "no pruned runs")
        return [Heading(3, "Per-layer density and mask overlap"), Para(f"Not drawn: {why}.")]
    at = plots.pct(sparsity)
    pruned = [r for r in table.rows if r.target == sparsity and r.method != "dense"]
    # A channel run removes channels instead of masking weights: its masks cover other shapes.
    rows = [r for r in pruned if not any(s.channel_cuts for s in r.summaries)]
    channels = [r.label for r in pruned if r not in rows]
    seed = shared_seed(rows)
    masks, missing = _masks_of(rows, Store.reader(store_root), seed)
    blocks: list[Block] = [Heading(3, f"Per-layer density at sparsity {at}"),
                           Para(f"Masks of seed {seed} of each variant at target sparsity {at} (the lowest "
                                "seed they all have, so that the overlap below compares methods from the same "
                                "initialisation).")]
    if missing:
        blocks.append(Para("No usable mask.pt for: " + ", ".join(missing) + "."))
    if channels:
        blocks.append(Para("Not drawn (channels removed, not masked: the layers have other shapes): "
                           + ", ".join(channels) + "."))
    if not masks:
        return blocks
    series = {label: layer_densities(m) for label, m in masks.items()}
    layers = list(dict.fromkeys(name for m in masks.values() for name in m))
    stem = f"{_slug(table)}_layer_density"
    written += plots.save(plots.layer_density(layers, series, colors, f"{table.title}: "
                                              f"per-layer density at sparsity {at}"), out, stem)
    blocks.append(Image(out, stem, f"Fraction of weights each variant keeps per layer at sparsity {at}"))
    sizes = {name: m[name].numel() for m in masks.values() for name in m}
    blocks.append(TableBlock(("layer", "weights", *series), tuple(
        (name, str(sizes[name]), *(_num(s.get(name), ".4f") for s in series.values())) for name in layers)))

    blocks.append(Heading(3, f"Mask overlap (IoU) at sparsity {at}"))
    labels = list(masks)
    if len(labels) < 2:
        return blocks + [Para("Only one variant has a mask at this sparsity: nothing to compare.")]
    matrix = iou_matrix([masks[label] for label in labels])
    stem = f"{_slug(table)}_mask_iou"
    written += plots.save(plots.iou_heatmap(labels, matrix, f"IoU of kept weights at sparsity {at}"), out, stem)
    blocks.append(Image(out, stem, f"Intersection over union of kept weights between variants at sparsity {at} "
                                   f"(seed {seed} of each); 1 = the same mask, 0 = disjoint"))
    blocks.append(TableBlock(("", *labels), tuple(
        (label, *(f"{v:.3f}" for v in matrix[i])) for i, label in enumerate(labels))))
    return blocks


# ---------------------------------------------------------------- warnings


def _who(r: RunRecord) -> str:
    return f"`{r.run_id}` ({r.method}, {r.model}/{r.dataset}, sparsity {plots.pct(r.target_sparsity)}, seed {r.seed})"


def find_warnings(records: Sequence[RunRecord], tables: Sequence[Table]) -> dict[str, list[str]]:
    """Warning lines by kind: collapse, few seeds, missed target, failed, diverged, unfinished."""
    ok = [(r, result) for r in records if (result := r.result) is not None]
    found: dict[str, list[str]] = {
        "Layer collapse": [f"{_who(r)}: every weight pruned in {', '.join(s.collapsed_layers)} "
                           "(the network is disconnected)"
                           for r, s in ok if s.collapsed_layers],
        f"Fewer than {MIN_SEEDS} seeds": [
            f"{t.title}: {row.label} at sparsity {plots.pct(row.target)}: {len(row.runs)} seed(s) "
            f"({', '.join(map(str, row.seeds))})"
            for t in tables for row in t.rows if len(row.runs) < MIN_SEEDS],
        "Target sparsity missed": [
            f"{_who(r)}: achieved {100 * s.sparsity:.4f}% < target {plots.pct(r.target_sparsity)}"
            for r, s in ok if r.method != "dense" and s.sparsity is not None
            and s.sparsity < r.target_sparsity - 1e-6],
        "Failed runs": [f"{_who(r)}: {r.error or 'no error recorded'}" for r in records if r.status == "failed"],
        # A diverged run has no result: it is named here and never enters a table or a plot.
        "Diverged runs": [f"{_who(r)}: {r.error or 'the loss stopped being finite'}"
                          for r in records if r.status == "diverged"],
        "Unfinished runs": [
            f"{_who(r)}: " + ("still running (or killed before it could be marked)" if r.status == "running"
                              else r.status + (f": {r.error}" if r.error else ""))
            for r in records if r.status not in ("ok", "failed", "diverged")]
            + [f"{_who(r)}: marked ok but has no summary" for r in records if r.status == "ok" and r.summary is None],
    }
    return {kind: lines for kind, lines in found.items() if lines}


def _warnings(records: Sequence[RunRecord], tables: Sequence[Table]) -> list[Block]:
    found = find_warnings(records, tables)
    blocks: list[Block] = [Heading(2, "Warnings")]
    if not found:
        return blocks + [Para("No warnings.")]
    for kind, lines in found.items():
        blocks += [Heading(3, f"{kind} ({len(lines)})"), Bullets(tuple(lines))]
    return blocks
