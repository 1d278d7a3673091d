"""Pruning at initialisation: SNIP, GraSP, SynFlow and random masks.

Each ``*_masks`` function returns masks keeping exactly ``round(density * n)``
weights with the given allocation ('global', 'layerwise', 'erk'); with
``current`` masks the result is a subset of them. The ``*_scores`` functions
give the raw scores. The model's parameters, gradients, buffers and
train/eval flags are left exactly as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import nn

from prunelab.models.modes import eval_mode
from prunelab.sparsity.allocate import allocate
from prunelab.sparsity.knobs import ITERATIONS, TEMPERATURE
from prunelab.sparsity.mask import Masks, count_kept, count_total, full_masks
from prunelab.sparsity.scores import LossFn, Scores, cross_entropy_loss, loss_grads
from prunelab.sparsity.structure import UNSTRUCTURED


def balanced_sample(
    x: torch.Tensor, y: torch.Tensor, per_class: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` examples of every class in ``y``, drawn without replacement.

    Classes come in ascending order, each block in the order drawn; the same
    generator state gives the same sample. GraSP scores on such a sample
    (10 per class in the paper) so that no class dominates the gradient.
    """
    picks = []
    for label in torch.unique(y).tolist():
        members = torch.nonzero(y == label).reshape(-1)
        if members.numel() < per_class:
            raise ValueError(
                f"class {label} has {members.numel()} examples, fewer than {per_class}"
            )
        order = torch.randperm(members.numel(), generator=generator)[:per_class]
        picks.append(members[order.to(members.device)])
    index = torch.cat(picks)
    return x[index], y[index]


def snip_scores(
    model: nn.Module, params: Mapping[str, nn.Parameter], x: torch.Tensor, y: torch.Tensor, *,
    loss_fn: LossFn | None = None,
) -> Scores:
    """SNIP's connection sensitivity |g * w| (Lee et al. 2019) on one batch, BatchNorm in eval mode.

    g is the gradient of ``loss_fn(model, (x, y))`` (default: cross-entropy).
    The paper normalises by the sum over all weights; that does not change
    which weights are kept, so it is left out.
    """
    with eval_mode(model):
        grads = loss_grads(model, params, (x, y), loss_fn)
    return {name: (grads[name] * p.detach()).abs() for name, p in params.items()}


def snip_masks(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    density: float,
    allocation: str = "global",
    current: Masks | None = None,
    structure: str = UNSTRUCTURED,
    *,
    loss_fn: LossFn | None = None,
) -> Masks:
    """Masks keeping the highest SNIP scores."""
    return allocate(snip_scores(model, params, x, y, loss_fn=loss_fn), density, allocation, current, structure)


def grasp_scores(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    temperature: float = TEMPERATURE.default,
    *,
    loss_fn: LossFn | None = None,
) -> Scores:
    """GraSP's score S = -w * (H g) (Wang et al. 2020), logits divided by ``temperature``.

    g is the gradient of the cross-entropy (of ``loss_fn(model, (x, y))`` when
    given, used as it is: ``temperature`` scales only the default loss's
    logits), taken as a constant; H g is the
    gradient of z = g . grad(L) (a second, differentiable gradient, then a
    double backward). A weight with a high S is one whose removal reduces
    the gradient flow least, or even raises it: GraSP REMOVES the highest S,
    so :func:`grasp_masks` keeps the lowest. BatchNorm is in eval mode.
    """
    loss = loss_fn or partial(cross_entropy_loss, temperature=temperature)
    with eval_mode(model):
        g = loss_grads(model, params, (x, y), loss)
        grads = loss_grads(model, params, (x, y), loss, create_graph=True)
        z = sum((g[name].detach() * grads[name]).sum() for name in params)
        hg = torch.autograd.grad(z, list(params.values()), materialize_grads=True)
    return {name: -p.detach() * h for (name, p), h in zip(params.items(), hg, strict=True)}


def grasp_masks(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    density: float,
    allocation: str = "global",
    temperature: float = TEMPERATURE.default,
    current: Masks | None = None,
    structure: str = UNSTRUCTURED,
    *,
    loss_fn: LossFn | None = None,
) -> Masks:
    """Masks keeping the LOWEST GraSP scores (allocation ranks -S, higher = keep)."""
    scores = grasp_scores(model, params, x, y, temperature, loss_fn=loss_fn)
    return allocate({name: -s for name, s in scores.items()}, density, allocation, current, structure)


