"""Choosing channels to remove and removing them: the tensors, their gradients and optimizer state.

A *removal* maps a group's root layer to the group channels it removes
(numbered as in the model at that moment). :func:`remove_channels` cuts them
out for real; :func:`zero_channels` sets the same entries to zero and keeps
the shapes (the masked network the smaller one must equal).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from prunelab.errors import UserError
from prunelab.sparsity.channels import NORMS, Group, find_groups, weight_dim

Removal = dict[str, list[int]]

# The size attribute of each layer type along each dimension of its weight.
_SIZES = {nn.Linear: ("out_features", "in_features"), nn.Conv1d: ("out_channels", "in_channels"),
          nn.Conv2d: ("out_channels", "in_channels"), nn.Conv3d: ("out_channels", "in_channels")}


class WeightCount:
    """Exact number of prunable weights (Conv and Linear weights) as channels are taken away.

    A weight sits at one output and one input of its layer, and the two can
    belong to different groups, so per-channel costs do not add up: this
    counts each layer as kept outputs x kept inputs x kernel size.
    """

    def __init__(self, model: nn.Module, groups: Sequence[Group], prunable: Mapping[str, torch.Tensor]) -> None:
        modules = dict(model.named_modules())
        self.groups = groups
        self.sizes: dict[str, list[int]] = {}  # layer -> [outputs kept, inputs kept, kernel size]
        for g in groups:
            for m in g.members:
                module = modules[m.module]
                if not isinstance(module, NORMS):
                    w = module.weight
                    self.sizes[m.module] = [w.shape[0], w.shape[1], w[0, 0].numel()]
        tracked = {f"{name}.weight" for name in self.sizes}
        self.fixed = sum(p.numel() for n, p in prunable.items() if n not in tracked)
        # Entries each channel has in each member: a flatten gives one channel many inputs of a Linear.
        self.entries = [[(m.module, weight_dim(modules[m.module], m.side), torch.bincount(m.channel, minlength=g.channels))
                         for m in g.members if m.module in self.sizes] for g in groups]

    @property
    def total(self) -> int:
        """Prunable weights left."""
        return self.fixed + sum(o * i * k for o, i, k in self.sizes.values())

    def take(self, group: int, channel: int) -> None:
        """Count channel ``channel`` of group ``group`` as removed."""
        for name, dim, counts in self.entries[group]:
            self.sizes[name][dim] -= int(counts[channel])


def choose_channels(
    model: nn.Module,
    groups: Sequence[Group],
    scores: Sequence[torch.Tensor | None],
    prunable: Mapping[str, torch.Tensor],
    keep: int,
    allocation: str,
    built: Mapping[str, int] | None = None,
) -> Removal:
    """The lowest-scoring channels whose removal leaves at most ``keep`` of the ``prunable`` weights.

    ``global``: one ranking over all scored channels (ties: group order, then
    channel), removed one by one until the count is reached, so it is passed
    by less than one channel's weights; ``layerwise``: the smallest equal
    fraction of every scored group's channels that reaches it, a fraction of
    the channels each group was ``built`` with (by root; default: those it has
    now), so that a run cutting in several steps ends with the channel counts
    of one cut (8 of 16, not 7). Every group keeps at least one channel;
    groups scored None are not touched.
    """
    order = {i: torch.sort(s, stable=True).indices.tolist() for i, s in enumerate(scores) if s is not None}
    if allocation == "layerwise":
        sizes = {i: (built or {}).get(groups[i].root, groups[i].channels) for i in order}
        counts = _layerwise_counts(model, groups, order, prunable, keep, sizes)
        return {groups[i].root: sorted(order[i][:k]) for i, k in counts.items() if k}
    if allocation != "global":
        raise UserError(f"prune.structure=channel allocates 'global' or 'layerwise', got {allocation!r}")
    ranked = sorted((float(scores[i][c]), rank, c, i)  # type: ignore[index]
                    for rank, i in enumerate(order) for c in order[i])
    count = WeightCount(model, groups, prunable)
    left = {i: groups[i].channels for i in order}
    removal: dict[int, list[int]] = {}
    for _, _, c, i in ranked:
        if count.total <= keep:
            break
        if left[i] > 1:
            left[i] -= 1
            removal.setdefault(i, []).append(c)
            count.take(i, c)
    _check_reached(count.total, keep)
    return {groups[i].root: sorted(cs) for i, cs in removal.items()}


def _layerwise_counts(model: nn.Module, groups: Sequence[Group], order: Mapping[int, list[int]],
                      prunable: Mapping[str, torch.Tensor], keep: int, sizes: Mapping[int, int]) -> dict[int, int]:
    """Channels to remove now per group: the smallest fraction f such that leaving ``sizes[i]`` minus
    floor(f * ``sizes[i]``) channels in every group is enough (``sizes``: the groups as built)."""

    def counts_at(f: float) -> dict[int, int]:
        gone = {i: sizes[i] - groups[i].channels for i in order}  # removed by earlier cuts
        return {i: max(0, min(int(f * sizes[i] + 1e-9) - gone[i], groups[i].channels - 1)) for i in order}

    def left(counts: Mapping[int, int]) -> int:
        count = WeightCount(model, groups, prunable)
        for i, k in counts.items():
            for c in order[i][:k]:
                count.take(i, c)
        return count.total

    fractions = sorted({k / sizes[i] for i in order for k in range(sizes[i])})
    lo, hi = 0, len(fractions) - 1  # binary search: the weights left fall as the fraction grows
    _check_reached(left(counts_at(fractions[hi])), keep)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if left(counts_at(fractions[mid])) <= keep else (mid + 1, hi)
    return counts_at(fractions[lo])


def _check_reached(left: int, keep: int) -> None:
    if left > keep:
        raise UserError(
            "removing whole channels cannot reach this sparsity: every group keeps one channel, the "
            "classifier's outputs stay and layers outside the groups stay whole; choose a lower prune.sparsity"
        )


def _plan(model: nn.Module, groups: Sequence[Group], removal: Mapping[str, Sequence[int]]
          ) -> dict[tuple[str, int], torch.Tensor]:
    """(layer name, weight dimension) -> the indices removed along it."""
    modules = dict(model.named_modules())
    plan: dict[tuple[str, int], torch.Tensor] = {}
    for g in groups:
        gone = torch.tensor(sorted(removal.get(g.root, ())), dtype=torch.long)
        if not len(gone):
            continue
        for m in g.members:
            hit = torch.isin(m.channel, gone)
            plan[(m.module, weight_dim(modules[m.module], m.side))] = m.index[hit]
    return plan


def _tensors(module: nn.Module, dim: int) -> list[str]:
    """Attributes cut along ``dim`` of the weight: the weight, and along the outputs the bias and
    (BatchNorm) the running statistics."""
    names = ["weight"]
    if dim == 0:
        names += ["bias"]
        if isinstance(module, NORMS):
            names += ["running_mean", "running_var"]
    return [n for n in names if getattr(module, n, None) is not None]


def remove_channels(
    model: nn.Module,
    groups: Sequence[Group],
    removal: Mapping[str, Sequence[int]],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Cut the ``removal``'s channels out of ``model``: weights, biases, BatchNorm statistics, the
    gradients and the ``optimizer``'s per-weight state, surviving entries in their order."""
    modules = dict(model.named_modules())
    for (name, dim), gone in _plan(model, groups, removal).items():
        module = modules[name]
        size = module.weight.shape[dim]
        keep = torch.ones(size, dtype=torch.bool)
        keep[gone] = False
        index = keep.nonzero().squeeze(1)
        for attr in _tensors(module, dim):
            _cut(module, attr, dim, index, optimizer)
        _resize(module, dim, len(index))


