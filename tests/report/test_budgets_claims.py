"""Matched budgets in the report (a table per budget, the side-by-side section) and the Claims section."""

from __future__ import annotations

from pathlib import Path

import pytest
from scipy import stats

from prunelab.cli import main
from prunelab.errors import UserError
from prunelab.report import build_tables, write_report
from prunelab.report.claims import FAILS, HOLDS, INCONCLUSIVE, Cell, Claim, Verdict, _verdict, check, read_claims
from prunelab.runs.store import Store

from fake_runs import add_run
from test_report import md_table

# Final test accuracies by (method, budget), one per seed; lottery does not fit a budget of 10.
ACC = {
    ("dense", 10): (0.84, 0.85, 0.86), ("progressive", 10): (0.80, 0.81, 0.82),
    ("dense", 40): (0.855, 0.86, 0.865), ("progressive", 40): (0.85, 0.86, 0.87), ("lottery", 40): (0.88, 0.89, 0.90),
}
# What each method's budget made of train.epochs (lottery: 19 cycles of 2): never a variant of its own.
CYCLE = {("dense", 10): 10, ("progressive", 10): 10, ("dense", 40): 40, ("progressive", 40): 40, ("lottery", 40): 2}


@pytest.fixture(scope="module")
def budget_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("budgets") / "runs"
    store = Store(root)
    # lottery's dense pretraining: 2 epochs, no budget, no pruned run of its recipe
    pretrained = [add_run(store, "dense", 0.0, seed, test_acc=0.80, cycle=2) for seed in range(3)]
    for (method, budget), accs in ACC.items():
        for seed, acc in enumerate(accs):
            add_run(store, method, 0.0 if method == "dense" else 0.9, seed, test_acc=acc, budget=budget,
                    cycle=CYCLE[method, budget], train_flops=1e12 * budget,
                    reused=(pretrained[seed],) if method == "lottery" else ())
    return root


def test_each_budget_is_a_table_and_what_the_budget_set_is_no_variant(budget_store: Path) -> None:
    tables = build_tables(Store(budget_store).records())  # the pretraining alone makes no table
    assert [(t.title, t.labels) for t in tables] == [
        ("lenet300 on fashion-mnist, budget 10 epochs", ["dense", "progressive"]),
        ("lenet300 on fashion-mnist, budget 40 epochs", ["dense", "lottery", "progressive"]),
    ]


def test_budget_tables_compare_with_the_reference_at_the_same_budget(budget_store: Path, tmp_path: Path) -> None:
    write_report(budget_store, tmp_path)
    md = (tmp_path / "report.md").read_text()
    rows = md_table(md, "## lenet300 on fashion-mnist, budget 40 epochs")
    head, lottery = rows[0], next(r for r in rows if r[0] == "lottery")
    cells = dict(zip(head, lottery))
    assert cells["vs progressive: verdict"] == "better" and cells["vs dense (points)"] == "+3.00"
    interval = stats.ttest_ind(ACC["lottery", 40], ACC["progressive", 40], equal_var=False).confidence_interval(0.95)
    assert cells["vs progressive (points, 95% CI)"] == f"+3.00 [{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]"
    matched = md_table(md, "## lenet300 on fashion-mnist: matched budgets")
    assert matched[0] == ["method / variant", "target sparsity", "10 ep: final test acc. (%)",
                          "10 ep: vs progressive (points, 95% CI)", "40 ep: final test acc. (%)",
                          "40 ep: vs progressive (points, 95% CI)"]
    by_label = {r[0]: r for r in matched[1:]}
    assert by_label["lottery"][2:4] == ["—", "—"]  # no lottery run at a budget of 10
    assert by_label["lottery"][4] == "89.00 ± 1.00 (3)" and by_label["lottery"][5].endswith(" better")
    assert by_label["progressive"][2] == "81.00 ± 1.00 (3)"
    assert (tmp_path / "lenet300_fashion-mnist_accuracy_vs_budget.png").stat().st_size > 0
    assert "dense (train.epochs" not in md  # the 2-epoch pretraining is a cost, not a row


CLAIMS = """
claims:
  - {id: prog-not-worse, text: t, a: progressive, b: lottery, test: not_worse, budget: matched}
  - {id: near-dense, text: t, a: progressive, b: dense, test: within, margin: 2.5, budget: [40]}
  - {id: unmeasured, text: t, a: progressive, b: dense, test: within, budget: none}
  - {id: cheaper, text: t, a: lottery, b: progressive, test: better, budget: matched, cheaper: true}
"""


