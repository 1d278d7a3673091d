"""Pruning methods: one module per family, each registering itself in :data:`METHODS`.

Import order is registration order, which is the order `prunelab list methods` shows.
"""

from prunelab.methods import dense, progressive, retrain, rewinding, pai, cyclic, dynamic  # noqa: F401, I001
from prunelab.methods.base import METHODS, SPENT_FIELDS, MethodSpec, register_method, settings_help

__all__ = ["METHODS", "SPENT_FIELDS", "MethodSpec", "register_method", "settings_help"]
