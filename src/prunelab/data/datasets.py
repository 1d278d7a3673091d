"""The dataset catalogue and :func:`load_splits`, which turns files into tensors.

Each dataset is a :class:`DatasetSpec` in :data:`DATASETS`: its shape, class
count, published normalization constants and where its files come from.
:func:`load_splits` reads them, validates them, normalizes the images and
carves a deterministic validation split out of the training set; the test set
is returned untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from prunelab.data.raw import CifarArchive, IdxFiles, RawData
from prunelab.data.sources import RemoteFile
from prunelab.errors import UserError
from prunelab.registry import Registry

DEFAULT_DATASET = "fashion-mnist"


@dataclass(frozen=True)
class DatasetSpec:
    """What prunelab knows about one dataset."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]  # per channel, of pixel values scaled to [0, 1]
    std: tuple[float, ...]
    default_val_size: int
    summary: str
    source: IdxFiles | CifarArchive


@dataclass(frozen=True)
class DataSplits:
    """Whole splits in memory: images float32 (N, C, H, W) normalized, labels int64."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    spec: DatasetSpec


DATASETS = Registry[DatasetSpec]("dataset")


def _register(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.register(spec.name, summary=spec.summary)(spec)


def _idx_files(base_url: str, checksums: dict[str, str]) -> IdxFiles:
    """The MNIST-family layout, downloading each ``<name>.gz`` from ``base_url``."""
    names = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    remote = tuple(RemoteFile(f"{n}.gz", f"{base_url}{n}.gz", checksums[n]) for n in names)
    return IdxFiles(*names, remote=remote)


# sha256 of the downloaded .gz files, from tensorflow/datasets
# tensorflow_datasets/url_checksums/fashion_mnist.txt ("url size sha256").
# Debian's fashion-mnist package re-gzipped these files, so its .gz copies have
# other checksums (the decompressed contents are the same).
_FASHION_SHA256 = {
    "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
# sha256 for the cvdf mirror, from tensorflow/datasets
# tensorflow_datasets/url_checksums/mnist.txt. Other projects pin the same
# values for the original yann.lecun.com files and for the
# ossci-datasets.s3.amazonaws.com/mnist/ mirror (not checked here by download).
_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
# CIFAR "python version" archives' sha256, from pytorch/vision
# torchvision/prototype/datasets/_builtin/cifar.py (Cifar10._SHA256,
# Cifar100._SHA256); keras-team/keras keras/src/datasets/cifar10.py and
# cifar100.py pin the same values as file_hash. (tensorflow/datasets'
# url_checksums list only the binary versions; torchvision's stable API only md5.)
_CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
_CIFAR100_SHA256 = "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
_KRIZ = "https://www.cs.toronto.edu/~kriz/"

# Normalization constants are the ones commonly published for each training set.
MNIST = _register(
    DatasetSpec(
        name="mnist",
        channels=1,
        image_size=28,
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
        default_val_size=5000,
        summary="MNIST handwritten digits, 28x28 grayscale, 10 classes",
        source=_idx_files("https://storage.googleapis.com/cvdf-datasets/mnist/", _MNIST_SHA256),
    )
)
FASHION_MNIST = _register(
    DatasetSpec(
        name="fashion-mnist",
        channels=1,
        image_size=28,
        num_classes=10,
        mean=(0.2860,),
        std=(0.3530,),
        default_val_size=5000,
        summary="Fashion-MNIST clothing images, 28x28 grayscale, 10 classes (the default)",
        source=_idx_files(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", _FASHION_SHA256
        ),
    )
)
CIFAR10 = _register(
    DatasetSpec(
        name="cifar10",
        channels=3,
        image_size=32,
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        default_val_size=5000,
        summary="CIFAR-10 natural images, 32x32 colour, 10 classes",
        source=CifarArchive(
            archive="cifar-10-python.tar.gz",
            folder="cifar-10-batches-py",
            train=tuple(f"data_batch_{i}" for i in range(1, 6)),
            test=("test_batch",),
            label_key=b"labels",
            remote=RemoteFile(
                "cifar-10-python.tar.gz", f"{_KRIZ}cifar-10-python.tar.gz", _CIFAR10_SHA256
            ),
        ),
    )
)
CIFAR100 = _register(
    DatasetSpec(
        name="cifar100",
        channels=3,
        image_size=32,
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        default_val_size=5000,
        summary="CIFAR-100 natural images, 32x32 colour, 100 fine classes",
        source=CifarArchive(
            archive="cifar-100-python.tar.gz",
            folder="cifar-100-python",
            train=("train",),
            test=("test",),
            label_key=b"fine_labels",
            remote=RemoteFile(
                "cifar-100-python.tar.gz", f"{_KRIZ}cifar-100-python.tar.gz", _CIFAR100_SHA256
            ),
        ),
    )
)


def load_splits(
    name: str,
    data_dir: Path | None = None,
    val_size: int | None = None,
    split_seed: int = 0,
    download: bool = True,
) -> DataSplits:
    """Load dataset ``name`` as normalized train/validation/test tensors.

    The validation split is ``val_size`` samples (``None``: the dataset's
    default) drawn from the training set by a permutation seeded with
    ``split_seed``; both parts keep the training set's order. Missing files are
    downloaded into the user cache unless ``download`` is False.
    """
    spec = DATASETS.get(name)
    raw = spec.source.read(spec.name, data_dir, download)
    _validate(spec, raw)
    val_size = spec.default_val_size if val_size is None else val_size
    train_index, val_index = split_indices(len(raw.train_labels), val_size, split_seed)
    images = torch.from_numpy(raw.train_images)
    labels = torch.from_numpy(raw.train_labels)
    return DataSplits(
        train_x=normalize(images[train_index], spec),
        train_y=labels[train_index],
        val_x=normalize(images[val_index], spec),
        val_y=labels[val_index],
        test_x=normalize(torch.from_numpy(raw.test_images), spec),
        test_y=torch.from_numpy(raw.test_labels),
        spec=spec,
    )


def split_indices(n_train: int, val_size: int, split_seed: int) -> tuple[Tensor, Tensor]:
    """Sorted (train, validation) indices: ``val_size`` of ``n_train`` chosen by ``split_seed``.

    Sorting makes the split a pure selection: with ``val_size == 0`` the
    training set is returned exactly as stored.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
        raise UserError(f"data.val_size must be a whole number >= 0, got {val_size!r}")
    if val_size >= n_train:
        raise UserError(
            f"data.val_size {val_size} leaves no training data "
            f"(the training set has {n_train} samples)"
        )
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(split_seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def normalize(images: Tensor, spec: DatasetSpec) -> Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def _validate(spec: DatasetSpec, raw: RawData) -> None:
    """Shapes, counts and label ranges; a UserError names what is wrong."""
    shape = (spec.channels, spec.image_size, spec.image_size)
    parts = (
        ("training", raw.train_images, raw.train_labels),
        ("test", raw.test_images, raw.test_labels),
    )
    for part, images, labels in parts:
        where = f"the {spec.name} {part} set"
        if images.ndim != 4 or images.shape[1:] != shape or images.dtype != np.uint8:
            raise UserError(
                f"{where} has images of shape {images.shape[1:]} ({images.dtype}), "
                f"expected {shape} (uint8)"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise UserError(f"{where} has {len(images)} images but labels of shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise UserError(
                f"{where} has labels from {labels.min()} to {labels.max()}, "
                f"outside 0..{spec.num_classes - 1}"
            )
