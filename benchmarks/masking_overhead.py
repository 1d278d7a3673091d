"""Time per training step: prunelab's masked training vs dense vs torch.nn.utils.prune hooks.

Same model, same initial weights, same batches; the three variants are timed
in interleaved rounds (the order rotates every round) so machine noise hits
them alike, and each ratio is the median over rounds of (variant / dense).

    python benchmarks/masking_overhead.py            # table
    python benchmarks/masking_overhead.py --json     # + one JSON object as the last line
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from prunelab.models import build_model
from prunelab.sparsity.allocate import global_masks
from prunelab.sparsity.mask import Masker, prunable_parameters
from prunelab.sparsity.scores import magnitude

# model -> (input shape, steps per round); ResNet-20 steps are ~100x slower than LeNet-300-100's.
MODELS = {"lenet300": ((1, 28, 28), 200), "lenet5": ((1, 28, 28), 60), "resnet20": ((3, 32, 32), 4)}


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
        for key in order[r % 3:] + order[: r % 3]:
            start = time.perf_counter()
            for i in range(steps):
                variants[key](*batches[i % len(batches)])
            times[key].append((time.perf_counter() - start) / steps)
    ratio = {k: statistics.median(t / d for t, d in zip(times[k], times["dense"])) for k in ("masked", "torch_prune")}
    return {
        "dense_ms": statistics.median(times["dense"]) * 1e3,
        "masked_over_dense": ratio["masked"],
        "torch_prune_over_dense": ratio["torch_prune"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    print(f"{'model':<10} {'dense ms/step':>14} {'masked/dense':>13} {'torch.prune/dense':>18}")
    for name in args.models:
        r = measure(name, args.rounds, args.sparsity, args.batch_size)
        results[name] = {"masked_over_dense": round(r["masked_over_dense"], 4),
                         "torch_prune_over_dense": round(r["torch_prune_over_dense"], 4)}
        print(f"{name:<10} {r['dense_ms']:>14.3f} {r['masked_over_dense']:>13.3f} {r['torch_prune_over_dense']:>18.3f}",
              flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
