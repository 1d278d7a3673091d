"""The report layer on a hand-built store: tables, plots, warnings, filters, masks, Pareto front."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from prunelab.errors import UserError
from prunelab.report import (
    build_tables,
    filter_records,
    iou_matrix,
    mask_iou,
    normalize,
    pareto_front,
    references_for,
    find_warnings,
    write_report,
)
from prunelab.report import plots
from prunelab.runs.store import Store

from fake_runs import LAYERS, add_run, mask_keeping

PROG_ACC = (0.90, 0.91, 0.95)
PROG_SEL = (0.91, 0.92, 0.96)
GEOMETRIC = {"schedule": "geometric", "fine_tune_epochs": 5}
HYBRID = {"schedule": "hybrid", "fine_tune_epochs": 5}


def build_store(root: Path) -> Path:
    """The shared hand-built store: 4 methods (5 variants) x 2 sparsities x 3 seeds, and trouble."""
    store = Store(root)
    first12 = list(range(12))  # 90% sparsity keeps 12 of 120 weights
    dense_ids = [add_run(store, "dense", 0.0, s, test_acc=0.90 + 0.001 * s) for s in range(3)]
    for s in range(3):
        add_run(store, "progressive", 0.9, s, test_acc=PROG_ACC[s], selected=PROG_SEL[s],
                kept=first12 if s == 0 else None)
        add_run(store, "progressive", 0.5, s, test_acc=0.89)
        add_run(store, "iterative", 0.9, s, settings=HYBRID, epochs=60, train_flops=4e12, dense_flops=6e12,
                reused=(dense_ids[s],), kept=first12 if s == 0 else None)
        add_run(store, "iterative", 0.9, s, settings=GEOMETRIC, epochs=60, train_flops=4e12,
                dense_flops=6e12, reused=(dense_ids[s],), kept=list(range(12, 24)) if s == 0 else None)
        add_run(store, "iterative", 0.5, s, settings=GEOMETRIC, achieved=0.49 if s == 2 else None)
    add_run(store, "oneshot", 0.9, 0)
    collapsed_id = add_run(store, "oneshot", 0.9, 1, collapsed=("fc3.weight",))  # a 2-seed group
    failed_id = add_run(store, "progressive", 0.9, 7, finish=False)
    store.mark(failed_id, "failed", "boom")
    add_run(store, "progressive", 0.5, 9, finish=False)  # still running
    (root / "ids.json").write_text(json.dumps({"failed": failed_id, "collapsed": collapsed_id}))
    return root


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_store(tmp_path_factory.mktemp("store") / "runs")


def md_table(md: str, heading: str) -> list[list[str]]:
    """The first Markdown table after the heading line starting with ``heading``, as rows of cells."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
        elif rows:
            break
    return [r for r in rows if not set("".join(r)) <= set("-|")]


