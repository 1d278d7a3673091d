"""Outputs of any kind (tensors, tuples, dicts, Hugging Face ModelOutputs) and losses of your own:
output_tensors, sparse_inference on them, and prune(..., loss_fn=...) for data-driven criteria."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab
from prunelab.deploy.inference import SparseLinear
from prunelab.errors import UserError
from prunelab.models.outputs import as_inputs, max_abs_difference, output_tensors
from prunelab.sparsity.mask import prunable_parameters

VOCAB, HIDDEN = 50, 16


# ------------------------------------------------------------------------------ output_tensors


class _WithToTuple:
    """Neither a mapping nor a sequence, but with to_tuple(), as some output classes are."""

    def __init__(self, *items: object) -> None:
        self.items = items

    def to_tuple(self) -> tuple[object, ...]:
        return self.items


def test_output_tensors_flattens_every_kind_in_a_fixed_order() -> None:
    a, b, c, d = (torch.full((1,), float(i)) for i in range(4))
    assert [t.item() for t in output_tensors(a)] == [0.0]
    nested = (a, [b, (c, None)], {"x": d, "skip": 3, "none": None})
    assert [t.item() for t in output_tensors(nested)] == [0.0, 1.0, 2.0, 3.0]
    assert [t.item() for t in output_tensors(OrderedDict(second=b, first=a))] == [1.0, 0.0]  # insertion order
    assert [t.item() for t in output_tensors(_WithToTuple(c, (d,)))] == [2.0, 3.0]
    assert output_tensors(None) == [] and output_tensors("text") == []


def test_hugging_face_model_output_gives_its_set_fields() -> None:
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")
    logits, hidden = torch.randn(2, 3), torch.randn(2, 4, 5)
    output = modeling_outputs.SequenceClassifierOutput(logits=logits, hidden_states=(hidden,))
    found = output_tensors(output)
    assert len(found) == 2 and found[0] is logits and found[1] is hidden  # loss is None: skipped


def test_max_abs_difference_names_what_differs() -> None:
    x = torch.tensor([1.0, -3.0])
    assert max_abs_difference([x, torch.zeros(0)], [x + 0.5, torch.zeros(0)]) == (0.5, 3.0)
    assert max_abs_difference([torch.tensor([1, 2])], [torch.tensor([1, 5])]) == (3.0, 2.0)  # integers
    with pytest.raises(ValueError, match="^1 output tensors instead of 2$"):
        max_abs_difference([x, x], [x])
    with pytest.raises(ValueError, match=r"^output 0 has shape \(1, 2\) instead of \(2,\)$"):
        max_abs_difference([x], [x.reshape(1, 2)])


def test_as_inputs() -> None:
    x = torch.zeros(2)
    assert as_inputs(x) == (x,) and as_inputs([x, x]) == (x, x)
    with pytest.raises(UserError, match="^example_input must be a tensor or a tuple of tensors, got dict$"):
        as_inputs({"x": x})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ sparse_inference


def _tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def test_sparse_inference_on_a_hugging_face_model() -> None:
    torch.manual_seed(0)
    bert = _tiny_bert()
    prunelab.prune(bert, 0.9)
    ids = torch.randint(0, 100, (4, 9))
    fast = prunelab.sparse_inference(bert, example_input=ids, min_weights=0)  # every Linear gets the sparse kernel
    assert any(isinstance(m, SparseLinear) for m in fast.modules())
    with torch.no_grad():
        expected, actual = bert(ids), fast(ids)
    assert type(actual) is type(expected)
    assert torch.allclose(actual.logits, expected.logits, rtol=0, atol=1e-5)


class _LstmTagger(nn.Module):
    """An LSTM's (output, (h, c)) passed on as a tuple, and a dict head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
        out, state = self.lstm(x)
        return {"tags": self.head(out) * scale}, state


def test_sparse_inference_with_tuple_inputs_and_nested_outputs() -> None:
    torch.manual_seed(0)
    model = _LstmTagger().eval()
    prunelab.prune(model, 0.8)
    example = (torch.randn(2, 5, 6), torch.tensor(2.0))
    fast = prunelab.sparse_inference(model, example_input=example, min_weights=0)
    with torch.no_grad():
        expected, actual = output_tensors(model(*example)), output_tensors(fast(*example))
    assert len(actual) == 3 and all(torch.allclose(a, e, rtol=0, atol=1e-5) for a, e in zip(actual, expected))


