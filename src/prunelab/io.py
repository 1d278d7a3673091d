"""Small shared helpers for what prunelab writes: JSON that is always valid JSON."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no NaN), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON (keys sorted; non-finite floats written as null, never as a bare NaN)."""
    return json.dumps(finite_or_none(obj), sort_keys=True, indent=indent, allow_nan=False)
