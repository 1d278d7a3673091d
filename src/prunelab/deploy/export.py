"""Exporting a pruned network: a plain dense state_dict, the sparse safetensors format, or ONNX.

:func:`export_run` does it for a finished run of the store: it rebuilds the
run's model from the registry, loads its stored weights and writes the chosen
format. The ONNX export (:func:`prunelab.deploy.onnx_export.export_onnx`) is
checked at once by running onnxruntime on a seeded batch and comparing with PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunelab.data import DATASETS
from prunelab.errors import UserError
from prunelab.models import build_model
from prunelab.deploy.onnx_export import export_onnx
from prunelab.deploy.sparse_format import plain_state_dict, save_sparse
from prunelab.io import atomic_torch_save
from prunelab.runs.store import Store
from prunelab.sparsity.channel_cut import replay_cuts

FORMATS = ("dense", "sparse", "onnx")
CHECK_EXAMPLES = 8  # size of the batch an ONNX export is checked on
CHECK_SEED = 0


def save_dense(model_or_state: nn.Module | Mapping[str, Tensor], path: Path) -> None:
    """Write a plain state_dict (CPU, contiguous, masks baked in) with ``torch.save``, atomically.

    It loads with ``torch.load(path, weights_only=True)`` into the model built
    from the registry alone: no mask entries, no ``weight_orig`` / ``weight_mask``.
    """
    atomic_torch_save(Path(path), plain_state_dict(model_or_state))


def run_model(model: str, dataset: str, channel_cuts: Sequence[Mapping[str, Sequence[int]]] | None = None
              ) -> nn.Module:
    """The network a run trained, before its weights are loaded: ``model`` built for ``dataset``, with the
    run's channel cuts (``prune.structure=channel``) replayed, so that its stored weights fit."""
    spec = DATASETS.get(dataset)
    network = build_model(model, spec.channels, spec.image_size, spec.num_classes)
    if channel_cuts:
        replay_cuts(network, channel_cuts, torch.zeros(1, spec.channels, spec.image_size, spec.image_size))
    return network


def export_run(store_root: Path, run_id_prefix: str, fmt: str, out: Path, force: bool = False) -> dict[str, Any]:
    """Write the weights of a finished run as ``fmt`` (dense, sparse or onnx) to ``out``.

    ``run_id_prefix`` is a unique prefix of the run's id. An existing ``out``
    is kept unless ``force``; missing parent folders are created. Returns a
    summary: run_id, format, path, bytes, model, dataset, sparsity,
    tensor_bytes (the dense tensors' size) and, for onnx, max_abs_diff on
    :data:`CHECK_EXAMPLES` seeded random inputs.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    store = Store.reader(Path(store_root))
    rid = store.resolve_id(run_id_prefix)
    record = store.get(rid)
    assert record is not None
    if record.status != "ok" or record.summary is None:
        why = f"failed ({record.error})" if record.status == "failed" else f"is not finished (status {record.status})"
        raise UserError(f"run {rid} {why}, so it has no final weights to export")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a folder; give --out a file name")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to overwrite it")
    store.verify(record)  # the summary, weights and masks are what the run stored
    stored = record.result
    assert stored is not None  # verify() passed: the run is finished
    model = run_model(record.model, record.dataset, stored.channel_cuts)
    try:
        model.load_state_dict(store.load_weights(rid), strict=True)
    except (RuntimeError, TypeError, AttributeError):
        raise UserError(f"the weights of run {rid} do not fit model {record.model}; the run folder is damaged") from None
    model.eval()
    spec = DATASETS.get(record.dataset)
    result: dict[str, Any] = {
        "run_id": rid, "format": fmt, "path": str(out), "model": record.model, "dataset": record.dataset,
        "method": record.method, "sparsity": stored.sparsity,
        "tensor_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
    }
    if stored.channel_cuts:
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["rebuild"] = ("the smaller network: prunelab.deploy.export.run_model(model, dataset, channel_cuts "
                             "of the run's summary), then load_state_dict")
    if fmt == "dense":
        save_dense(model, out)
    elif fmt == "sparse":
        meta = {"run_id": rid, "model": record.model, "dataset": record.dataset, "method": record.method,
                "sparsity": str(stored.sparsity), "weights_sha256": str(stored.weights_sha256)}
        save_sparse(model, out, meta)
    else:
        generator = torch.Generator().manual_seed(CHECK_SEED)
        # Normalized images are roughly standard normal, so Gaussian inputs exercise the same range.
        example = torch.randn(CHECK_EXAMPLES, spec.channels, spec.image_size, spec.image_size, generator=generator)
        exported = export_onnx(model, example, out, output_names=["logits"])
        result["max_abs_diff"] = exported.max_abs_diff
        result["check_examples"] = CHECK_EXAMPLES
    result["bytes"] = out.stat().st_size
    return result
