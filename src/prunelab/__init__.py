"""prunelab: find sparse neural networks cheaply and compare pruning strategies fairly.

The library API for your own models and loops (the CLI is ``prunelab``):
:func:`prune`, :class:`ProgressivePruner`.
"""

from prunelab.pruner import ProgressivePruner, prune

__all__ = ["ProgressivePruner", "prune"]

__version__ = "0.1.0"
