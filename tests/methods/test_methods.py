"""Every registered method, on tiny real-format data: exact sparsity, zeros kept, honest cost, resume.

Parametrized over the method registry: a newly registered method is tested
without touching this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from prunelab.config.build import build_config
from prunelab.runs.experiment import Runtime, run
from prunelab.methods import METHODS
from prunelab.runs.store import Store
from prunelab.sparsity.structure import NM, nm_violations
from prunelab.training.loop import Trainer
from conftest import interrupted_then_resumed

TINY = {"data.val_size": 200, "train.batch_size": 100, "epochs": 1}  # 1000 train images: 10 steps/epoch
TOTAL = 266_200  # LeNet-300-100's Linear weights

# Cycles each method trains at sparsity 0.9 with one-epoch cycles (dense pretraining included).
CYCLES = {"dense": 1, "progressive": 1, "oneshot": 2, "iterative": 12, "lottery": 12, "lrr": 12, "random": 1,
          "erk": 1, "snip": 1, "grasp": 1, "synflow": 1, "cyclic": 4, "sculpt": 5, "set": 1, "rigl": 1, "granet": 1}


def _runtime(store: Path, data: Path) -> Runtime:
    return Runtime(store=store, data_dir=data, progress=False, download=False)


def test_every_canonical_method_is_registered() -> None:
    assert METHODS.names() == list(CYCLES)


@pytest.mark.parametrize("method", METHODS.names())
def test_method_reaches_exact_target_and_counts_every_epoch(
    method: str, tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = CycleSpy(monkeypatch)
    cfg = build_config({**TINY, "method": method, "sparsity": 0.9})
    summary, _ = run(cfg, _runtime(tmp_path, tiny_data_dir))
    for end in spy.ends:  # after every cycle: pruned weights and their momentum are exactly zero
        for name, m in end["masks"].items():
            assert torch.count_nonzero(end["weights"][name][~m]) == 0
        for p, state in end["optimizer"].state.items():
            name = next((n for n, q in end["params"].items() if q is p), None)
            if name is not None:
                assert torch.count_nonzero(state["momentum_buffer"][~end["masks"][name]]) == 0
    assert summary["status"] == "ok"
    target = 0.0 if method == "dense" else 0.9
    kept = round((1 - target) * TOTAL)
    masks = torch.load(tmp_path / summary["run_id"] / "mask.pt", weights_only=True)
    weights = torch.load(tmp_path / summary["run_id"] / "weights.pt", weights_only=True)
    assert sum(int(m.sum()) for m in masks.values()) == kept
    for name, m in masks.items():
        assert torch.count_nonzero(weights[name][~m]) == 0  # pruned weights are exactly zero
    assert summary["sparsity"] >= 1 - kept / TOTAL and summary["sparsity"] == pytest.approx(target, abs=1e-3)
    assert summary["epochs"] == CYCLES[method] == METHODS.get(method).plan(cfg).epochs
    assert summary["steps"] == 10 * CYCLES[method]
    assert summary["train_flops"] <= summary["dense_train_flops"]
    if method in ("oneshot", "iterative", "lrr", "lottery"):
        assert len(summary["reused_runs"]) == 1  # the dense pretraining is a stored run, reused


def test_pretraining_is_reused_not_retrained(tiny_data_dir: Path, tmp_path: Path) -> None:
    first, _ = run(build_config({**TINY, "method": "oneshot"}), _runtime(tmp_path, tiny_data_dir))
    dense = Store(tmp_path).get(first["reused_runs"][0])
    assert dense is not None and dense.status == "ok" and dense.method == "dense"
    created = dense.updated
    second, _ = run(build_config({**TINY, "method": "lrr"}), _runtime(tmp_path, tiny_data_dir))
    assert second["reused_runs"] == first["reused_runs"]
    assert Store(tmp_path).get(first["reused_runs"][0]).updated == created  # not trained again
    assert second["epochs"] == 12  # its cost still includes the dense epoch


class CycleSpy:
    """Records masks and weights at the start and end of every cycle."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.starts: list[dict[str, Any]] = []
        self.ends: list[dict[str, Any]] = []
        original = Trainer.run_cycle
        spy = self

        def run_cycle(trainer: Trainer, *args: Any, **kwargs: Any) -> Any:
            spy.starts.append(spy._snap(trainer))
            result = original(trainer, *args, **kwargs)
            spy.ends.append(spy._snap(trainer))
            return result

        monkeypatch.setattr(Trainer, "run_cycle", run_cycle)

    @staticmethod
    def _snap(trainer: Trainer) -> dict[str, Any]:
        return {
            "masks": {k: v.clone() for k, v in trainer.masker.masks.items()},
            "weights": {k: v.detach().clone() for k, v in trainer.masker.params.items()},
            "optimizer": trainer.optimizer,
            "params": dict(trainer.masker.params),
        }


