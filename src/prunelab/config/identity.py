"""The run id: a hash of the config's non-default fields and of the data read.

Fields left at their defaults are omitted, so adding a new defaulted field
renames no existing run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from prunelab.config.schema import MethodConfig, RunConfig
from prunelab.data.identity import DataIdentity


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
            # None stands for the method's defaults (a config not built yet). A settings class whose
            # behaviour changed for some configs names the revision in `identity_extra`, so that
            # those configs get new ids and no result of the old behaviour is reused.
            nested = non_default(value) if value is not None else {}
            nested.update(getattr(value, "identity_extra", dict)())
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
