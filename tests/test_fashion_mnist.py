"""End to end on the real Fashion-MNIST (Debian's dataset-fashion-mnist; `make test` installs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunelab.config.build import build_config
from prunelab.runs.experiment import Runtime, run

REAL = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").exists(),
                                reason="Fashion-MNIST is not installed (run `make data`)")


def _run(tmp_path: Path, **raw: object) -> dict:
    summary, _ = run(build_config(raw), Runtime(store=tmp_path, progress=False, download=False))
    return summary


def test_progressive_two_epochs_hits_exact_sparsity(tmp_path: Path) -> None:
    summary = _run(tmp_path, method="progressive", sparsity=0.9, epochs=2)
    assert summary["sparsity"] == 1 - round(0.1 * 266_200) / 266_200
    assert summary["test_acc"] > 0.8  # LeNet-300-100 reaches ~0.86 after 2 epochs at 90%
    assert summary["steps"] == 2 * 430  # 55,000 training images in batches of 128


@pytest.mark.slow
def test_progressive_90_within_one_point_of_dense_in_30_epochs(tmp_path: Path) -> None:
    dense = _run(tmp_path, method="dense", epochs=30)
    sparse = _run(tmp_path, method="progressive", sparsity=0.9, epochs=30)
    assert sparse["sparsity"] == 1 - round(0.1 * 266_200) / 266_200
    assert sparse["test_acc"] >= dense["test_acc"] - 0.01
