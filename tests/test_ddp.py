"""``torchrun -m prunelab run`` on CPU (gloo, 2 processes): one run trained with DistributedDataParallel.

Each test starts torchrun as a subprocess on the tiny data and checks what the
issue promises: exact sparsity, equal masks on every rank (their digests),
one result printed and stored by rank 0, the same cost as a single-process
run, and resume after a killed run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from prunelab.cli import main
from prunelab.runs.store import Store
from prunelab.training.distributed import masks_digest

pytestmark = pytest.mark.integration  # torchrun processes

TINY = ["--set", "data.val_size=200", "--batch-size", "64", "--no-progress", "--no-download"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*argv: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PRUNELAB_FAULT"}
    if fault is not None:
        env["PRUNELAB_FAULT"] = fault
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), "-m", "prunelab", "run", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _summary(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # rank 0 alone prints
    return json.loads(lines[0])


def _check_masks(summary: dict[str, Any], store: Path) -> None:
    """Exact sparsity from the stored weights; every rank's masks equal to the stored ones.

    Every Conv and Linear weight of the models used here is prunable (the only weights with 2+ dims).
    """
    assert summary["ddp"]["world_size"] == 2
    digests = summary["ddp"]["mask_sha256"]
    masks = torch.load(store / summary["run_id"] / "mask.pt", weights_only=True)
    assert digests == [masks_digest(masks)] * 2
    weights = torch.load(store / summary["run_id"] / "weights.pt", weights_only=True)
    prunable = [w for k, w in weights.items() if k.endswith(".weight") and w.dim() >= 2]
    total = sum(w.numel() for w in prunable)
    kept = sum(int((w != 0).sum()) for w in prunable)
    target = 1 - summary["target_sparsity"]
    assert kept == round(target * total) and summary["sparsity"] == 1 - kept / total


def test_progressive_under_torchrun_matches_a_single_process_run(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--method", "progressive", "--sparsity", "0.9", "--epochs", "2", "--data-dir", str(tiny_data_dir),
            "--json", *TINY]
    ddp = _summary(_torchrun(*argv, "--store", str(tmp_path / "ddp")))
    assert ddp["sparsity"] == 0.9
    _check_masks(ddp, tmp_path / "ddp")
    assert [r.run_id for r in Store(tmp_path / "ddp").records()] == [ddp["run_id"]]
    assert not list((tmp_path / "ddp" / ddp["run_id"]).glob("checkpoint-*"))

    assert main(["run", *argv, "--store", str(tmp_path / "single")]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "ddp" not in single and single["run_id"] == ddp["run_id"]
    # The global batch is the single-process batch: the same steps and the same counted compute.
    for key in ("sparsity", "epochs", "steps", "train_flops", "dense_train_flops"):
        assert ddp[key] == single[key], key
    assert ddp["test_acc"] > 0.5 and single["test_acc"] > 0.5  # chance is 0.1
    assert abs(ddp["test_acc"] - single["test_acc"]) < 0.05


def test_a_method_with_dense_pretraining_runs_under_torchrun(tiny_data_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    summary = _summary(_torchrun("--method", "oneshot", "--sparsity", "0.8", "--epochs", "1", "--data-dir",
                                 str(tiny_data_dir), "--store", str(store), "--json", *TINY))
    _check_masks(summary, store)
    assert summary["epochs"] == 2 and len(summary["reused_runs"]) == 1  # 1 dense epoch + 1 fine-tuning epoch
    dense = Store(store).get(summary["reused_runs"][0])
    assert dense is not None and dense.status == "ok" and dense.summary is not None
    assert dense.summary["ddp"]["world_size"] == 2 and len(Store(store).records()) == 2


def test_a_killed_torchrun_run_resumes_to_the_uninterrupted_result(tiny_data_dir: Path, tmp_path: Path) -> None:
    argv = ["--method", "progressive", "--epochs", "4", "--data-dir", str(tiny_data_dir), "--json", *TINY]
    reference = _summary(_torchrun(*argv, "--store", str(tmp_path / "a")))

    store = tmp_path / "b"
    killed = _torchrun(*argv, "--store", str(store), fault="kill:step:40")  # every rank dies in epoch 3
    assert killed.returncode != 0
    folder = store / reference["run_id"]
    assert len(list(folder.glob("checkpoint-*.pt"))) == 2 and not (folder / "summary.json").exists()

    resumed = _summary(_torchrun(*argv, "--store", str(store)))
    _check_masks(resumed, store)
    for key in ("weights_sha256", "test_acc", "val_acc", "sparsity", "steps", "train_flops", "selected_test_acc"):
        assert resumed[key] == reference[key], key


@pytest.mark.slow
def test_a_batchnorm_network_scored_on_data_agrees_on_every_rank(tiny_data_dir: Path, tmp_path: Path) -> None:
    # SNIP scores one batch; BatchNorm running statistics are per shard until rank 0's are shared.
    store = tmp_path / "store"
    summary = _summary(_torchrun("--method", "snip", "--model", "resnet20", "--sparsity", "0.8", "--epochs", "2",
                                 "--data-dir", str(tiny_data_dir), "--store", str(store), "--json", *TINY))
    _check_masks(summary, store)
    assert summary["test_acc"] > 0.2
