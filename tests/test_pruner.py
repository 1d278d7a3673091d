"""The public API on models that are not in the zoo: prunelab.prune and ProgressivePruner."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab
from prunelab.errors import UserError
from prunelab.sparsity.mask import count_kept, count_total, prunable_parameters


class TinyEncoder(nn.Module):
    """Token and position embeddings, two Transformer encoder layers, a mean-pooled classifier."""

    def __init__(self, vocab: int = 50, dim: int = 32, classes: int = 5, tie: bool = False) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(16, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        h = self.encoder(h)
        return self.head(h.mean(dim=1)) + 0.0 * self.lm_head(h).sum()


def depthwise_separable() -> nn.Module:
    """A MobileNet-style block: stem conv, depthwise 3x3, pointwise 1x1, BatchNorm, classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Conv2d(16, 32, 1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


class SharedLayers(nn.Module):
    """One Linear applied twice, and two Linear modules holding the same Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(20, 32)
        self.block = nn.Linear(32, 32)
        self.tied_a = nn.Linear(32, 32)
        self.tied_b = nn.Linear(32, 32)
        self.tied_b.weight = self.tied_a.weight
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.block(h))
        h = torch.relu(self.block(h))  # the same weights again
        h = torch.relu(self.tied_a(h)) + torch.relu(self.tied_b(h))
        return self.out(h)


def encoder_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (8, 12), generator=g), torch.randint(0, 5, (8,), generator=g)


def image_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


def vector_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 20, generator=g), torch.randint(0, 4, (8,), generator=g)


def user_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, pruner: prunelab.ProgressivePruner,
    batch: tuple[torch.Tensor, torch.Tensor], clip: bool = False,
) -> None:
    """One step of a user's own loop: backward, optional clipping, the optimizer's step, then the pruner's."""
    x, y = batch
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    pruner.step()


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[torch.Tensor, torch.Tensor]]]] = {
    "transformer": (TinyEncoder, encoder_batch),
    "depthwise": (depthwise_separable, image_batch),
    "shared": (SharedLayers, vector_batch),
}

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
}


def expected_kept(model: nn.Module, sparsity: float) -> int:
    total = sum(p.numel() for p in prunable_parameters(model).values())
    return round((1.0 - sparsity) * total)


def assert_pruned_state_zero(pruner: prunelab.ProgressivePruner, optimizer: torch.optim.Optimizer) -> None:
    for name, p in pruner.masker.params.items():
        pruned = ~pruner.masks[name]
        assert torch.count_nonzero(p.detach()[pruned]) == 0, name
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert torch.count_nonzero(value[pruned]) == 0, f"{name} {key}"


def test_transformer_prunable_weights_are_attention_and_mlp_not_embeddings() -> None:
    names = set(prunable_parameters(TinyEncoder()))
    per_layer = {"self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"}
    expected = {f"encoder.layers.{i}.{n}" for i in range(2) for n in per_layer} | {"head.weight", "lm_head.weight"}
    assert names == expected
    with_tables = set(prunable_parameters(TinyEncoder(), embeddings=True))
    assert with_tables == expected | {"tokens.weight", "positions.weight"}


def test_weight_tied_to_an_embedding_is_left_dense_by_default() -> None:
    model = TinyEncoder(tie=True)
    assert "lm_head.weight" not in prunable_parameters(model)
    prunelab.prune(model, 0.9)
    assert torch.count_nonzero(model.tokens.weight) == model.tokens.weight.numel()


