"""Masks over the prunable tensors and the bookkeeping that keeps pruned weights at zero.

A mask set is a plain ``dict`` from parameter name to a boolean tensor of the
parameter's shape (True = the weight is kept). Prunable tensors are the
``weight`` of every Conv and Linear layer, the input projections of
``nn.MultiheadAttention`` and the weight matrices of ``nn.RNN``, ``nn.LSTM``
and ``nn.GRU``, minus name patterns the user excludes; embedding tables only
when asked for.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from functools import partial

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Masks = dict[str, torch.Tensor]

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_parameters(
    model: nn.Module, exclude: Sequence[str] = (), embeddings: bool = False
) -> dict[str, nn.Parameter]:
    """The prunable weights of ``model``, keyed by parameter name, in model order.

    These are the ``weight`` of every Conv and Linear layer (attention output
    projections included), the packed or separate q/k/v input projections of
    every ``nn.MultiheadAttention``, and the ``weight_ih_l*``, ``weight_hh_l*``
    (and ``weight_hr_l*``) matrices of every recurrent layer, reverse
    directions included. Embedding tables are left out unless
    ``embeddings`` is true, also when a Linear layer shares (ties) its weight
    with one: pruning a vocabulary row removes a token, not a connection.
    ``exclude`` holds fnmatch patterns matched against the parameter name
    (``"fc3.*"``) or the module name (``"fc3"``). A weight shared by several
    modules appears once, under its first name.
    """
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set() if embeddings else set(tables)
    for module_name, module in model.named_modules():
        for attr in _weight_names(module, embeddings):
            weight = getattr(module, attr)
            name = f"{module_name}.{attr}" if module_name else attr
            if weight is None or id(weight) in seen or _excluded(name, module_name, exclude):
                continue
            seen.add(id(weight))
            params[name] = weight
    return params


def _weight_names(module: nn.Module, embeddings: bool) -> tuple[str, ...]:
    """Attribute names of the prunable weights a module owns directly."""
    if isinstance(module, PRUNABLE_TYPES) or (embeddings and isinstance(module, nn.Embedding)):
        return ("weight",)
    if isinstance(module, nn.RNNBase):
        # Input-hidden, hidden-hidden (and LSTM projection) matrices of every layer and direction.
        return tuple(n for n, _ in module.named_parameters(recurse=False)
                     if n.startswith(("weight_ih_l", "weight_hh_l", "weight_hr_l")))
    if isinstance(module, nn.MultiheadAttention):
        # One packed q/k/v matrix, or three when key/value sizes differ from the embedding size.
        return ("in_proj_weight",) if module.in_proj_weight is not None else (
            "q_proj_weight", "k_proj_weight", "v_proj_weight")  # fmt: skip
    return ()


def _excluded(name: str, module_name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module_name, p) for p in patterns)


def full_masks(params: Mapping[str, torch.Tensor]) -> Masks:
    """Masks keeping every weight."""
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()}


def count_kept(masks: Mapping[str, torch.Tensor]) -> int:
    """Number of weights the masks keep."""
    return sum(int(m.sum()) for m in masks.values())


def count_total(masks: Mapping[str, torch.Tensor]) -> int:
    """Number of weights the masks cover."""
    return sum(m.numel() for m in masks.values())


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of weights the masks remove."""
    total = count_total(masks)
    return 1.0 - count_kept(masks) / total if total else 0.0


def count_zeros(params: Mapping[str, torch.Tensor]) -> int:
    """Number of the given weights that are exactly zero, read from the weights themselves."""
    return sum(int((p == 0).sum()) for p in params.values())


