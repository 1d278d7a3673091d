"""The command line end to end on tiny real-format data: results, the store, and user errors."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunelab.cli import main
from prunelab.data import DATASETS
from prunelab.methods import METHODS
from prunelab.models import MODELS

TINY = ["--set", "data.val_size=200", "--batch-size", "64", "--no-progress"]
REQUIRED = {"run_id", "status", "method", "model", "dataset", "target_sparsity", "sparsity", "test_acc",
            "val_acc", "epochs", "steps", "wall_s", "train_flops", "dense_train_flops", "weights_sha256"}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, json.loads(lines[-1]) if code == 0 and "--json" in argv else {}, err


@pytest.mark.parametrize("method", ["dense", "progressive"])
def test_run_stores_a_complete_result(tiny_data_dir: Path, tmp_path: Path, capsys, method: str) -> None:
    store = tmp_path / "store"
    argv = ["run", "--method", method, "--epochs", "3", "--data-dir", str(tiny_data_dir), "--store", str(store),
            "--json", *TINY]
    code, summary, _ = _run(capsys, *argv)
    assert code == 0 and REQUIRED <= set(summary)
    assert summary["status"] == "ok" and summary["method"] == method
    target = 0.0 if method == "dense" else 0.9
    assert summary["target_sparsity"] == target
    weights = torch.load(store / summary["run_id"] / "weights.pt", weights_only=True)
    prunable = [weights[k] for k in ("fc1.weight", "fc2.weight", "fc3.weight")]
    total = sum(w.numel() for w in prunable)
    zeros = sum(int((w == 0).sum()) for w in prunable)
    assert summary["sparsity"] == zeros / total
    if method == "progressive":
        assert zeros == total - round(0.1 * total)
    assert summary["epochs"] == 3 and summary["steps"] == 3 * 16  # 1000 train images / 64
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test_acc"] > 0.5  # learnable tiny data
    assert summary["train_flops"] <= summary["dense_train_flops"]

    # The same config again answers from the store without training.
    code, again, err = _run(capsys, *argv)
    assert code == 0 and again == summary and "already in the store" in err
    code, shown, _ = _run(capsys, "show", summary["run_id"][:6], "--store", str(store), "--json")
    assert code == 0 and shown == summary


def test_list_commands(tmp_path: Path, capsys) -> None:
    registries = {"methods": METHODS, "models": MODELS, "datasets": DATASETS}
    for what, registry in registries.items():
        assert main(["list", what, "--store", str(tmp_path / "s"), "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["name"] for r in rows] == registry.names()
        assert all(r["summary"] for r in rows)
    assert main(["list", "runs", "--store", str(tmp_path / "s"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # a new store holds no run


def test_method_help_lists_settings(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--method", "progressive", "--help"])
    out = capsys.readouterr().out
    assert "settings of method 'progressive'" in out and "end_epoch" in out and "power" in out


def _truncated_dir(tmp_path: Path, tiny_data_dir: Path) -> Path:
    images = tiny_data_dir / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(data[: len(data) // 2]))
    return tiny_data_dir


@pytest.mark.integration
@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--model", "resnet"], "unknown model 'resnet'"),
        (["--set", "train.epochz=3"], "unknown config key"),
        (["--set", "train.lr=-1"], "train.lr must be positive"),
        (["--epochs", "x"], "invalid int value"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
        (["TRUNCATED"], "is not a valid IDX file"),
    ],
)
def test_user_errors_are_one_sentence(tmp_path: Path, tiny_data_dir: Path, extra: list[str], fragment: str) -> None:
    argv = ["run", "--epochs", "1", "--store", str(tmp_path / "store"), "--data-dir", str(tiny_data_dir),
            "--no-download", *TINY]
    if extra == ["TRUNCATED"]:
        _truncated_dir(tmp_path, tiny_data_dir)
        extra = []
    proc = subprocess.run([sys.executable, "-m", "prunelab", *argv, *extra], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_dataset_without_download(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    code = main(["run", "--dataset", "mnist", "--epochs", "1", "--store", str(tmp_path / "s"),
                 "--data-dir", str(tmp_path), "--no-download", "--no-progress"])
    assert code == 2
    assert "does not hold the mnist files" in capsys.readouterr().err


def test_show_unknown_run(tmp_path: Path, capsys) -> None:
    assert main(["show", "abcdef", "--store", str(tmp_path / "s")]) == 2
    assert "no run 'abcdef'" in capsys.readouterr().err
