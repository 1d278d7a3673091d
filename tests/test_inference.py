"""sparse_inference computes the same function; SparseLinear replaces exactly the sparse layers."""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import max_diff, prune_
from prunelab.errors import UserError
from prunelab.deploy.inference import SparseLinear, sparse_inference, sparsify_linears
from prunelab.models import build_model
from prunelab.sparsity.channels import find_groups

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"


def sparse_linear(out_features: int, in_features: int, sparsity: float, bias: bool = True) -> nn.Linear:
    """A Linear layer with exactly ``round(sparsity * n)`` zero weights and a nonzero bias."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        flat = layer.weight.view(-1)
        flat[torch.randperm(flat.numel())[: round(sparsity * flat.numel())]] = 0
        if bias:
            layer.bias.uniform_(-1, 1)
    return layer


@pytest.mark.parametrize("density", [0.1, 0.02])
def test_lenet300_same_outputs(density: float) -> None:
    torch.manual_seed(0)
    model = prune_(build_model("lenet300", 1, 28, 10), density)
    x = torch.randn(32, 1, 28, 28)
    fast = sparse_inference(model, example_input=x)
    assert max_diff(model, fast, x) < 1e-5
    with torch.inference_mode():
        assert float((model(x) - fast(x)).abs().max()) < 1e-5


def test_lenet300_fc1_gets_the_sparse_kernel_and_small_layers_stay_dense() -> None:
    torch.manual_seed(0)
    fast = sparse_inference(prune_(build_model("lenet300", 1, 28, 10), 0.1, "layerwise"))
    assert isinstance(fast.fc1, SparseLinear)  # 784 x 300 at 90%
    assert type(fast.fc2) is nn.Linear and type(fast.fc3) is nn.Linear  # below min_weights


def test_resnet20_same_outputs() -> None:
    torch.manual_seed(0)
    model = prune_(build_model("resnet20", 3, 32, 10), 0.05).eval()
    x = torch.randn(2, 3, 32, 32)
    assert max_diff(model, sparse_inference(model), x) < 1e-5


def test_replaced_only_at_or_above_the_threshold() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        sparse=sparse_linear(300, 400, 0.9), medium=sparse_linear(300, 300, 0.5), small=sparse_linear(10, 300, 0.99),
    ))  # fmt: skip
    fast = sparse_inference(model, shrink=False)
    assert isinstance(fast.sparse, SparseLinear)
    assert type(fast.medium) is nn.Linear  # 50% < default threshold
    assert type(fast.small) is nn.Linear  # 3000 weights < min_weights
    assert fast.sparse.values.numel() == round(0.1 * 400 * 300)
    looser = sparse_inference(model, threshold=0.5, shrink=False, min_weights=0)
    assert all(isinstance(m, SparseLinear) for m in (looser.sparse, looser.medium, looser.small))
    assert type(sparse_inference(model, threshold=0.91, shrink=False).sparse) is nn.Linear
    x = torch.randn(5, 400)
    assert max_diff(model, fast, x) < 1e-5 and max_diff(model, looser, x) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_linear_on_3d_inputs(bias: bool) -> None:
    torch.manual_seed(0)
    layer = sparse_linear(24, 32, 0.8, bias=bias)
    sparse = SparseLinear.from_linear(layer)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        out = sparse(x)
        assert out.shape == (3, 7, 24)
        assert float((out - layer(x)).abs().max()) < 1e-5
        assert float((sparse(x[0, 0]) - layer(x[0, 0])).abs().max()) < 1e-5  # 1-D input too
    assert sparse.crow_indices.dtype == torch.int32 and sparse.col_indices.dtype == torch.int32


def test_chained_sparse_layers_need_no_warning_or_copy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(sparse_linear(256, 512, 0.9), nn.ReLU(), sparse_linear(128, 256, 0.9))
    fast = sparse_inference(model, min_weights=0)
    x = torch.randn(4, 512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CSR "beta" warning is silenced locally
        with torch.inference_mode():
            hidden = fast[1](fast[0](x))
            assert hidden.t().is_contiguous()  # transposed layout: the next layer reads it without a copy
            assert float((fast(x) - model(x)).abs().max()) < 1e-5


def test_result_does_not_alias_the_original_and_is_for_inference() -> None:
    torch.manual_seed(0)
    model = prune_(build_model("lenet300", 1, 28, 10), 0.1).train()
    fast = sparse_inference(model)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = fast(x).clone()
        for p in model.parameters():
            p.add_(1.0)
        assert torch.equal(fast(x), before)
    original = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not original & {t.untyped_storage().data_ptr() for t in [*fast.parameters(), *fast.buffers()]}
    assert not any(m.training for m in fast.modules())
    assert not any(p.requires_grad for p in fast.parameters())
    assert model.training  # the original's mode is untouched


def test_untraceable_model_still_gets_sparse_kernels() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = sparse_linear(400, 300, 0.95)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(-x if x.sum() > 0 else x)  # data-dependent control flow: fx cannot trace it

    torch.manual_seed(0)
    model = Net()
    fast = sparse_inference(model)
    assert isinstance(fast.fc, SparseLinear)
    assert max_diff(model, fast, torch.randn(3, 300)) < 1e-5


def test_example_input_check_catches_a_wrong_result(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    broken = nn.Sequential(nn.Linear(4, 3))
    monkeypatch.setattr("prunelab.deploy.inference.shrink_model", lambda m: broken)
    with pytest.raises(RuntimeError, match="changed the model's output"):
        sparse_inference(model, example_input=torch.randn(2, 4))


@pytest.mark.parametrize(("kwargs", "word"), [({"threshold": 1.5}, "threshold"), ({"min_weights": -1}, "min_weights")])
def test_bad_settings_are_user_errors(kwargs: dict[str, float], word: str) -> None:
    with pytest.raises(UserError, match=word):
        sparse_inference(nn.Linear(2, 2), **kwargs)


def test_sparsify_linears_skips_attention_projections() -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 2)
    with torch.no_grad():
        attention.out_proj.weight.zero_()
    assert sparsify_linears(attention, threshold=0.5, min_weights=0) == 0


def test_benchmark_runs_and_prints_one_json_object(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARK.parent))  # as `python benchmarks/inference.py` has it
    spec = importlib.util.spec_from_file_location("inference_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--models", "lenet300", "--rounds", "2", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"latency", "size"}
    assert [(r["sparsity"], r["batch"]) for r in result["latency"]] == [
        (s, b) for s in (0.9, 0.95, 0.98) for b in (1, 64)
    ]
    for row in result["latency"]:
        assert set(row) == {"model", "sparsity", "batch", "dense_ms", "sparse_ms", "speedup", "ideal"}
        assert row["model"] == "lenet300" and row["dense_ms"] > 0 and row["sparse_ms"] > 0
        assert row["ideal"] == round(1 / (1 - row["sparsity"]), 1)
    assert [r["sparsity"] for r in result["size"]] == [0.9, 0.95, 0.98]
    for row in result["size"]:
        assert set(row) == {"model", "sparsity", "dense_bytes", "sparse_bytes"}
        assert 0 < row["sparse_bytes"] < row["dense_bytes"]


def test_sparse_linear_survives_copy_move_and_state_dict() -> None:
    torch.manual_seed(0)
    layer = sparse_linear(8, 16, 0.7)
    sparse = SparseLinear.from_linear(layer)
    x = torch.randn(2, 16)
    copied = copy.deepcopy(sparse)
    sparse.values.zero_()  # the copy has its own buffers
    with torch.no_grad():
        assert float((copied(x) - layer(x)).abs().max()) < 1e-5
        as_double = copy.deepcopy(copied).double()
        assert as_double(x.double()).dtype == torch.float64
        assert float((as_double(x.double()) - layer(x).double()).abs().max()) < 1e-5
        sparse.load_state_dict(copied.state_dict())
        assert torch.equal(sparse(x), copied(x))


def test_threshold_counts_weights_as_allocation_rounds_them() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(347, 251))
    prune_(model, 1 - 0.9, "layerwise")  # keeps round(0.1 * 87097) = 8710: 0.899997 zeros
    fast = sparse_inference(model, threshold=0.9, shrink=False, min_weights=0)
    assert isinstance(fast[0], SparseLinear) and fast[0].values.numel() == 8710
    assert type(sparse_inference(model, threshold=0.9001, shrink=False, min_weights=0)[0]) is nn.Linear


def test_dead_channels_across_residual_additions_are_removed() -> None:
    # ResNet-20's last stage: its residual stream is written by the shortcut and by every block's conv2,
    # so no simple chain holds it; the dependency graph does. Zero 40 of its 64 channels everywhere.
    torch.manual_seed(0)
    model = build_model("resnet20", 3, 32, 10).eval()
    x = torch.randn(4, 3, 32, 32)
    group = next(g for g in find_groups(model, x[:1]) if g.root == "stages.2.0.shortcut.0")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for m in group.members:
            if m.side == "out":
                for p in modules[m.module].parameters(recurse=False):
                    p[m.index[m.channel < 40]] = 0.0
    fast = sparse_inference(model, example_input=x)
    assert fast.fc.in_features == 24 and fast.stages[2][0].shortcut[0].out_channels == 24
    assert max_diff(model, fast, x) <= 1e-5 * max(1.0, float(model(x).abs().max()))