def test_separate_qkv_projections_are_prunable() -> None:
    attention = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)
    assert set(prunable_parameters(attention)) == {"q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("scope", ["global", "layerwise", "erk"])
def test_prune_hits_the_exact_count(name: str, scope: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name][0]()
    masks = prunelab.prune(model, 0.9, scope=scope)
    params = prunable_parameters(model)
    assert set(masks) == set(params)
    assert count_kept(masks) == expected_kept(model, 0.9)
    zeros = sum(int((p == 0).sum()) for p in params.values())
    assert zeros == count_total(masks) - count_kept(masks)


def test_shared_weights_are_pruned_once() -> None:
    model = SharedLayers()
    names = list(prunable_parameters(model))
    assert names == ["inp.weight", "block.weight", "tied_a.weight", "out.weight"]
    masks = prunelab.prune(model, 0.5, scope="layerwise")
    assert int(masks["tied_a.weight"].sum()) == 512
    assert torch.equal(model.tied_b.weight == 0, ~masks["tied_a.weight"])


def test_prune_magnitude_keeps_the_largest_and_zeros_optimizer_state() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(12.0).reshape(3, 4) - 5.5)
        model[2].weight.copy_(torch.tensor([[0.1, -20.0, 0.2], [30.0, 0.3, -0.4]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.randn(5, 4)), torch.tensor([0, 1, 0, 1, 0])).backward()
    optimizer.step()  # momentum buffers are now non-zero everywhere
    before = {n: p.detach().clone() for n, p in prunable_parameters(model).items()}
    masks = prunelab.prune(model, 0.75, optimizer=optimizer)
    flat = torch.cat([b.abs().reshape(-1) for b in before.values()])
    threshold = flat.sort(descending=True).values[round(0.25 * flat.numel()) - 1]
    for name, p in prunable_parameters(model).items():
        assert torch.equal(masks[name], before[name].abs() >= threshold)
        assert torch.count_nonzero(optimizer.state[p]["momentum_buffer"][~masks[name]]) == 0


def test_prune_by_given_scores_random_and_taylor() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    params = prunable_parameters(model)
    scores = {n: torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) for n, p in params.items()}
    masks = prunelab.prune(model, 0.5, scores, scope="layerwise")
    assert masks["1.weight"].reshape(-1).tolist() == [False] * 48 + [True] * 48
    a = prunelab.prune(nn.Sequential(nn.Linear(12, 8)), 0.5, "random", generator=torch.Generator().manual_seed(3))
    b = prunelab.prune(nn.Sequential(nn.Linear(12, 8)), 0.5, "random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["0.weight"], b["0.weight"])
    batches = [(torch.randn(6, 12), torch.randint(0, 3, (6,))) for _ in range(2)]
    taylor = prunelab.prune(model, 0.7, "taylor", batches=batches)
    assert count_kept(taylor) == round(0.3 * (96 + 24))


def test_prune_offers_every_registered_criterion_with_the_methods_masks() -> None:
    """The API and the methods share one registry: snip, grasp and synflow by name give the
    masks of the pruning-at-initialisation functions, at exactly the target count."""
    from prunelab.sparsity import pai

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 12, generator=g), torch.tensor([0, 1, 2] * 3)
    expected = {
        "snip": lambda m, ps: pai.snip_masks(m, ps, x, y, 0.25),
        "grasp": lambda m, ps: pai.grasp_masks(m, ps, x, y, 0.25),
        "synflow": lambda m, ps: pai.synflow_masks(m, ps, 0.25, "global", (12,)),
    }
    for name, reference in expected.items():
        model = net()
        want = reference(model, prunable_parameters(model))
        got = prunelab.prune(net(), 0.75, name, batches=[(x, y)])
        assert count_kept(got) == round(0.25 * 120), name
        assert all(torch.equal(got[n], want[n]) for n in want), name
    with pytest.raises(UserError, match="needs input_shape"):
        prunelab.prune(net(), 0.5, "synflow")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"sparsity": 0.5, "criterion": "magnitud"}, "did you mean 'magnitude'"),
        ({"sparsity": 0.5, "scope": "globl"}, "did you mean 'global'"),
        ({"sparsity": 0.5, "criterion": "taylor"}, "needs batches"),
        ({"sparsity": 0.5, "exclude": ("*",)}, "no prunable weights"),
        ({"sparsity": 0.5, "criterion": {"0.weight": torch.ones(3, 4)}}, "scores are missing for: 2.weight"),
    ],
)
def test_prune_refuses_bad_arguments_in_one_sentence(kwargs: dict[str, object], message: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        prunelab.prune(model, **kwargs)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_progressive_pruner_in_a_user_loop(name: str, optimizer_name: str) -> None:
    """Ramps to exactly the target; pruned weights and their optimizer state are 0 after every step."""
    torch.manual_seed(0)
    build, batch = MODELS[name]
    model = build()
    optimizer = OPTIMIZERS[optimizer_name](list(model.parameters()))
    pruner = prunelab.ProgressivePruner(model, optimizer, sparsity=0.8, start=0, end=2, steps_per_epoch=3)
    kept = []
    for step in range(9):
        user_step(model, optimizer, pruner, batch(step), clip=True)
        assert_pruned_state_zero(pruner, optimizer)
        kept.append(count_kept(pruner.masks))
    total = count_total(pruner.masks)
    # Updates before steps 0 and 3: 0.4, then 0.8 (the target), kept to the end.
    assert kept[:2] == [round(0.6 * total)] * 2
    assert kept[2:] == [expected_kept(model, 0.8)] * 7
    assert pruner.sparsity == pytest.approx(0.8, abs=0.5 / total)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_progressive_pruner_follows_the_polynomial_schedule_and_is_monotone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = prunelab.ProgressivePruner(
        model, optimizer, sparsity=0.9, start=1, end=3, steps_per_epoch=4, every=2, power=3.0
    )
    total = count_total(pruner.masks)
    previous = pruner.masks
    seen = []
    for step in range(16):
        user_step(model, optimizer, pruner, vector_batch(step))
        assert all(bool((~previous[n] & pruner.masks[n]).sum() == 0) for n in previous)  # never revived
        previous = pruner.masks
        seen.append(count_kept(pruner.masks))
    # Updates at steps 4, 6, 8, 10 target 0.9 + (0 - 0.9) * (1 - k / 4)^3 for k = 1..4.
    targets = [0.9 - 0.9 * (1 - k / 4) ** 3 for k in range(1, 5)]
    expected = [total] * 3 + [round((1 - s) * total) for s in targets for _ in range(2)] + [round(0.1 * total)] * 5
    assert seen == expected


def test_start_equal_to_end_prunes_once_then_keeps_the_mask() -> None:
    torch.manual_seed(0)
    model = SharedLayers()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = prunelab.ProgressivePruner(model, optimizer, sparsity=0.75, start=0, end=0, steps_per_epoch=5)
    first = {n: m.clone() for n, m in pruner.masks.items()}
    assert count_kept(first) == expected_kept(model, 0.75)
    for step in range(6):
        user_step(model, optimizer, pruner, vector_batch(step))
        assert_pruned_state_zero(pruner, optimizer)
    assert all(torch.equal(first[n], pruner.masks[n]) for n in first)


def test_pruner_state_dict_round_trip_and_remove() -> None:
    torch.manual_seed(0)
    model = depthwise_separable()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = prunelab.ProgressivePruner(model, optimizer, sparsity=0.5, start=0, end=1, steps_per_epoch=2, every=1)
    pruner.step()
    state = pruner.state_dict()
    other = prunelab.ProgressivePruner(model, optimizer, sparsity=0.5, start=0, end=1, steps_per_epoch=2, every=1)
    other.load_state_dict(state)
    assert other.steps == 1 and all(torch.equal(other.masks[n], state["masks"][n]) for n in state["masks"])
    pruner.remove()
    other.remove()
    x, y = image_batch(0)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in other.masker.params.values()]
    assert any(bool((g[~other.masks[n]] != 0).any()) for g, n in zip(grads, other.masks))  # hooks gone


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps_per_epoch": 0}, "steps_per_epoch must be at least 1"),
        ({"start": 3, "end": 2}, "need 0 <= start <= end"),
        ({"sparsity": -0.1}, "sparsity must be in"),
        ({"power": 0.0}, "power must be positive"),
        ({"initial_sparsity": 0.95}, "initial_sparsity must be in"),
    ],
)
def test_progressive_pruner_refuses_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    before = model[0].weight.detach().clone()
    args: dict[str, float] = {"sparsity": 0.9, "start": 0, "end": 2, "steps_per_epoch": 3} | kwargs
    with pytest.raises(UserError, match=message):
        prunelab.ProgressivePruner(model, torch.optim.SGD(model.parameters(), lr=0.1), **args)  # type: ignore[arg-type]
    assert torch.equal(model[0].weight, before)
