"""prunelab: find sparse neural networks cheaply and compare pruning strategies fairly."""

__version__ = "0.1.0"