# ------------------------------------------------------------------------------ prune(..., loss_fn=...)


class _TinyCausalLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, V), each position seeing itself and the one before."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mix = nn.Linear(2 * HIDDEN, 64)
        self.head = nn.Linear(64, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        previous = F.pad(h, (0, 0, 1, 0))[:, :-1]
        return self.head(torch.relu(self.mix(torch.cat([h, previous], dim=-1))))


def _next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def _token_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 12), generator=generator) for _ in range(3)]


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
def test_language_model_prunes_with_its_own_loss(criterion: str) -> None:
    torch.manual_seed(0)
    model = _TinyCausalLM()
    masks = prunelab.prune(model, 0.9, criterion=criterion, batches=_token_batches(), loss_fn=_next_token_loss,
                           generator=torch.Generator().manual_seed(0))
    params = prunable_parameters(model)
    assert set(masks) == set(params) == {"mix.weight", "head.weight"}  # the embedding stays dense
    total = sum(p.numel() for p in params.values())
    assert sum(int((p == 0).sum()) for p in params.values()) == round(0.9 * total)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * total)


def test_language_model_without_loss_fn_is_one_sentence() -> None:
    torch.manual_seed(0)
    model = _TinyCausalLM()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    batches = [(ids[:, :-1], ids[:, 1:]) for ids in _token_batches()]
    with pytest.raises(UserError) as info:
        prunelab.prune(model, 0.9, criterion="taylor", batches=batches)
    assert str(info.value) == (
        "the default loss (cross-entropy) needs a classifier's logits of shape (batch, classes), but the model "
        "put out logits of shape (4, 11, 50); pass loss_fn=(model, batch) -> scalar loss tensor (for a language model, "
        "e.g. the cross-entropy of the next-token logits)"
    )
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # nothing pruned


def test_a_custom_loss_equal_to_the_default_gives_the_same_masks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    copy = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    copy.load_state_dict(model.state_dict())
    batches = [(torch.randn(8, 10), torch.randint(0, 4, (8,))) for _ in range(2)]
    for criterion in ("taylor", "snip", "grasp"):
        default = prunelab.prune(model, 0.5, criterion=criterion, batches=batches)
        temperature = 200.0 if criterion == "grasp" else 1.0  # grasp's default loss divides the logits by 200
        own = prunelab.prune(copy, 0.5, criterion=criterion, batches=batches,
                             loss_fn=lambda m, b, t=temperature: F.cross_entropy(m(b[0]) / t, b[1]))
        assert all(torch.equal(default[n], own[n]) for n in default), criterion


def test_default_loss_reads_the_logits_of_a_model_output() -> None:
    torch.manual_seed(0)
    bert = _tiny_bert()
    batches = [(torch.randint(0, 100, (4, 9)), torch.randint(0, 3, (4,)))]
    # Layerwise: at initialisation the query and key gradients are so small that a global ranking empties them.
    masks = prunelab.prune(bert, 0.5, criterion="taylor", scope="layerwise", batches=batches)
    assert masks and all(int(m.sum()) == round(0.5 * m.numel()) for m in masks.values())


@pytest.mark.parametrize(("loss_fn", "message"), [
    (lambda m, b: m(b).sum(-1), r"^loss_fn must return a scalar loss tensor, got shape \(4, 12\)$"),
    (lambda m, b: 1.0, "^loss_fn must return a scalar loss tensor, got a float$"),
    (lambda m, b: m(b).detach().mean(), "^the loss from loss_fn does not depend on the model's weights"),
])
def test_bad_losses_are_one_sentence(loss_fn: object, message: str) -> None:
    with pytest.raises(UserError, match=message):
        prunelab.prune(_TinyCausalLM(), 0.5, criterion="taylor", batches=_token_batches(), loss_fn=loss_fn)


def test_loss_fn_with_a_criterion_that_takes_no_data_is_refused() -> None:
    with pytest.raises(UserError, match="^loss_fn is used only by the criteria that score on batches"):
        prunelab.prune(nn.Linear(4, 4), 0.5, loss_fn=_next_token_loss)


def test_snip_needs_pairs_to_join_batches() -> None:
    with pytest.raises(UserError, match="^criterion 'snip' scores all batches as one sample"):
        prunelab.prune(_TinyCausalLM(), 0.5, criterion="snip", batches=_token_batches(), loss_fn=_next_token_loss)
