"""export_onnx: any model to ONNX, the TorchScript exporter first and dynamo where it fails, checked with
onnxruntime; failures are one sentence naming the operator or the cause, with the exporters' noise swallowed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prunelab.deploy.onnx_export import DYNAMO, TORCHSCRIPT, OnnxExport, export_onnx
from prunelab.errors import UserError

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class Attention(nn.Module):
    """Linear -> MultiheadAttention (batch first) -> Linear: in eval mode without gradients, attention runs
    the fused aten::_native_multi_head_attention, which the TorchScript exporter cannot map."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h, _ = self.attention(h, h, h)
        return self.out(h)


class KthValue(nn.Module):
    """aten::kthvalue has an ONNX mapping in neither exporter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.kthvalue(self.fc(x), 2, dim=-1).values


class Branches(nn.Module):
    """Branches on a value of its input: tracing freezes one branch, torch.export refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h * 2 if h[0, 0] > 0 else h - 1


class TwoInTwoOut(nn.Module):
    """Two positional inputs (features and token ids), a dict of two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.embed = nn.Embedding(10, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": self.fc(x), "tokens": self.embed(ids).sum(1)}


def _run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_multihead_attention_falls_back_to_dynamo_and_reproduces_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Attention().train()
    result = export_onnx(model, torch.randn(2, 5, 8), tmp_path / "attention.onnx")
    assert isinstance(result, OnnxExport) and result.exporter == DYNAMO and result.opset == 18
    assert result.path == tmp_path / "attention.onnx" and result.bytes == result.path.stat().st_size
    assert 0.0 <= result.max_abs_diff <= 1e-4
    assert model.training  # the mode is given back
    x = torch.randn(3, 5, 8)  # another batch size: the batch axis is dynamic
    (got,) = _run(result.path, {"input": x.numpy()})
    with torch.no_grad():
        assert np.abs(got - model.eval()(x).numpy()).max() <= 1e-4


def test_plain_mlp_uses_torchscript(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    result = export_onnx(model, torch.randn(4, 10), tmp_path / "mlp.onnx")
    assert result.exporter == TORCHSCRIPT and result.opset == 17 and result.max_abs_diff <= 1e-5
    x = torch.randn(7, 10)
    (got,) = _run(result.path, {"input": x.numpy()})
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() <= 1e-5


def test_dynamo_alone_exports_the_mlp_too(tmp_path: Path) -> None:
    result = export_onnx(nn.Linear(3, 2), torch.randn(2, 3), tmp_path / "m.onnx", exporters=[DYNAMO])
    assert result.exporter == DYNAMO and result.max_abs_diff <= 1e-5


def test_tuple_inputs_and_dict_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoInTwoOut()
    x, ids = torch.randn(2, 6), torch.tensor([[1, 9, 4], [0, 2, 3]])
    result = export_onnx(model, (x, ids), tmp_path / "two.onnx")
    assert result.max_abs_diff <= 1e-5
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["output_0", "output_1"]  # the dict's order
    scores, tokens = session.run(None, {"input_0": x.numpy(), "input_1": ids.numpy()})
    with torch.no_grad():
        expected = model(x, ids)
    assert np.abs(scores - expected["scores"].numpy()).max() <= 1e-5
    assert np.abs(tokens - expected["tokens"].numpy()).max() <= 1e-5


def test_hugging_face_model_output(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    bert = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    result = export_onnx(bert, ids, tmp_path / "bert.onnx", output_names=["logits"])
    (got,) = _run(result.path, {"input": ids.numpy()})
    with torch.no_grad():
        assert np.abs(got - bert(ids).logits.numpy()).max() <= 1e-4


def test_an_operator_without_onnx_mapping_is_one_sentence(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError) as info:
        export_onnx(KthValue(), torch.randn(3, 4), tmp_path / "k.onnx")
    message = str(info.value)
    assert message == ("cannot export KthValue to ONNX: operator aten::kthvalue has no ONNX equivalent "
                       "(tried the torchscript and dynamo exporters)")
    assert info.value.__cause__ is None and info.value.__context__ is None  # no chained traceback
    assert not (tmp_path / "k.onnx").exists()
    out, err = capfd.readouterr()  # neither the TorchScript graph dump nor dynamo's progress lines get out
    assert out == "" and err == ""


def test_a_branch_on_input_values_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        export_onnx(Branches(), torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3), tmp_path / "b.onnx")
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "torchscript exporter: onnxruntime's outputs differ" in message
    assert "dynamo exporter: the model branches on its input's values (at test_onnx_export.py:" in message
    assert not (tmp_path / "b.onnx").exists()


def test_a_negative_tolerance_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="^tolerance must be at least 0, got -1.0$"):
        export_onnx(nn.Linear(1, 1), torch.zeros(1, 1), tmp_path / "m.onnx", tolerance=-1.0)


@pytest.mark.parametrize("bad", [None, [], (torch.zeros(1), "text"), "text"])
def test_bad_example_input_is_one_sentence(tmp_path: Path, bad: object) -> None:
    with pytest.raises(UserError, match="^example_input must be a tensor or a tuple of tensors, got"):
        export_onnx(nn.Linear(1, 1), bad, tmp_path / "m.onnx")  # type: ignore[arg-type]


def test_unknown_exporter(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="exporters must be chosen from torchscript, dynamo"):
        export_onnx(nn.Linear(1, 1), torch.zeros(1, 1), tmp_path / "m.onnx", exporters=["tflite"])
