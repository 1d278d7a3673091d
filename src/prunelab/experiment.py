"""One run from config to stored result: build everything from the registries, run the method, store.

This is the only place that knows the store, the data, the models and the
methods at once; methods and the training loop see only what they need.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunelab.config import MethodConfig, RunConfig, run_id, to_dict
from prunelab.data import DataSplits, load_splits
from prunelab.errors import UserError
from prunelab.methods import METHODS
from prunelab.methods.context import Context, Pretrained
from prunelab.models import build_model
from prunelab.sparsity.mask import Masker, prunable_parameters, weight_sparsity
from prunelab.store import RunFolder, Store, atomic_torch_save, safe_torch_load
from prunelab.training.cost import forward_flops
from prunelab.training.loop import Cost, LoopSettings, Trainer, evaluate


@dataclass(frozen=True)
class Runtime:
    """How and where to run; none of it changes a result, so none of it is in the run id."""

    store: Path = Path("runs")
    data_dir: Path | None = None
    device: str = "cpu"
    threads: int | None = None
    progress: bool | None = None
    download: bool = True


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda' or 'auto' (CUDA when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose one of: auto, cpu, cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; says where the run can resume from."""

    def __init__(self, run_id: str, folder: RunFolder) -> None:
        latest = folder.checkpoints()
        where = (
            f"its checkpoint {latest[-1].name} is kept; run the same command again to resume from it"
            if latest else "it had no checkpoint yet; run the same command again to start it over"
        )
        super().__init__(f"run {run_id} interrupted; {where}")


def _stored(store: Store, rid: str) -> dict[str, Any] | None:
    """The summary of a finished run, if the store has one."""
    record = store.get(rid)
    return record.summary if record is not None and record.status == "ok" else None


def headline(cfg: RunConfig) -> dict[str, Any]:
    """The fields every summary and index row carries."""
    return {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "target_sparsity": cfg.prune.sparsity,
        "seed": cfg.seed,
    }


def run(cfg: RunConfig, runtime: Runtime, data: DataSplits | None = None) -> tuple[dict[str, Any], bool]:
    """Run ``cfg`` (or return its stored result). Returns (summary, was_cached).

    ``data``: the already loaded splits of ``cfg``'s dataset and seed (saves a reload
    when a method runs its dense pretraining as a run of its own).
    """
    store = Store(runtime.store)
    rid = run_id(cfg)
    cached = _stored(store, rid)
    if cached is not None:
        return cached, True
    # One process trains a run; another asking for it waits, then reads the result.
    with store.lock(rid):
        cached = _stored(store, rid)
        if cached is not None:
            return cached, True
        folder = store.begin(rid, to_dict(cfg), headline(cfg))
        try:
            summary = _execute(cfg, rid, folder, runtime, data)
            store.finish(rid, summary)
        except KeyboardInterrupt:
            store.mark(rid, "interrupted", "interrupted by the user")
            raise RunInterrupted(rid, folder) from None
        except UserError as exc:
            store.mark(rid, "failed", str(exc))
            raise
        except Exception as exc:
            store.mark(rid, "failed", f"{type(exc).__name__}: {exc}")
            raise
        folder.drop_checkpoint()
    return summary, False


