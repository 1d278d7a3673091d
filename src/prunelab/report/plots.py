"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display).

Each function returns a :class:`~matplotlib.figure.Figure`; :func:`save` writes
it as PNG and SVG with fixed sizes, a fixed SVG hash salt and no dates, so the
same store gives byte-identical files.
"""

from __future__ import annotations

import io
import math
from typing import Any
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

from prunelab.report.references import Reference
from prunelab.report.tables import Row, Table, pareto_front
from prunelab.io import atomic_write_bytes

STYLE = {
    "svg.hashsalt": "prunelab",
    "svg.fonttype": "path",
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
REFERENCE_MARKERS = ("*", "D", "P", "X", "^", "v", "s", "h")
SPARSITY_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")


@contextmanager
def style() -> Iterator[None]:
    """The report's matplotlib settings, for building and saving a figure."""
    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, out: Path, stem: str) -> list[Path]:
    """Write ``out/stem.png`` and ``out/stem.svg`` (atomically); return both paths."""
    paths = []
    for fmt, metadata in (("png", {"Software": None}), ("svg", {"Date": None})):
        buffer = io.BytesIO()
        with style():
            fig.savefig(buffer, format=fmt, dpi=120, metadata=metadata)
        path = out / f"{stem}.{fmt}"
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths


