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

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prunelab.errors import UserError
from prunelab.sparsity.allocate import ALLOCATORS, allocate
from prunelab.sparsity.channel_cut import choose_channels, remove_channels
from prunelab.sparsity.channels import find_groups
from prunelab.sparsity.criteria import CRITERIA, DATA_NEEDS, Probe, Target
from prunelab.sparsity.mask import Masker, Masks, collapsed_layers, mask_sparsity, prunable_parameters
from prunelab.sparsity.schedules import PolynomialSchedule
from prunelab.sparsity.scores import Batch, LossFn, magnitude
from prunelab.sparsity.structure import CHANNEL, UNSTRUCTURED, check_groupable, check_sparsity, parse_structure


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
    input_shape: Sequence[int] = (),
    structure: str = UNSTRUCTURED,
    loss_fn: LossFn | None = None,
) -> Masks:
    """Prune ``model`` once to exactly ``sparsity`` of its prunable weights; return the masks.

    Pruned weights are set to 0 in place (and their ``optimizer`` state, when
    given). ``criterion`` is a name from :data:`prunelab.sparsity.criteria.CRITERIA`
    (``prunelab list criteria``) with its default settings, or a mapping from
    parameter name to scores (higher = keep). Data-driven criteria score on
    ``batches`` (``snip`` and ``grasp`` on all of them as one sample) by the gradients of
    ``loss_fn(model, batch) -> scalar loss tensor``, by default the cross-entropy of a
    classifier's (batch, classes) logits on ``(inputs, labels)`` batches (other outputs, such as a
    language model's (batch, tokens, vocabulary) logits, need a ``loss_fn``); ``synflow``
    needs the ``input_shape`` of one example (default: that of ``batches``). ``scope`` is ``global``
    (one ranking over all layers), ``layerwise`` (the same sparsity in every
    layer) or ``erk`` (Erdős-Rényi-Kernel densities). ``exclude`` holds
    fnmatch patterns of parameter or module names to leave dense; embedding
    tables are left dense unless ``embeddings`` is true. ``structure="N:M"`` keeps at most N
    of every M consecutive input weights (``sparsity`` must then be ``1 - N/M``). The masks keep
    fine-tuning from reviving weights only with :class:`ProgressivePruner`
    (``start == end``) or your own gradient masking.
    """
    params = _prunable(model, exclude, embeddings)
    _check_structure(params, structure, sparsity)
    target = Target(1.0 - _fraction(sparsity), ALLOCATORS.entry(scope).name, structure=structure)
    if loss_fn is not None and not (isinstance(criterion, str) and CRITERIA.get(criterion).needs in DATA_NEEDS):
        raise UserError("loss_fn is used only by the criteria that score on batches (taylor, hessian, snip, "
                        f"grasp), not by {criterion if isinstance(criterion, str) else 'scores of your own'!r}")
    if isinstance(criterion, str):
        probe = Probe(model, params, tuple(batches), tuple(input_shape), generator, loss_fn)
        masks = _by_name(criterion, probe, target)
    else:
        masks = allocate(_given(params, criterion), target.density, target.allocation, structure=structure)
    Masker(params).set_masks(masks, optimizer)
    _warn_collapse(masks, set())
    return masks


