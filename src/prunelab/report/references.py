"""Published numbers the report overlays on its plots, each with its source paper and caveat.

Only rows whose network and dataset map to a prunelab model and dataset are
kept; each keeps its caveat, which the report prints next to the plot. Rows
left out: SCULPT's ResNet-50 on ImageNet (no such model or dataset here) and
seed 2's per-sparsity curves (published only as figures). No published
pruning table for Fashion-MNIST is known, so it has no rows.

Accuracies are top-1 in percent, as published; sparsity is a fraction. The
evaluation protocol they are compared under is in docs/guide.md ("Protocol").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reference:
    """One published (model, dataset, sparsity) -> top-1 accuracy, with how it was obtained."""

    source: str
    model: str
    dataset: str
    sparsity: float
    top1: float
    std: float | None
    training: str
    caveat: str


_SEED1 = "progressive, seed 1"
_SEED1_R18 = "ResNet-18 (11.2M, CIFAR variant); 5 seeds"

REFERENCES: tuple[Reference, ...] = (
    Reference(_SEED1, "resnet18", "cifar10", 0.0, 95.27, None, "200 ep", "dense; 1 seed"),
    Reference(_SEED1, "resnet18", "cifar10", 0.729, 95.12, 0.09, "200 ep, 1 cycle",
              "5 seeds, final epoch"),
    *(
        Reference(_SEED1, "resnet18", "cifar10", s, acc, None, "200 ep", _SEED1_R18)
        for s, acc in ((0.70, 95.21), (0.75, 95.22), (0.80, 95.24), (0.85, 95.18), (0.90, 95.06),
                       (0.95, 93.86))
    ),
    Reference(_SEED1, "vgg16", "cifar10", 0.97, 93.13, None, "350 ep",
              "1 seed; a VGG-16-like net with BN, head may differ from prunelab's vgg16"),
    Reference(_SEED1, "vgg19", "cifar10", 0.98, 83.85, None, "400 ep, cosine restarts",
              "final epoch; the headline 93.44 is the best epoch on the TEST set, not comparable; "
              "VGG-19 + BN head (prunelab's vgg19 has one Linear head)"),
    Reference(_SEED1, "lenet300", "mnist", 0.789, 98.88, None, "160 ep",
              "1 seed; rotation/translation augmentation"),
    Reference(_SEED1, "lenet300", "mnist", 0.98, 98.35, None, "200 ep",
              "1 seed; rotation/translation augmentation"),
    Reference("lottery ticket (cited by seed 1)", "resnet20", "cifar10", 0.729, 90.5, None, "30K it",
              "seed 1 calls it 'ResNet-18'; it is the 20-layer, 271K-parameter net (prunelab's resnet20)"),
    Reference("SNIP (cited)", "vgg16", "cifar10", 0.97, 92.0, None, "150K it",
              "approximate (~92.0); VGG-like with a different head, mapped to vgg16 by assumption"),
    Reference("GraSP (cited)", "vgg19", "cifar10", 0.98, 92.19, 0.12, "160 ep",
              "single linear head"),
    Reference("one-shot vs iterative, seed 2", "resnet18", "cifar10", 0.0, 94.14, None, "226 ep",
              "dense; checkpoint selection on the test split"),
    Reference("one-shot vs iterative, seed 2", "resnet18", "cifar100", 0.0, 74.64, None, "226 ep",
              "dense; checkpoint selection on the test split"),
    Reference("lottery-ticket framework defaults", "lenet300", "mnist", 0.0, 98.3, None,
              "framework defaults", "dense; recalled, not verified"),
    Reference("lottery-ticket framework defaults", "resnet20", "cifar10", 0.0, 91.7, None,
              "framework defaults", "dense; recalled, not verified"),
    Reference("lottery-ticket framework defaults", "vgg16", "cifar10", 0.0, 93.7, None,
              "framework defaults", "dense; recalled, not verified"),
)


def references_for(
    model: str, dataset: str, table: tuple[Reference, ...] = REFERENCES
) -> list[Reference]:
    """The rows of ``table`` for exactly this model and dataset, in table order."""
    return [r for r in table if r.model == model and r.dataset == dataset]
