"""load_splits: every registered dataset, exact split properties, validation errors."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_fashion_mnist_arrays, write_tiny_fashion_mnist

from prunelab.data import DATASETS, DEFAULT_DATASET, load_splits, write_cifar_batch, write_idx
from prunelab.data.datasets import CIFAR10, DatasetSpec, split_indices
from prunelab.data.raw import CifarArchive, IdxFiles
from prunelab.errors import UserError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never find (or write) a real cache or data root from these tests."""
    monkeypatch.delenv("PRUNELAB_DATA", raising=False)
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "empty-cache"))


def _write_fake(
    spec: DatasetSpec, root: Path, n_train: int, n_test: int, extracted: bool = False
) -> None:
    """Files in the dataset's real on-disk format, with random contents."""
    rng = np.random.default_rng(0)
    folder = root / spec.name
    folder.mkdir(parents=True)
    source = spec.source

    def images(n: int) -> np.ndarray:
        return rng.integers(
            0, 256, size=(n, spec.channels, spec.image_size, spec.image_size), dtype=np.uint8
        )

    def labels(n: int) -> np.ndarray:
        return rng.integers(0, spec.num_classes, size=n).astype(np.uint8)

    if isinstance(source, IdxFiles):
        files = {
            source.train_images: images(n_train)[:, 0],
            source.train_labels: labels(n_train),
            source.test_images: images(n_test)[:, 0],
            source.test_labels: labels(n_test),
        }
        for name, array in files.items():
            write_idx(folder / f"{name}.gz", array, gzip=True)
        return
    assert isinstance(source, CifarArchive)
    batches = folder / source.folder
    batches.mkdir()
    for names, n in ((source.train, n_train), (source.test, n_test)):
        for name in names:
            count = n // len(names)
            write_cifar_batch(batches / name, images(count), labels(count), source.label_key)
    if extracted:
        return
    with tarfile.open(folder / source.archive, "w:gz") as tar:  # the tarball, not the folder
        tar.add(batches, arcname=source.folder)
    for path in batches.iterdir():
        path.unlink()
    batches.rmdir()


def test_default_dataset_is_registered() -> None:
    assert DEFAULT_DATASET == "fashion-mnist"
    assert DATASETS.names() == ["mnist", "fashion-mnist", "cifar10", "cifar100"]


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_loads_from_its_real_format(tmp_path: Path, name: str) -> None:
    spec = DATASETS.get(name)
    _write_fake(spec, tmp_path / "data", n_train=100, n_test=20)
    splits = load_splits(name, data_dir=tmp_path / "data", val_size=30, download=False)
    shape = (spec.channels, spec.image_size, spec.image_size)
    assert splits.spec is spec
    assert splits.train_x.shape == (70, *shape) and splits.train_x.dtype == torch.float32
    assert splits.val_x.shape == (30, *shape)
    assert splits.test_x.shape == (20, *shape)
    for labels in (splits.train_y, splits.val_y, splits.test_y):
        assert labels.dtype == torch.int64
        assert 0 <= labels.min() and labels.max() < spec.num_classes
    assert len(spec.mean) == len(spec.std) == spec.channels
    assert spec.default_val_size == 5000


def test_cifar_from_extracted_folder(tmp_path: Path) -> None:
    spec = DATASETS.get("cifar100")
    _write_fake(spec, tmp_path, n_train=50, n_test=10, extracted=True)
    assert (tmp_path / "cifar100" / "cifar-100-python" / "train").is_file()
    splits = load_splits("cifar100", data_dir=tmp_path, val_size=10, download=False)
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (40, 10, 10)


def test_tiny_dataset_normalized_exactly(tiny_data_dir: Path) -> None:
    splits = load_splits("fashion-mnist", data_dir=tiny_data_dir, val_size=1, download=False)
    images, labels = tiny_fashion_mnist_arrays(1200, seed=0)
    expected = (torch.from_numpy(images).float()[:, None] / 255 - 0.2860) / 0.3530
    train_index, val_index = split_indices(1200, 1, 0)
    assert torch.equal(splits.train_x, expected[train_index])  # a pure selection, stored order kept
    assert torch.equal(splits.val_x, expected[val_index])
    assert torch.equal(splits.train_y, torch.from_numpy(labels).long()[train_index])
    assert splits.val_x.shape == (1, 1, 28, 28) and splits.test_x.shape == (300, 1, 28, 28)


def test_small_training_sets_hold_out_ten_percent_by_default(tiny_data_dir: Path) -> None:
    splits = load_splits("fashion-mnist", data_dir=tiny_data_dir, download=False)
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (1080, 120, 300)
    assert splits.identity is not None
    assert (splits.identity.train, splits.identity.val, splits.identity.test) == (1080, 120, 300)
    assert DATASETS.get("fashion-mnist").default_val_size == 5000  # 60,000-image sets keep 5,000


