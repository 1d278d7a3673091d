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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import UserError
from prunelab.models.modes import eval_mode

Batch = Any
"""One batch of data: ``(inputs, labels)`` for the default loss, anything a ``loss_fn`` takes otherwise."""
Scores = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch) -> scalar loss tensor``: the loss the data-driven criteria differentiate."""

_PASS_LOSS_FN = "pass loss_fn=(model, batch) -> scalar loss tensor"


def cross_entropy_loss(model: nn.Module, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """The default loss: the mean cross-entropy of a classifier's logits / ``temperature`` on ``batch``,
    a pair ``(inputs, labels)``.

    The logits are the model's output tensor of shape (batch, classes), or the
    ``logits`` entry of a dict-like output (a Hugging Face ``ModelOutput``).
    Anything else, such as a language model's (batch, tokens, vocabulary)
    logits, which cross-entropy would silently read as (batch, classes,
    positions), is a one-sentence :class:`UserError` asking for a ``loss_fn``.
    """
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise UserError(f"the default loss (cross-entropy) takes batches of (inputs, labels), "
                        f"got a {type(batch).__name__}; for other batches {_PASS_LOSS_FN}")
    x, y = batch
    output = model(x)
    logits = output.get("logits") if isinstance(output, Mapping) else output
    if not (isinstance(logits, torch.Tensor) and logits.ndim == 2):
        what = (f"logits of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor)
                else f"a {type(output).__name__}")
        raise UserError(f"the default loss (cross-entropy) needs a classifier's logits of shape (batch, classes), "
                        f"but the model put out {what}; {_PASS_LOSS_FN} (for a language model, e.g. the "
                        f"cross-entropy of the next-token logits)")
    return F.cross_entropy(logits / temperature, y)


def loss_grads(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    batch: Batch,
    loss_fn: LossFn | None = None,
    create_graph: bool = False,
) -> Scores:
    """dL/dw of ``loss_fn(model, batch)`` (default :func:`cross_entropy_loss`) for every parameter.

    The one place where the data-driven criteria compute a loss. Run it
    inside :func:`eval_mode`. With ``create_graph`` the gradients stay
    differentiable (for Hessian-vector products). A parameter the loss does
    not use gets a zero gradient.
    """
    loss = (loss_fn or cross_entropy_loss)(model, batch)
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        what = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}"
        raise UserError(f"loss_fn must return a scalar loss tensor, got {what}")
    if not loss.requires_grad:
        raise UserError("the loss from loss_fn does not depend on the model's weights (it has no gradient); "
                        "compute it from model(...) outside torch.no_grad()")
    grads = torch.autograd.grad(loss.reshape(()), list(params.values()), create_graph=create_graph,
                                materialize_grads=True)
    return dict(zip(params, grads, strict=True))


def magnitude(params: Mapping[str, torch.Tensor]) -> Scores:
    """|w|: the magnitude criterion."""
    return {name: p.detach().abs() for name, p in params.items()}


def taylor(
    model: nn.Module, params: Mapping[str, nn.Parameter], batches: Iterable[Batch], loss_fn: LossFn | None = None
) -> Scores:
    """First-order Taylor saliency |w * dL/dw|, averaged over ``batches`` (loss: ``loss_fn``, by default
    :func:`cross_entropy_loss`).

    The absolute value is taken per batch before averaging: on a trained
    network the gradient over all the data is near zero, so averaging the
    gradients first would leave mostly noise; per-batch magnitudes measure
    how much the loss reacts to removing the weight (as Molchanov et al. 2019
    accumulate per-batch contributions).
    """
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    with eval_mode(model):
        for batch in batches:
            grads = loss_grads(model, params, batch, loss_fn)
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
    loss_fn: LossFn | None = None,
) -> Scores:
    """An estimate of diag(H) of the loss (``loss_fn``, by default cross-entropy), averaged over ``batches``.

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
        for batch in batches:
            grads = loss_grads(model, params, batch, loss_fn, create_graph=True)
            for _ in range(samples):
                v = {name: rademacher_like(params[name], generator) for name in names}
                dot = sum((grads[name] * v[name]).sum() for name in names)
                hv = torch.autograd.grad(dot, [params[n] for n in names], retain_graph=True, materialize_grads=True)
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
    loss_fn: LossFn | None = None,
) -> Scores:
    """Optimal Brain Damage saliency 0.5 * diag(H) * w^2 (LeCun et al. 1990), an ESTIMATE.

    diag(H) comes from :func:`hessian_diagonal` (Hutchinson, ``samples``
    Rademacher vectors per batch from ``generator``), so the scores are
    random: noisy for few samples, and possibly negative where the estimate
    (or the true curvature, away from a minimum) is negative; such weights
    are pruned first.
    """
    diag = hessian_diagonal(model, params, batches, samples, generator, loss_fn)
    return {name: 0.5 * diag[name] * params[name].detach() ** 2 for name in params}
