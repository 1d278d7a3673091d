"""prune.structure=channel through whole runs: channels removed for real, the target never missed,
the stored weights rebuilt from the recorded cuts, FLOPs that follow the smaller network, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import interrupted_then_resumed
from prunelab.cli.output import print_summary
from prunelab.config.build import build_config
from prunelab.errors import UserError
from prunelab.models import build_model
from prunelab.runs.experiment import Runtime, run
from prunelab.sparsity.channel_cut import replay_cuts
from prunelab.sparsity.channels import find_groups
from prunelab.sparsity.mask import prunable_parameters

TINY = {"data.val_size": 200, "train.batch_size": 100, "epochs": 4}  # 1000 train images: 10 steps/epoch


def _runtime(store: Path, data: Path) -> Runtime:
    return Runtime(store=store, data_dir=data, progress=False, download=False)


def _rebuilt(summary: dict[str, Any], store: Path) -> torch.nn.Module:
    """The stored weights in the model as built with the run's cuts replayed (shapes must agree)."""
    model = build_model(summary["model"], 1, 28, 10)
    replay_cuts(model, summary["channel_cuts"], torch.zeros(1, 1, 28, 28))
    model.load_state_dict(torch.load(store / summary["run_id"] / "weights.pt", weights_only=True))
    return model


@pytest.mark.parametrize(("method", "extra"), [
    ("progressive", {}),
    ("progressive", {"method.score": "l2", "prune.allocation": "layerwise"}),
    ("oneshot", {"method.score": "taylor", "method.batches": 2}),
    ("iterative", {"method.schedule": "constant", "method.steps": 2, "method.finetune_epochs": 1}),
])
@pytest.mark.parametrize("model", ["lenet300", "lenet5"])
def test_channel_runs_remove_channels_and_never_miss_the_target(
    model: str, method: str, extra: dict[str, Any], tiny_data_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = build_config({**TINY, "model": model, "method": method, "prune.structure": "channel", "sparsity": 0.5,
                        **extra})
    summary, _ = run(cfg, _runtime(tmp_path, tiny_data_dir))
    assert summary["status"] == "ok"
    built = build_model(model, 1, 28, 10)
    dense_total = sum(p.numel() for p in prunable_parameters(built).values())
    rebuilt = _rebuilt(summary, tmp_path)
    left = sum(p.numel() for p in prunable_parameters(rebuilt).values())
    assert left <= round(0.5 * dense_total) and summary["sparsity"] >= 1 - left / dense_total >= 0.5
    assert 0 < summary["channel_sparsity"] < 1 and summary["itop_rate"] is None
    # The classifier keeps its outputs and the input its channels.
    assert rebuilt(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # Every epoch after a cut is counted at the smaller network's FLOPs.
    assert summary["train_flops"] < summary["dense_train_flops"]
    if method == "progressive" and model == "lenet5" and not extra:  # `prunelab show` names the channel fields
        print_summary(summary, as_json=False)
        shown = capsys.readouterr().out
        assert f"channel sparsity              {summary['channel_sparsity']:.4f}" in shown


def test_a_killed_channel_run_resumes_bit_identical(tiny_data_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Updates every 5 steps until epoch 3: cuts in epochs 1, 2 and 3; killed after epoch 2's record.
    raw = {**TINY, "model": "lenet5", "method": "progressive", "prune.structure": "channel", "sparsity": 0.6,
           "method.update_every": 5, "method.end_epoch": 3, "prune.allocation": "layerwise"}
    cfg = build_config(raw)
    straight, _ = run(cfg, _runtime(tmp_path / "a", tiny_data_dir))
    resumed = interrupted_then_resumed(cfg, _runtime(tmp_path / "b", tiny_data_dir), monkeypatch,
                                       straight["run_id"], lambda n, record: n == 2)
    assert len(straight["channel_cuts"]) >= 3
    assert resumed["channel_cuts"] == straight["channel_cuts"]
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    assert resumed["train_flops"] == straight["train_flops"] and resumed["test_acc"] == straight["test_acc"]


@pytest.mark.parametrize(("raw", "fragment"), [
    ({"method": "lottery"}, "lottery cannot prune with prune.structure=channel"),
    ({"method": "progressive", "method.score": "hessian"}, "criterion 'hessian' scores single weights"),
    ({"method": "progressive", "method.score": "l2", "prune.structure": "unstructured"},
     "method.score='l2' needs prune.structure=channel"),
    ({"method": "oneshot", "method.score": "bn_scale", "prune.structure": "2:4"}, "scores whole channels"),
    ({"method": "progressive", "method.monotone": False}, "needs method.monotone=true"),
])
def test_channel_settings_that_cannot_work_are_refused(raw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build_config({"prune.structure": "channel", **raw})


def test_layerwise_cuts_in_steps_end_with_the_counts_of_one_cut(tiny_data_dir: Path, tmp_path: Path) -> None:
    # Cuts every 5 steps; the fraction of every group is taken of the channels it was built with,
    # so the end is one fraction f of each group (floor(f * channels) gone), as one cut would leave.
    raw = {**TINY, "model": "lenet5", "method": "progressive", "prune.structure": "channel", "sparsity": 0.7,
           "method.update_every": 5, "method.end_epoch": 3, "prune.allocation": "layerwise"}
    summary, _ = run(build_config(raw), _runtime(tmp_path, tiny_data_dir))
    assert len(summary["channel_cuts"]) >= 3
    built = {g.root: g.channels for g in find_groups(build_model("lenet5", 1, 28, 10), torch.zeros(1, 1, 28, 28))}
    gone = {root: sum(len(cut.get(root, ())) for cut in summary["channel_cuts"]) for root in built}
    fractions = {k / c for c in built.values() for k in range(c)}
    assert any(all(gone[r] == int(f * c + 1e-9) for r, c in built.items()) for f in fractions), gone
