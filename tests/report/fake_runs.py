"""Hand-built runs for the report's tests: configs, masks and summaries written straight into a store."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from prunelab.runs.store import MASK, Store

LAYERS = {"fc1.weight": (8, 10), "fc2.weight": (4, 8), "fc3.weight": (2, 4)}  # 120 weights
N_WEIGHTS = sum(a * b for a, b in LAYERS.values())


def config(method: str, sparsity: float, seed: int, model: str, dataset: str,
           settings: dict[str, Any], epochs: int = 30, budget: int | None = None) -> dict[str, Any]:
    """A stored config; ``epochs`` is train.epochs (under a budget, what the budget gave the method)."""
    return {
        "seed": seed,
        "data": {"dataset": dataset, "val_size": None, "augment": {"flip": False}},
        "model": {"name": model},
        "train": {"epochs": epochs, "lr": 0.1, "batch_size": 128, **({"budget": budget} if budget else {})},
        "prune": {"sparsity": sparsity, "allocation": "global", "exclude": []},
        "method": {"name": method, "settings": settings},
    }


def mask_keeping(kept: list[int]) -> dict[str, torch.Tensor]:
    """Masks over LAYERS keeping exactly the flat indices ``kept``."""
    flat = torch.zeros(N_WEIGHTS, dtype=torch.bool)
    flat[kept] = True
    out, start = {}, 0
    for name, shape in LAYERS.items():
        n = shape[0] * shape[1]
        out[name] = flat[start:start + n].reshape(shape).clone()
        start += n
    return out


def add_run(store: Store, method: str, sparsity: float, seed: int, *, model: str = "lenet300",
            dataset: str = "fashion-mnist", settings: dict[str, Any] | None = None, test_acc: float = 0.85,
            selected: float | None = 0.86, achieved: float | None = None, epochs: int = 30,
            train_flops: float = 1.2e12, dense_flops: float = 3e12, collapsed: tuple[str, ...] = (),
            reused: tuple[str, ...] = (), kept: list[int] | None = None, finish: bool = True,
            dynamic: dict[str, float] | None = None, budget: int | None = None, cycle: int = 30) -> str:
    """A finished (or, with ``finish=False``, running) run in ``store`` with these results; its id."""
    cfg = config(method, sparsity, seed, model, dataset, settings or {}, cycle, budget)
    rid = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    head = {"method": method, "model": model, "dataset": dataset, "target_sparsity": sparsity, "seed": seed}
    folder = store.begin(rid, cfg, head)
    if not finish:
        return rid
    if kept is None:
        k = round((1 - sparsity) * N_WEIGHTS)
        kept = torch.randperm(N_WEIGHTS, generator=torch.Generator().manual_seed(seed))[:k].tolist()
    mask_sha256 = folder.write_torch(MASK, mask_keeping(kept))
    store.finish(rid, {
        "run_id": rid, "status": "ok", **head,
        "sparsity": sparsity if achieved is None else achieved,
        "test_acc": test_acc, "val_acc": test_acc + 0.01, "selected_epoch": epochs,
        "selected_val_acc": test_acc + 0.01, "selected_test_acc": selected,
        "epochs": epochs, "steps": 100 * epochs, "wall_s": 10.0 * (seed + 1),
        "train_flops": train_flops, "dense_train_flops": dense_flops,
        "collapsed_layers": list(collapsed), "reused_runs": list(reused), "notes": [], "mask_sha256": mask_sha256,
        **(dynamic or {}),
    })
    return rid
