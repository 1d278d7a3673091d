"""Exports: dense state_dict, sparse safetensors and ONNX, from a model and from a stored run via the CLI."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

from conftest import write_tiny_fashion_mnist
from prunelab.cli import EXPORT_FORMATS, main
from prunelab.config.build import build_config
from prunelab.errors import UserError
from prunelab.runs.experiment import Runtime, run
from prunelab.deploy.export import FORMATS, export_onnx, run_model, save_dense
from prunelab.models import build_model
from prunelab.deploy.sparse_format import load_sparse, read_metadata
from prunelab.runs.store import Store

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")),
    reason="the onnx extra (onnx, onnxruntime) is not installed",
)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _batch(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_dense_export_loads_into_a_fresh_model(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 1, 28, 10).eval()
    save_dense(model, tmp_path / "w.pt")
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    fresh = build_model(name, 1, 28, 10).eval()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(_batch()), model(_batch()))
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in state.values())


def test_dense_export_bakes_torch_prune_masks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("lenet300", 1, 28, 10).eval()
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    assert "fc1.weight_orig" in model.state_dict() and "fc1.weight_mask" in model.state_dict()
    save_dense(model, tmp_path / "w.pt")
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert set(state) == set(build_model("lenet300", 1, 28, 10).state_dict())
    zeros = state["fc1.weight"] == 0
    assert int(zeros.sum()) == state["fc1.weight"].numel() // 2
    assert not bool(torch.signbit(state["fc1.weight"][zeros]).any())  # baked to +0.0
    fresh = build_model("lenet300", 1, 28, 10).eval()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(_batch()), model(_batch()))


@needs_onnx
@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_onnx_export_matches_pytorch(tmp_path: Path, name: str) -> None:
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model(name, 1, 28, 10).train()
    diff = export_onnx(model, _batch(), tmp_path / "m.onnx").max_abs_diff
    assert 0.0 <= diff <= 1e-5
    assert model.training  # the mode is given back
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))
    # The batch axis is dynamic: another batch size runs too and agrees.
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = _batch(3)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert np.abs(got - model.eval()(x).numpy()).max() <= 1e-5


def test_onnx_export_without_onnxruntime_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(UserError, match=re.escape("pip install 'prunelab[onnx]'")):
        export_onnx(build_model("lenet300", 1, 28, 10), _batch(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- from the store, through the CLI


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store holding one finished 1-epoch progressive run on tiny Fashion-MNIST: (store, run id)."""
    root = tmp_path_factory.mktemp("export")
    data = write_tiny_fashion_mnist(root / "data")
    cfg = build_config({"method": "progressive", "epochs": 1, "data.val_size": 200, "train.batch_size": 64})
    summary, _ = run(cfg, Runtime(store=root / "store", data_dir=data, progress=False, download=False))
    return root / "store", summary["run_id"]


def _export(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["dense", "sparse", pytest.param("onnx", marks=needs_onnx)])
def test_cli_exports_a_finished_run(finished_run: tuple[Path, str], tmp_path: Path, capsys, fmt: str) -> None:
    store, rid = finished_run
    out = tmp_path / "new" / "folder" / f"model.{fmt}"
    code, stdout, err = _export(capsys, rid[:6], "--format", fmt, "--out", str(out), "--store", str(store))
    assert code == 0 and err == "" and len(stdout.splitlines()) == 1
    assert str(out) in stdout and f"({out.stat().st_size} bytes" in stdout
    weights = torch.load(store / rid / "weights.pt", weights_only=True)
    fresh = build_model("lenet300", 1, 28, 10)
    if fmt == "dense":
        state = torch.load(out, weights_only=True)
        fresh.load_state_dict(state, strict=True)
        assert all(same_bits(state[k], v) for k, v in weights.items())
    elif fmt == "sparse":
        state = load_sparse(out, fresh)
        assert all(same_bits(state[k], v) for k, v in weights.items())
        assert read_metadata(out)["run_id"] == rid
        assert out.stat().st_size < 0.5 * sum(v.numel() * v.element_size() for v in weights.values())
    else:
        import onnx

        match = re.search(r"max abs difference vs PyTorch: (\S+)", stdout)
        assert match is not None and float(match.group(1)) <= 1e-5
        onnx.checker.check_model(onnx.load(str(out)))