def test_report_files_are_written_and_self_contained(store_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    paths = write_report(store_root, out)
    assert out / "report.md" in paths and out / "report.html" in paths
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    stems = {p.stem for p in paths if p.suffix in (".png", ".svg")}
    assert {s.split("_", 2)[-1] for s in stems} == {
        "accuracy_vs_sparsity", "accuracy_vs_cost", "layer_density", "mask_iou"}
    for stem in stems:
        assert (out / f"{stem}.png").read_bytes().startswith(b"\x89PNG")
        assert b"<svg" in (out / f"{stem}.svg").read_bytes()
    page = (out / "report.html").read_text()
    sources = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", page, flags=re.I)
    assert len(sources) == len(stems) and all(s.startswith("data:") for s in sources)
    assert "<link" not in page and "url(" not in page
    # Shared reports name no folder of this machine: an absolute store path is shown by its name only.
    assert store_root.is_absolute() and str(store_root) not in page
    assert f"Store: `{store_root.name}`" in (out / "report.md").read_text()


def test_dynamic_runs_show_itop_and_moved_connections(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs")
    for seed, (itop, moved) in enumerate([(0.25, 100), (0.35, 300)]):
        add_run(store, "rigl", 0.9, seed, dynamic={"itop_rate": itop, "connections_moved": moved})
    add_run(store, "progressive", 0.9, 0)  # stored before ITOP was recorded
    write_report(tmp_path / "runs", tmp_path / "out")
    rows = md_table((tmp_path / "out" / "report.md").read_text(), "### Results")
    header, by_method = rows[0], {r[0]: r for r in rows[1:]}
    itop, moved = header.index("ITOP (%)"), header.index("moved")
    assert (by_method["rigl"][itop], by_method["rigl"][moved]) == ("30.0", "200")
    assert (by_method["progressive"][itop], by_method["progressive"][moved]) == ("n/a", "n/a")


def test_output_is_deterministic(store_root: Path, tmp_path: Path) -> None:
    first = write_report(store_root, tmp_path / "a")
    second = write_report(store_root, tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_table_has_exact_mean_and_sample_std(store_root: Path, tmp_path: Path) -> None:
    write_report(store_root, tmp_path)
    rows = md_table((tmp_path / "report.md").read_text(), "### Results")
    by_key = {(r[0], r[1]): r for r in rows[1:]}
    prog = by_key[("progressive", "90%")]
    mean, std = statistics.fmean(PROG_ACC) * 100, statistics.stdev(PROG_ACC) * 100  # 92.00, 2.65
    assert prog[4] == f"{mean:.2f} ± {std:.2f}" == "92.00 ± 2.65"
    assert prog[5] == "+1.90"  # the dense runs' mean is 90.10%
    assert by_key[("dense", "0%")][5] == "n/a"
    assert prog[6] == "93.00 ± 2.65"
    assert prog[3] == "3" and prog[2] == "90.00%"
    assert prog[7] == "12.0"  # 1.2e12 FLOPs / (3e12 / 30 epochs)
    hybrid = by_key[("iterative (method.schedule=hybrid)", "90%")]
    assert hybrid[7] == "40.0" and hybrid[8] == "60" and hybrid[11] == "1"
    assert by_key[("oneshot", "90%")][4].endswith("± " + f"{statistics.stdev([0.85, 0.85]) * 100:.2f}")
    # dense first, then methods alphabetically, then sparsity; failed/running runs are not rows
    assert [r[0] for r in rows[1:]][0] == "dense"
    table = build_tables(Store(store_root).records())[0]
    row = next(r for r in table.rows if r.label == "progressive" and r.target == 0.9)
    assert row.seeds == [0, 1, 2]
    assert row.test == pytest.approx((statistics.fmean(PROG_ACC), statistics.stdev(PROG_ACC)), abs=1e-15)


def test_single_seed_std_is_na(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs")
    add_run(store, "progressive", 0.9, 0, test_acc=0.8)
    write_report(tmp_path / "runs", tmp_path / "out")
    rows = md_table((tmp_path / "out" / "report.md").read_text(), "### Results")
    assert rows[1][4] == "80.00 ± n/a"


def test_warnings_list_failed_collapse_few_seeds_missed_and_unfinished(store_root: Path, tmp_path: Path) -> None:
    ids = json.loads((store_root / "ids.json").read_text())
    records = Store(store_root).records()
    found = find_warnings(records, build_tables(records))
    assert any(ids["failed"] in line and "boom" in line for line in found["Failed runs"])
    assert any(ids["collapsed"] in line and "fc3.weight" in line for line in found["Layer collapse"])
    assert found["Fewer than 3 seeds"] == ["lenet300 on fashion-mnist: oneshot at sparsity 90%: 2 seed(s) (0, 1)"]
    assert len(found["Target sparsity missed"]) == 1 and "49.0000%" in found["Target sparsity missed"][0]
    assert len(found["Unfinished runs"]) == 1 and "still running" in found["Unfinished runs"][0]
    write_report(store_root, tmp_path)
    md = (tmp_path / "report.md").read_text()
    warn = md[md.index("## Warnings"):]
    assert ids["failed"] in warn and "boom" in warn and ids["collapsed"] in warn and "2 seed(s)" in warn
    results = md[md.index("### Results"):md.index("### Accuracy vs sparsity")]
    assert ids["failed"] not in md[:md.index("## Warnings")] and "| progressive | 90% |" in results


def test_variant_labels_name_only_the_differing_fields(store_root: Path) -> None:
    table = build_tables(Store(store_root).records())[0]
    assert table.labels == [
        "dense", "iterative (method.schedule=geometric)",
        "iterative (method.schedule=hybrid)", "oneshot", "progressive"]


def test_mask_iou_identical_and_disjoint() -> None:
    a, b = mask_keeping(list(range(12))), mask_keeping(list(range(12, 24)))
    half = mask_keeping(list(range(6, 18)))
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, b) == 0.0
    assert mask_iou(a, half) == 6 / 18
    assert iou_matrix([a, b, a]) == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


def test_report_mask_overlap_table(store_root: Path, tmp_path: Path) -> None:
    write_report(store_root, tmp_path)  # default layer sparsity: 90%, shared by the most methods
    md = (tmp_path / "report.md").read_text()
    rows = md_table(md, "### Mask overlap (IoU) at sparsity 90%")
    header, body = rows[0], {r[0]: dict(zip(rows[0][1:], r[1:])) for r in rows[1:]}
    hybrid, geometric = "iterative (method.schedule=hybrid)", "iterative (method.schedule=geometric)"
    assert set(header[1:]) == {hybrid, geometric, "oneshot", "progressive"}
    assert body["progressive"][hybrid] == "1.000"
    assert body["progressive"][geometric] == "0.000"
    assert body["oneshot"]["oneshot"] == "1.000"
    density = md_table(md, "### Per-layer density at sparsity 90%")
    assert [r[0] for r in density[1:]] == list(LAYERS)
    assert dict(zip(density[0], density[1]))["progressive"] == "0.1500"  # 12 kept, all in fc1 (80)


def test_layer_sparsity_can_be_chosen(store_root: Path, tmp_path: Path) -> None:
    write_report(store_root, tmp_path / "a", layer_sparsity=0.5)
    assert "### Mask overlap (IoU) at sparsity 50%" in (tmp_path / "a" / "report.md").read_text()
    write_report(store_root, tmp_path / "b", layer_sparsity=0.7)
    assert "no runs at sparsity 70%" in (tmp_path / "b" / "report.md").read_text()


def test_filter_records(store_root: Path) -> None:
    records = Store(store_root).records()
    assert {r.method for r in filter_records(records, {"method": "progressive"})} == {"progressive"}
    at_90 = filter_records(records, {"sparsity": "0.90"})
    assert at_90 and {r.target_sparsity for r in at_90} == {0.9}
    hybrid = filter_records(records, {"method.settings.schedule": "hybrid"})
    assert len(hybrid) == 3 and all(r.config["method"]["settings"]["schedule"] == "hybrid" for r in hybrid)
    assert filter_records(records, {"method.schedule": "hybrid"}) == hybrid  # as --set spells it
    assert len(filter_records(records, {"epochs": "30", "seed": "1", "method": "dense"})) == 1
    assert filter_records(records, {"train.epochs": "31"}) == []
    assert filter_records(records, {}) == records
    with pytest.raises(UserError, match="unknown report filter field 'nope'"):
        filter_records(records, {"nope": "1"})


def test_normalize_compares_numbers_as_numbers() -> None:
    assert normalize(0.9) == normalize("0.9") == normalize("0.90") == normalize("9e-1")
    assert normalize(30) == normalize("30.0") == "30"
    assert normalize(True) == normalize("True") == "true"
    assert normalize("hybrid") == "hybrid"


def test_write_report_with_filter_and_errors(store_root: Path, tmp_path: Path) -> None:
    write_report(store_root, tmp_path / "f", where={"method": "progressive"})
    rows = md_table((tmp_path / "f" / "report.md").read_text(), "### Results")
    assert {r[0] for r in rows[1:]} == {"dense", "progressive"}  # the baseline is always shown
    write_report(store_root, tmp_path / "s", where={"sparsity": "0.9", "seed": "1"})
    rows = md_table((tmp_path / "s" / "report.md").read_text(), "### Results")
    assert ("dense", "0%") in {(r[0], r[1]) for r in rows[1:]} and all(r[3] == "1" for r in rows[1:])
    with pytest.raises(UserError, match="no run"):
        write_report(store_root, tmp_path / "g", where={"method": "lottery"})
    with pytest.raises(UserError, match="no run store"):
        write_report(tmp_path / "missing", tmp_path / "h")
    assert not (tmp_path / "missing").exists()


def test_pareto_front_small_example() -> None:
    points = [(10, 80), (5, 70), (20, 79), (5, 75), (30, 90), (30, 85), (40, 90), (float("nan"), 99)]
    assert pareto_front(points) == [3, 0, 4]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 50.0), (1.0, 50.0)]) == [0]


