"""RunSummary: the typed summary keeps the stored and printed keys exactly, and reads older summaries."""

from __future__ import annotations

import pytest

from prunelab.runs.summary import DivergedSummary, RunSummary

# The keys of `prunelab run --json` / summary.json for a single-process run (itop_rate and
# connections_moved added with dynamic sparse training; the others as before the typed summary).
KEYS = {
    "run_id", "status", "method", "model", "dataset", "target_sparsity", "seed", "sparsity", "test_acc",
    "test_loss", "val_acc", "selected_epoch", "selected_val_acc", "selected_test_acc", "epochs", "budget", "steps",
    "wall_s", "eval_s", "train_flops", "dense_train_flops", "itop_rate", "connections_moved", "weights_sha256",
    "mask_sha256", "threads",
    "data_identity", "collapsed_layers", "reused_runs", "notes",
}
HEAD = {"run_id": "0123456789ab", "method": "progressive", "model": "lenet300", "dataset": "fashion-mnist",
        "target_sparsity": 0.9, "seed": 0}


def test_keys_are_those_stored_and_ddp_only_when_distributed() -> None:
    summary = RunSummary(status="ok", **HEAD, sparsity=0.9, epochs=3.0, notes=["n"])
    assert set(summary.as_dict()) == KEYS
    with_ddp = RunSummary(status="ok", **HEAD, ddp={"world_size": 2, "mask_sha256": ["a", "a"]})
    assert set(with_ddp.as_dict()) == KEYS | {"ddp"}
    assert RunSummary.from_dict(summary.as_dict()) == summary
    assert RunSummary.from_dict(with_ddp.as_dict()) == with_ddp


def test_older_summaries_read_with_the_missing_fields_none() -> None:
    older = {**HEAD, "status": "ok", "sparsity": 0.9, "weights_sha256": "ab", "unknown_later_field": 1}
    summary = RunSummary.from_dict(older)
    assert (summary.sparsity, summary.weights_sha256, summary.mask_sha256, summary.threads) == (0.9, "ab", None, None)
    with pytest.raises(ValueError, match="lacks \\['run_id'\\]"):
        RunSummary.from_dict({k: v for k, v in older.items() if k != "run_id"})


def test_a_diverged_summary_keeps_its_keys() -> None:
    diverged = DivergedSummary(**HEAD, error="loss is nan", epoch=1, step=3, data_identity=None)
    assert diverged.as_dict() == {**HEAD, "status": "diverged", "error": "loss is nan", "epoch": 1, "step": 3,
                                  "data_identity": None}


def test_whole_epoch_counts_are_integers_in_json() -> None:
    assert RunSummary(status="ok", **HEAD, epochs=20.0).as_dict()["epochs"] == 20
    assert isinstance(RunSummary(status="ok", **HEAD, epochs=20.0).as_dict()["epochs"], int)
    assert RunSummary(status="ok", **HEAD, epochs=2.5).as_dict()["epochs"] == 2.5  # a late rewind to a step
