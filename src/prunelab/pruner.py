"""Pruning any ``torch.nn.Module``: :func:`prune` once, or :class:`ProgressivePruner` in your own loop.

The same parts as ``prunelab run`` (prunable weights, criteria, exact-count
allocation, the polynomial schedule, the masker that keeps pruned weights and
their optimizer state at zero), without prunelab's trainer, data or store::

    masks = prunelab.prune(model, 0.9)                    # one shot, weights zeroed

    pruner = prunelab.ProgressivePruner(model, optimizer, sparsity=0.9,
                                        start=0, end=5, steps_per_epoch=len(loader))
    for epoch in range(10):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            pruner.step()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prunelab.errors import UserError
from prunelab.registry import Registry
from prunelab.sparsity.allocate import ALLOCATIONS, allocate
from prunelab.sparsity.mask import Masker, Masks, mask_sparsity, prunable_parameters
from prunelab.sparsity.pai import random_scores
from prunelab.sparsity.schedules import PolynomialSchedule
from prunelab.sparsity.scores import CRITERIA, Batch, Criterion, Scores, magnitude

SCOPES = Registry[str]("scope")
for _scope in ALLOCATIONS:
    SCOPES.register(_scope)(_scope)


def _random_criterion(
    model: nn.Module, params: Mapping[str, nn.Parameter], batches: Sequence[Batch], generator: torch.Generator | None
) -> Scores:
    return random_scores(params, generator)


PRUNE_CRITERIA = Registry[Criterion]("criterion")
"""Criteria :func:`prune` takes by name: ``magnitude``, ``taylor`` and ``hessian`` (these two
score on ``batches``), and ``random``."""
for _entry in CRITERIA:
    PRUNE_CRITERIA.register(_entry.name, _entry.summary)(_entry.obj)
PRUNE_CRITERIA.register("random", "i.i.d. uniform scores")(_random_criterion)


def prune(
    model: nn.Module,
    sparsity: float,
    criterion: str | Mapping[str, torch.Tensor] = "magnitude",
    scope: str = "global",
    exclude: Sequence[str] = (),
    *,
    embeddings: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    batches: Sequence[Batch] = (),
    generator: torch.Generator | None = None,
) -> Masks:
    """Prune ``model`` once to exactly ``sparsity`` of its prunable weights; return the masks.

    Pruned weights are set to 0 in place (and their ``optimizer`` state, when
    given). ``criterion`` is a name from :data:`PRUNE_CRITERIA` or a mapping
    from parameter name to scores (higher = keep). ``scope`` is ``global``
    (one ranking over all layers), ``layerwise`` (the same sparsity in every
    layer) or ``erk`` (Erdős-Rényi-Kernel densities). ``exclude`` holds
    fnmatch patterns of parameter or module names to leave dense; embedding
    tables are left dense unless ``embeddings`` is true. The masks keep
    fine-tuning from reviving weights only with :class:`ProgressivePruner`
    (``start == end``) or your own gradient masking.
    """
    params = _prunable(model, exclude, embeddings)
    masks = allocate(_scores(model, params, criterion, batches, generator), 1.0 - _fraction(sparsity), SCOPES.get(scope))
    Masker(params).set_masks(masks, optimizer)
    return masks


class ProgressivePruner:
    """Gradual magnitude pruning inside a training loop you own; call :meth:`step` after ``optimizer.step()``.

    Sparsity follows ``s(t) = sparsity + (initial - sparsity) * (1 - progress)^power``
    (power 3 is Zhu & Gupta's gradual pruning; 1, the default, a linear ramp,
    as ``prunelab run --method progressive``). The mask is updated every
    ``every`` optimizer steps (default: once per epoch) from epoch ``start``
    until epoch ``end`` (epochs may be fractional), where the target is
    reached; an update already targets the sparsity at the end of its
    interval, so the first one (at ``start == 0``: on construction) prunes a
    little and the last one, before the final interval, reaches ``sparsity``.
    Updates are monotone: only weights still active compete, so a pruned
    weight never returns.

    Between updates, a gradient hook on every prunable weight zeroes the
    pruned gradients as soon as backward has accumulated them, and each
    update zeroes the pruned weights and their optimizer state (momentum,
    Adam moments). Pruned weights and their state then stay exactly 0 under
    SGD (momentum, Nesterov, weight decay), Adam and AdamW. Gradient clipping
    after ``backward()`` already sees masked gradients. With ``start == end``
    the model is pruned once on construction and the masks are kept through
    the rest of training (prune, then fine-tune).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sparsity: float,
        start: float = 0,
        end: float | None = None,
        steps_per_epoch: int = 1,
        *,
        every: int | None = None,
        initial_sparsity: float = 0.0,
        power: float = 1.0,
        scope: str = "global",
        exclude: Sequence[str] = (),
        embeddings: bool = False,
    ) -> None:
        if steps_per_epoch < 1:
            raise UserError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
        end = start if end is None else end
        if not 0 <= start <= end:
            raise UserError(f"need 0 <= start <= end (in epochs), got start={start}, end={end}")
        if power <= 0:
            raise UserError(f"power must be positive, got {power}")
        final = _fraction(sparsity)
        if not 0 <= initial_sparsity <= final:
            raise UserError(f"initial_sparsity must be in [0, sparsity], got {initial_sparsity}")
        first, last = round(start * steps_per_epoch), round(end * steps_per_epoch)
        self.optimizer = optimizer
        self.scope = SCOPES.get(scope)
        self.schedule = PolynomialSchedule(
            initial=initial_sparsity,
            final=final,
            start=first,
            end=max(last, first + 1),  # start == end: one update, straight to the target
            every=every if every is not None else (steps_per_epoch if last > first else 1),
            power=power,
        )
        self.masker = Masker(_prunable(model, exclude, embeddings))
        self.steps = 0
        self._handles = self.masker.register_grad_hooks()
        self._update()

    @property
    def masks(self) -> Masks:
        """The current masks, by parameter name (True = kept)."""
        return self.masker.masks

    @property
    def sparsity(self) -> float:
        """The fraction of prunable weights the current masks remove."""
        return mask_sparsity(self.masker.masks)

    def step(self) -> None:
        """Count one optimizer step; update the masks when the schedule says so."""
        self.steps += 1
        self._update()

    def _update(self) -> None:
        if self.schedule.is_update(self.steps):
            density = 1.0 - self.schedule.sparsity_at(self.steps)
            masks = allocate(magnitude(self.masker.params), density, self.scope, self.masker.masks)
            self.masker.set_masks(masks, self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        """The step count and masks, to checkpoint beside the model and optimizer."""
        return {"steps": self.steps, "masks": {n: m.cpu() for n, m in self.masker.masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (after loading the model's and optimizer's own state)."""
        self.steps = int(state["steps"])
        self.masker.set_masks(state["masks"], self.optimizer)

    def remove(self) -> None:
        """Detach the gradient hooks; the weights keep their zeros."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _fraction(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def _prunable(model: nn.Module, exclude: Sequence[str], embeddings: bool) -> dict[str, nn.Parameter]:
    params = prunable_parameters(model, exclude, embeddings)
    if not params:
        raise UserError("the model has no prunable weights (Linear, Conv or attention projections) left after exclusions")
    return params


def _scores(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    criterion: str | Mapping[str, torch.Tensor],
    batches: Sequence[Batch],
    generator: torch.Generator | None,
) -> Scores:
    """Scores of the prunable weights by a criterion name or given by the caller."""
    if not isinstance(criterion, str):
        missing = set(params) - set(criterion)
        if missing:
            raise UserError(f"scores are missing for: {', '.join(sorted(missing))}")
        return {n: criterion[n] for n in params}
    fn = PRUNE_CRITERIA.get(criterion)
    if criterion in ("taylor", "hessian") and not batches:
        raise UserError(f"criterion {criterion!r} needs batches=[(inputs, labels), ...] to score on")
    return fn(model, params, batches, generator)
