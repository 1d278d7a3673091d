"""Criteria for the methods: the data each registered criterion needs, drawn from the run.

The criteria themselves, with their settings and defaults, are registered
once in :mod:`prunelab.sparsity.criteria`; here a method's context supplies
what a criterion looks at (training batches, a class-balanced sample, the
input shape), each drawn from its own generator so that a resumed run draws
the same data. All criteria allocate with the config's ``prune.allocation``
and keep exactly the target count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from prunelab.methods.context import Context
from prunelab.sparsity import pai
from prunelab.sparsity.criteria import CRITERIA, Needs, Probe, Target
from prunelab.sparsity.channel_cut import Removal, choose_channels
from prunelab.sparsity.channels import Group, find_groups
from prunelab.sparsity.mask import Masks
from prunelab.sparsity.structure import CHANNEL
from prunelab.training.loop import CHANNEL_CUTS


def _weights(ctx: Context, name: str, knobs: Mapping[str, Any]) -> Probe:
    trainer = ctx.trainer
    return Probe(trainer.model, trainer.masker.params, generator=ctx.generator(name))


def _batches(ctx: Context, name: str, knobs: Mapping[str, Any]) -> Probe:
    batch = ctx.cfg.train.batch_size
    x, y = ctx.sample(knobs["batches"] * batch, name)
    batches = tuple(zip(x.split(batch), y.split(batch)))
    return Probe(ctx.trainer.model, ctx.trainer.masker.params, batches, generator=ctx.generator(f"{name}-probe"))


def _batch(ctx: Context, name: str, knobs: Mapping[str, Any]) -> Probe:
    return Probe(ctx.trainer.model, ctx.trainer.masker.params, (ctx.sample(ctx.cfg.train.batch_size, name),))


def _balanced(ctx: Context, name: str, knobs: Mapping[str, Any]) -> Probe:
    data = ctx.trainer.data
    sample = pai.balanced_sample(data.train_x, data.train_y, knobs["samples_per_class"], ctx.generator(name))
    return Probe(ctx.trainer.model, ctx.trainer.masker.params, (sample,), generator=ctx.generator(f"{name}-reinit"))


def _shape(ctx: Context, name: str, knobs: Mapping[str, Any]) -> Probe:
    spec = ctx.trainer.data.spec
    shape = (spec.channels, spec.image_size, spec.image_size)
    return Probe(ctx.trainer.model, ctx.trainer.masker.params, input_shape=shape)


_PROBES: dict[Needs, Callable[[Context, str, Mapping[str, Any]], Probe]] = {
    "weights": _weights, "batches": _batches, "batch": _batch, "balanced": _balanced, "shape": _shape,
}


def masks_by(ctx: Context, name: str, density: float, settings: object = None) -> Masks:
    """Masks at ``density`` by criterion ``name`` on the current network (monotone), with the
    criterion's settings taken from ``settings`` where it has them (else the defaults)."""
    criterion = CRITERIA.get(name)
    prune = ctx.cfg.prune
    criterion.check(prune.structure)
    assert criterion.masks is not None  # check() refuses channel-only criteria here
    knobs = criterion.settings(settings)
    probe = _PROBES[criterion.needs](ctx, name, knobs)
    return criterion.masks(probe, Target(density, prune.allocation, ctx.trainer.masker.masks, prune.structure), knobs)


def channels_by(ctx: Context, name: str, density: float, settings: object = None) -> tuple[list[Group], Removal]:
    """The channel groups of the current network and the channels to remove, lowest scores of
    criterion ``name`` first, until at most ``density`` of the network's prunable weights (as it
    was built) are left, allocated by ``prune.allocation`` (``global`` or ``layerwise``)."""
    criterion = CRITERIA.get(name)
    criterion.check(CHANNEL)
    assert criterion.channel is not None
    knobs = criterion.settings(settings)
    probe = _PROBES[criterion.needs](ctx, name, knobs)
    trainer = ctx.trainer
    groups = find_groups(trainer.model, trainer.data.train_x[:1], ctx.cfg.prune.exclude)
    keep = round(density * trainer.dense_total)
    chosen = choose_channels(trainer.model, groups, criterion.channel(probe, groups), trainer.masker.params, keep,
                             ctx.cfg.prune.allocation, _built_channels(groups, trainer.extra.get(CHANNEL_CUTS, [])))
    return groups, chosen


def _built_channels(groups: list[Group], cuts: list[Removal]) -> dict[str, int]:
    """Each group's channels as the network was built: those it has plus those earlier cuts removed."""
    return {g.root: g.channels + sum(len(cut.get(g.root, ())) for cut in cuts) for g in groups}


def prune_by(ctx: Context, name: str, density: float, settings: object = None) -> None:
    """Prune the current network to ``density`` by criterion ``name``: masks, or with
    ``prune.structure=channel`` channels removed (skipped while a resumed run replays)."""
    if ctx.cfg.prune.structure == CHANNEL:
        ctx.cut(lambda: channels_by(ctx, name, density, settings))
    else:
        ctx.update_masks(lambda: masks_by(ctx, name, density, settings))
