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

from prunelab.data.identity import DataIdentity
from prunelab.data.raw import CifarArchive, IdxFiles, RawData
from prunelab.data.sources import RemoteFile
from prunelab.errors import UserError
from prunelab.registry import Registry

DEFAULT_DATASET = "fashion-mnist"
# Training sets smaller than this hold out 10% for validation by default (larger ones the
# dataset's default_val_size); a split must leave at least MIN_TRAIN_FRACTION for training.
SMALL_TRAIN_SET = 20_000
SMALL_VAL_FRACTION = 0.1
MIN_TRAIN_FRACTION = 0.1


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
    identity: DataIdentity | None = None  # the files read and the split sizes (None: built in memory)


DATASETS = Registry[DatasetSpec]("dataset")


def _register(spec: DatasetSpec) -> DatasetSpec:
    return DATASETS.register(spec.name, summary=spec.summary)(spec)


def _idx_files(base_url: str, checksums: dict[str, str], contents: dict[str, str]) -> IdxFiles:
    """The MNIST-family layout, downloading each ``<name>.gz`` from ``base_url``.

    ``checksums``: sha256 of the published .gz files; ``contents``: sha256 of
    their decompressed contents (what any re-gzipped copy still matches).
    """
    names = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    remote = tuple(RemoteFile(f"{n}.gz", f"{base_url}{n}.gz", checksums[n]) for n in names)
    official = {n: frozenset({f"gz-sha256:{checksums[n]}", f"sha256:{contents[n]}"}) for n in names}
    return IdxFiles(*names, remote=remote, official=official)


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
# sha256 of the decompressed IDX files (the same in every copy, Debian's included); several
# independent projects pin these values for the files published by Zalando Research.
_FASHION_CONTENT_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
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
# sha256 of the decompressed MNIST IDX files, as pinned by several independent projects.
_MNIST_CONTENT_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# md5 of the extracted CIFAR batches, from pytorch/vision torchvision/datasets/cifar.py
# (train_list, test_list); they identify an extracted copy of the official archive.
_CIFAR10_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
_CIFAR100_BATCH_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}
# CIFAR "python version" archives' sha256, from pytorch/vision
# torchvision/prototype/datasets/_builtin/cifar.py (Cifar10._SHA256,
# Cifar100._SHA256); keras-team/keras keras/src/datasets/cifar10.py and
# cifar100.py pin the same values as file_hash. (tensorflow/datasets'
# url_checksums list only the binary versions; torchvision's stable API only md5.)
_CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
_CIFAR100_SHA256 = "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
_KRIZ = "https://www.cs.toronto.edu/~kriz/"


def _cifar(archive: str, folder: str, train: tuple[str, ...], test: tuple[str, ...], label_key: bytes,
           archive_sha256: str, batch_md5: dict[str, str]) -> CifarArchive:
    """A CIFAR archive from Krizhevsky's site; official files: the archive by its sha256, the
    extracted batches by their md5."""
    official = {f"{folder}/{name}": frozenset({f"md5:{md5}"}) for name, md5 in batch_md5.items()}
    return CifarArchive(
        archive=archive, folder=folder, train=train, test=test, label_key=label_key,
        remote=RemoteFile(archive, f"{_KRIZ}{archive}", archive_sha256),
        official={**official, archive: frozenset({f"gz-sha256:{archive_sha256}"})},
    )


def _grayscale_28(name: str, mean: float, std: float, summary: str, source: IdxFiles) -> DatasetSpec:
    """An MNIST-like dataset: 28x28 grayscale, 10 classes, 5,000 training images held out."""
    return _register(DatasetSpec(name=name, channels=1, image_size=28, num_classes=10, mean=(mean,), std=(std,),
                                 default_val_size=5000, summary=summary, source=source))


