"""Pruning methods: one module per family, each registering itself in :data:`METHODS`."""

from prunelab.methods import dense, progressive  # noqa: F401  (imported to register)
from prunelab.methods.base import METHODS, MethodSpec, register_method, settings_help

__all__ = ["METHODS", "MethodSpec", "register_method", "settings_help"]