@pytest.mark.parametrize(
    ("val_size", "message"),
    [(0, "data.val_size must be a whole number >= 1"), (1081, "leaves 119 of the 1200 training images"),
     (1199, "leaves 1 of the 1200"), (1200, "leaves 0 of the 1200")],
)
def test_splits_that_leave_too_little_are_refused(tiny_data_dir: Path, val_size: int, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_splits("fashion-mnist", data_dir=tiny_data_dir, val_size=val_size, download=False)
    assert len(load_splits("fashion-mnist", data_dir=tiny_data_dir, val_size=1080, download=False).train_y) == 120


def test_an_empty_test_set_is_refused(tmp_path: Path) -> None:
    write_tiny_fashion_mnist(tmp_path, n_train=100, n_test=0)
    with pytest.raises(UserError, match="the fashion-mnist test set is empty"):
        load_splits("fashion-mnist", data_dir=tmp_path, download=False)


def test_splits_deterministic_disjoint_and_exact(tiny_data_dir: Path) -> None:
    def load(seed: int):
        return load_splits(
            "fashion-mnist", data_dir=tiny_data_dir, val_size=200, split_seed=seed, download=False
        )

    a, b, c = load(0), load(0), load(1)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.val_x, c.val_x)
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (1000, 200, 300)
    train_index, val_index = split_indices(1200, 200, 0)
    assert set(train_index.tolist()).isdisjoint(val_index.tolist())
    assert sorted(train_index.tolist() + val_index.tolist()) == list(range(1200))
    images, _ = tiny_fashion_mnist_arrays(1200, seed=0)
    full = (torch.from_numpy(images).float()[:, None] / 255 - 0.2860) / 0.3530
    test_images, _ = tiny_fashion_mnist_arrays(300, seed=1)
    assert torch.equal(a.train_x, full[train_index])
    assert torch.equal(a.val_x, full[val_index])
    # the test set is never touched
    assert torch.equal(a.test_x, (torch.from_numpy(test_images).float()[:, None] / 255 - 0.2860) / 0.3530)


@pytest.mark.parametrize(("val_size", "reason"), [(1200, "leaves 0 of the 1200 training images"), (-1, ">= 1")])
def test_bad_val_size(tiny_data_dir: Path, val_size: int, reason: str) -> None:
    with pytest.raises(UserError, match=reason):
        load_splits("fashion-mnist", data_dir=tiny_data_dir, val_size=val_size, download=False)


def test_unknown_dataset_suggests() -> None:
    with pytest.raises(UserError, match="did you mean 'cifar10'"):
        load_splits("cifar-10")


def _rewrite(folder: Path, name: str, array: np.ndarray) -> None:
    write_idx(folder / f"{name}.gz", array, gzip=True)


@pytest.mark.parametrize(
    ("name", "array", "reason"),
    [
        (
            "train-labels-idx1-ubyte",
            np.zeros(1199, np.uint8),
            "1200 images but labels of shape (1199,)",
        ),
        (
            "train-labels-idx1-ubyte",
            np.full(1200, 10, np.uint8),
            "labels from 10 to 10, outside 0..9",
        ),
        (
            "t10k-images-idx3-ubyte",
            np.zeros((300, 28, 27), np.uint8),
            "images of shape (1, 28, 27)",
        ),
    ],
)
def test_inconsistent_files_are_user_errors(
    tmp_path: Path, name: str, array: np.ndarray, reason: str
) -> None:
    root = write_tiny_fashion_mnist(tmp_path / "data")
    _rewrite(root / "fashion-mnist", name, array)
    with pytest.raises(UserError) as caught:
        load_splits("fashion-mnist", data_dir=root, download=False)
    assert reason in str(caught.value)


def test_missing_files_without_download(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="does not hold the cifar10 files: cifar-10-python.tar.gz is missing"):
        CIFAR10.source.read("cifar10", empty, download=False)


def test_real_fashion_mnist() -> None:
    if not REAL_FASHION.is_dir():
        pytest.skip(f"{REAL_FASHION} is missing")
    splits = load_splits("fashion-mnist", data_dir=REAL_FASHION, download=False)
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (55000, 5000, 10000)
    assert splits.train_x.shape == (55000, 1, 28, 28)
    assert sorted(torch.cat([splits.train_y, splits.val_y]).unique().tolist()) == list(range(10))
    assert torch.bincount(splits.test_y).tolist() == [1000] * 10
    assert splits.identity is not None and splits.identity.canonical  # the official files, by checksum
    # The published constants normalize the training set to about zero mean, unit std.
    both = torch.cat([splits.train_x, splits.val_x])
    assert abs(both.mean().item()) < 1e-3 and abs(both.std().item() - 1) < 1e-3
