"""Datasets in memory: file formats, locating/downloading files, splits and batching."""

from prunelab.data.batches import Augment, eval_batches, num_batches, train_batches
from prunelab.data.cifar import load_cifar_batch, write_cifar_batch
from prunelab.data.datasets import (
    DATASETS,
    DEFAULT_DATASET,
    DatasetSpec,
    DataSplits,
    load_splits,
)
from prunelab.data.idx import read_idx, write_idx
from prunelab.data.sources import RemoteFile, locate

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "Augment",
    "DataSplits",
    "DatasetSpec",
    "RemoteFile",
    "eval_batches",
    "load_cifar_batch",
    "load_splits",
    "locate",
    "num_batches",
    "read_idx",
    "train_batches",
    "write_cifar_batch",
    "write_idx",
]
