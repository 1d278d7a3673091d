"""Runs through the experiment layer: resume is bit-identical, progressive pruning keeps its promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from prunelab.config.build import build_config
from prunelab.runs.experiment import Runtime, run
from prunelab.runs.store import RunFolder, Store

TINY = {"data.val_size": 200, "train.batch_size": 64}


def _runtime(store: Path, data: Path) -> Runtime:
    return Runtime(store=store, data_dir=data, progress=False, download=False)


@pytest.mark.parametrize("raw", [
    {"method": "progressive", "epochs": 4},
    {"method": "progressive", "epochs": 4, "method.update_every": 5, "method.monotone": False},
    {"method": "dense", "epochs": 3, "data.augment.hflip": True, "data.augment.crop_padding": 2},
    {"method": "progressive", "epochs": 4, "model": "lenet5", "train.precision": "bf16", "train.channels_last": True},
])
def test_interrupted_run_resumes_bit_identical(tiny_data_dir: Path, tmp_path: Path, monkeypatch, raw: dict) -> None:
    cfg = build_config({**TINY, **raw})
    reference, _ = run(cfg, _runtime(tmp_path / "a", tiny_data_dir))

    original = RunFolder.append_metrics

    def interrupt_at_epoch_2(self: RunFolder, record: dict[str, Any]) -> None:
        original(self, record)
        if record["epoch"] == 2:  # after epoch 2 is logged, before its checkpoint is written
            raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "append_metrics", interrupt_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, _runtime(tmp_path / "b", tiny_data_dir))
    record = Store(tmp_path / "b").get(reference["run_id"])
    assert record is not None and record.status == "interrupted"
    monkeypatch.setattr(RunFolder, "append_metrics", original)

    resumed, cached = run(cfg, _runtime(tmp_path / "b", tiny_data_dir))
    assert not cached
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    for key in ("test_acc", "val_acc", "sparsity", "steps", "epochs", "train_flops", "selected_test_acc"):
        assert resumed[key] == reference[key], key
    metrics = Store(tmp_path / "b").folder(reference["run_id"]).metrics()
    assert [m["epoch"] for m in metrics] == list(range(1, cfg.train.epochs + 1))


def _masks(store: Path, run_id: str) -> dict[str, torch.Tensor]:
    return torch.load(store / run_id / "mask.pt", weights_only=True)


@pytest.mark.parametrize("allocation", ["global", "layerwise"])
def test_progressive_ramp_is_monotone_and_exact(tiny_data_dir: Path, tmp_path: Path, allocation: str) -> None:
    cfg = build_config({**TINY, "epochs": 4, "sparsity": 0.8, "method.end_epoch": 3,
                        "prune.allocation": allocation})
    summary, _ = run(cfg, _runtime(tmp_path, tiny_data_dir))
    metrics = Store(tmp_path).folder(summary["run_id"]).metrics()
    kept = [m["kept"] for m in metrics]
    total = 266_200  # LeNet-300-100's Conv/Linear weights
    # Seed schedule: s_e = s_f * (e + 1) / E_ramp, here 0.8 * [1/3, 2/3, 1, 1].
    assert kept == [round((1 - 0.8 * min(1, (e + 1) / 3)) * total) for e in range(4)]
    masks = _masks(tmp_path, summary["run_id"])
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)
    assert summary["sparsity"] == 1 - round(0.2 * total) / total
    assert summary["selected_epoch"] in (3, 4)  # only epochs at the target compete for selection
    # FLOPs: every weight of LeNet-300-100 is used once per sample (2 FLOPs forward, 3 forwards a step)
    # and the masks change only before an epoch's first batch, so epoch e costs 6 x images x kept_e.
    images = summary["data_identity"]["split"]["train"]
    assert summary["train_flops"] == pytest.approx(6 * images * sum(kept), rel=1e-12)
    assert summary["dense_train_flops"] == 6 * images * 4 * total


def test_excluded_layer_stays_dense(tiny_data_dir: Path, tmp_path: Path) -> None:
    cfg = build_config({**TINY, "epochs": 2, "prune.exclude": ["fc3"]})
    summary, _ = run(cfg, _runtime(tmp_path, tiny_data_dir))
    masks = _masks(tmp_path, summary["run_id"])
    assert len(masks) == 2  # the output layer is not prunable any more
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * sum(m.numel() for m in masks.values()))
