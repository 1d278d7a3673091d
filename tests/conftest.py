"""Shared test fixtures: a tiny, learnable dataset in the real Fashion-MNIST format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import prunelab

from prunelab.data.idx import write_idx

_CELL = 7  # the 28x28 image is a 4x4 grid of 7x7 cells; class k lights cell k


def tiny_fashion_mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images uint8 (n, 28, 28) and balanced labels uint8 (n,) in 10 classes.

    Each class has its own bright 7x7 block on a noisy dark background, so a
    small model learns it in a few steps.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 80, size=(n, 28, 28), dtype=np.uint8)
    for k in range(10):
        row, col = divmod(k, 4)
        block = (
            labels == k,
            slice(row * _CELL, (row + 1) * _CELL),
            slice(col * _CELL, (col + 1) * _CELL),
        )
        images[block] = rng.integers(170, 256, size=images[block].shape, dtype=np.uint8)
    return images, labels


def write_tiny_fashion_mnist(
    root: Path, n_train: int = 1200, n_test: int = 300, seed: int = 0
) -> Path:
    """Write gzipped IDX files with the real Fashion-MNIST names into ``root/fashion-mnist``.

    Returns ``root``: the folder to pass as ``--data-dir`` / ``data_dir``.
    """
    folder = Path(root) / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = tiny_fashion_mnist_arrays(n_train, seed)
    test_images, test_labels = tiny_fashion_mnist_arrays(n_test, seed + 1)
    for name, array in (
        ("train-images-idx3-ubyte", train_images),
        ("train-labels-idx1-ubyte", train_labels),
        ("t10k-images-idx3-ubyte", test_images),
        ("t10k-labels-idx1-ubyte", test_labels),
    ):
        write_idx(folder / f"{name}.gz", array, gzip=True)
    return Path(root)


def prune_(model: nn.Module, density: float, scheme: str = "global") -> nn.Module:
    """Magnitude-prune ``model`` in place to keep ``density`` of its weights (zeros baked in)."""
    prunelab.prune(model, 1.0 - density, scope=scheme)
    return model


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference between ``a`` (put in eval mode) and ``b`` on ``x``."""
    with torch.no_grad():
        return float((a.eval()(x) - b(x)).abs().max())


def interrupted_then_resumed(
    cfg: Any, runtime: Any, monkeypatch: pytest.MonkeyPatch, run_id: str, stop: Callable[[int, dict[str, Any]], bool]
) -> dict[str, Any]:
    """Run ``cfg`` (run ``run_id``) until Ctrl-C after the epoch record of that run for which
    ``stop(n, record)`` holds (``n``: its records so far, from 1; records of runs it trains first, such
    as dense pretraining, do not count), then run it again (it resumes); the resumed run's summary."""
    from prunelab.runs.experiment import run
    from prunelab.runs.store import RunFolder

    original = RunFolder.append_metrics
    seen = {"n": 0}

    def interrupt(self: RunFolder, record: dict[str, Any]) -> None:
        original(self, record)
        if self.path.name == run_id:
            seen["n"] += 1
            if stop(seen["n"], record):
                raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "append_metrics", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, runtime)
    monkeypatch.setattr(RunFolder, "append_metrics", original)
    return run(cfg, runtime)[0]


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Path:
    """A data directory holding a tiny learnable Fashion-MNIST (1200 train, 300 test)."""
    return write_tiny_fashion_mnist(tmp_path)
