"""Inference latency of a pruned model, dense vs prunelab.deploy.inference.sparse_inference; file sizes.

Models:
  lenet300  LeNet-300-100 from the zoo (input 1x28x28, 10 classes)
  mlp4096   defined here: Linear(4096, 4096) - ReLU - Linear(4096, 4096) - ReLU -
            Linear(4096, 10), input a 4096-vector (layers large enough for
            sparse kernels to pay off)
Each model is built with torch.manual_seed(0) and the zoo's initialisation
(Kaiming-normal weights, zero biases), then magnitude-pruned at that random
init with layerwise allocation: every prunable layer at the same sparsity.
"dense" runs that pruned model as it is (zeros multiplied by dense kernels);
"sparse" runs sparse_inference(model) with its defaults. Both compute the
same function (checked on the benchmark's input before timing).

Latency: under torch.inference_mode, dense and sparse alternate within every
round (the order swaps each round) so machine noise hits both alike; each
round times enough calls for about 10 ms, ms are medians over rounds and the
speedup is the median over rounds of dense / sparse. The ideal speedup is
1 / density, what skipping every zero for free would give.

Size: bytes of prunelab.deploy.export.save_dense vs save_sparse of the pruned model.

    python benchmarks/inference.py            # table
    python benchmarks/inference.py --json     # + one JSON object as the last line
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import prunelab
from common import interleaved_calls, median_ratios
from prunelab.deploy.export import save_dense, save_sparse
from prunelab.deploy.inference import sparse_inference
from prunelab.models import build_model, init_weights

SPARSITIES = (0.9, 0.95, 0.98)
BATCHES = (1, 64)


def mlp4096() -> nn.Module:
    """Linear(4096, 4096) - ReLU - Linear(4096, 4096) - ReLU - Linear(4096, 10)."""
    model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
    init_weights(model)
    return model


# model -> (builder, input shape without the batch dim)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "lenet300": (lambda: build_model("lenet300", 1, 28, 10), (1, 28, 28)),
    "mlp4096": (mlp4096, (4096,)),
}


def pruned(name: str, sparsity: float) -> nn.Module:
    """Model ``name`` at its seeded init, magnitude-pruned layerwise to ``sparsity``, in eval mode."""
    torch.manual_seed(0)
    model = MODELS[name][0]()
    prunelab.prune(model, sparsity, scope="layerwise")
    return model.eval()


def latency(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median ms per call of each model and median per-round speedup, timed interleaved."""
    times = interleaved_calls({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, rounds)
    return {
        "dense_ms": statistics.median(times["dense"]) * 1e3,
        "sparse_ms": statistics.median(times["sparse"]) * 1e3,
        "speedup": 1 / median_ratios(times, "dense")["sparse"],
    }


def file_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of the dense and the sparse export of ``model``."""
    with tempfile.TemporaryDirectory() as folder:
        dense_path, sparse_path = Path(folder) / "dense.pt", Path(folder) / "sparse.safetensors"
        save_dense(model, dense_path)
        save_sparse(model, sparse_path)
        return {"dense_bytes": dense_path.stat().st_size, "sparse_bytes": sparse_path.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; magnitude pruning at the seeded "
          "random init, layerwise allocation")  # fmt: skip
    latencies, sizes = [], []
    header = f"{'model':<9} {'sparsity':>8} {'batch':>5} {'dense ms':>9} {'sparse ms':>9} {'speedup':>7} {'ideal':>6}"
    print(header)
    for name in args.models:
        for sparsity in SPARSITIES:
            model = pruned(name, sparsity)
            with torch.inference_mode():
                fast = sparse_inference(model)
                for batch in BATCHES:
                    g = torch.Generator().manual_seed(1)
                    x = torch.randn(batch, *MODELS[name][1], generator=g)
                    error = float((model(x) - fast(x)).abs().max())
                    if error > 1e-5:
                        raise RuntimeError(f"{name}: sparse_inference differs by {error}")
                    r = latency(model, fast, x, args.rounds)
                    row = {"model": name, "sparsity": sparsity, "batch": batch,
                           "dense_ms": round(r["dense_ms"], 4), "sparse_ms": round(r["sparse_ms"], 4),
                           "speedup": round(r["speedup"], 3), "ideal": round(1 / (1 - sparsity), 1)}  # fmt: skip
                    latencies.append(row)
                    print(f"{name:<9} {sparsity:>8.2f} {batch:>5} {r['dense_ms']:>9.3f} {r['sparse_ms']:>9.3f} "
                          f"{r['speedup']:>6.2f}x {row['ideal']:>5.1f}x", flush=True)  # fmt: skip
            sizes.append({"model": name, "sparsity": sparsity, **file_sizes(model)})
    print(f"\n{'model':<9} {'sparsity':>8} {'dense bytes':>12} {'sparse bytes':>12} {'ratio':>6}")
    for s in sizes:
        print(f"{s['model']:<9} {s['sparsity']:>8.2f} {s['dense_bytes']:>12} {s['sparse_bytes']:>12} "
              f"{s['dense_bytes'] / s['sparse_bytes']:>5.1f}x")  # fmt: skip
    if args.json:
        print(json.dumps({"latency": latencies, "size": sizes}))


if __name__ == "__main__":
    main()
