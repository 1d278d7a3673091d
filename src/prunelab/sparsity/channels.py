"""Channel structure: whole output channels of convolutions and output neurons of Linear layers,
found in coupled groups by Torch-Pruning's dependency graph and removed for real.

A *group* is a set of channels that must go together: a convolution's output
channel, the BatchNorm entry after it, the input channel of every layer that
reads it, and, across a residual addition, the same channel of every other
branch that is added to it. Torch-Pruning (``torch_pruning.DependencyGraph``)
finds the groups, including the index mapping of a flatten before a Linear
layer; prunelab cuts the tensors itself (:func:`remove_channels`), so that the
gradients and the optimizer state (momentum, Adam moments) of the surviving
channels are carried over with the same indices as the weights.

Which groups are prunable: those whose every member with parameters is a
Conv (not grouped, not transposed), Linear or BatchNorm layer. A group that
also reaches a LayerNorm, GroupNorm, attention, recurrent or embedding layer
is left alone: removing a channel there changes the layer's statistics or
head size, so the smaller network would not compute what the masked one
does. The classifier (the last Conv or Linear layer the forward pass runs)
keeps its outputs, and the network's input keeps its channels (no layer
produces them). Groups that reach a layer matched by ``exclude`` are left alone.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from prunelab.errors import UserError
from prunelab.models.modes import eval_mode
from prunelab.sparsity.scores import Batch, LossFn, loss_grads

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Layers a group may contain. Anything else with parameters makes the group not prunable.
SUPPORTED: tuple[type[nn.Module], ...] = (*_CONV, nn.Linear, *NORMS)
@dataclass(frozen=True)
class Member:
    """Where a group's channels sit in one layer: its ``side`` (``out``: the layer's outputs,
    ``in``: its inputs), the ``index`` along that dimension and the group channel of each entry."""

    module: str
    side: str
    index: torch.Tensor
    channel: torch.Tensor


@dataclass(frozen=True)
class Group:
    """Coupled channels: ``channels`` of them, named by the ``root`` layer whose outputs they are."""

    root: str
    channels: int
    members: tuple[Member, ...]


def classifier_name(model: nn.Module, example: torch.Tensor) -> str:
    """The last Conv or Linear layer the forward pass runs (its outputs are never removed)."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda _m, _i, _o, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, (*_CONV, nn.Linear))]
    try:
        with torch.no_grad(), eval_mode(model):
            model(example)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise UserError("the model has no Conv or Linear layer, so it has no channels to remove")
    return order[-1]


def find_groups(model: nn.Module, example: torch.Tensor, exclude: Sequence[str] = ()) -> list[Group]:
    """The prunable channel groups of ``model`` (traced on ``example``, one input batch), in a fixed order."""
    names = {m: n for n, m in model.named_modules()}
    last = dict(model.named_modules())[classifier_name(model, example)]
    with eval_mode(model):
        # A tuple: Torch-Pruning calls model(*example_inputs), which would unpack a bare batch.
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=(example,))
    groups = []
    for tp_group in graph.get_all_groups(ignored_layers=[last], root_module_types=(*_CONV, nn.Linear)):
        members = _members(graph, tp_group, names)
        if members is None or any(_excluded(m.module, exclude) for m in members):
            continue
        root = members[0]
        groups.append(Group(root.module, int(root.index.numel()), tuple(members)))
    position = {name: i for i, name in enumerate(names.values())}
    return sorted(groups, key=lambda g: position[g.root])


def _members(graph: tp.DependencyGraph, tp_group: tp.Group, names: Mapping[nn.Module, str]) -> list[Member] | None:
    """The group's layers with parameters, or None when one of them is not :data:`SUPPORTED`."""
    members: dict[tuple[str, str], Member] = {}
    for item in tp_group.items:
        module = item.dep.target.module
        if not isinstance(module, nn.Module) or next(module.parameters(recurse=False), None) is None:
            continue  # an operation (add, flatten, activation) without parameters
        if not isinstance(module, SUPPORTED) or getattr(module, "groups", 1) != 1 or getattr(module, "transposed", False):
            return None
        side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
        key = (names[module], side)
        if key not in members:
            members[key] = Member(key[0], side, torch.tensor(list(item.idxs)), torch.tensor(list(item.root_idxs)))
    return list(members.values()) or None


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(f"{name}.weight", p) for p in patterns)