def _init_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    from prunelab.runs.experiment import seed_everything
    from prunelab.models import build_model

    seed_everything(seed)
    model = build_model("lenet300", 1, 28, 10)
    return {k: v.detach().clone() for k, v in model.named_parameters() if k.endswith("weight")}


def test_lottery_masks_nested_and_rewound_to_init(tiny_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    spy = CycleSpy(monkeypatch)
    run(build_config({**TINY, "method": "lottery", "sparsity": 0.5}), _runtime(tmp_path, tiny_data_dir))
    init = _init_weights()
    rounds = spy.starts[1:]  # starts[0] is the dense pretraining (a run of its own)
    assert len(rounds) == 4  # ceil(log(0.5) / log(0.8)) = 4 rounds
    for previous, current in zip(spy.starts[1:], spy.starts[2:]):
        for name, m in current["masks"].items():
            assert not (m & ~previous["masks"][name]).any()  # nested: nothing returns
    for start in rounds:
        for name, m in start["masks"].items():
            assert torch.equal(start["weights"][name], init[name] * m)  # survivors rewound exactly


def test_lottery_late_rewinding_restores_the_saved_step(tiny_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    saved: dict[str, torch.Tensor] = {}
    from prunelab.methods import rewinding

    original = rewinding.Snapshot.before_step

    def capture(self: Any, step: int, trainer: Trainer) -> None:
        original(self, step, trainer)
        if step == self.step:
            saved.update({k: v.detach().clone() for k, v in trainer.masker.params.items()})

    monkeypatch.setattr(rewinding.Snapshot, "before_step", capture)
    spy = CycleSpy(monkeypatch)
    cfg = build_config({**TINY, "method": "lottery", "sparsity": 0.36, "epochs": 2, "method.rewind": "3it"})
    run(cfg, _runtime(tmp_path, tiny_data_dir))
    assert saved and len(spy.starts) == 3  # round 0 trained here (late rewinding), then 2 rounds
    for start in spy.starts[1:]:
        for name, m in start["masks"].items():
            assert torch.equal(start["weights"][name], saved[name] * m)


def test_lrr_keeps_weights_and_restarts_lr(tiny_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    spy = CycleSpy(monkeypatch)
    summary, _ = run(build_config({**TINY, "method": "lrr", "sparsity": 0.36, "epochs": 2}),
                     _runtime(tmp_path, tiny_data_dir))
    for end, start in zip(spy.ends[1:], spy.starts[2:]):
        for name, m in start["masks"].items():
            assert torch.equal(start["weights"][name], end["weights"][name] * m)  # no rewind
    metrics = Store(tmp_path).folder(summary["run_id"]).metrics()
    lrs = [(m["cycle"], m["epoch"], m["lr"]) for m in metrics]
    # Cosine over 2 epochs restarts every round: the first epoch's last lr is the same in each round.
    first = {lr for _, epoch, lr in lrs if epoch == 1}
    assert len(first) == 1 and len({c for c, _, _ in lrs}) == 2


@pytest.mark.parametrize("score", ["random", "snip", "synflow", "magnitude"])
def test_cyclic_never_changes_its_mask(score: str, tiny_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    spy = CycleSpy(monkeypatch)
    run(build_config({**TINY, "method": "cyclic", "method.score": score, "method.cycles": 3}),
        _runtime(tmp_path, tiny_data_dir))
    first = spy.starts[0]["masks"]
    assert sum(int(m.sum()) for m in first.values()) == round(0.1 * TOTAL)
    for snap in spy.starts + spy.ends:
        assert all(torch.equal(snap["masks"][n], first[n]) for n in first)


def test_sculpt_final_mask_is_a_subset_at_the_target(tiny_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    spy = CycleSpy(monkeypatch)
    run(build_config({**TINY, "method": "sculpt", "method.cycles": 2, "method.score": "snip"}),
        _runtime(tmp_path, tiny_data_dir))
    initial, final = spy.starts[0]["masks"], spy.starts[-1]["masks"]
    assert sum(int(m.sum()) for m in initial.values()) == round(0.5 * TOTAL)
    assert sum(int(m.sum()) for m in final.values()) == round(0.1 * TOTAL)
    assert all(not (final[n] & ~initial[n]).any() for n in final)
    assert len(spy.starts) == 3


@pytest.mark.parametrize(("raw", "cycles"), [
    ({"method": "iterative", "method.schedule": "constant", "method.steps": 3}, 1 + 3),
    ({"method": "iterative", "method.schedule": "geometric", "method.fraction": 0.5}, 1 + 4),
    ({"method": "iterative", "method.schedule": "hybrid", "method.fraction": 0.3}, 1 + 5),
    ({"method": "oneshot", "method.patience": 1, "method.finetune_epochs": 6}, None),
    ({"method": "oneshot", "method.score": "taylor"}, 2),
    ({"method": "oneshot", "method.score": "hessian", "method.batches": 2}, 2),
])
def test_retrain_variants(raw: dict, cycles: int | None, tiny_data_dir: Path, tmp_path: Path) -> None:
    summary, _ = run(build_config({**TINY, **raw}), _runtime(tmp_path, tiny_data_dir))
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
    if cycles is not None:
        assert summary["epochs"] == cycles
    else:  # early stopping: at least patience + 1 fine-tuning epochs, at most the cap
        assert 1 + 2 <= summary["epochs"] <= 1 + 6


@pytest.mark.parametrize("raw", [
    {"method": "lottery", "sparsity": 0.5},
    {"method": "sculpt", "method.cycles": 2},
    {"method": "oneshot", "epochs": 3},
    {"method": "iterative", "method.schedule": "constant", "method.steps": 3},
])
def test_multi_cycle_methods_resume_bit_identical(raw: dict, tiny_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = build_config({**TINY, **raw})
    reference, _ = run(cfg, _runtime(tmp_path / "a", tiny_data_dir))
    # Ctrl-C after the third epoch of the method's own cycles: the earlier cycles are replayed.
    resumed = interrupted_then_resumed(cfg, _runtime(tmp_path / "b", tiny_data_dir), monkeypatch,
                                       reference["run_id"], lambda n, record: n == 3)
    for key in ("weights_sha256", "test_acc", "sparsity", "epochs", "steps", "train_flops", "reused_runs", "notes"):
        assert resumed[key] == reference[key], key


def test_lottery_per_layer_rates(tiny_data_dir: Path, tmp_path: Path) -> None:
    cfg = build_config({**TINY, "method": "lottery", "sparsity": 0.5, "method.layer_rates": ["fc3=0.1"]})
    summary, _ = run(cfg, _runtime(tmp_path, tiny_data_dir))
    masks = torch.load(tmp_path / summary["run_id"] / "mask.pt", weights_only=True)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * TOTAL)
    density = {n: float(m.float().mean()) for n, m in masks.items()}
    assert density["fc3.weight"] > density["fc1.weight"]  # the output layer is pruned at half the rate


@pytest.mark.parametrize("allocation", ["global", "layerwise", "erk"])
@pytest.mark.parametrize("method", ["oneshot", "snip", "grasp", "synflow"])
def test_every_allocation_is_exact(method: str, allocation: str, tiny_data_dir: Path, tmp_path: Path) -> None:
    cfg = build_config({**TINY, "method": method, "sparsity": 0.8, "prune.allocation": allocation})
    summary, _ = run(cfg, _runtime(tmp_path, tiny_data_dir))
    masks = torch.load(tmp_path / summary["run_id"] / "mask.pt", weights_only=True)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * TOTAL)
    if allocation == "layerwise":
        assert all(abs(float(m.float().mean()) - 0.2) < 1e-3 for m in masks.values())


DYNAMIC = ("set", "rigl", "granet")


@pytest.mark.parametrize("method", [m for m in METHODS.names() if m != "dense" and m not in DYNAMIC])
def test_nm_structure_holds_exactly_in_the_stored_weights(method: str, tiny_data_dir: Path, tmp_path: Path) -> None:
    cfg = build_config({**TINY, "method": method, "prune.structure": "2:4"})
    summary, _ = run(cfg, _runtime(tmp_path, tiny_data_dir))
    masks = torch.load(tmp_path / summary["run_id"] / "mask.pt", weights_only=True)
    weights = torch.load(tmp_path / summary["run_id"] / "weights.pt", weights_only=True)
    for name, m in masks.items():  # exactly 2 kept in every group of 4 consecutive inputs
        assert torch.equal(m.reshape(-1, 4).sum(1), torch.full((m.numel() // 4,), 2)), name
    assert nm_violations({n: weights[n] for n in masks}, NM(2, 4)) == {}
    assert summary["target_sparsity"] == 0.5 and summary["sparsity"] == pytest.approx(0.5, abs=1e-5)


def test_layer_collapse_is_reported(tiny_data_dir: Path, tmp_path: Path) -> None:
    # One-shot global magnitude pruning at 99.99% of LeNet-300-100 keeps 27 weights. Observed:
    # all of them in fc2/fc3 (fc1's weights are the smallest: its fan-in is 784), so fc1 collapses.
    cfg = build_config({**TINY, "method": "oneshot", "sparsity": 0.9999})
    summary, _ = run(cfg, _runtime(tmp_path, tiny_data_dir))
    masks = torch.load(tmp_path / summary["run_id"] / "mask.pt", weights_only=True)
    empty = [n for n, m in masks.items() if not m.any()]
    assert empty == ["fc1.weight"]
    assert summary["collapsed_layers"] == empty
    assert all(any(n in note for note in summary["notes"]) for n in empty)


@pytest.mark.parametrize(("epochs", "noted"), [(2, True), (4, False)])
def test_progressive_says_when_its_ramp_is_pruning_at_init(epochs: int, noted: bool, tiny_data_dir: Path,
                                                           tmp_path: Path) -> None:
    summary, _ = run(build_config({**TINY, "epochs": epochs}), _runtime(tmp_path, tiny_data_dir))
    assert any("in effect pruning at initialisation" in note for note in summary["notes"]) == noted


@pytest.mark.parametrize(("rewind", "k"), [("1ep", 10), ("3it", 3)])
def test_late_rewinding_continues_from_step_k_with_its_learning_rate(
    rewind: str, k: int, tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prunelab.training import loop
    from prunelab.training.optim import lr_at

    optimizers: list[Any] = []  # one per cycle, held so that no id is reused
    first_lr: list[float] = []
    original = loop.set_lr

    def record(optimizer: Any, lr: float) -> None:
        if not optimizers or optimizer is not optimizers[-1]:  # a cycle's first step
            optimizers.append(optimizer)
            first_lr.append(lr)
        original(optimizer, lr)

    monkeypatch.setattr(loop, "set_lr", record)
    cfg = build_config({**TINY, "method": "lottery", "sparsity": 0.5, "epochs": 2, "method.rewind": rewind})
    summary, _ = run(cfg, _runtime(tmp_path, tiny_data_dir))
    # Round 0 trains all T = 20 steps; each of the 4 rounds to 50% (20% per round) trains T - k.
    assert summary["steps"] == 20 + 4 * (20 - k)
    assert summary["epochs"] == pytest.approx(2 + 4 * (20 - k) / 10, rel=1e-12)
    optim = cfg.train.optim()
    assert len(first_lr) == 5 and first_lr[0] == lr_at(0, 10, 2, optim)
    assert all(first_lr[r] == lr_at(k, 10, 2, optim) for r in range(1, 5))


def test_lottery_rewound_one_epoch_trains_three_times_the_dense_steps(tiny_data_dir: Path, tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, tiny_data_dir)
    dense, _ = run(build_config({**TINY, "method": "dense", "epochs": 2}), runtime)
    cfg = build_config({**TINY, "method": "lottery", "sparsity": 0.5, "epochs": 2, "method.rewind": "1ep"})
    lottery, _ = run(cfg, runtime)
    assert lottery["steps"] == 3 * dense["steps"] and lottery["epochs"] == 6.0
    assert METHODS.get("lottery").plan(cfg).epochs == 6


def test_late_rewinding_configs_have_new_ids_and_rewinding_to_init_keeps_its_own() -> None:
    from prunelab.config.identity import run_id

    # Before rounds continued from step k, `lottery --set method.rewind=1ep` was 7eddab192ef3.
    assert run_id(build_config({"method": "lottery", "method.rewind": "1ep"})) == "93453a2ad0e5"
    assert run_id(build_config({"method": "lottery"})) == "0152d2ff4f9f"  # unchanged