def prune_channels(
    model: nn.Module,
    sparsity: float,
    example_input: torch.Tensor,
    criterion: str = "magnitude",
    scope: str = "global",
    exclude: Sequence[str] = (),
    *,
    optimizer: torch.optim.Optimizer | None = None,
    batches: Sequence[Batch] = (),
    loss_fn: LossFn | None = None,
) -> dict[str, list[int]]:
    """Remove whole channels and neurons from ``model`` in place, lowest ``criterion`` scores first, until
    at most ``1 - sparsity`` of its prunable weights are left; return the channels removed (by group).

    The model really gets smaller: its layers are cut, and so are the gradients and the
    ``optimizer``'s state (momentum, Adam moments), which goes on training the smaller network.
    Channel groups are found by Torch-Pruning's dependency graph on ``example_input`` (one batch):
    residual partners go together, the classifier keeps its outputs, and groups that reach a
    LayerNorm, attention or other layer whose statistics would change are left alone (docs/methods.md,
    section 8). ``criterion``: ``magnitude`` (L1 per weight of the filter), ``l2``, ``bn_scale`` or
    ``taylor`` (on ``batches``, with ``loss_fn`` as in :func:`prune`); ``scope``: ``global`` or
    ``layerwise``. Raises :class:`UserError` in one sentence when whole channels cannot reach ``sparsity``.
    """
    params = _prunable(model, exclude, False)
    chosen = CRITERIA.get(criterion)
    chosen.check(CHANNEL)
    assert chosen.channel is not None
    if chosen.needs in ("batches", "batch", "balanced") and not batches:
        raise UserError(f"criterion {criterion!r} needs batches=[(inputs, labels), ...] to score on")
    groups = find_groups(model, example_input, exclude)
    keep = round((1.0 - _fraction(sparsity)) * sum(p.numel() for p in params.values()))
    probe = Probe(model, params, tuple(batches), loss_fn=loss_fn)
    removal = choose_channels(model, groups, chosen.channel(probe, groups), params, keep, scope)
    remove_channels(model, groups, removal, optimizer)
    return removal