def colors_for(labels: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One colour per variant label, stable in label order."""
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def pct(sparsity: float) -> str:
    """0.9 -> "90%", 0.729 -> "72.9%"."""
    return f"{100 * sparsity:.2f}".rstrip("0").rstrip(".") + "%"


def _acc(row: Row) -> tuple[float, float] | None:
    mean, std = row.test
    if mean is None or math.isnan(mean):
        return None
    return 100 * mean, 100 * (std or 0.0)


OUTLIER_POINTS = 15.0  # means this far below the best are drawn at the bottom edge, labelled


def _mark_outliers(ax: Any, points: Sequence[tuple[float, float, float, str]]) -> None:
    """Keep the axis on the methods that work: a collapsed run (10% accuracy) would squash the rest."""
    if not points:
        return
    floor = max(y for _, y, _, _ in points) - OUTLIER_POINTS
    low = [(x, y, label) for x, y, _, label in points if y < floor]
    if not low:
        return
    top = max(y + e for _, y, e, _ in points if y >= floor)
    ax.set_ylim(floor - 0.5, top + 0.5)
    for k, (x, y, label) in enumerate(low):
        ax.plot([x], [floor], marker="v", color="black", ms=6, clip_on=False)
        ax.annotate(f"{label}: {y:.1f}% (off scale)", (x, floor), xytext=(4, 6 + 10 * (k % 3)),
                    textcoords="offset points", fontsize=7)


def accuracy_vs_density(
    table: Table, references: Sequence[Reference], colors: Mapping[str, tuple[float, ...]]
) -> Figure:
    """Final test accuracy against weights remaining (log, inverted: sparsity grows to the right)."""
    with style():
        fig = new_figure(9.0, 4.8)
        ax = fig.add_subplot()
        densities: list[float] = []
        points: list[tuple[float, float, float, str]] = []  # (x, mean, std, label) of every plotted mean
        for label in table.labels:
            rows = [r for r in table.rows_of(label) if _acc(r) is not None]
            if not rows:
                continue
            color = colors[label]
            if rows[0].method == "dense":
                for r in rows:
                    mean, std = _acc(r)  # type: ignore[misc]
                    ax.axhspan(mean - std, mean + std, color=color, alpha=0.15, lw=0)
                    ax.axhline(mean, color=color, ls="--", lw=1.2, label=f"{label} (mean ± std)")
                continue
            xs = [1.0 - r.target for r in rows]
            densities += xs
            ys, es = zip(*(_acc(r) for r in rows))  # type: ignore[misc]
            points += [(x, y, e, label) for x, y, e in zip(xs, ys, es)]
            ax.errorbar(xs, ys, yerr=es, color=color, marker="o", ms=4, capsize=3, lw=1.2, label=label)
        for k, source in enumerate(dict.fromkeys(r.source for r in references)):
            refs = [r for r in references if r.source == source]
            xs = [1.0 - r.sparsity for r in refs]
            densities += xs
            ax.errorbar(
                xs, [r.top1 for r in refs], yerr=[r.std or 0.0 for r in refs], ls="none",
                marker=REFERENCE_MARKERS[k % len(REFERENCE_MARKERS)], ms=8, mfc="none",
                color="black", capsize=2, label=f"published: {source}",
            )
        _mark_outliers(ax, points)
        # Inverted (dense on the left), with a margin, set before the log scale so that a single x
        # never autoscales to a singular range. Dense is the band; no empty tick stands for it.
        densities = densities or [1.0]
        ax.set_xlim(max(densities) * 1.25, min(densities) * 0.8)
        ax.set_xscale("log")
        ticks = sorted({1.0 - t for t in table.targets if t > 0} or {1.0})
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(ticks, [pct(1.0 - d) for d in ticks], rotation=45)
        ax.set_xlabel("target sparsity (x: weights remaining, log scale)")
        ax.set_ylabel("final-epoch test accuracy (%)")
        ax.set_title(f"{table.title}: accuracy vs sparsity")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    return fig


def accuracy_vs_cost(table: Table, colors: Mapping[str, tuple[float, ...]]) -> Figure:
    """One small panel per target sparsity: accuracy against training cost, with the Pareto front."""
    targets = [t for t in table.targets if t > 0] or table.targets
    dense = [r for r in table.rows if r.method == "dense" and r.cost is not None and _acc(r) is not None]
    with style():
        fig, axes = _panels(len(targets), {1: 1, 2: 2, 3: 3, 4: 2}.get(len(targets), 3), 3.6, 3.0)
        for ax, target in zip(axes, targets):
            rows = [r for r in table.rows if r.target == target and r.cost is not None and _acc(r) is not None]
            points = [(r.cost, _acc(r)[0]) for r in rows]  # type: ignore[index]
            for r, (cost, mean) in zip(rows, points):
                ax.errorbar([cost], [mean], yerr=[_acc(r)[1]], color=colors[r.label],  # type: ignore[index]
                            marker="o", ms=5, capsize=3)
            for r in dense if target > 0 else []:
                ax.plot([r.cost], [_acc(r)[0]], marker="D", ms=5, color="grey", ls="none")  # type: ignore[index]
            front = [points[i] for i in pareto_front(points)]
            if front:
                xs, ys = [p[0] for p in front], [p[1] for p in front]
                # From the first to the last point of the front, not on past it to the edge.
                ax.step(xs, ys, where="post", color="black", lw=1, alpha=0.7)
                ax.scatter(xs, ys, s=110, facecolors="none", edgecolors="black", lw=1.2, zorder=3)
            costs = [p[0] for p in points] + [r.cost for r in dense if target > 0]
            if costs:  # a fixed margin, set before the log scale so a single cost is not a singular range
                ax.set_xlim(min(costs) / 1.6, max(costs) * 1.6)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"sparsity {pct(target)}", fontsize=9)
            ax.set_xlabel("training cost (dense-epoch equivalents)")
            ax.set_ylabel("final test acc. (%)")
        names = [label for label in table.labels if any(r.target in targets for r in table.rows_of(label))]
        handles = [Line2D([], [], color=colors[label], marker="o", ls="none") for label in names]
        handles += [Line2D([], [], color="black", lw=1, marker="o", mfc="none", ms=9)]
        names += ["Pareto front (best accuracy for at most that cost)"]
        if dense:
            handles.append(Line2D([], [], color="grey", marker="D", ls="none"))
            names.append("dense (for reference, not in the front)")
        fig.legend(handles, names, loc="outside right upper", fontsize=7, frameon=False)
        fig.suptitle(f"{table.title}: accuracy vs training cost")
    return fig


def _panels(count: int, ncols: int, width: float, height: float) -> tuple[Figure, list[Any]]:
    """A figure with ``count`` panels of ``width`` x ``height`` inches in ``ncols`` columns (room for a
    legend at the right); the grid's spare cells hidden. Call within :func:`style`."""
    nrows = math.ceil(count / ncols) or 1
    fig = new_figure(width * ncols + 3.2, height * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def layer_density(
    layers: Sequence[str], series: Mapping[str, Mapping[str, float]],
    colors: Mapping[str, tuple[float, ...]], title: str,
) -> Figure:
    """Grouped bars: per layer, the density each variant's mask keeps (log y when densities spread)."""
    n = max(1, len(series))
    width = min(22.0, max(6.5, 2.5 + 0.11 * len(layers) * (n + 1)))
    with style():
        fig = new_figure(width, 4.2)
        ax = fig.add_subplot()
        values = [d for s in series.values() for d in s.values()]
        positive = [v for v in values if v > 0]
        log = bool(positive) and min(positive) < 0.1 * max(positive)
        bar = 0.8 / n
        for k, (label, dens) in enumerate(series.items()):
            xs = [i - 0.4 + bar * (k + 0.5) for i in range(len(layers))]
            ys = [dens.get(name, math.nan) for name in layers]
            ax.bar(xs, ys, width=bar, color=colors[label], label=label)
            if log:
                for x, y in zip(xs, ys):
                    if y == 0:  # a collapsed layer has no bar on a log axis: say so
                        ax.annotate("0", (x, 0), xycoords=("data", "axes fraction"), ha="center",
                                    va="bottom", fontsize=6, color=colors[label])
        if log:
            ax.set_yscale("log")
        ax.set_xticks(range(len(layers)), [name.removesuffix(".weight") for name in layers],
                      rotation=60, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        ax.set_ylabel("density (fraction of weights kept)")
        # The title over the axes and the legend beside them: a figure-level title met the legend.
        ax.set_title(title)
        fig.legend(loc="outside right upper", fontsize=7, frameon=False)
    return fig


def iou_heatmap(labels: Sequence[str], matrix: Sequence[Sequence[float]], title: str) -> Figure:
    """Annotated heatmap of the IoU of kept weights between variants' masks."""
    n = len(labels)
    with style():
        fig = new_figure(max(4.5, 2.5 + 0.8 * n), max(3.5, 1.8 + 0.6 * n))
        ax = fig.add_subplot()
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.grid(False)
        for i in range(n):
            for j in range(n):
                value = matrix[i][j]
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value < 0.6 else "black")
        ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        fig.colorbar(image, ax=ax, label="IoU of kept weights")
        ax.set_title(title)
    return fig


def epoch_curves(
    series: Mapping[str, Sequence[Mapping[str, Any]]], colors: Mapping[str, tuple[float, ...]], title: str
) -> Figure:
    """Validation accuracy and mask sparsity against the epochs of each run (every cycle, in order)."""
    with style():
        fig = new_figure(10.0, 3.6)
        acc_ax, sparsity_ax = fig.subplots(1, 2)
        for label, records in series.items():
            xs = range(1, len(records) + 1)
            acc = [100 * r["val_acc"] if r.get("val_acc") is not None else math.nan for r in records]
            # Records written before the field's rename call it "sparsity".
            sparsity = [100 * r.get("mask_sparsity", r.get("sparsity", math.nan)) for r in records]
            acc_ax.plot(xs, acc, color=colors[label], lw=1.2, label=label)
            sparsity_ax.plot(xs, sparsity, color=colors[label], lw=1.2)
        acc_ax.set_ylabel("validation accuracy (%)")
        sparsity_ax.set_ylabel("sparsity of the masks (%)")
        for ax in (acc_ax, sparsity_ax):
            ax.set_xlabel("epoch of the run (all its cycles, pretraining excluded)")
        fig.suptitle(title)
        fig.legend(loc="outside right upper", fontsize=7, frameon=False)
    return fig



def accuracy_vs_budget(tables: Sequence[Table], colors: Mapping[str, tuple[float, ...]]) -> Figure:
    """One panel per target sparsity: final test accuracy against the training budget (log), a line per
    variant across the budget tables of one (model, dataset); dense as a dashed grey line."""
    targets = sorted({r.target for t in tables for r in t.rows if r.target > 0})
    budgets = sorted(t.budget for t in tables if t.budget is not None)
    labels = list(dict.fromkeys(label for t in tables for label in t.labels))
    dense = {r.label for t in tables for r in t.rows if r.method == "dense"}
    looks = {label: dict(marker="D", ls="--", color="grey") if label in dense
             else dict(marker="o", ls="-", color=colors[label]) for label in labels}
    with style():
        fig, axes = _panels(len(targets), min(len(targets), 3) or 1, 3.8, 3.2)
        for ax, target in zip(axes, targets):
            for label in labels:
                points = [(t.budget, _acc(r)) for t in tables for r in t.rows_of(label)
                          if (r.target == target or r.method == "dense") and _acc(r) is not None]
                if not points:
                    continue
                xs, accs = [p[0] for p in points], [p[1] for p in points]
                ax.errorbar(xs, [a[0] for a in accs], yerr=[a[1] for a in accs], capsize=3, lw=1.2, ms=4,
                            **looks[label])
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_title(f"sparsity {pct(target)}", fontsize=9)
            ax.set_xlabel("training budget (epochs, log)")
            ax.set_ylabel("final test acc. (%)")
        handles = [Line2D([], [], **looks[label]) for label in labels]
        # Centred beside the panels: at the upper right the legend met the figure's title.
        fig.legend(handles, labels, loc="outside right center", fontsize=7, frameon=False)
        fig.suptitle(f"{tables[0].model} on {tables[0].dataset}: accuracy vs matched training budget "
                     "(mean ± std over seeds)")
    return fig
