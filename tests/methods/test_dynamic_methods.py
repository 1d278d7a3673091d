"""set, rigl and granet on tiny real-format data: the invariants of every update step, ITOP, cost, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from prunelab.config.build import build_config
from prunelab.methods import dynamic
from prunelab.runs.experiment import Runtime, run
from prunelab.training.loop import Trainer
from conftest import interrupted_then_resumed

# 1000 training images in batches of 100: 10 steps an epoch; updates every few steps.
TINY = {"data.val_size": 200, "train.batch_size": 100, "epochs": 2}
TOTAL = 266_200  # LeNet-300-100's Linear weights
FAST = {
    "set": {"method.update_every": 4},
    "rigl": {"method.delta": 3},
    "granet": {"method.update_every": 4},
}


def _runtime(store: Path, data: Path) -> Runtime:
    return Runtime(store=store, data_dir=data, progress=False, download=False)


class UpdateSpy:
    """Wraps a method's hook: the masks, weights and momentum around each call, and the step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hook: type, method: str) -> None:
        self.calls: list[dict[str, Any]] = []
        original = getattr(hook, method)
        spy = self

        def wrapped(self_: Any, step: int, trainer: Trainer) -> Any:
            before = {k: v.clone() for k, v in trainer.masker.masks.items()}
            result = original(self_, step, trainer)
            update = self_.updates.at(step)
            spy.calls.append({
                "step": step, "before": before, "after": dict(trainer.masker.masks), "hook": self_, "update": update,
                # Right after the update (what the step's optimizer does next is not its business).
                "weights": {n: p.detach().clone() for n, p in trainer.masker.params.items()} if update else {},
                "momentum": {n: _momentum(trainer, n) for n in trainer.masker.params} if update else {},
            })
            return result

        monkeypatch.setattr(hook, method, wrapped)


def _momentum(trainer: Trainer, name: str) -> torch.Tensor | None:
    assert trainer.optimizer is not None
    buffer = trainer.optimizer.state.get(trainer.masker.params[name], {}).get("momentum_buffer")
    return None if buffer is None else buffer.clone()


@pytest.mark.parametrize(("method", "hook", "where"), [
    ("set", dynamic.SetHook, "before_step"),
    ("rigl", dynamic.RiglHook, "after_backward"),
    ("granet", dynamic.GranetHook, "after_backward"),
])
def test_every_update_keeps_the_invariants(method: str, hook: type, where: str, tiny_data_dir: Path,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = UpdateSpy(monkeypatch, hook, where)
    cfg = build_config({**TINY, "method": method, "sparsity": 0.9, **FAST[method]})
    summary, _ = run(cfg, _runtime(tmp_path, tiny_data_dir))
    updates = [c for c in spy.calls if c["update"]]
    assert len(spy.calls) == 20 and len(updates) >= 3
    moved = 0
    for call in spy.calls:
        before, after = call["before"], call["after"]
        if not call["update"]:  # masks change only at update steps
            assert all(torch.equal(before[n], after[n]) for n in before)
            continue
        grown = {n: after[n] & ~before[n] for n in before}
        dropped = {n: before[n] & ~after[n] for n in before}
        moved += sum(int(g.sum()) for g in grown.values())
        for n, weight in call["weights"].items():
            # A regrown weight starts at exactly 0 with zero optimizer state; dropped ones become 0.
            assert torch.count_nonzero(weight[grown[n] | dropped[n]]) == 0
            momentum = call["momentum"][n]
            if momentum is not None:
                assert torch.count_nonzero(momentum[~after[n]]) == 0
                assert torch.count_nonzero(momentum[grown[n]]) == 0
        kept_before, kept_after = (sum(int(m.sum()) for m in ms.values()) for ms in (before, after))
        regrown, removed = (sum(int(m.sum()) for m in ms.values()) for ms in (grown, dropped))
        if method == "granet":  # the cubic schedule's count, then as many regrown as dropped beyond it
            schedule = call["hook"].ramp.schedule
            target = round((1 - schedule.sparsity_at(call["step"])) * TOTAL)
            assert kept_after == (target if schedule.is_update(call["step"]) else kept_before)
            assert removed - regrown == kept_before - kept_after
        else:  # every layer keeps its count: exactly the target, as many regrown as dropped
            assert all(int(after[n].sum()) == int(before[n].sum()) for n in before)
            assert kept_after == round(0.1 * TOTAL) and regrown == removed
    assert summary["connections_moved"] == moved > 0
    # The masks keep exactly 10% (checked above); counted from the weights, a connection regrown late
    # that no gradient has reached yet is still 0, so the weights may hold a few more zeros.
    assert 0.9 <= summary["sparsity"] < 0.9 + moved / TOTAL
    density = 1.0 if method == "granet" else 0.1  # granet starts dense: every weight trained once
    assert summary["itop_rate"] > 0.1 and summary["itop_rate"] >= density


def test_rigl_counts_the_dense_gradient_of_every_update(tiny_data_dir: Path, tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, tiny_data_dir)
    static, _ = run(build_config({**TINY, "method": "erk", "sparsity": 0.9}), runtime)
    rigl, _ = run(build_config({**TINY, "method": "rigl", "sparsity": 0.9, "method.delta": 3}), runtime)
    # LeNet-300-100 uses each weight once per sample (2 FLOPs): f_D = 2 x 266,200, f_S = 2 x 26,620.
    # Updates at steps 0, 3, ..., 12 (< 75% of 20 steps): each costs f_D - f_S more per sample (RigL's count).
    updates = len(range(0, 15, 3))
    extra = updates * 100 * (2 * TOTAL - 2 * round(0.1 * TOTAL))
    assert rigl["train_flops"] == pytest.approx(static["train_flops"] + extra, rel=1e-12)
    assert rigl["train_flops"] > static["train_flops"]


def test_a_fixed_mask_has_itop_equal_to_its_density(tiny_data_dir: Path, tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, tiny_data_dir)
    snip, _ = run(build_config({**TINY, "method": "snip", "sparsity": 0.9}), runtime)
    dense, _ = run(build_config({**TINY, "method": "dense"}), runtime)
    assert (snip["itop_rate"], snip["connections_moved"]) == (round(0.1 * TOTAL) / TOTAL, 0)
    assert (dense["itop_rate"], dense["connections_moved"]) == (1.0, 0)


@pytest.mark.parametrize("method", ["set", "rigl", "granet"])
def test_dynamic_methods_resume_bit_identical(method: str, tiny_data_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = build_config({**TINY, "epochs": 3, "method": method, "sparsity": 0.9, **FAST[method]})
    reference, _ = run(cfg, _runtime(tmp_path / "a", tiny_data_dir))
    resumed = interrupted_then_resumed(cfg, _runtime(tmp_path / "b", tiny_data_dir), monkeypatch,
                                       reference["run_id"], lambda n, record: record["epoch"] == 2)
    for key in ("weights_sha256", "mask_sha256", "test_acc", "train_flops", "itop_rate", "connections_moved"):
        assert resumed[key] == reference[key], key
