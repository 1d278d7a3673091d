"""prunelab: find sparse neural networks cheaply and compare pruning strategies fairly.

The library API for your own models and loops (the CLI is ``prunelab``):
:func:`prune` and :class:`ProgressivePruner` to prune, :func:`prune_channels` to remove
whole channels; :func:`save_sparse` and
:func:`load_sparse` to store a pruned model compactly; :func:`sparse_inference`
to run it faster on CPU; :func:`export_onnx` to export any model to ONNX, checked;
:func:`load_runs` and :func:`load_metrics` to read a store as pandas tables. Inside
Lightning or the Hugging Face Trainer: :mod:`prunelab.integrations`.
"""

from prunelab.deploy.inference import sparse_inference
from prunelab.deploy.onnx_export import OnnxExport, export_onnx
from prunelab.runs.frames import load_metrics, load_runs
from prunelab.sparsity.pruner import ProgressivePruner, prune, prune_channels
from prunelab.deploy.sparse_format import load_sparse, save_sparse

__all__ = [
    "OnnxExport", "ProgressivePruner", "export_onnx", "load_metrics", "load_runs", "load_sparse", "prune",
    "prune_channels", "save_sparse", "sparse_inference",
]

__version__ = "0.1.0"
