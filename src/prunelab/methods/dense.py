"""``dense``: the baseline; the same recipe, no pruning."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from prunelab.methods.base import ALL_STRUCTURES, NoSettings, register_method
from prunelab.methods.context import Context

if TYPE_CHECKING:
    from prunelab.config.schema import RunConfig


def _no_target(cfg: RunConfig) -> RunConfig:
    # A dense run ignores every pruning setting; resetting them gives every
    # dense run of one recipe the same id (a sweep's dense x sparsity grid
    # collapses to one run).
    return dataclasses.replace(cfg, prune=type(cfg.prune)(sparsity=0.0))


@register_method("dense", NoSettings, "train the dense network with the same recipe (baseline)", _no_target,
                 structures=ALL_STRUCTURES)
def run(ctx: Context, settings: NoSettings) -> None:
    """Train one cycle without masks."""
    ctx.train_cycle("train")
