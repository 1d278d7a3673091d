"""Channel pruning's real speedup: dense training against channel-progressive training, and the
inference latency of the network it ends with.

For each model (LeNet-5, VGG-11, ResNet-20, on Fashion-MNIST-sized inputs, 1x28x28) and each channel
sparsity c (0.5 and 0.75):

- the weight sparsity that removes the fraction c of every channel group (layerwise allocation) is
  computed on the model as built, and `prunelab run --method progressive --set prune.structure=channel
  --set prune.allocation=layerwise --sparsity <it>` trains with it: its ramp removes channels at each
  epoch of the first half of the cycle, so the later epochs train the smaller network;
- training: whole runs (store, checkpoints, evaluation included) of the dense and the channel
  recipes, same synthetic subset (random images of the dataset's shape: the content does not change
  the time) and epochs, each in a fresh store, interleaved, 1 thread, after an untimed round;
  `train_wall_ratio` is the median over rounds of (channel run / dense run);
- inference: the built model against the network the channel run ended with (its cuts replayed on
  the model as built), under torch.inference_mode, batches of 1 and 64, interleaved;
  `inference_speedup` is the median over rounds of (dense / channel) per batch size;
- `parameters_ratio`: the channel network's parameters over the dense model's.

    python benchmarks/structured.py            # table
    python benchmarks/structured.py --json     # + one JSON object as the last line
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from common import interleaved_calls, interleaved_runs, median_ratios, synthetic_splits
from prunelab.config.build import build_config
from prunelab.deploy.export import run_model
from prunelab.models import build_model
from prunelab.sparsity.channel_cut import WeightCount
from prunelab.sparsity.channels import find_groups
from prunelab.sparsity.mask import prunable_parameters

DATASET = "fashion-mnist"
MODELS = ("lenet5", "vgg11", "resnet20")
CHANNEL_SPARSITIES = (0.5, 0.75)
BATCHES = (1, 64)


def sparsity_for(model: str, fraction: float) -> float:
    """The weight sparsity whose layerwise channel allocation removes ``fraction`` of every group's channels."""
    built = build_model(model, 1, 28, 10)
    groups = find_groups(built, torch.zeros(1, 1, 28, 28))
    prunable = prunable_parameters(built)
    count = WeightCount(built, groups, prunable)
    dense = count.total
    for i, g in enumerate(groups):
        for c in range(min(int(fraction * g.channels + 1e-9), g.channels - 1)):
            count.take(i, c)
    # A little under the exact figure, so that round((1 - s) * dense) is exactly the count left.
    return 1.0 - (count.total + 0.4) / dense


def measure(model: str, epochs: int, n_train: int, rounds: int) -> dict[str, dict[str, Any]]:
    base = {"model": model, "dataset": DATASET, "epochs": epochs, "data.val_size": 500}
    configs = {"dense": build_config({**base, "method": "dense"})}
    for c in CHANNEL_SPARSITIES:
        configs[str(c)] = build_config({**base, "method": "progressive", "prune.structure": "channel",
                                        "prune.allocation": "layerwise", "sparsity": sparsity_for(model, c)})
    summaries: dict[str, dict[str, Any]] = {}
    times = interleaved_runs(configs, synthetic_splits(DATASET, n_train), rounds,
                             keep=lambda key, summary: summaries.__setitem__(key, summary))
    torch.set_num_threads(1)  # a run sets train.threads; the latencies run on one thread too
    ratios = median_ratios(times, "dense")
    dense = build_model(model, 1, 28, 10).eval()
    out = {}
    for c in CHANNEL_SPARSITIES:
        s = summaries[str(c)]
        small = run_model(model, DATASET, s["channel_cuts"]).eval()
        speedup = {}
        with torch.inference_mode():
            for batch in BATCHES:
                x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
                lat = interleaved_calls({"dense": lambda: dense(x), "channel": lambda: small(x)}, 4 * rounds + 10)
                speedup[str(batch)] = round(1 / median_ratios(lat, "dense")["channel"], 3)
        out[str(c)] = {
            "train_wall_ratio": round(ratios[str(c)], 4), "inference_speedup": speedup,
            "parameters_ratio": round(sum(p.numel() for p in small.parameters())
                                      / sum(p.numel() for p in dense.parameters()), 4),
            "channel_sparsity": round(s["channel_sparsity"], 4), "sparsity": round(s["sparsity"], 4),
            "train_flops_ratio": round(s["train_flops"] / s["dense_train_flops"], 4),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of whole runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    print(f"{'model':<9} {'channels':>8} {'sparsity':>8} {'params':>7} {'train wall':>10} {'train FLOPs':>11} "
          f"{'infer b1':>8} {'infer b64':>9}")
    results: dict[str, Any] = {}
    for model in args.models:
        results[model] = measure(model, args.epochs, args.train_images, args.rounds)
        for c, r in results[model].items():
            print(f"{model:<9} {r['channel_sparsity']:>8.3f} {r['sparsity']:>8.3f} {r['parameters_ratio']:>7.3f} "
                  f"{r['train_wall_ratio']:>10.3f} {r['train_flops_ratio']:>11.3f} "
                  f"{r['inference_speedup']['1']:>7.2f}x {r['inference_speedup']['64']:>8.2f}x", flush=True)
    load = {"load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
    print(f"load average (1 min): {load['load_before']} before, {load['load_after']} after; "
          f"{args.epochs} epochs of {args.train_images} images, {args.rounds} rounds")
    if args.json:
        print(json.dumps({**results, "machine": load}))


if __name__ == "__main__":
    main()
