"""train.budget: every method spends at most the budget, one-cycle and cycle-split methods exactly it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunelab.cli import main
from prunelab.config.build import build_config, flatten
from prunelab.config.identity import to_dict
from prunelab.errors import BudgetTooSmall, UserError
from prunelab.methods import METHODS, SPENT_FIELDS
from prunelab.runs.experiment import Runtime, run

TINY = {"data.val_size": 200, "train.batch_size": 100}  # 1000 train images: 10 steps/epoch


@pytest.mark.parametrize(("method", "cycle"), [
    ("progressive", 20), ("lottery", 4), ("lrr", 4), ("sculpt", 4), ("cyclic", 5), ("oneshot", 10), ("set", 20),
])
def test_the_split_of_a_budget_of_20_at_half_sparsity(method: str, cycle: int) -> None:
    cfg = build_config({"budget": 20, "method": method, "sparsity": 0.5})
    assert cfg.train.budget == 20 and cfg.train.epochs == cycle
    if method == "oneshot":
        assert cfg.method.settings.finetune_epochs == 10


@pytest.mark.parametrize(("raw", "fragment"), [
    ({"budget": 20, "epochs": 5}, "give train.budget or train.epochs, not both"),
    ({"budget": 3, "method": "lottery", "sparsity": 0.5}, "leaves each of 5 rounds less than one epoch"),
    ({"budget": 0}, "train.budget must be in [1, 100000]"),
    ({"budget": 20, "method": "lottery", "method.rewind": "5it", "sparsity": 0.5}, "not steps"),
    ({"budget": 40, "method": "iterative", "method.schedule": "hybrid", "sparsity": 0.9},
     "later steps less than one epoch"),
])
def test_budgets_that_cannot_be_spent_are_refused(raw: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        build_config(raw)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["progressive", "lottery", "sculpt", "cyclic", "oneshot"])
def test_runs_train_exactly_their_budget(method: str, tiny_data_dir: Path, tmp_path: Path) -> None:
    summary, _ = run(build_config({**TINY, "budget": 20, "method": method, "sparsity": 0.5}),
                     Runtime(store=tmp_path, data_dir=tiny_data_dir, progress=False, download=False))
    assert summary["status"] == "ok" and summary["epochs"] == 20  # dense pretraining included


@pytest.mark.parametrize(("method", "epochs", "split"), [
    ("progressive", 20, "1 × 20"), ("lottery", 20, "5 × 4"), ("lrr", 20, "5 × 4"), ("sculpt", 20, "5 × 4"),
    ("cyclic", 20, "4 × 5"), ("oneshot", 20, "10 + 10"), ("iterative", 18, "10 + 4 × 2"), ("rigl", 20, "1 × 20"),
])
def test_the_plan_shows_the_split_of_a_budget_of_20(method: str, epochs: int, split: str) -> None:
    plan = METHODS.get(method).plan(build_config({"budget": 20, "method": method, "sparsity": 0.5}))
    assert (plan.epochs, plan.split) == (epochs, split)  # iterative: 4 steps of 10 // 4 = 2 epochs, 2 unspent


@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("budget", [10, 40, 120])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_no_plan_exceeds_its_budget_and_only_epoch_fields_follow_it(method: str, budget: int, sparsity: float) -> None:
    raw = {"method": method, "sparsity": sparsity}
    try:
        cfg = build_config({**raw, "budget": budget})
    except BudgetTooSmall:
        return  # said in one sentence; a sweep skips the point (test_a_sweep_over_budgets_...)
    assert METHODS.get(method).plan(cfg).epochs <= budget
    changed = {k for k, v in flatten(to_dict(cfg)).items() if flatten(to_dict(build_config(raw))).get(k) != v}
    assert changed <= {"train.budget", *SPENT_FIELDS}


@pytest.mark.integration
def test_a_sweep_over_budgets_skips_the_points_that_do_not_fit_and_lists_them(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text("base: {data.val_size: 200, train.batch_size: 100, sparsity: 0.5}\n"
                    "grid: {budget: [3, 10], method: [progressive, lottery]}\n")
    common = ["--store", str(tmp_path / "store"), "--data-dir", str(tiny_data_dir), "--no-progress", "--json"]
    assert main(["sweep", str(path), "--dry-run", *common]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["budget"], r["epochs"], r["split"]) for r in plan["runs"]] == [
        ("progressive", 3, 3, "1 × 3"), ("progressive", 10, 10, "1 × 10"), ("lottery", 10, 10, "5 × 2")]
    assert [u["where"] for u in plan["unfit"]] == ["train.budget=3, method.name=lottery"]
    assert "leaves each of 5 rounds less than one epoch" in plan["unfit"][0]["reason"]
    assert main(["sweep", str(path), "--workers", "1", *common]) == 0
    assert "skipped grid point train.budget=3, method.name=lottery" in capsys.readouterr().err
    assert main(["list", "runs", *common[:2], "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert sorted((r["method"], r["budget"], r["epochs"]) for r in runs) == [
        ("dense", None, 2.0), ("lottery", 10, 10.0), ("progressive", 3, 3.0), ("progressive", 10, 10.0)]
    lottery = next(r["run_id"] for r in runs if r["method"] == "lottery")
    assert main(["show", lottery, *common[:2], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["budget"], shown["epochs"]) == (10, 10.0)


@pytest.mark.integration
def test_without_a_terminal_each_epoch_is_one_line_and_rounds_say_their_total(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(build_config({**TINY, "budget": 10, "method": "lrr", "sparsity": 0.5}),
        Runtime(store=tmp_path, data_dir=tiny_data_dir, progress=None, download=False))
    lines = [line for line in capsys.readouterr().err.splitlines() if " epoch " in line]
    # the dense pretraining's 2 epochs, then 4 rounds of 2 (a test's stderr is no terminal)
    assert [line.split(":")[1].strip() for line in lines] == [
        "train epoch 1/2", "train epoch 2/2", *(f"round {r}/4 epoch {e}/2" for r in range(1, 5) for e in (1, 2))]