def test_claims_are_checked_cell_by_cell(budget_store: Path, tmp_path: Path) -> None:
    path = tmp_path / "claims.yaml"
    path.write_text(CLAIMS)
    tables = build_tables(Store(budget_store).records())
    verdicts = {c.id: check(c, tables) for c in read_claims(path)}
    worse = verdicts["prog-not-worse"]
    assert [(c.table.budget, c.target, c.verdict) for c in worse.cells] == [(40, 0.9, FAILS)]  # only at 40
    assert worse.verdict == FAILS and round(100 * worse.cells[0].comparison.difference, 6) == -3.0
    near = verdicts["near-dense"]
    assert [c.verdict for c in near.cells] == [HOLDS] and near.verdict == HOLDS  # +0.00 [-2.08, +2.08] inside ±2.5
    assert verdicts["unmeasured"].cells == [] and verdicts["unmeasured"].verdict == INCONCLUSIVE
    assert verdicts["cheaper"].cells[0].verdict == FAILS and "not cheaper" in verdicts["cheaper"].cells[0].why
    write_report(budget_store, tmp_path / "out", claims=path)
    md = (tmp_path / "out" / "report.md").read_text()
    summary = {r[0].split(":")[0]: r[3] for r in md_table(md, "## Claims")[1:]}
    assert summary == {"prog-not-worse": FAILS, "near-dense": HOLDS, "unmeasured": INCONCLUSIVE, "cheaper": FAILS}


@pytest.mark.parametrize(("test", "margin", "low", "high", "verdict"), [
    ("within", 0.5, -0.4, 0.4, HOLDS), ("within", 0.5, -0.6, 0.4, INCONCLUSIVE), ("within", 0.5, 0.6, 0.9, FAILS),
    ("within", 0.5, -0.9, -0.6, FAILS), ("better", 0.0, 0.1, 0.5, HOLDS), ("better", 0.0, -0.1, 0.5, INCONCLUSIVE),
    ("better", 0.0, -0.5, -0.1, FAILS), ("better", 0.3, 0.1, 0.5, INCONCLUSIVE),
    ("not_worse", 0.2, -0.1, 0.3, HOLDS), ("not_worse", 0.2, -0.3, 0.3, INCONCLUSIVE),
    ("not_worse", 0.2, -0.5, -0.3, FAILS),
])
def test_a_cell_verdict_from_its_interval(test: str, margin: float, low: float, high: float, verdict: str) -> None:
    assert _verdict(Claim("c", "t", {}, {}, test, margin=margin), low, high) == verdict


@pytest.mark.parametrize(("cells", "share", "verdict"), [
    ([HOLDS] * 4 + [INCONCLUSIVE], 0.8, HOLDS), ([HOLDS] * 4 + [INCONCLUSIVE], 1.0, INCONCLUSIVE),
    ([HOLDS] * 4 + [FAILS], 0.8, HOLDS), ([HOLDS] * 3 + [FAILS] * 2, 0.8, FAILS),
    ([HOLDS] * 3 + [FAILS, INCONCLUSIVE], 0.8, INCONCLUSIVE), ([HOLDS, FAILS], 1.0, FAILS),
])
def test_a_claim_verdict_over_its_cells(cells: list[str], share: float, verdict: str) -> None:
    claim = Claim("c", "t", {}, {}, "better", share=share)
    fake = [Cell(None, 0.9, None, None, None, v) for v in cells]  # type: ignore[arg-type]
    assert Verdict(claim, fake).verdict == verdict


@pytest.mark.parametrize(("text", "fragment"), [
    ("claims: []", "non-empty list 'claims'"),
    ("claims: [{id: a, text: t, a: x, b: y, test: beats}]", "test must be one of within, better, not_worse"),
    ("claims: [{id: a, text: t, a: x, b: y, test: better, colour: red}]", "unknown keys ['colour']"),
    ("claims: [{id: a, text: t, a: x, test: better}]", "missing keys ['b']"),
    ("claims: [{id: a, text: t, a: x, b: y, test: better, sparsity: [0.9, 0.5]}]", "0 <= sparsity low <= high"),
    ("claims: [{id: a, text: t, a: x, b: y, test: better, budget: [0]}]", "budget must be none, matched"),
    ("claims: [{id: a, text: t, a: {schedule: x}, b: y, test: better}]", "a method name or a mapping with a method"),
    ("claims: [{id: a, text: t, a: x, b: y, test: better}, {id: a, text: t, a: x, b: y, test: better}]",
     "must be unique"),
])
def test_bad_claims_files_are_one_sentence(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "claims.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        read_claims(path)


def test_the_report_command_refuses_a_missing_claims_file(budget_store: Path, tmp_path: Path, capsys) -> None:
    code = main(["report", "--store", str(budget_store), "--out", str(tmp_path / "r"),
                 "--claims", str(tmp_path / "nope.yaml")])
    assert code == 2 and "claims file" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_the_repository_claims_file_holds_the_seeds_claims() -> None:
    claims = {c.id: c for c in read_claims(Path(__file__).parents[2] / "studies" / "claims.yaml")}
    assert {"progressive-near-dense", "progressive-matches-imp", "oneshot-wins-below-80", "iterative-wins-above-80",
            "hybrid-beats-oneshot", "cyclic-boosts-pai", "sculpt-matches-lrr-cheaper"} <= set(claims)
    near = claims["progressive-near-dense"]
    assert (near.test, near.margin, near.sparsity, near.budget) == ("within", 0.1, (0.7, 0.85), "none")