@needs_onnx
def test_cli_export_json_and_overwrite(finished_run: tuple[Path, str], tmp_path: Path, capsys) -> None:
    store, rid = finished_run
    out = tmp_path / "m.onnx"
    argv = [rid, "--format", "onnx", "--out", str(out), "--store", str(store)]
    code, stdout, _ = _export(capsys, *argv, "--json")
    result = json.loads(stdout.splitlines()[-1])
    assert code == 0 and result["run_id"] == rid and result["format"] == "onnx"
    assert result["bytes"] == out.stat().st_size and 0.0 <= result["max_abs_diff"] <= 1e-5
    code, stdout, err = _export(capsys, *argv)
    assert code == 2 and stdout == "" and "already exists" in err and len(err.splitlines()) == 1
    code, _, _ = _export(capsys, *argv, "--force")
    assert code == 0


def test_cli_refuses_missing_and_unfinished_runs(tmp_path: Path, capsys) -> None:
    store = tmp_path / "store"
    head = {"method": "progressive", "model": "lenet300", "dataset": "fashion-mnist", "target_sparsity": 0.9,
            "seed": 0}
    Store(store).begin("abc123abc123", {}, head)
    Store(store).begin("def456def456", {}, head)
    Store(store).mark("def456def456", "failed", "something broke")
    for rid, fragment in [("zzz", "no run 'zzz'"), ("abc", "is not finished (status running)"),
                          ("def", "failed (something broke)")]:
        code, stdout, err = _export(capsys, rid, "--format", "dense", "--out", str(tmp_path / "x.pt"),
                                    "--store", str(store))
        assert code == 2 and stdout == "" and fragment in err and len(err.splitlines()) == 1
        assert not (tmp_path / "x.pt").exists()


def test_cli_unknown_format_is_an_argparse_error(tmp_path: Path, capsys) -> None:
    assert EXPORT_FORMATS == FORMATS  # the CLI spells the list out to stay light; it must not drift
    with pytest.raises(SystemExit) as info:
        main(["export", "abc", "--format", "zip", "--out", str(tmp_path / "x")])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["dense", pytest.param("onnx", marks=needs_onnx)])
def test_a_channel_run_exports_the_smaller_network(tmp_path: Path, capsys, fmt: str) -> None:
    data = write_tiny_fashion_mnist(tmp_path / "data")
    cfg = build_config({"model": "lenet5", "method": "progressive", "prune.structure": "channel", "sparsity": 0.5,
                        "prune.allocation": "layerwise", "epochs": 2, "data.val_size": 200, "train.batch_size": 64})
    summary, _ = run(cfg, Runtime(store=tmp_path / "store", data_dir=data, progress=False, download=False))
    capsys.readouterr()  # the run's own lines
    out = tmp_path / f"model.{fmt}"
    code, stdout, err = _export(capsys, summary["run_id"], "--format", fmt, "--out", str(out),
                                "--store", str(tmp_path / "store"), "--json")
    assert code == 0 and err == ""
    result = json.loads(stdout)
    dense = sum(p.numel() for p in build_model("lenet5", 1, 28, 10).parameters())
    assert result["parameters"] < dense / 2
    if fmt == "dense":  # the state dict fits the model as built with the run's cuts replayed
        model = run_model("lenet5", "fashion-mnist", summary["channel_cuts"])
        model.load_state_dict(torch.load(out, weights_only=True), strict=True)
        assert sum(p.numel() for p in model.parameters()) == result["parameters"]
    else:
        import onnx

        graph = onnx.load(str(out)).graph
        assert sum(int(np.prod(t.dims)) for t in graph.initializer) < dense / 2
        # Logits of order 10 after training: float32 rounding of other conv kernels, relative 1e-6.
        assert result["max_abs_diff"] <= 1e-4
