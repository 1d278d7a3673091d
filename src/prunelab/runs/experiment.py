"""One run from config to stored result: build everything from the registries, run the method, store.

This is the only place that knows the store, the data, the models and the
methods at once; methods and the training loop see only what they need.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunelab.config.identity import run_id, to_dict
from prunelab.config.build import method_config
from prunelab.config.schema import RunConfig
from prunelab.data import DataSplits, load_splits
from prunelab.data.identity import DataIdentity
from prunelab.errors import Diverged, UserError
from prunelab.integrations.trackers import TrackedRun, tracked
from prunelab.methods import METHODS
from prunelab.methods.context import Context, Pretrained
from prunelab.models import build_model
from prunelab.sparsity.channels import classifier_name
from prunelab.sparsity.mask import Masker, count_zeros, prunable_parameters
from prunelab.sparsity.structure import check_groupable, check_nm, parse_structure
from prunelab.runs.summary import DivergedSummary, RunSummary
from prunelab.runs.store import MASK, WEIGHTS, RunFolder, Store, checkpoint_owner
from prunelab.training import distributed
from prunelab.training.cost import forward_flops
from prunelab.training.distributed import World
from prunelab.training.loop import CHANNEL_CUTS, Cost, LoopSettings, Trainer


@dataclass(frozen=True)
class Runtime:
    """How and where to run; none of it changes a result, so none of it is in the run id.

    ``data``: the identity of the files each dataset was found to have (see
    :func:`data_identities`), so that a sweep knows its runs' ids before any
    of them trains; every run still reads and checks its data itself.
    ``trackers``: where each epoch record goes besides ``metrics.jsonl``
    (:mod:`prunelab.integrations.trackers`; ``mlflow_uri``: MLflow's tracking URI).
    """

    store: Path = Path("runs")
    data_dir: Path | None = None
    device: str = "auto"
    progress: bool | None = None
    download: bool = True
    data: Mapping[str, DataIdentity] = field(default_factory=dict)
    trackers: tuple[str, ...] = ()
    mlflow_uri: str | None = None


def data_identities(datasets: Iterable[str], runtime: Runtime) -> Runtime:
    """``runtime`` knowing the identity of the files of each of ``datasets`` (each read once)."""
    known = dict(runtime.data)
    for name in datasets:
        if name not in known:
            identity = load_splits(name, runtime.data_dir, None, 0, runtime.download).identity
            assert identity is not None
            known[name] = identity
    return dataclasses.replace(runtime, data=known)


def identify(cfg: RunConfig, runtime: Runtime) -> str:
    """The run id of ``cfg`` on the data ``runtime`` knows (:func:`data_identities` must have seen its dataset)."""
    if cfg.data.dataset not in runtime.data:
        raise RuntimeError(f"the identity of dataset {cfg.data.dataset!r} is not known yet; call data_identities")
    return run_id(cfg, runtime.data[cfg.data.dataset])


def resolve_device(name: str, world: World = distributed.SINGLE) -> torch.device:
    """'cpu', 'cuda' or 'auto' (CUDA when present); each process of a distributed run uses GPU LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose one of: auto, cpu, cuda")
    if name == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
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

    The data is read first: the run id covers the files read (see
    :func:`prunelab.config.run_id`), so a stored result is reused only for
    the same config and the same data, and only after its files pass their
    checksums. A run whose loss stops being finite is stored as ``diverged``
    and raises :class:`Diverged`, also when it is asked for again.

    Under torchrun every process calls this and trains the run together
    (:mod:`prunelab.training.distributed`): rank 0 alone uses the store and
    tells the others whether to train and, at the end, the result.
    """
    world = distributed.current()
    if data is None:
        data = load_data(cfg, runtime, world)
    rid = run_id(cfg, data.identity)
    if not world.is_main:
        return _follow(cfg, rid, runtime, data, world)
    store = Store(runtime.store)
    cached = _stored(store, rid)
    if cached is not None:
        return world.share(cached), True
    # One process trains a run; another asking for it waits, then reads the result.
    with store.lock(rid):
        cached = _stored(store, rid)
        if cached is not None:
            return world.share(cached), True
        config = run_config_record(cfg, data)
        folder = store.begin(rid, config, headline(cfg))
        world.share(None)  # the other ranks: train it (the folder exists now)
        try:
            # Trackers see each epoch as metrics.jsonl gets it; a resumed run replays what that file kept.
            tracked_run = TrackedRun(rid, folder.path, store.root, config, runtime.mlflow_uri)
            stored = folder.metrics() if runtime.trackers else []
            with tracked(runtime.trackers, tracked_run, folder.append_metrics, stored) as log:
                summary = _finish(_train(cfg, folder, runtime, data, world, log), rid, folder)
            store.finish(rid, summary)
        except KeyboardInterrupt:
            store.mark(rid, "interrupted", "interrupted by the user")
            raise RunInterrupted(rid, folder) from None
        except Diverged as exc:
            store.finish(rid, diverged_summary(cfg, rid, exc, data))
            folder.drop_checkpoint()
            raise Diverged(f"run {rid}: {exc}", exc.epoch, exc.step) from None
        except UserError as exc:
            store.mark(rid, "failed", str(exc))
            raise
        except Exception as exc:
            store.mark(rid, "failed", f"{type(exc).__name__}: {exc}")
            raise
        folder.drop_checkpoint()
    return world.share(summary), False


def _stored(store: Store, rid: str) -> dict[str, Any] | None:
    """The verified stored summary of ``rid`` if it finished; raises :class:`Diverged` if it diverged."""
    record = store.get(rid)
    if record is not None and record.status == "diverged" and record.summary is not None:
        s = record.summary
        raise Diverged(f"run {rid} is stored as diverged: {s.get('error')}", s.get("epoch"), s.get("step"))
    return store.finished(rid)


def run_config_record(cfg: RunConfig, data: DataSplits) -> dict[str, Any]:
    """What ``config.json`` holds: the resolved config and, under ``data_identity``, the data read."""
    record = to_dict(cfg)
    if data.identity is not None:
        record["data_identity"] = data.identity.as_dict()
    return record


def diverged_summary(cfg: RunConfig, rid: str, exc: Diverged, data: DataSplits) -> dict[str, Any]:
    """The stored record of a diverged run: where it diverged, and no result."""
    return DivergedSummary(
        run_id=rid, **headline(cfg), error=str(exc), epoch=exc.epoch, step=exc.step,
        data_identity=data.identity.as_dict() if data.identity is not None else None,
    ).as_dict()


def load_data(cfg: RunConfig, runtime: Runtime, world: World = distributed.SINGLE) -> DataSplits:
    """The splits ``cfg`` trains on, checked against its batch size; says their sizes and origin (rank 0)."""
    with world.main_first():  # one download, not one per process
        data = load_splits(cfg.data.dataset, runtime.data_dir, cfg.data.val_size, cfg.seed, runtime.download)
    n_train = len(data.train_y)
    if n_train < cfg.train.batch_size:
        raise UserError(
            f"the training split has {n_train} images, fewer than one batch of {cfg.train.batch_size}; "
            "lower train.batch_size or data.val_size"
        )
    if world.is_main and data.identity is not None:
        RunFolder.notify(data.identity.describe())
    return data


def _follow(
    cfg: RunConfig, rid: str, runtime: Runtime, data: DataSplits, world: World
) -> tuple[dict[str, Any], bool]:
    """:func:`run` on a rank other than 0: train alongside rank 0, write nothing, return rank 0's result."""
    cached = world.share(None)
    if cached is not None:
        return cached, True
    # Read-only: rank 0 writes this folder; we only load the checkpoints it wrote.
    folder = RunFolder(Path(runtime.store) / rid, owner=checkpoint_owner(rid, run_config_record(cfg, data)))
    _train(cfg, folder, runtime, data, world, None)
    return world.share(None), False


def _train(cfg: RunConfig, folder: RunFolder, runtime: Runtime, data: DataSplits, world: World,
           log: Callable[[dict[str, Any]], None] | None) -> Context:
    """Build model, data and trainer, and run the method program; every rank of a distributed run takes part.

    ``log``: what each epoch record goes to (rank 0: its ``metrics.jsonl`` and trackers; None on the
    other ranks, which write nothing).
    """
    device = resolve_device(runtime.device, world)
    # The thread count changes float rounding, so it is part of the config (train.threads), not the runtime.
    torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    data = _to_device(data, device, cfg.train.channels_last)
    world.check_batching(len(data.train_y), cfg.train.batch_size)
    spec = data.spec
    model = build_model(cfg.model.name, spec.channels, spec.image_size, spec.num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)  # 4-D weights (convolutions) only
    params = prunable_parameters(model, cfg.prune.exclude)
    if not params:
        raise UserError(f"every prunable layer of {cfg.model.name} is excluded by prune.exclude; nothing to prune")
    if (nm := parse_structure(cfg.prune.structure)) is not None:
        check_groupable({n: p.shape for n, p in params.items()}, nm)
    trainer = Trainer(
        model=model,
        data=data,
        settings=LoopSettings(
            batch_size=cfg.train.batch_size,
            label_smoothing=cfg.train.label_smoothing,
            optim=cfg.train.optim(),
            augment=cfg.data.augment,
            precision=cfg.train.precision,
            bn_l1=cfg.train.bn_l1,
        ),
        masker=Masker(params),
        layer_flops=forward_flops(model, (spec.channels, spec.image_size, spec.image_size)),
        seed=cfg.seed,
        checkpointer=folder,
        log=log if world.is_main else None,
        progress=runtime.progress if world.is_main else False,
        world=world,
    )
    ctx = Context(cfg, trainer, pretrained=lambda: _pretrained(cfg, runtime, data))
    METHODS.get(cfg.method.name).run(ctx, cfg.method.settings)
    trainer.agree_on_masks("the final masks")
    return ctx


def dense_config(cfg: RunConfig) -> RunConfig:
    """The dense run of the same recipe (data, model, training, seed).

    Without the budget: the epochs are those the budget gave the method's first cycle, and the dense
    run is the same training as a plain dense run of that length (and shares its run id).
    """
    dense = METHODS.get("dense")
    train = dataclasses.replace(cfg.train, budget=None)
    return dense.resolve(dataclasses.replace(cfg, method=method_config("dense"), train=train))


def _pretrained(cfg: RunConfig, runtime: Runtime, data: DataSplits) -> Pretrained:
    """The stored dense run of ``cfg``'s recipe, trained (and stored) first if it is not there yet.

    Content-addressed: any method of any sweep that needs this pretraining finds
    the same run id, so it is trained once.
    """
    summary, _ = run(dense_config(cfg), runtime, data)
    # Read only (every rank of a distributed run reads it), checked against its recorded sha256.
    stored = RunSummary.from_dict(summary)
    weights = Store.reader(runtime.store).load_weights(stored.run_id)
    cost = Cost(**{f.name: getattr(stored, f.name) for f in dataclasses.fields(Cost)})
    return Pretrained(stored.run_id, weights, cost)


def _to_device(data: DataSplits, device: torch.device, channels_last: bool = False) -> DataSplits:
    """The splits on ``device`` (once, so batches never travel), images in channels_last layout if asked.

    Batches are gathered from these tensors and keep their layout.
    """
    if device.type == "cpu" and not channels_last:
        return data
    moved = {k: getattr(data, k).to(device) for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
    if channels_last:
        for k in ("train_x", "val_x", "test_x"):
            if moved[k].dim() == 4:
                moved[k] = moved[k].contiguous(memory_format=torch.channels_last)
    return dataclasses.replace(data, **moved)


def _sparsity(trainer: Trainer) -> float:
    """Zeros among the prunable weights, and weights removed with their channels, over the weights as built."""
    params = trainer.masker.params
    removed = trainer.dense_total - sum(p.numel() for p in params.values())
    return (count_zeros(params) + removed) / trainer.dense_total


def _channel_fields(ctx: Context) -> dict[str, Any]:
    """``channel_sparsity`` and ``channel_cuts`` of a run that removed channels (nothing otherwise)."""
    cuts = ctx.trainer.extra.get(CHANNEL_CUTS)
    if cuts is None:
        return {}
    spec = ctx.trainer.data.spec
    built = build_model(ctx.cfg.model.name, spec.channels, spec.image_size, spec.num_classes)
    example = ctx.trainer.data.train_x[:1].cpu()
    last = classifier_name(built, example)

    def outputs(model: nn.Module) -> int:
        return sum(m.weight.shape[0] for n, m in model.named_modules()
                   if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and n != last)

    return {"channel_sparsity": 1.0 - outputs(ctx.trainer.model) / outputs(built), "channel_cuts": cuts}


def _finish(ctx: Context, rid: str, folder: RunFolder) -> dict[str, Any]:
    """Evaluate on test (final weights and validation-selected weights), store files, build the summary (rank 0)."""
    trainer = ctx.trainer
    model, masker, data = trainer.model, trainer.masker, trainer.data
    if (nm := parse_structure(ctx.cfg.prune.structure)) is not None:
        check_nm(masker.params, nm)  # never store weights that break the structure the run promises
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights_sha256 = folder.write_torch(WEIGHTS, state)
    mask_sha256 = folder.write_torch(MASK, {k: v.cpu() for k, v in masker.masks.items()})
    started = time.perf_counter()
    test_loss, test_acc = trainer.evaluate(data.test_x, data.test_y)
    history = ctx.last_cycle.history if ctx.last_cycle else []
    selection = ctx.last_cycle.selection if ctx.last_cycle else None
    selected_test_acc = None
    if selection is not None and selection.state is not None:
        model.load_state_dict(selection.state)
        selected_test_acc = trainer.evaluate(data.test_x, data.test_y)[1]
        model.load_state_dict(state)
    collapsed = ctx.check_collapse()
    cost = trainer.cost
    final = history[-1] if history else {}
    return RunSummary(
        run_id=rid,
        status="ok",
        **headline(ctx.cfg),
        sparsity=_sparsity(trainer),
        **_channel_fields(ctx),
        test_acc=test_acc,
        test_loss=test_loss,
        val_acc=final.get("val_acc"),
        selected_epoch=selection.epoch if selection and selection.epoch > 0 else None,
        selected_val_acc=selection.val_acc if selection and selection.epoch > 0 else None,
        selected_test_acc=selected_test_acc,
        epochs=cost.epochs,
        budget=ctx.cfg.train.budget,
        steps=cost.steps,
        wall_s=cost.wall_s,
        eval_s=time.perf_counter() - started,
        train_flops=cost.train_flops,
        dense_train_flops=cost.dense_train_flops,
        itop_rate=None if CHANNEL_CUTS in trainer.extra else trainer.history.itop_rate(),
        connections_moved=trainer.history.moved,
        weights_sha256=weights_sha256,
        mask_sha256=mask_sha256,
        threads=ctx.cfg.train.threads,
        data_identity=data.identity.as_dict() if data.identity is not None else None,
        collapsed_layers=collapsed,
        reused_runs=ctx.reused,
        notes=ctx.notes,
        ddp={"world_size": trainer.world.size, "mask_sha256": trainer.mask_digests}
        if trainer.world.distributed else None,
    ).as_dict()
