"""Pruning at initialisation, then one training cycle: ``random``, ``erk``, ``snip``, ``grasp``, ``synflow``.

docs/methods.md section 4. The mask is computed once on the freshly initialised
network and never changes. ``random`` draws i.i.d. scores and allocates them
layerwise (the same density in every layer) unless ``prune.allocation`` is
``erk``; ``erk`` is random scores with the ERK layer densities (Evci et al.
2020). ``cyclic`` (cyclic.py) trains any of these masks for several cycles;
magnitude at initialisation is ``--method cyclic --set method.score=magnitude
--set method.cycles=1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prunelab.methods.base import NoSettings, check_counts, register_method
from prunelab.methods.context import Context
from prunelab.methods.scoring import prune_by
from prunelab.sparsity.knobs import ITERATIONS, REINIT, SAMPLES_PER_CLASS, TEMPERATURE

if TYPE_CHECKING:
    from prunelab.config.schema import RunConfig


@dataclass(frozen=True)
class GraspSettings:
    """GraSP's data sample and temperature (Wang et al. 2020)."""

    temperature: float = TEMPERATURE.field()
    samples_per_class: int = SAMPLES_PER_CLASS.field()
    reinit: bool = REINIT.field()

    def __post_init__(self) -> None:
        check_counts(self, 1, "samples_per_class")


@dataclass(frozen=True)
class SynflowSettings:
    """SynFlow's iterations (Tanaka et al. 2020)."""

    iterations: int = ITERATIONS.field()

    def __post_init__(self) -> None:
        check_counts(self, 1, "iterations")


def _allocation(name: str, unless: tuple[str, ...]) -> Callable[[RunConfig], RunConfig]:
    """A resolver setting ``prune.allocation`` to ``name`` unless it is one of ``unless``."""
    def resolve(cfg: RunConfig) -> RunConfig:
        if cfg.prune.allocation in unless:
            return cfg
        return dataclasses.replace(cfg, prune=dataclasses.replace(cfg.prune, allocation=name))

    return resolve


def _register(
    name: str, score: str, settings: type, summary: str, resolve: Callable[[RunConfig], RunConfig] | None = None
) -> None:
    def run(ctx: Context, s: object) -> None:
        prune_by(ctx, score, ctx.target_density, s)
        ctx.train_cycle("train")

    run.__doc__ = f"Prune at initialisation by {score}, then train one cycle."
    register_method(name, settings, summary, resolve)(run)


erk_unless_layerwise = _allocation("erk", unless=("layerwise", "erk"))
"""A resolver giving the ERK allocation unless ``prune.allocation`` asks for layerwise (SET, RigL)."""

_register("random", "random", NoSettings, "random mask at init (uniform per layer), then one cycle",
          _allocation("layerwise", unless=("layerwise", "erk")))
_register("erk", "random", NoSettings, "random mask at init with ERK layer densities, then one cycle",
          _allocation("erk", unless=("erk",)))
_register("snip", "snip", NoSettings, "SNIP at init: keep the top |g * w| on one batch, then one cycle")
_register("grasp", "grasp", GraspSettings,
          "GraSP at init: remove the highest -w * Hg (T=200, ~10 images/class), then one cycle")
_register("synflow", "synflow", SynflowSettings,
          "SynFlow at init: data-free, 100 iterations of |w * dR/dw|, then one cycle")