@torch.no_grad()
def _cut(module: nn.Module, attr: str, dim: int, index: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    old = getattr(module, attr)
    index = index.to(old.device)
    if not isinstance(old, nn.Parameter):  # a buffer (BatchNorm running statistics)
        setattr(module, attr, old.index_select(dim, index))
        return
    new = nn.Parameter(old.index_select(dim, index), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = old.grad.index_select(dim, index)
    setattr(module, attr, new)
    if optimizer is not None:
        _carry_state(optimizer, old, new, dim, index)


def _carry_state(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, dim: int,
                 index: torch.Tensor) -> None:
    """Point the optimizer at ``new`` and cut ``old``'s per-weight state (momentum, moments) the same way."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            k: v.index_select(dim, index) if isinstance(v, torch.Tensor) and v.shape == old.shape else v
            for k, v in state.items()
        }


def _resize(module: nn.Module, dim: int, size: int) -> None:
    """Keep the layer's size attributes true (they print, and ONNX export and Torch-Pruning read them)."""
    if isinstance(module, NORMS):
        module.num_features = size
        return
    attrs = next(v for t, v in _SIZES.items() if isinstance(module, t))
    setattr(module, attrs[dim], size)


def replay_cuts(model: nn.Module, cuts: Sequence[Mapping[str, Sequence[int]]], example: torch.Tensor) -> None:
    """Remove ``cuts`` (removals in the order they were made) from ``model`` as built: the network a
    run with ``prune.structure=channel`` ended with (``example``: one input batch)."""
    for removal in cuts:
        remove_channels(model, find_groups(model, example), removal)


@torch.no_grad()
def zero_channels(model: nn.Module, groups: Sequence[Group], removal: Mapping[str, Sequence[int]]) -> None:
    """Set the ``removal``'s entries to zero (weights, biases, BatchNorm scale and shift), shapes kept."""
    modules = dict(model.named_modules())
    for (name, dim), gone in _plan(model, groups, removal).items():
        module = modules[name]
        for attr in _tensors(module, dim):
            if attr in ("weight", "bias"):
                getattr(module, attr).index_fill_(dim, gone.to(module.weight.device), 0.0)