def _execute(
    cfg: RunConfig, rid: str, folder: RunFolder, runtime: Runtime, data: DataSplits | None
) -> dict[str, Any]:
    device = resolve_device(runtime.device)
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    seed_everything(cfg.seed)
    if data is None:
        data = load_splits(cfg.data.dataset, runtime.data_dir, cfg.data.val_size, cfg.seed, runtime.download)
        data = _to_device(data, device)
    spec = data.spec
    model = build_model(cfg.model.name, spec.channels, spec.image_size, spec.num_classes).to(device)
    params = prunable_parameters(model, cfg.prune.exclude)
    if not params:
        raise UserError(f"every prunable layer of {cfg.model.name} is excluded by prune.exclude; nothing to prune")
    trainer = Trainer(
        model=model,
        data=data,
        settings=LoopSettings(
            batch_size=cfg.train.batch_size,
            label_smoothing=cfg.train.label_smoothing,
            optim=cfg.train.optim(),
            augment=cfg.data.augment,
        ),
        masker=Masker(params),
        layer_flops=forward_flops(model, (spec.channels, spec.image_size, spec.image_size)),
        seed=cfg.seed,
        checkpointer=folder,
        log=folder.append_metrics,
        progress=runtime.progress,
    )
    ctx = Context(cfg, trainer, pretrained=lambda: _pretrained(cfg, runtime, data))
    METHODS.get(cfg.method.name).run(ctx, cfg.method.settings)
    return _finish(ctx, rid, folder, data)


def dense_config(cfg: RunConfig) -> RunConfig:
    """The dense run of the same recipe (data, model, training, seed)."""
    dense = METHODS.get("dense")
    return dense.resolve(dataclasses.replace(cfg, method=MethodConfig("dense")))


def _pretrained(cfg: RunConfig, runtime: Runtime, data: DataSplits) -> Pretrained:
    """The stored dense run of ``cfg``'s recipe, trained (and stored) first if it is not there yet.

    Content-addressed: any method of any sweep that needs this pretraining finds
    the same run id, so it is trained once.
    """
    summary, _ = run(dense_config(cfg), runtime, data)
    weights = safe_torch_load(Store(runtime.store).folder(summary["run_id"]).path / "weights.pt")
    cost = Cost(**{f.name: summary[f.name] for f in dataclasses.fields(Cost)})
    return Pretrained(summary["run_id"], weights, cost)


def _to_device(data: DataSplits, device: torch.device) -> DataSplits:
    if device.type == "cpu":
        return data
    moved = {k: getattr(data, k).to(device) for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
    return DataSplits(**moved, spec=data.spec)


def _finish(ctx: Context, rid: str, folder: RunFolder, data: DataSplits) -> dict[str, Any]:
    """Evaluate on test (final weights and validation-selected weights), store files, build the summary."""
    model, masker = ctx.trainer.model, ctx.trainer.masker
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(folder.path / "weights.pt", state)
    atomic_torch_save(folder.path / "mask.pt", {k: v.cpu() for k, v in masker.masks.items()})
    weights_sha256 = hashlib.sha256((folder.path / "weights.pt").read_bytes()).hexdigest()
    started = time.perf_counter()
    test_loss, test_acc = evaluate(model, data.test_x, data.test_y)
    history = ctx.last_cycle.history if ctx.last_cycle else []
    selection = ctx.last_cycle.selection if ctx.last_cycle else None
    selected_test_acc = None
    if selection is not None and selection.state is not None:
        model.load_state_dict(selection.state)
        selected_test_acc = evaluate(model, data.test_x, data.test_y)[1]
        model.load_state_dict(state)
    collapsed = ctx.check_collapse()
    cost = ctx.trainer.cost
    final = history[-1] if history else {}
    return {
        "run_id": rid,
        "status": "ok",
        **headline(ctx.cfg),
        "sparsity": weight_sparsity(masker.params),
        "test_acc": test_acc,
        "test_loss": test_loss,
        "val_acc": final.get("val_acc"),
        "selected_epoch": selection.epoch if selection and selection.epoch > 0 else None,
        "selected_val_acc": selection.val_acc if selection and selection.epoch > 0 else None,
        "selected_test_acc": selected_test_acc,
        "epochs": cost.epochs,
        "steps": cost.steps,
        "wall_s": cost.wall_s,
        "eval_s": time.perf_counter() - started,
        "train_flops": cost.train_flops,
        "dense_train_flops": cost.dense_train_flops,
        "weights_sha256": weights_sha256,
        "collapsed_layers": collapsed,
        "reused_runs": ctx.reused,
        "notes": ctx.notes,
    }
