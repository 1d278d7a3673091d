"""Criteria by name: from a context and a target density to masks.

Two families share one entry point, :func:`prune_by`:
- criteria for trained networks (methods.md section 2): ``magnitude``,
  ``taylor`` (first order, |w dL/dw| averaged over batches), ``hessian``
  (Optimal Brain Damage saliency with a Hutchinson estimate of diag H);
- pruning at initialisation (section 4): ``random``, ``snip``, ``grasp``,
  ``synflow`` (and ``magnitude`` at init).
All of them allocate with the config's ``prune.allocation`` (global,
layerwise or erk) and keep exactly the target count.
"""

from __future__ import annotations

from prunelab.methods.context import Context
from prunelab.sparsity import pai, scores
from prunelab.sparsity.mask import Masks

TRAINED_SCORES = ("magnitude", "taylor", "hessian")
PAI_SCORES = ("random", "magnitude", "snip", "grasp", "synflow")


KNOBS = ("batches", "temperature", "samples_per_class", "iterations")


def knobs(settings: object) -> dict[str, object]:
    """The criterion knobs a method's settings carry (each method declares only those it uses)."""
    return {k: getattr(settings, k) for k in KNOBS if hasattr(settings, k)}


def masks_by(
    ctx: Context,
    score: str,
    density: float,
    batches: int = 8,
    temperature: float = 200.0,
    samples_per_class: int = 10,
    iterations: int = 100,
) -> Masks:
    """Masks at ``density`` by criterion ``score`` on the current network (monotone).

    Defaults are the original authors' settings: GraSP uses temperature 200
    and about 10 images per class, SynFlow 100 iterations; Taylor and Hessian
    scores average over ``batches`` training batches.
    """
    model, params, masks = ctx.trainer.model, ctx.trainer.masker.params, ctx.trainer.masker.masks
    allocation = ctx.cfg.prune.allocation
    batch = ctx.cfg.train.batch_size
    if score == "magnitude":
        return ctx.allocate(scores.magnitude(params), density)
    if score == "random":
        return ctx.allocate(pai.random_scores(params, ctx.generator("random")), density)
    if score in ("taylor", "hessian"):
        x, y = ctx.sample(batches * batch, score)
        batches = list(zip(x.split(batch), y.split(batch)))
        fn = scores.CRITERIA.get(score)
        return ctx.allocate(fn(model, params, batches, ctx.generator(f"{score}-probe")), density)
    if score == "snip":
        x, y = ctx.sample(batch, "snip")
        return pai.snip_masks(model, params, x, y, density, allocation, masks)
    if score == "grasp":
        data = ctx.trainer.data
        x, y = pai.balanced_sample(data.train_x, data.train_y, samples_per_class, ctx.generator("grasp"))
        # GraSP REMOVES the highest S = -w * Hg: grasp_masks keeps the lowest.
        return pai.grasp_masks(model, params, x, y, density, allocation, temperature, masks)
    if score == "synflow":
        spec = ctx.trainer.data.spec
        shape = (spec.channels, spec.image_size, spec.image_size)
        return pai.synflow_masks(model, params, density, allocation, shape, iterations, current=masks)
    raise ValueError(f"unknown criterion {score!r}")


def prune_by(ctx: Context, score: str, density: float, settings: object = None) -> None:
    """Prune the current network to ``density`` by ``score`` with the criterion knobs found in
    ``settings`` (skipped while a resumed run replays)."""
    if not ctx.replaying:
        ctx.set_masks(masks_by(ctx, score, density, **knobs(settings)))  # type: ignore[arg-type]
