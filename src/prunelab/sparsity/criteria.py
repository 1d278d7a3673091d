"""The one registry of pruning criteria: name, mask function, the data it needs, its settings.

The CLI (``prunelab list``), the methods (:mod:`prunelab.methods.scoring`)
and the Python API (:func:`prunelab.prune`) all pick criteria here. Every
criterion turns a :class:`Probe` (the network, its prunable weights and the
data it looks at) and a :class:`Target` (density, allocation, current
masks) into masks keeping exactly the target count; the scoring itself
lives in :mod:`~prunelab.sparsity.scores` (trained networks) and
:mod:`~prunelab.sparsity.pai` (pruning at initialisation).

What a criterion needs (:attr:`Criterion.needs`) tells a caller which data
to supply: ``weights`` (nothing but the weights and a generator),
``batches`` (``batches`` training batches), ``batch`` (one batch),
``balanced`` (a class-balanced sample of ``samples_per_class`` images per
class), ``shape`` (only the input shape: data-free).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prunelab.errors import UserError
from prunelab.registry import Registry
from prunelab.sparsity import channels, pai, scores
from prunelab.sparsity.channels import Group
from prunelab.sparsity.allocate import allocate
from prunelab.sparsity.knobs import BATCHES, ITERATIONS, REINIT, SAMPLES_PER_CLASS, TEMPERATURE, Knob
from prunelab.sparsity.mask import Masks
from prunelab.sparsity.scores import Batch, LossFn
from prunelab.sparsity.structure import CHANNEL, UNSTRUCTURED

Needs = Literal["weights", "batches", "batch", "balanced", "shape"]
DATA_NEEDS: tuple[Needs, ...] = ("batches", "batch", "balanced")
"""The needs of criteria that score on data (through a loss)."""


@dataclass(frozen=True)
class Probe:
    """What a criterion looks at."""

    model: nn.Module
    params: Mapping[str, nn.Parameter]
    batches: Sequence[Batch] = ()
    input_shape: tuple[int, ...] = ()
    generator: torch.Generator | None = None
    loss_fn: LossFn | None = None
    """``(model, batch) -> scalar loss`` the data-driven criteria differentiate; None: cross-entropy."""


@dataclass(frozen=True)
class Target:
    """How many weights to keep and how: ``density`` of the prunable weights, allocated
    ``global``, ``layerwise`` or ``erk``, in the mask ``structure`` (``unstructured`` or ``N:M``);
    with ``current`` masks the result is a subset of them."""

    density: float
    allocation: str = "global"
    current: Masks | None = None
    structure: str = UNSTRUCTURED


MaskFn = Callable[[Probe, Target, Mapping[str, Any]], Masks]
#: Scores of every group's channels (higher = keep); None for a group the criterion cannot score.
ChannelFn = Callable[[Probe, Sequence[Group]], list[torch.Tensor | None]]


@dataclass(frozen=True)
class Criterion:
    """One registered criterion."""

    name: str
    masks: MaskFn | None
    """Masks of single weights; None for a criterion that scores only whole channels."""
    needs: Needs
    knobs: tuple[Knob, ...] = ()
    trained: bool = False
    """Meant for trained networks (oneshot, iterative)."""
    at_init: bool = False
    """Meant for pruning at initialisation (the PaI methods, cyclic, sculpt)."""
    channel: ChannelFn | None = None
    """Scores of whole channels (``prune.structure=channel``); None for a criterion of single weights only."""

    def check(self, structure: str) -> None:
        """A :class:`UserError` when this criterion cannot prune with ``structure``."""
        if structure == CHANNEL and self.channel is None:
            raise UserError(f"criterion {self.name!r} scores single weights; with prune.structure=channel "
                            f"use one of: {', '.join(channel_names())}")
        if structure != CHANNEL and self.masks is None:
            raise UserError(f"criterion {self.name!r} scores whole channels; it needs prune.structure=channel")

    def settings(self, given: object = None) -> dict[str, Any]:
        """This criterion's knobs: the defaults, overridden by the attributes ``given`` has."""
        return {k.name: getattr(given, k.name, k.default) for k in self.knobs}


CRITERIA: Registry[Criterion] = Registry("criterion")


def _register(name: str, summary: str, needs: Needs, *knobs: Knob, trained: bool = False, at_init: bool = False,
              channel: ChannelFn | None = None) -> Callable[[MaskFn], MaskFn]:
    def decorate(fn: MaskFn) -> MaskFn:
        CRITERIA.register(name, summary)(Criterion(name, fn, needs, knobs, trained, at_init, channel))
        return fn

    return decorate


def _ranked(probe_scores: scores.Scores, target: Target) -> Masks:
    return allocate(probe_scores, target.density, target.allocation, target.current, target.structure)


