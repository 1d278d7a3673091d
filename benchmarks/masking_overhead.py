"""Time per training step and per whole cycle: prunelab's masked training vs dense.

Step: prunelab's masked step vs the dense step vs torch.nn.utils.prune's
hooks; same model, same initial weights, same batches. Cycle: a whole
`prunelab run` (store, checkpoints, evaluation included) of progressive
pruning to 90% against dense, same epochs, on a synthetic subset of the
model's input shape (1,000-20,000 training images, 500 validation and 500
test; the content does not change the time), each run in a fresh store, 1
thread, after one untimed pair that pays the imports.
Variants are timed in interleaved rounds (the order rotates every round) so
machine noise hits them alike; each ratio is the median over rounds of
(variant / dense). A second, identical dense variant (and a second dense run
in the cycle) is timed beside them: its ratio to dense, `noise_floor` and
`cycle_noise_floor`, is 1 on a quiet machine, and how far it is from 1 says
how much of a measured overhead the machine's noise could explain. The load
average is printed before and after.

    python benchmarks/masking_overhead.py            # table
    python benchmarks/masking_overhead.py --json     # + one JSON object as the last line
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from common import interleaved_runs, median_ratios, synthetic_splits
from prunelab.config.build import build_config
from prunelab.models import build_model
from prunelab.sparsity.allocate import global_masks
from prunelab.sparsity.mask import Masker, prunable_parameters
from prunelab.sparsity.scores import magnitude

# model -> (input shape, steps per round); ResNet-20 steps are ~100x slower than LeNet-300-100's.
MODELS = {"lenet300": ((1, 28, 28), 200), "lenet5": ((1, 28, 28), 60), "resnet20": ((3, 32, 32), 4)}
# model -> (dataset whose shape it takes, epochs of the timed cycle, training images of the subset)
CYCLES = {"lenet300": ("fashion-mnist", 4, 20_000), "lenet5": ("fashion-mnist", 2, 10_000),
          "resnet20": ("cifar10", 2, 1_000)}


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def _dense(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None]:
    opt = _optimizer(model)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _masked(model: nn.Module, sparsity: float) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """prunelab's path: exactly what Trainer does around each optimizer step."""
    opt = _optimizer(model)
    params = prunable_parameters(model)
    masker = Masker(params)
    masker.set_masks(global_masks(magnitude(params), 1 - sparsity), opt)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        masker.apply_to_grads()
        opt.step()

    return step


def _torch_prune(model: nn.Module, sparsity: float) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """torch.nn.utils.prune: weight = weight_orig * mask recomputed by a forward pre-hook."""
    modules = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    torch_prune.global_unstructured(modules, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    return _dense(model)


def measure(name: str, rounds: int, sparsity: float, batch_size: int) -> dict[str, float]:
    shape, steps = MODELS[name]
    torch.manual_seed(0)
    base = build_model(name, shape[0], shape[1], 10)
    variants = {
        "dense": _dense(copy.deepcopy(base)),
        "dense_again": _dense(copy.deepcopy(base)),
        "masked": _masked(copy.deepcopy(base), sparsity),
        "torch_prune": _torch_prune(copy.deepcopy(base), sparsity),
    }
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch_size, *shape, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
               for _ in range(8)]
    for step in variants.values():  # warm-up: allocator, kernels, optimizer state
        for x, y in batches[:3]:
            step(x, y)
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for r in range(rounds):
        for key in order[r % len(order):] + order[: r % len(order)]:
            start = time.perf_counter()
            for i in range(steps):
                variants[key](*batches[i % len(batches)])
            times[key].append((time.perf_counter() - start) / steps)
    ratio = median_ratios(times, "dense")
    return {
        "dense_ms": statistics.median(times["dense"]) * 1e3,
        "masked_over_dense": ratio["masked"],
        "torch_prune_over_dense": ratio["torch_prune"],
        "noise_floor": ratio["dense_again"],
    }


def measure_cycle(name: str, rounds: int, sparsity: float) -> dict[str, float]:
    """Wall time of a whole progressive run against the dense run of the same recipe, interleaved."""
    dataset, epochs, n_train = CYCLES[name]
    base = {"model": name, "dataset": dataset, "epochs": epochs, "data.val_size": 500}
    dense = build_config({**base, "method": "dense"})
    configs = {"dense": dense, "dense_again": dense,
               "progressive": build_config({**base, "method": "progressive", "sparsity": sparsity})}
    times = interleaved_runs(configs, synthetic_splits(dataset, n_train), rounds)
    ratio = median_ratios(times, "dense")
    return {"dense_cycle_s": statistics.median(times["dense"]), "cycle_over_dense": ratio["progressive"],
            "cycle_noise_floor": ratio["dense_again"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cycle-rounds", type=int, default=5, help="interleaved pairs of whole runs per model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # One thread, as `prunelab run` trains by default (train.threads = 1); the cycles set it themselves.
    torch.set_num_threads(args.threads or 1)
    load_before = os.getloadavg()[0]
    results: dict[str, dict[str, float]] = {}
    print(f"{'model':<10} {'dense ms/step':>14} {'masked/dense':>13} {'torch.prune/dense':>18} {'noise':>6} "
          f"{'dense cycle s':>14} {'cycle/dense':>12} {'noise':>6}")
    for name in args.models:
        r = measure(name, args.rounds, args.sparsity, args.batch_size)
        c = measure_cycle(name, args.cycle_rounds, args.sparsity)
        torch.set_num_threads(args.threads or 1)  # a run sets train.threads; the next steps use ours again
        results[name] = {"masked_over_dense": round(r["masked_over_dense"], 4),
                         "torch_prune_over_dense": round(r["torch_prune_over_dense"], 4),
                         "noise_floor": round(r["noise_floor"], 4),
                         "cycle_over_dense": round(c["cycle_over_dense"], 4),
                         "cycle_noise_floor": round(c["cycle_noise_floor"], 4)}
        print(f"{name:<10} {r['dense_ms']:>14.3f} {r['masked_over_dense']:>13.3f} {r['torch_prune_over_dense']:>18.3f} "
              f"{r['noise_floor']:>6.3f} {c['dense_cycle_s']:>14.2f} {c['cycle_over_dense']:>12.3f} "
              f"{c['cycle_noise_floor']:>6.3f}", flush=True)
    load = {"load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
    print(f"load average (1 min): {load['load_before']} before, {load['load_after']} after")
    if args.json:
        print(json.dumps({**results, "machine": load}))


if __name__ == "__main__":
    main()