def xavier_redrawn(model: nn.Module, params: Mapping[str, nn.Parameter], generator: torch.Generator | None
                   ) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A copy of ``model`` whose Linear weights are redrawn from Xavier normal, and its ``params`` by name.

    GraSP's code scores such a copy by default (``reinit=True``): on networks
    initialised with small Linear weights the scores of the real weights
    pick masks that train badly. The copy's draw comes from ``generator``.
    """
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for module in clone.modules():
            if isinstance(module, nn.Linear):
                drawn = torch.empty(module.weight.shape, dtype=module.weight.dtype)
                nn.init.xavier_normal_(drawn, generator=generator)
                module.weight.copy_(drawn)
    named = dict(clone.named_parameters())
    return clone, {name: named[name] for name in params}


def random_scores(
    params: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
) -> Scores:
    """I.i.d. uniform [0, 1) scores, drawn on the CPU in parameter order (device-independent)."""
    return {
        name: torch.rand(p.shape, generator=generator).to(p.device) for name, p in params.items()
    }


def random_masks(
    params: Mapping[str, torch.Tensor],
    density: float,
    allocation: str = "layerwise",
    generator: torch.Generator | None = None,
    current: Masks | None = None,
    structure: str = UNSTRUCTURED,
) -> Masks:
    """Random pruning: uniform per layer ('layerwise') or with ERK densities ('erk')."""
    return allocate(random_scores(params, generator), density, allocation, current, structure)


def _linearized_copy(model: nn.Module) -> nn.Module:
    """A float64 copy in eval mode with every floating parameter and buffer replaced by |.|.

    Positive weights make the network's output a positive sum over paths, so
    dR/dw measures the flow through each weight. float64 because these
    products of weights overflow float32 in deep networks. Buffers (BN
    running statistics) are made positive too, as SynFlow's authors do.
    """
    clone = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for tensor in list(clone.parameters()) + list(clone.buffers()):
            if tensor.is_floating_point():
                tensor.abs_()
    return clone


def _synflow_scores(
    clone: nn.Module,
    weights: Mapping[str, nn.Parameter],
    base: Mapping[str, torch.Tensor],
    masks: Masks,
    input_shape: Sequence[int],
) -> Scores:
    """|w * dR/dw| for R = sum of the clone's outputs on ones, with the masks applied to |w|."""
    with torch.no_grad():
        for name, w in weights.items():
            w.copy_(base[name] * masks[name])
    device = next(iter(base.values())).device
    ones = torch.ones((1, *input_shape), dtype=torch.float64, device=device)
    grads = torch.autograd.grad(clone(ones).sum(), list(weights.values()))
    return {
        name: (w.detach() * g).abs() for (name, w), g in zip(weights.items(), grads, strict=True)
    }


def synflow_masks(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    density: float,
    allocation: str,
    input_shape: Sequence[int],
    iterations: int = ITERATIONS.default,
    current: Masks | None = None,
    structure: str = UNSTRUCTURED,
) -> Masks:
    """SynFlow (Tanaka et al. 2020): data-free, iterative pruning by synaptic flow.

    Scores |w * dR/dw| on a positive float64 copy of the model (see
    :func:`_linearized_copy`; ``model`` itself is not touched), input of ones
    of shape ``(1, *input_shape)``, R = sum of the outputs. Over ``iterations``
    rounds the density falls geometrically, d_k = d0 * (density / d0)^(k / iterations)
    with d0 the density of ``current`` (1 without it, the paper's d^(k/100)),
    and each round re-scores the copy with the masked weights zeroed: pruning
    in small steps keeps a layer from being cut off entirely. The last round
    is exactly at ``density``; every round is a subset of the previous one.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    names_by_id = {id(p): name for name, p in model.named_parameters()}
    clone = _linearized_copy(model)
    clone_params = dict(clone.named_parameters())
    weights = {name: clone_params[names_by_id[id(p)]] for name, p in params.items()}
    base = {name: w.detach().clone() for name, w in weights.items()}
    masks = full_masks(params) if current is None else dict(current)
    start = count_kept(masks) / count_total(masks)
    if start == 0.0:
        return masks  # nothing left to rank
    for k in range(1, iterations + 1):
        # The last round is pinned to ``density``: the power can miss it by a rounding error.
        last = k == iterations
        step_density = density if last else start * (density / start) ** (k / iterations)
        scores = _synflow_scores(clone, weights, base, masks, input_shape)
        masks = allocate(scores, step_density, allocation, masks, structure)
    return masks
