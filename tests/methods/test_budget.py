"""train.budget: every method spends at most the budget, one-cycle and cycle-split methods exactly it."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunelab.config.build import build_config
from prunelab.errors import UserError
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