def _sample(probe: Probe, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All the probe's batches as one (a single batch is returned as it is); each must be a pair."""
    pairs = all(isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(t, torch.Tensor) for t in b)
                for b in probe.batches)
    if not pairs:
        raise UserError(f"criterion {name!r} scores all batches as one sample, so they must be (inputs, labels) "
                        "pairs of tensors (loss_fn then gets the pair); taylor and hessian take any batch")
    if len(probe.batches) == 1:
        return probe.batches[0][0], probe.batches[0][1]
    return torch.cat([x for x, _ in probe.batches]), torch.cat([y for _, y in probe.batches])


def _norms(p: int) -> ChannelFn:
    return lambda probe, groups: [channels.norm_scores(probe.model, g, p) for g in groups]


def _bn_scales(probe: Probe, groups: Sequence[Group]) -> list[torch.Tensor | None]:
    found = [channels.bn_scale_scores(probe.model, g) for g in groups]
    if all(s is None for s in found):
        raise UserError("bn_scale scores a channel by its BatchNorm scale, and no prunable group of this "
                        "model has a BatchNorm layer; use magnitude, l2 or taylor")
    return found


def _channel_taylor(probe: Probe, groups: Sequence[Group]) -> list[torch.Tensor | None]:
    return list(channels.taylor_scores(probe.model, groups, probe.batches, probe.loss_fn))


@_register("magnitude", "|w|; for channels the L1 norm of the channel's filter (Li et al. 2017)", "weights",
           trained=True, at_init=True, channel=_norms(1))
def _magnitude(probe: Probe, target: Target, knobs: Mapping[str, Any]) -> Masks:
    return _ranked(scores.magnitude(probe.params), target)


@_register("taylor", "first-order Taylor |w * dL/dw| averaged over batches; for channels "
           "(sum of w * dL/dw over the channel)^2 (Molchanov et al. 2019)", "batches", BATCHES, trained=True,
           channel=_channel_taylor)
def _taylor(probe: Probe, target: Target, knobs: Mapping[str, Any]) -> Masks:
    return _ranked(scores.taylor(probe.model, probe.params, probe.batches, probe.loss_fn), target)


@_register("hessian", "OBD 0.5 * diag(H) * w^2, diag(H) by Hutchinson's estimator", "batches", BATCHES,
           trained=True)
def _hessian(probe: Probe, target: Target, knobs: Mapping[str, Any]) -> Masks:
    return _ranked(scores.hessian(probe.model, probe.params, probe.batches, 1, probe.generator, probe.loss_fn),
                   target)


@_register("random", "i.i.d. uniform scores", "weights", at_init=True)
def _random(probe: Probe, target: Target, knobs: Mapping[str, Any]) -> Masks:
    return _ranked(pai.random_scores(probe.params, probe.generator), target)


@_register("snip", "SNIP: |g * w| on one batch (Lee et al. 2019)", "batch", at_init=True)
def _snip(probe: Probe, target: Target, knobs: Mapping[str, Any]) -> Masks:
    x, y = _sample(probe, "snip")
    return _ranked(pai.snip_scores(probe.model, probe.params, x, y, loss_fn=probe.loss_fn), target)


@_register("grasp", "GraSP: remove the highest -w * Hg (Wang et al. 2020)", "balanced", TEMPERATURE,
           SAMPLES_PER_CLASS, REINIT, at_init=True)
def _grasp(probe: Probe, target: Target, knobs: Mapping[str, Any]) -> Masks:
    x, y = _sample(probe, "grasp")
    model, params = probe.model, probe.params
    if knobs.get("reinit", REINIT.default):
        model, params = pai.xavier_redrawn(model, params, probe.generator)
    return pai.grasp_masks(model, params, x, y, target.density, target.allocation,
                           knobs.get("temperature", TEMPERATURE.default), target.current, target.structure,
                           loss_fn=probe.loss_fn)


@_register("synflow", "SynFlow: data-free, iterative |w * dR/dw| (Tanaka et al. 2020)", "shape", ITERATIONS,
           at_init=True)
def _synflow(probe: Probe, target: Target, knobs: Mapping[str, Any]) -> Masks:
    return pai.synflow_masks(probe.model, probe.params, target.density, target.allocation, probe.input_shape,
                             knobs.get("iterations", ITERATIONS.default), current=target.current,
                             structure=target.structure)


CRITERIA.register("l2", "channels only: L2 norm of the channel's filter")(
    Criterion("l2", None, "weights", trained=True, channel=_norms(2)))
CRITERIA.register("bn_scale", "channels only: |gamma| of the channel's BatchNorm (network slimming, Liu et al. 2017)")(
    Criterion("bn_scale", None, "weights", trained=True, channel=_bn_scales))


def channel_names() -> list[str]:
    """Names of the criteria that score whole channels."""
    return [e.name for e in CRITERIA if e.obj.channel is not None]


def names(trained: bool = False, at_init: bool = False) -> list[str]:
    """Names of the criteria meant for trained networks and/or for pruning at initialisation."""
    return [e.name for e in CRITERIA if (trained and e.obj.trained) or (at_init and e.obj.at_init)]
