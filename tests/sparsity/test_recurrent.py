"""Recurrent layers are prunable (every direction and layer), and prune() warns when its count misleads."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import prunelab
from prunelab.sparsity.mask import prunable_parameters


class Tagger(nn.Module):
    """A bidirectional 2-layer recurrent classifier over sequences of 10 features (every weight matrix
    a multiple of 10 entries, so that 90% of each is a whole number)."""

    def __init__(self, rnn: type[nn.RNNBase] = nn.LSTM) -> None:
        super().__init__()
        self.rnn = rnn(10, 20, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(40, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU, nn.RNN])
def test_every_recurrent_weight_matrix_is_prunable(rnn: type[nn.RNNBase]) -> None:
    names = set(prunable_parameters(Tagger(rnn)))
    matrices = {f"rnn.weight_{kind}_l{layer}{suffix}" for kind in ("ih", "hh") for layer in (0, 1)
                for suffix in ("", "_reverse")}
    assert names == matrices | {"head.weight"}  # biases are never pruned


def test_layerwise_prune_leaves_exactly_ninety_percent_zeros_in_each_lstm_matrix() -> None:
    torch.manual_seed(0)
    model = Tagger()
    prunelab.prune(model, 0.9, scope="layerwise")
    for name, p in prunable_parameters(model).items():
        assert int((p == 0).sum()) == p.numel() - round(0.1 * p.numel()), name


def test_lstm_masks_stay_exact_under_training() -> None:
    torch.manual_seed(0)
    model = Tagger()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = prunelab.ProgressivePruner(model, optimizer, sparsity=0.8, start=0, end=0, steps_per_epoch=1,
                                        scope="layerwise")
    x, y = torch.randn(8, 5, 10), torch.randint(0, 3, (8,))
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        pruner.step()
        for name, p in pruner.masker.params.items():
            pruned = ~pruner.masks[name]
            assert torch.count_nonzero(p.detach()[pruned]) == 0, name
            assert torch.count_nonzero(optimizer.state[p]["exp_avg"][pruned]) == 0, name
    assert pruner.sparsity == pytest.approx(0.8, abs=1e-12)


def test_a_model_mostly_outside_the_prunable_weights_is_warned_about() -> None:
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Flatten(), nn.Linear(64, 4))
    with pytest.warns(UserWarning, match=r"hold only 0\.4% of the model's parameters"):
        prunelab.prune(model, 0.5)


def test_a_collapsed_layer_is_warned_about_once() -> None:
    model = nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 2))
    with torch.no_grad():
        model[2].weight.mul_(1e-6)  # the smallest magnitudes: global pruning takes them all
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prunelab.prune(model, 0.9)
    messages = [str(w.message) for w in caught]
    assert messages == ["2.weight lost all its weights: the network is disconnected there"]
