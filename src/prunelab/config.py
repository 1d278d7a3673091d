"""Typed run configuration: frozen dataclasses, YAML + ``--set`` overrides, validation, run id.

A config is validated once, here, at the edge: every dataclass checks its own
fields in ``__post_init__`` and raises :class:`UserError` with one sentence.
Everything downstream can trust it.

The run id is the hash of the resolved config with fields left at their
defaults omitted, so adding a new defaulted field renames no existing run.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunelab import safe_yaml
from prunelab.data import DATASETS, Augment
from prunelab.data.identity import DataIdentity
from prunelab.errors import UserError
from prunelab.methods import METHODS
from prunelab.models import MODELS
from prunelab.sparsity.allocate import ALLOCATIONS
from prunelab.training.loop import PRECISIONS
from prunelab.training.optim import LR_SCHEDULES, OPTIMIZERS, OptimSettings


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

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs must be at least 1, got {self.epochs}")
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

    def __post_init__(self) -> None:
        _check(
            0.0 <= self.sparsity < 1.0,
            f"sparsity must be in [0, 1) (a fraction of weights removed), got {self.sparsity}",
        )
        _choice("allocation", self.allocation, ALLOCATIONS)


@dataclass(frozen=True)
class MethodConfig:
    """The method name and its own settings dataclass."""

    name: str = "progressive"
    settings: Any = None

    def __post_init__(self) -> None:
        spec = METHODS.entry(self.name).obj
        if self.settings is None:
            object.__setattr__(self, "settings", spec.settings())
        _check(
            isinstance(self.settings, spec.settings),
            f"settings of method {self.name!r} must be {spec.settings.__name__}",
        )


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
    "sparsity": "prune.sparsity",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
    "threads": "train.threads",
}


# ---------------------------------------------------------------- building from raw values


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys, with the top-level aliases resolved."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise UserError(f"config keys must be strings, got {key!r}")
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[ALIASES.get(path, path)] = value
    return flat


def _number(value: Any) -> float | None:
    """``value`` as a float: an int, a float, or a string ``float()`` reads.

    YAML 1.1 leaves ``1e9`` a string, so ``--set train.lr=1e9`` arrives as one.
    None for anything else, bools included; the result may be infinite or NaN.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int too large for a float
            return math.inf
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Convert a YAML-parsed value to the annotated type, or raise one sentence."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(path, v, args[0]) for v in items)
        if len(items) != len(args):
            raise UserError(f"{path} must have {len(args)} values, got {value!r}")
        return tuple(_coerce(path, v, a) for v, a in zip(items, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{path} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(number)
        raise UserError(f"{path} must be an integer, got {value!r}")
    if hint is float:
        number = _number(value)
        if number is None:
            raise UserError(f"{path} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise UserError(f"{path} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{path} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint!r} at {path}")


def _keys_of(cls: type, prefix: str) -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys.extend(_keys_of(hint, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from the entries of ``raw`` under ``prefix`` (consumed)."""
    kwargs = {}
    for name, hint in typing.get_type_hints(cls).items():
        path = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, raw, f"{path}.")
        elif path in raw:
            kwargs[name] = _coerce(path, raw.pop(path), hint)
    return cls(**kwargs)


def build_config(raw: Mapping[str, Any]) -> RunConfig:
    """A validated, resolved :class:`RunConfig` from dotted keys (``train.lr``) or aliases."""
    raw = {ALIASES.get(k, k): v for k, v in raw.items()}
    method_name = _coerce("method.name", raw.pop("method.name", MethodConfig.name), str)
    spec = METHODS.entry(method_name).obj
    settings_raw = {k: raw.pop(k) for k in list(raw) if k.startswith("method.")}
    settings = _build(spec.settings, settings_raw, "method.")
    known = _keys_of(RunConfig, "") + [f"method.{f.name}" for f in dataclasses.fields(spec.settings)]
    for key in list(settings_raw) + [k for k in raw if k not in known]:
        close = difflib.get_close_matches(key, known, n=1) or difflib.get_close_matches(key, list(ALIASES), n=1)
        hint = f" (did you mean {ALIASES.get(close[0], close[0])!r}?)" if close else ""
        raise UserError(f"unknown config key {key!r}{hint} for method {method_name!r}")
    sections = {
        "data": _build(DataConfig, raw, "data."),
        "model": _build(ModelConfig, raw, "model."),
        "train": _build(TrainConfig, raw, "train."),
        "prune": _build(PruneConfig, raw, "prune."),
    }
    seed = _coerce("seed", raw.pop("seed"), int) if "seed" in raw else RunConfig.seed
    cfg = RunConfig(seed=seed, method=MethodConfig(method_name, settings), **sections)
    return spec.resolve(cfg)


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=0.05", "method.power=3"]`` -> dotted keys with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = safe_yaml.load(text, f"--set {key.strip()}") if text.strip() else ""
        except yaml.YAMLError:
            raise UserError(f"--set {key.strip()}: cannot parse value {text!r}") from None
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    """Flattened dotted keys of a YAML config file."""
    return flatten(read_yaml_tree(path))


def read_yaml_tree(path: Path) -> Mapping[str, Any]:
    """The mapping a YAML file holds; one sentence for a missing, unreadable or malformed file."""
    try:
        tree = safe_yaml.read(Path(path), f"config file {path}")
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"config file {path} is not valid YAML{line}") from None
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        raise UserError(f"config file {path} must hold a mapping of settings, not {type(tree).__name__}")
    return tree


def load_config(
    path: Path | None = None, overrides: Sequence[str] = (), flags: Mapping[str, Any] | None = None
) -> RunConfig:
    """YAML file, then ``--set`` overrides, then explicit flags (later wins)."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    raw.update({ALIASES.get(k, k): v for k, v in parse_set(overrides).items()})
    raw.update({ALIASES.get(k, k): v for k, v in (flags or {}).items() if v is not None})
    return build_config(raw)


# ---------------------------------------------------------------- identity


def to_dict(obj: Any) -> Any:
    """The full config as plain JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def non_default(obj: Any) -> dict[str, Any]:
    """Only the fields that differ from their defaults, recursively (nested dataclasses compared by fields)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(obj, MethodConfig) and f.name == "settings":
            nested = non_default(value)
            if nested:
                out[f.name] = nested
        elif dataclasses.is_dataclass(value):
            nested = non_default(value)
            if nested:
                out[f.name] = nested
        elif value != f.default:
            out[f.name] = to_dict(value)
    return out


def run_id(cfg: RunConfig, data: DataIdentity | None = None) -> str:
    """12 hex digits of sha256 over the canonical JSON of the non-default fields and the data.

    ``data``: the files the run reads. The official files of a dataset (or
    ``None``: not known yet, as for the official files) add nothing, which
    keeps every existing id; any other data adds the digest of its files, so
    a result is reused only for the same config and the same data.
    """
    identity = non_default(cfg)
    if data is not None and not data.canonical:
        identity["data_sha256"] = data.sha256
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