class MagnitudeRamp:
    """The one mask update of progressive pruning, shared by :class:`ProgressivePruner` and
    ``prunelab run --method progressive``.

    At each update step of ``schedule`` the masks keep the largest magnitudes
    at the schedule's density, allocated by ``allocation``. Monotone (the
    default): only weights still active compete, so a pruned weight never
    returns. Non-monotone: all weights compete, a pruned weight with the
    magnitude it had when it was pruned, and a revived weight gets that value back.
    """

    def __init__(self, schedule: PolynomialSchedule, allocation: str = "global", monotone: bool = True,
                 structure: str = UNSTRUCTURED) -> None:
        self.schedule = schedule
        self.allocation = ALLOCATORS.entry(allocation).name
        self.monotone = monotone
        self.structure = structure
        # Non-monotone only: the value each pruned weight had when it was pruned.
        self.shadow: dict[str, torch.Tensor] = {}

    def masks_at(self, step: int, params: Mapping[str, nn.Parameter], current: Masks) -> Masks | None:
        """The new masks if ``step`` is an update step, else None (revived weights restored in place)."""
        if not self.schedule.is_update(step):
            return None
        density = 1.0 - self.schedule.sparsity_at(step)
        if self.monotone:
            return allocate(magnitude(params), density, self.allocation, current, self.structure)
        values = {n: torch.where(current[n], p.detach(), self.shadow.get(n, p.detach())) for n, p in params.items()}
        masks = allocate(magnitude(values), density, self.allocation, None, self.structure)
        with torch.no_grad():
            for n, p in params.items():
                self.shadow[n] = torch.where(masks[n], torch.zeros_like(p), values[n])
                p.copy_(torch.where(masks[n], values[n], p))
        return masks

    def state_dict(self) -> dict[str, Any]:
        """The shadow values of pruned weights (non-monotone; empty otherwise)."""
        return {"shadow": dict(self.shadow)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.shadow = dict(state.get("shadow", {}))


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
    weight never returns. With ``structure="N:M"`` (``sparsity`` then ``1 - N/M``)
    every update keeps the N largest of each group of M input weights and
    the final masks are N:M.

    Between updates, a gradient hook on every prunable weight zeroes the
    pruned gradients as soon as backward has accumulated them, and each
    update zeroes the pruned weights and their optimizer state (momentum,
    Adam moments). Pruned weights and their state then stay exactly 0 under
    SGD (momentum, Nesterov, weight decay), Adam and AdamW. Gradient clipping
    after ``backward()`` already sees masked gradients. With ``start == end``
    the model is pruned once on construction and the masks are kept through
    the rest of training (prune, then fine-tune). ``state``, a :meth:`state_dict` of a
    pruner with the same settings, resumes from it in place of the update on construction
    (for trainer callbacks, which restore a checkpoint before training goes on).
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
        structure: str = UNSTRUCTURED,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        if steps_per_epoch < 1:
            raise UserError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
        end = start if end is None else end
        final = check_ramp(sparsity, start, end, power, initial_sparsity)
        first, last = round(start * steps_per_epoch), round(end * steps_per_epoch)
        self.optimizer = optimizer
        self.schedule = PolynomialSchedule(
            initial=initial_sparsity,
            final=final,
            start=first,
            end=max(last, first + 1),  # start == end: one update, straight to the target
            every=every if every is not None else (steps_per_epoch if last > first else 1),
            power=power,
        )
        params = _prunable(model, exclude, embeddings)
        _check_structure(params, structure, final)
        self.ramp = MagnitudeRamp(self.schedule, scope, structure=structure)
        self.masker = Masker(params)
        self.steps = 0
        self._collapsed: set[str] = set()  # layers already warned about
        self._handles = self.masker.register_grad_hooks()
        if state is None:
            self._update()
        else:
            self.load_state_dict(state)

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
        masks = self.ramp.masks_at(self.steps, self.masker.params, self.masker.masks)
        if masks is not None:
            self.masker.set_masks(masks, self.optimizer)
            _warn_collapse(masks, self._collapsed)

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


def check_ramp(sparsity: float, start: float, end: float, power: float, initial_sparsity: float) -> float:
    """Check the schedule settings of :class:`ProgressivePruner` (epochs ``start <= end``); return ``sparsity``.

    Trainer callbacks call it on construction, so bad settings fail before training starts.
    """
    if not 0 <= start <= end:
        raise UserError(f"need 0 <= start <= end (in epochs), got start={start}, end={end}")
    if power <= 0:
        raise UserError(f"power must be positive, got {power}")
    final = _fraction(sparsity)
    if not 0 <= initial_sparsity <= final:
        raise UserError(f"initial_sparsity must be in [0, sparsity], got {initial_sparsity}")
    return final


def _check_structure(params: Mapping[str, nn.Parameter], structure: str, sparsity: float) -> None:
    """The structure's own errors: a sparsity other than ``1 - N/M``, tensors without groups of M."""
    if structure == CHANNEL:
        raise UserError("prunelab.prune and ProgressivePruner prune single weights or N:M groups; "
                        "prunelab.prune_channels removes whole channels")
    nm = parse_structure(structure)
    if nm is not None:
        check_sparsity(nm, sparsity, f"pass sparsity={1 - nm.density:.4g}")
        check_groupable({n: p.shape for n, p in params.items()}, nm, api=True)


def _fraction(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def _prunable(model: nn.Module, exclude: Sequence[str], embeddings: bool) -> dict[str, nn.Parameter]:
    params = prunable_parameters(model, exclude, embeddings)
    if not params:
        raise UserError("the model has no prunable weights (Linear, Conv, recurrent or attention weights) "
                        "left after exclusions")
    everything = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    share = sum(p.numel() for p in params.values()) / everything
    if share < 0.5:
        warnings.warn(f"the prunable weights hold only {share:.1%} of the model's parameters, and the sparsity "
                      "counts only them (see prunelab.sparsity.mask.prunable_parameters)", stacklevel=3)
    return params


def _warn_collapse(masks: Masks, warned: set[str]) -> None:
    """One warning per layer that the masks empty entirely (the network is disconnected there)."""
    for name in collapsed_layers(masks):
        if name not in warned:
            warned.add(name)
            warnings.warn(f"{name} lost all its weights: the network is disconnected there", stacklevel=3)


def _given(params: Mapping[str, nn.Parameter], scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The caller's scores of the prunable weights, all of them present."""
    missing = set(params) - set(scores)
    if missing:
        raise UserError(f"scores are missing for: {', '.join(sorted(missing))}")
    return {n: scores[n] for n in params}


def _by_name(name: str, probe: Probe, target: Target) -> Masks:
    """Masks by the registered criterion ``name`` at its default settings."""
    criterion = CRITERIA.get(name)
    if criterion.needs in ("batches", "batch", "balanced") and not probe.batches:
        raise UserError(f"criterion {name!r} needs batches=[(inputs, labels), ...] to score on")
    if criterion.needs == "shape" and not probe.input_shape:
        if not probe.batches:
            raise UserError(f"criterion {name!r} needs input_shape=(channels, height, width) or batches")
        probe = Probe(probe.model, probe.params, probe.batches, tuple(probe.batches[0][0].shape[1:]))
    criterion.check(target.structure)
    assert criterion.masks is not None  # check() refuses channel-only criteria here
    return criterion.masks(probe, target, criterion.settings())
