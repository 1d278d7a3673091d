"""Configs from raw values: YAML files, ``--set key=value`` overrides and flags.

Values are coerced to the annotated types, unknown keys are refused with a
suggestion, the method's settings are filled from its registry entry and
the method resolves the config (:meth:`MethodSpec.resolve`). This module
sits above the methods, which import only :mod:`prunelab.config.schema`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from prunelab import safe_yaml
from prunelab.config.schema import (
    ALIASES,
    DataConfig,
    MethodConfig,
    ModelConfig,
    PruneConfig,
    RunConfig,
    TrainConfig,
)
from prunelab.errors import UserError
from prunelab.methods import METHODS
from prunelab.sparsity.structure import parse_structure


def method_config(name: str, settings: Any = None) -> MethodConfig:
    """Method ``name`` with ``settings`` (None: its defaults), checked against its registry entry."""
    spec = METHODS.entry(name).obj
    if settings is None:
        settings = spec.settings()
    if not isinstance(settings, spec.settings):
        raise UserError(f"settings of method {name!r} must be {spec.settings.__name__}")
    return MethodConfig(name, settings)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints evaluates string annotations: about 1 ms a call, so a sweep of
    # thousands of points would spend seconds here without the cache.
    return typing.get_type_hints(cls)


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
    for name, hint in _hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys.extend(_keys_of(hint, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from the entries of ``raw`` under ``prefix`` (consumed)."""
    kwargs = {}
    for name, hint in _hints(cls).items():
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
    structure = raw.get("prune.structure")
    if isinstance(structure, str) and "prune.sparsity" not in raw and (nm := parse_structure(structure)):
        raw["prune.sparsity"] = 1 - nm.density  # N:M fixes the sparsity: the default 0.9 does not apply
    given_epochs = "train.epochs" in raw
    sections = {
        "data": _build(DataConfig, raw, "data."),
        "model": _build(ModelConfig, raw, "model."),
        "train": _build(TrainConfig, raw, "train."),
        "prune": _build(PruneConfig, raw, "prune."),
    }
    seed = _coerce("seed", raw.pop("seed"), int) if "seed" in raw else RunConfig.seed
    cfg = RunConfig(seed=seed, method=method_config(method_name, settings), **sections)
    if cfg.train.budget is not None:
        if given_epochs:
            raise UserError("give train.budget or train.epochs, not both: with a budget, each method sets its "
                            "cycle length itself")
        cfg = spec.spend(cfg, cfg.train.budget)
    return spec.resolve(cfg)


def key_value(item: str, flag: str, form: str = "key=value") -> tuple[str, str]:
    """``"train.lr = 0.05"`` -> ``("train.lr", "0.05")``: the one parser of ``key=value`` options.

    One sentence naming ``flag`` and the expected ``form`` when there is no
    ``=`` or no key.
    """
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"{flag} expects {form}, got {item!r}")
    return key.strip(), value.strip()


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=0.05", "method.power=3"]`` -> dotted keys with YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in items:
        key, text = key_value(item, "--set")
        try:
            out[key] = safe_yaml.load(text, f"--set {key}") if text else ""
        except yaml.YAMLError:
            raise UserError(f"--set {key}: cannot parse value {text!r}") from None
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    """Flattened dotted keys of a YAML config file."""
    return flatten(read_yaml_tree(path))


def read_yaml_tree(path: Path, what: str = "config file") -> Mapping[str, Any]:
    """The mapping a YAML file holds; one sentence for a missing, unreadable or malformed file."""
    try:
        tree = safe_yaml.read(Path(path), f"{what} {path}")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{what} {path} is not valid YAML{line}") from None
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        raise UserError(f"{what} {path} must hold a mapping, not {type(tree).__name__}")
    return tree


def load_config(
    path: Path | None = None, overrides: Sequence[str] = (), flags: Mapping[str, Any] | None = None
) -> RunConfig:
    """YAML file, then ``--set`` overrides, then explicit flags (later wins)."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    raw.update({ALIASES.get(k, k): v for k, v in parse_set(overrides).items()})
    raw.update({ALIASES.get(k, k): v for k, v in (flags or {}).items() if v is not None})
    return build_config(raw)