def weight_dim(module: nn.Module, side: str) -> int:
    """The dimension of ``module.weight`` a side's channels index (BatchNorm has only one)."""
    return 1 if side == "in" and not isinstance(module, NORMS) else 0


def _out_parameters(model: nn.Module, group: Group, norms: bool) -> list[tuple[Member, str, nn.Parameter]]:
    """(member, attribute, parameter) of the group's outputs: Conv/Linear (``norms`` False) or BatchNorm."""
    modules = dict(model.named_modules())
    out = []
    for m in group.members:
        module = modules[m.module]
        if m.side == "out" and isinstance(module, NORMS) == norms:
            out += [(m, attr, p) for attr, p in module.named_parameters(recurse=False)]
    return out


def _per_channel(group: Group, member: Member, values: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of ``values`` (one tensor of the member's layer) over each group channel's entries."""
    per_entry = values.detach().index_select(dim, member.index.to(values.device)).movedim(dim, 0)
    per_entry = per_entry.reshape(len(member.index), -1).sum(1).double().cpu()
    return torch.zeros(group.channels, dtype=torch.float64).index_add_(0, member.channel, per_entry)


def norm_scores(model: nn.Module, group: Group, p: int) -> torch.Tensor:
    """Each channel's filter weights by their L1 (``p=1``) or L2 (``p=2``) norm, per weight of the filter
    (mean |w|, root mean square), summed over every producer in the group.

    Within a layer this ranks as the plain norm does (Li et al. 2017); dividing by the filter's size
    makes layers comparable in a global ranking, where plain sums would remove the small filters of
    the first layers first.
    """
    total = torch.zeros(group.channels, dtype=torch.float64)
    for m, attr, w in _out_parameters(model, group, norms=False):
        if attr == "weight":
            per_weight = _per_channel(group, m, w.abs() ** p, 0) / w[0].numel()
            total += per_weight if p == 1 else per_weight.sqrt()
    return total


def dead_channels(model: nn.Module, groups: Sequence[Group]) -> dict[str, list[int]]:
    """Channels whose every output parameter (weights, biases, BatchNorm scale and shift) is exactly
    zero: they put out 0 everywhere, so removing them changes nothing. Each group keeps one channel."""
    removal = {}
    for g in groups:
        total = torch.zeros(g.channels, dtype=torch.float64)
        for m, _, p in _out_parameters(model, g, norms=False) + _out_parameters(model, g, norms=True):
            total += _per_channel(g, m, p.abs(), 0)
        dead = (total == 0).nonzero().squeeze(1).tolist()[: g.channels - 1]
        if dead:
            removal[g.root] = dead
    return removal


def bn_scale_scores(model: nn.Module, group: Group) -> torch.Tensor | None:
    """Sum of |gamma| over the group's BatchNorm layers; None when the group has none."""
    scales = [(m, w) for m, attr, w in _out_parameters(model, group, norms=True) if attr == "weight"]
    if not scales:
        return None
    return sum((_per_channel(group, m, w.abs(), 0) for m, w in scales), torch.zeros(group.channels, dtype=torch.float64))


def taylor_scores(model: nn.Module, groups: Sequence[Group], batches: Sequence[Batch],
                  loss_fn: LossFn | None = None) -> list[torch.Tensor]:
    """Molchanov et al. 2019: per batch, (sum of w * dL/dw over every output parameter of the channel:
    weights, biases, BatchNorm scale and shift)^2, averaged over ``batches``; in eval mode. L is
    ``loss_fn(model, batch)`` (default: cross-entropy)."""
    if not batches:
        raise ValueError("taylor needs at least one batch")
    parts = [_out_parameters(model, g, norms=False) + _out_parameters(model, g, norms=True) for g in groups]
    params = {f"{i}.{j}": p for i, part in enumerate(parts) for j, (_, _, p) in enumerate(part)}
    totals = [torch.zeros(g.channels, dtype=torch.float64) for g in groups]
    with eval_mode(model):
        for batch in batches:
            grads = loss_grads(model, params, batch, loss_fn)
            for i, (g, part) in enumerate(zip(groups, parts)):
                first = torch.zeros(g.channels, dtype=torch.float64)
                for j, (m, _, p) in enumerate(part):
                    first += _per_channel(g, m, p * grads[f"{i}.{j}"], 0)
                totals[i] += first**2
    return [t / len(batches) for t in totals]
