"""Criteria: functions from a model's prunable weights to one score per weight (higher = keep).

The data-driven criteria score a network in eval mode, so BatchNorm uses its
running statistics and does not update them, and dropout is off; each
module's train/eval flag is restored afterwards. Gradients are taken with
``torch.autograd.grad``, which never writes ``.grad``, so scoring leaves the
parameters, their gradients and the buffers exactly as they were.

The registry that names them (with pruning at initialisation's criteria) is
:mod:`prunelab.sparsity.criteria`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.models.modes import eval_mode

Batch = tuple[torch.Tensor, torch.Tensor]
Scores = dict[str, torch.Tensor]


def cross_entropy_grads(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    create_graph: bool = False,
    temperature: float = 1.0,
) -> Scores:
    """dL/dw of the mean cross-entropy of ``model(x) / temperature`` against ``y``.

    Run it inside :func:`eval_mode`. With ``create_graph`` the gradients stay
    differentiable (for Hessian-vector products).
    """
    loss = F.cross_entropy(model(x) / temperature, y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return dict(zip(params, grads, strict=True))


def magnitude(params: Mapping[str, torch.Tensor]) -> Scores:
    """|w|: the magnitude criterion."""
    return {name: p.detach().abs() for name, p in params.items()}


def taylor(
    model: nn.Module, params: Mapping[str, nn.Parameter], batches: Iterable[Batch]
) -> Scores:
    """First-order Taylor saliency |w * dL/dw|, averaged over ``batches`` (cross-entropy loss).

    The absolute value is taken per batch before averaging: on a trained
    network the gradient over all the data is near zero, so averaging the
    gradients first would leave mostly noise; per-batch magnitudes measure
    how much the loss reacts to removing the weight (as Molchanov et al. 2019
    accumulate per-batch contributions).
    """
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    with eval_mode(model):
        for x, y in batches:
            grads = cross_entropy_grads(model, params, x, y)
            for name, p in params.items():
                totals[name] += (p.detach() * grads[name]).abs()
            count += 1
    if count == 0:
        raise ValueError("taylor needs at least one batch")
    return {name: total / count for name, total in totals.items()}


def rademacher_like(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Independent +1/-1 entries with probability 1/2 each, drawn on the CPU from ``generator``."""
    signs = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8)
    return (signs * 2 - 1).to(device=p.device, dtype=p.dtype)


def hessian_diagonal(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    batches: Iterable[Batch],
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> Scores:
    """An estimate of diag(H) of the cross-entropy loss, averaged over ``batches``.

    Hutchinson's estimator: for Rademacher v, E[v * Hv] = diag(H), because
    E[v_i v_j] is 1 when i = j and 0 otherwise. Each batch draws ``samples``
    vectors v over all the given parameters together; Hv comes from one
    double backward per vector. The variance falls as 1/(samples * batches).
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    names = list(params)
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    with eval_mode(model):
        for x, y in batches:
            grads = cross_entropy_grads(model, params, x, y, create_graph=True)
            for _ in range(samples):
                v = {name: rademacher_like(params[name], generator) for name in names}
                dot = sum((grads[name] * v[name]).sum() for name in names)
                hv = torch.autograd.grad(dot, [params[n] for n in names], retain_graph=True)
                for name, h in zip(names, hv, strict=True):
                    totals[name] += (v[name] * h).detach()
                count += 1
    if count == 0:
        raise ValueError("hessian needs at least one batch")
    return {name: total / count for name, total in totals.items()}


def hessian(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    batches: Iterable[Batch],
    samples: int = 1,
    generator: torch.Generator | None = None,
) -> Scores:
    """Optimal Brain Damage saliency 0.5 * diag(H) * w^2 (LeCun et al. 1990), an ESTIMATE.

    diag(H) comes from :func:`hessian_diagonal` (Hutchinson, ``samples``
    Rademacher vectors per batch from ``generator``), so the scores are
    random: noisy for few samples, and possibly negative where the estimate
    (or the true curvature, away from a minimum) is negative; such weights
    are pruned first.
    """
    diag = hessian_diagonal(model, params, batches, samples, generator)
    return {name: 0.5 * diag[name] * params[name].detach() ** 2 for name in params}
