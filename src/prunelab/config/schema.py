"""Typed run configuration: frozen dataclasses, one per section of a config.

Every dataclass checks its own fields in ``__post_init__`` and raises
:class:`UserError` with one sentence. A method's own settings are a
dataclass of the method (:mod:`prunelab.methods`); :mod:`prunelab.config.build`
fills and checks them, since the methods themselves import this module.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prunelab.data import DATASETS, Augment
from prunelab.errors import UserError
from prunelab.models import MODELS
from prunelab.sparsity.allocate import ALLOCATIONS
from prunelab.sparsity.structure import UNSTRUCTURED, check_sparsity, parse_structure
from prunelab.training.loop import PRECISIONS
from prunelab.training.optim import LR_SCHEDULES, OPTIMIZERS, OptimSettings


#: Largest training budget accepted, in epochs.
MAX_BUDGET = 100_000


def _choice(kind: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown {kind} {value!r}{hint}; choose one of: {', '.join(choices)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, how much of its training set is held out for validation, augmentation."""

    dataset: str = "fashion-mnist"
    val_size: int | None = field(default=None, metadata={"help": "validation images carved from train (None: 5000, or 10% of a training set under 20000)"})
    augment: Augment = Augment()

    def __post_init__(self) -> None:
        size = DATASETS.get(self.dataset).image_size
        _check(self.val_size is None or self.val_size >= 1, f"data.val_size must be at least 1, got {self.val_size}")
        _check(
            self.augment.crop_padding <= size,
            f"data.augment.crop_padding must be at most the image size {size} of {self.dataset}, "
            f"got {self.augment.crop_padding}",
        )


@dataclass(frozen=True)
class ModelConfig:
    """Which architecture (it adapts to the dataset's channels, image size and classes)."""

    name: str = "lenet300"

    def __post_init__(self) -> None:
        MODELS.entry(self.name)


MAX_THREADS = 1024


@dataclass(frozen=True)
class TrainConfig:
    """One training cycle: epochs, batches, optimizer, learning-rate schedule, loss."""

    epochs: int = 30
    budget: int | None = field(default=None, metadata={
        "help": "total training epochs of the run, dense pretraining included; each method spends them by its "
                "rule (docs/methods.md, matched budgets) and train.epochs follows"})
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    # Both can change the numbers a run produces (other kernels, other rounding), so they are part
    # of the config; at their defaults they stay out of the run id, which keeps existing ids.
    precision: str = field(
        default="fp32", metadata={"help": "fp32, or bf16: forward pass and loss under bfloat16 autocast"}
    )
    channels_last: bool = field(
        default=False, metadata={"help": "model and image batches in channels_last memory layout (conv nets)"}
    )
    # Another thread count sums floats in another order: the same config gives other bits. So the count
    # is part of the config (and, unless 1, of the run id); 1 also keeps a run fast beside other work.
    threads: int = field(
        default=1, metadata={"help": "CPU threads of the run (torch intra-op); a count other than 1 is another run"}
    )
    bn_l1: float = field(
        default=0.0, metadata={"help": "network slimming's L1 penalty on BatchNorm scales (1e-4 VGG, 1e-5 ResNet)"}
    )

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be at least 1, got {self.epochs}")
        _check(self.budget is None or 1 <= self.budget <= MAX_BUDGET,
               f"train.budget must be in [1, {MAX_BUDGET}] epochs, got {self.budget}")
        _check(self.batch_size >= 1, f"train.batch_size must be at least 1, got {self.batch_size}")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("learning-rate schedule", self.schedule, LR_SCHEDULES)
        _check(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        _check(0 <= self.momentum < 1, f"train.momentum must be in [0, 1), got {self.momentum}")
        _check(not self.nesterov or self.momentum > 0, "train.nesterov needs a positive train.momentum")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(all(0 <= b < 1 for b in self.betas), f"train.betas must be in [0, 1), got {self.betas}")
        _check(all(m >= 0 for m in self.milestones), f"train.milestones must be >= 0, got {self.milestones}")
        _check(0 < self.gamma <= 1, f"train.gamma must be in (0, 1], got {self.gamma}")
        _check(
            0 <= self.warmup_epochs < self.epochs,
            f"train.warmup_epochs must be in [0, epochs), got {self.warmup_epochs}",
        )
        _check(
            0 <= self.label_smoothing < 1,
            f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}",
        )
        _check(1 <= self.threads <= MAX_THREADS, f"train.threads must be in [1, {MAX_THREADS}], got {self.threads}")
        _check(0 <= self.bn_l1 < 1, f"train.bn_l1 must be in [0, 1), got {self.bn_l1}")
        _choice("precision", self.precision, PRECISIONS)
        _check(
            isinstance(self.channels_last, bool),
            f"train.channels_last must be true or false, got {self.channels_last!r}",
        )

    def optim(self) -> OptimSettings:
        """The optimizer and schedule part of this config."""
        return OptimSettings(
            optimizer=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
            betas=self.betas,
            schedule=self.schedule,
            milestones=self.milestones,
            gamma=self.gamma,
            warmup_epochs=self.warmup_epochs,
        )


@dataclass(frozen=True)
class PruneConfig:
    """The target and how it is distributed over layers."""

    sparsity: float = 0.9
    allocation: str = "global"
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "fnmatch patterns of layers kept dense, e.g. 'fc3*'"}
    )
    structure: str = field(
        default=UNSTRUCTURED,
        metadata={"help": "'unstructured', or N:M such as '2:4' (at most N of every M input weights; "
                          "the sparsity is then 1 - N/M)"},
    )

    def __post_init__(self) -> None:
        _check(
            0.0 <= self.sparsity < 1.0,
            f"sparsity must be in [0, 1) (a fraction of weights removed), got {self.sparsity}",
        )
        _choice("allocation", self.allocation, ALLOCATIONS)
        check_sparsity(parse_structure(self.structure), self.sparsity, "leave prune.sparsity unset")


@dataclass(frozen=True)
class MethodConfig:
    """The method name and its own settings dataclass (None: the method's defaults, filled by
    :func:`prunelab.config.build.method_config`)."""

    name: str = "progressive"
    settings: Any = None


#: Largest seed accepted: numpy's generators take seeds below 2**32.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's result (and so its id)."""

    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    method: MethodConfig = MethodConfig()

    def __post_init__(self) -> None:
        _check(0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}], got {self.seed}")


# Short names accepted at the top level of YAML files, sweeps and the CLI flags.
ALIASES = {
    "method": "method.name",
    "model": "model.name",
    "dataset": "data.dataset",
    "epochs": "train.epochs",
    "budget": "train.budget",
    "sparsity": "prune.sparsity",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
    "threads": "train.threads",
}