def weight_sparsity(params: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the given weights that are exactly zero, read from the weights themselves."""
    total = sum(p.numel() for p in params.values())
    return count_zeros(params) / total if total else 0.0


def collapsed_layers(masks: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of masked tensors with no weight left (the network is disconnected there)."""
    return [name for name, m in masks.items() if not bool(m.any())]


class Masker:
    """Applies a mask set to a model's parameters during training.

    Per step, only the gradients of pruned weights are zeroed (one fused
    multiply, before ``optimizer.step()``). Whenever the masks change, the
    pruned weights AND their optimizer state (momentum, Nesterov, Adam and
    AdamW moments) are zeroed. Together these keep every pruned weight and its
    state exactly 0 after every step of SGD (with momentum, Nesterov, weight
    decay), Adam and AdamW: the update of a weight is built only from its
    gradient, its state and its own value, all 0 (weight decay adds wd * 0).
    So re-multiplying the weights every step, which costs as much again, is
    not needed; the trainer still re-applies the masks to the weights at the
    end of every epoch as a guard against optimizers that break this rule.
    tests/sparsity/test_mask.py checks the invariant after every step.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Masks | None = None) -> None:
        self.params = dict(params)
        self.masks: Masks = full_masks(self.params)
        self._params_list = list(self.params.values())
        self._factors: list[torch.Tensor] = []
        # The tensors that have pruned weights, and their factors: the only ones the per-step work touches.
        self._sparse_params: list[nn.Parameter] = []
        self._sparse_factors: list[torch.Tensor] = []
        self.dense = True
        if masks is not None:
            self.set_masks(masks)

    def set_masks(self, masks: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install new masks, zero the pruned weights and their optimizer state."""
        if set(masks) != set(self.params):
            raise ValueError("masks must cover exactly the prunable parameters")
        self.masks = {name: masks[name].to(device=p.device, dtype=torch.bool) for name, p in self.params.items()}
        self.dense = all(bool(m.all()) for m in self.masks.values())
        # Float factors so the per-step work is a plain multiply; skipped while dense.
        self._factors = [self.masks[n].to(p.dtype) for n, p in self.params.items()]
        sparse = [(p, f) for (n, p), f in zip(self.params.items(), self._factors) if not bool(self.masks[n].all())]
        self._sparse_params = [p for p, _ in sparse]
        self._sparse_factors = [f for _, f in sparse]
        self.apply_to_weights()
        if optimizer is not None:
            self.zero_optimizer_state(optimizer)

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        """Multiply every masked weight by its mask (pruned weights become exactly +0.0)."""
        if self._sparse_params:
            torch._foreach_mul_(self._sparse_params, self._sparse_factors)
            # A negative weight times 0 is -0.0; adding +0.0 turns it into +0.0 (and changes
            # nothing else), so a stored zero is one bit pattern and sparse exports stay small.
            torch._foreach_add_(self._sparse_params, 0.0)

    def apply_to_grads(self) -> None:
        """Zero the gradients of pruned weights (call before ``optimizer.step()``).

        Every step calls this, so it does no more than the one fused multiply:
        no ``no_grad`` wrapper (gradients are not tracked by autograd) and no
        rebuilt lists unless a weight got no gradient this step.
        """
        grads = [p.grad for p in self._sparse_params]
        if any(g is None for g in grads):
            pairs = [(g, f) for g, f in zip(grads, self._sparse_factors) if g is not None]
            grads, factors = [g for g, _ in pairs], [f for _, f in pairs]
        else:
            factors = self._sparse_factors
        if grads:
            torch._foreach_mul_(grads, factors)

    @torch.no_grad()
    def mask_grads_with(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Also zero the gradients outside ``masks`` for this step (connections that have just come in)."""
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(masks[name].to(p.grad.dtype))

    def register_grad_hooks(self) -> list[RemovableHandle]:
        """Zero pruned gradients as soon as backward has accumulated them, one weight at a time.

        For training loops prunelab does not run: the masking then needs no
        call before ``optimizer.step()``, and gradient clipping already sees
        the masked gradients. Remove the returned handles to detach.
        """
        params = enumerate(self._params_list)
        return [p.register_post_accumulate_grad_hook(partial(self._mask_grad, i)) for i, p in params]

    @torch.no_grad()
    def _mask_grad(self, index: int, param: torch.Tensor) -> None:
        if not self.dense and param.grad is not None:
            param.grad.mul_(self._factors[index])

    @torch.no_grad()
    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero every per-weight optimizer buffer (momentum, Adam moments) at pruned positions."""
        for p, f in zip(self._params_list, self._factors):
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.mul_(f)
