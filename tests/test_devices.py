"""Device choice (``--device``) and the device options that enter the config: bf16 autocast
(``train.precision``) and ``train.channels_last``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prunelab.cli import main
from prunelab.config.build import build_config
from prunelab.config.identity import run_id
from prunelab.errors import UserError
from prunelab.runs.experiment import Runtime, resolve_device, run

TINY = {"data.val_size": 200, "train.batch_size": 64}
TINY_ARGS = ["--set", "data.val_size=200", "--batch-size", "64", "--no-progress", "--no-download"]


def _exact_sparsity(store: Path, summary: dict) -> None:
    """The stored weights keep exactly the target count (LeNets: every weight matrix and kernel is prunable)."""
    weights = torch.load(store / summary["run_id"] / "weights.pt", weights_only=True)
    prunable = [w for k, w in weights.items() if k.endswith(".weight") and w.dim() >= 2]
    total = sum(w.numel() for w in prunable)
    kept = sum(int((w != 0).sum()) for w in prunable)
    assert kept == round((1 - summary["target_sparsity"]) * total)
    assert summary["sparsity"] == 1 - kept / total


def test_bf16_run_trains_and_prunes_exactly(tiny_data_dir: Path, tmp_path: Path) -> None:
    cfg = build_config({**TINY, "method": "progressive", "epochs": 3, "train.precision": "bf16"})
    assert run_id(cfg) != run_id(build_config({**TINY, "method": "progressive", "epochs": 3}))
    summary, _ = run(cfg, Runtime(store=tmp_path, data_dir=tiny_data_dir, progress=False, download=False))
    assert summary["sparsity"] == 0.9
    _exact_sparsity(tmp_path, summary)
    assert summary["test_acc"] > 0.5  # chance is 0.1
    assert json.loads((tmp_path / summary["run_id"] / "config.json").read_text())["train"]["precision"] == "bf16"


def test_channels_last_flag_gives_the_same_sparsity_and_finite_results(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--model", "lenet5", "--epochs", "2", "--data-dir", str(tiny_data_dir), "--json", *TINY_ARGS]
    results = {}
    for layout in ([], ["--channels-last"]):
        store = tmp_path / ("last" if layout else "first")
        assert main([*argv, *layout, "--store", str(store)]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        _exact_sparsity(store, summary)
        assert all(math.isfinite(summary[k]) for k in ("test_acc", "test_loss", "val_acc"))
        results[bool(layout)] = (store, summary)
    store, summary = results[True]
    assert summary["sparsity"] == results[False][1]["sparsity"] == 0.9
    assert summary["run_id"] != results[False][1]["run_id"]
    config = json.loads((store / summary["run_id"] / "config.json").read_text())
    assert config["train"]["channels_last"] is True
    # The second convolution (6 input channels), whose layouts differ.
    conv = torch.load(store / summary["run_id"] / "weights.pt", weights_only=True)["features.3.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_an_unknown_precision_flag_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--precision", "bf61", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown precision 'bf61' (did you mean 'bf16'?)" in err and "\n" not in err


def test_auto_is_the_default_device_and_picks_cuda_only_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Runtime().device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="^--device cuda was asked for but no CUDA device is available$"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_an_unknown_device_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--device", "tpu", "--store", str(tmp_path)])
    assert exit_.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