# Normalization constants are the ones commonly published for each training set.
MNIST = _grayscale_28(
    "mnist", 0.1307, 0.3081, "MNIST handwritten digits, 28x28 grayscale, 10 classes",
    _idx_files("https://storage.googleapis.com/cvdf-datasets/mnist/", _MNIST_SHA256, _MNIST_CONTENT_SHA256),
)
FASHION_MNIST = _grayscale_28(
    "fashion-mnist", 0.2860, 0.3530, "Fashion-MNIST clothing images, 28x28 grayscale, 10 classes (the default)",
    _idx_files("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", _FASHION_SHA256,
               _FASHION_CONTENT_SHA256),
)
def _colour_32(name: str, num_classes: int, mean: tuple[float, float, float], std: tuple[float, float, float],
               summary: str, source: CifarArchive) -> DatasetSpec:
    """A CIFAR-like dataset: 32x32 colour, 5,000 training images held out."""
    return _register(DatasetSpec(name=name, channels=3, image_size=32, num_classes=num_classes, mean=mean, std=std,
                                 default_val_size=5000, summary=summary, source=source))


CIFAR10 = _colour_32(
    "cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    "CIFAR-10 natural images, 32x32 colour, 10 classes",
    _cifar("cifar-10-python.tar.gz", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
           ("test_batch",), b"labels", _CIFAR10_SHA256, _CIFAR10_BATCH_MD5),
)
CIFAR100 = _colour_32(
    "cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
    "CIFAR-100 natural images, 32x32 colour, 100 fine classes",
    _cifar("cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",), b"fine_labels",
           _CIFAR100_SHA256, _CIFAR100_BATCH_MD5),
)


def load_splits(
    name: str,
    data_dir: Path | None = None,
    val_size: int | None = None,
    split_seed: int = 0,
    download: bool = True,
) -> DataSplits:
    """Load dataset ``name`` as normalized train/validation/test tensors.

    The validation split is ``val_size`` samples (``None``: see
    :func:`default_val_size`) drawn from the training set by a permutation
    seeded with ``split_seed``; both parts keep the training set's order.
    Missing files are downloaded into the user cache unless ``download`` is
    False. The result's ``identity`` records the files read and the split sizes.
    """
    spec = DATASETS.get(name)
    raw = spec.source.read(spec.name, data_dir, download)
    _validate(spec, raw)
    n_train = len(raw.train_labels)
    val_size = default_val_size(spec, n_train) if val_size is None else val_size
    train_index, val_index = split_indices(n_train, val_size, split_seed)
    images = torch.from_numpy(raw.train_images)
    labels = torch.from_numpy(raw.train_labels)
    identity = DataIdentity(spec.name, raw.files, len(train_index), len(val_index), len(raw.test_labels))
    return DataSplits(
        train_x=normalize(images[train_index], spec),
        train_y=labels[train_index],
        val_x=normalize(images[val_index], spec),
        val_y=labels[val_index],
        test_x=normalize(torch.from_numpy(raw.test_images), spec),
        test_y=torch.from_numpy(raw.test_labels),
        spec=spec,
        identity=identity,
    )


def default_val_size(spec: DatasetSpec, n_train: int) -> int:
    """Validation images held out when ``data.val_size`` is not set.

    The dataset's own default (5,000 for the 50,000-60,000-image training sets,
    which keeps their run ids) for training sets of at least
    :data:`SMALL_TRAIN_SET` images; 10% of smaller ones (at least one image).
    """
    if n_train >= SMALL_TRAIN_SET:
        return spec.default_val_size
    return max(1, int(n_train * SMALL_VAL_FRACTION))


def split_indices(n_train: int, val_size: int, split_seed: int) -> tuple[Tensor, Tensor]:
    """Sorted (train, validation) indices: ``val_size`` of ``n_train`` chosen by ``split_seed``.

    Sorting makes the split a pure selection: both parts keep the stored
    order. The validation split must hold at least one image and leave at
    least :data:`MIN_TRAIN_FRACTION` of the training set for training.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
        raise UserError(f"data.val_size must be a whole number >= 1 (validation selects and stops), got {val_size!r}")
    if n_train - val_size < max(1, MIN_TRAIN_FRACTION * n_train):
        raise UserError(
            f"data.val_size {val_size} leaves {max(0, n_train - val_size)} of the {n_train} training images for "
            f"training, fewer than {MIN_TRAIN_FRACTION:.0%}; choose a smaller data.val_size"
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
        if len(labels) == 0:
            raise UserError(f"{where} is empty: it holds no images")
        if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise UserError(
                f"{where} has labels from {labels.min()} to {labels.max()}, "
                f"outside 0..{spec.num_classes - 1}"
            )