def test_fashion_mnist_says_no_published_numbers(store_root: Path, tmp_path: Path) -> None:
    write_report(store_root, tmp_path)
    assert "No published pruning table for Fashion-MNIST is known" in (tmp_path / "report.md").read_text()


def test_published_numbers_overlaid_for_resnet18_cifar10(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs")
    for s in range(3):
        add_run(store, "progressive", 0.9, s, model="resnet18", dataset="cifar10", test_acc=0.94 + 0.001 * s)
        add_run(store, "dense", 0.0, s, model="resnet18", dataset="cifar10", test_acc=0.95)
    write_report(tmp_path / "runs", tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    refs = md_table(md, "Published numbers overlaid")
    assert ["progressive, seed 1", "90%", "95.06", "200 ep"] == refs[[r[1] for r in refs].index("90%")][:4]
    assert any("test split" in r[4] for r in refs)  # caveats are shown
    table = build_tables(store.records())[0]
    fig = plots.accuracy_vs_density(table, references_for("resnet18", "cifar10"), plots.colors_for(table.labels))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "published: progressive, seed 1" in legend and "published: one-shot vs iterative, seed 2" in legend
    assert references_for("lenet300", "fashion-mnist") == []


def test_mask_overlap_compares_variants_of_one_seed(store_root: Path, tmp_path: Path) -> None:
    write_report(store_root, tmp_path)
    text = (tmp_path / "report.md").read_text()
    match = re.search(r"Masks of seed (\d+) of each variant at target sparsity (\d+)%", text)
    assert match is not None
    seed, at = int(match[1]), int(match[2]) / 100
    rows = [r for r in build_tables(Store(store_root).records())[0].rows if r.target == at and r.method != "dense"]
    with_seed = [r for r in rows if seed in {run.seed for run in r.runs}]
    # The seed is the lowest that every variant has, when they share one.
    shared = set.intersection(*({run.seed for run in r.runs} for r in rows))
    assert seed == min(shared) if shared else with_seed


@pytest.mark.parametrize(("width_pt", "style"), [(648.0, "width: 100%"), (432.0, "width: min(100%, 720px)")])
def test_wide_plots_take_the_page_width(tmp_path: Path, width_pt: float, style: str) -> None:
    from prunelab.report.document import Image, to_html

    (tmp_path / "p.svg").write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width_pt}pt" height="300pt"/>')
    assert f'style="{style}"' in to_html([Image(tmp_path, "p", "a plot")], "t")


def test_training_curves_of_one_grid_cell(tmp_path: Path) -> None:
    store = Store(tmp_path / "runs")
    for method, sparsity in (("dense", 0.0), ("progressive", 0.9), ("oneshot", 0.9)):
        for seed in (0, 1):
            rid = add_run(store, method, sparsity, seed)
            for epoch in range(1, 4):
                store.folder(rid).append_metrics({"cycle": 0, "epoch": epoch, "val_acc": 0.8 + 0.01 * epoch,
                                                  "mask_sparsity": sparsity * epoch / 3})
    written = write_report(tmp_path / "runs", tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "### Training curves at sparsity 90%" in text
    assert "at target sparsity 90% and of the dense run, seed 0" in text
    assert tmp_path / "out" / "lenet300_fashion-mnist_epochs.png" in written


def test_welch_interval_by_hand() -> None:
    from prunelab.report.stats import welch

    # The reference does not vary, so Welch's degrees of freedom are n - 1 = 2, t(0.975, 2) = 4.302653.
    found = welch([0.90, 0.91, 0.95], [0.85, 0.85])
    half = 4.302652729911275 * math.sqrt(statistics.variance([0.90, 0.91, 0.95]) / 3)
    assert found is not None and math.isclose(found.difference, 0.07, abs_tol=1e-12)
    assert math.isclose(found.low, 0.07 - half, rel_tol=1e-9) and math.isclose(found.high, 0.07 + half, rel_tol=1e-9)
    assert found.verdict == "better" and found.seeds == 2
    assert welch([0.9], [0.8, 0.85]) is None
    same = welch([0.8, 0.9], [0.81, 0.89])
    assert same is not None and same.verdict == "no detectable difference at 2 seeds"


def test_report_compares_every_variant_with_the_reference(store_root: Path, tmp_path: Path) -> None:
    write_report(store_root, tmp_path)
    rows = md_table((tmp_path / "report.md").read_text(), "### Results")
    header = rows[0]
    diff, verdict = header.index("vs progressive (points, 95% CI)"), header.index("vs progressive: verdict")
    by_key = {(r[0], r[1]): r for r in rows[1:]}
    oneshot = by_key[("oneshot", "90%")]  # 0.85, 0.85 against 0.90, 0.91, 0.95
    half = 100 * 4.302652729911275 * math.sqrt(statistics.variance(PROG_ACC) / 3)
    assert oneshot[diff] == f"-7.00 [{-7.0 - half:+.2f}, {-7.0 + half:+.2f}]" and oneshot[verdict] == "worse"
    assert by_key[("progressive", "90%")][diff] == "—" and by_key[("dense", "0%")][verdict] == "—"
    write_report(store_root, tmp_path / "b", reference="oneshot")
    header = md_table((tmp_path / "b" / "report.md").read_text(), "### Results")[0]
    assert "vs oneshot: verdict" in header
