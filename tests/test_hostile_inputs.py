"""Every hostile or broken input through the command line: one sentence, non-zero exit, a consistent store.

Each case runs against a store that already holds a finished run; afterwards that
run must be untouched, no row may be left 'running' and no temporary file may remain.
"""

from __future__ import annotations

import builtins
import gzip
import hashlib
import pickle
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import write_tiny_fashion_mnist
from prunelab.cli import main
from prunelab.data.idx import write_idx
from prunelab.runs.store import Store

TINY = ["--set", "data.val_size=200", "--batch-size", "64", "--no-progress", "--epochs", "1"]
IMAGES = "fashion-mnist/train-images-idx3-ubyte.gz"


class ExecPayload:
    """Unpickling this would create the sentinel file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return builtins.exec, (f"open({str(self.sentinel)!r}, 'w').close()",)


def _wrong_magic(root: Path) -> list[str]:
    (root / IMAGES).write_bytes(gzip.compress(b"\x12\x34\x08\x03" + bytes(64)))
    return ["--data-dir", str(root)]


def _wrong_dims(root: Path) -> list[str]:
    write_idx(root / IMAGES, np.zeros((1200, 784), dtype=np.uint8), gzip=True)
    return ["--data-dir", str(root)]


def _truncated(root: Path) -> list[str]:
    data = gzip.decompress((root / IMAGES).read_bytes())
    (root / IMAGES).write_bytes(gzip.compress(data[: len(data) // 3]))
    return ["--data-dir", str(root)]


def _corrupted_gzip(root: Path) -> list[str]:
    data = (root / IMAGES).read_bytes()
    (root / IMAGES).write_bytes(data[: len(data) // 2])
    return ["--data-dir", str(root)]


def _cifar_payload(root: Path) -> list[str]:
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": ExecPayload(root / "SENTINEL")}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return ["--dataset", "cifar10", "--data-dir", str(root / "cifar10")]


def _yaml(text: str) -> Callable[[Path], list[str]]:
    def make(root: Path) -> list[str]:
        (root / "bad.yaml").write_text(text)
        return ["--config", str(root / "bad.yaml"), "--data-dir", str(root)]

    return make


def _missing_no_download(root: Path) -> list[str]:
    (root / "empty").mkdir()
    return ["--dataset", "mnist", "--data-dir", str(root / "empty"), "--no-download"]


def _missing_no_network(root: Path) -> list[str]:
    return ["--dataset", "mnist"]  # not in $PRUNELAB_CACHE (empty) nor the system folder: a download


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "idx-wrong-magic": (_wrong_magic, "magic"),
    "idx-wrong-dims": (_wrong_dims, "expected (1, 28, 28)"),
    "idx-truncated": (_truncated, "truncated"),
    "idx-corrupted-gzip": (_corrupted_gzip, "is not a valid IDX file"),
    "cifar-exec-payload": (_cifar_payload, "which prunelab refuses to load"),
    "yaml-unknown-key": (_yaml("train:\n  epochz: 3\n"), "did you mean 'train.epochs'"),
    "yaml-wrong-type": (_yaml("train:\n  nesterov: sometimes\n"), "must be true or false"),
    "yaml-out-of-range": (_yaml("sparsity: 1.5\n"), "sparsity"),
    "yaml-negative-lr": (_yaml("train:\n  lr: -0.1\n"), "train.lr"),
    "yaml-malformed": (_yaml("train: [unclosed\n"), "is not valid YAML"),
    "yaml-not-a-mapping": (_yaml("- a\n- b\n"), "must hold a mapping"),
    "missing-dataset-no-download": (_missing_no_download, "does not hold the mnist files"),
    "missing-dataset-no-network": (_missing_no_network, "you seem to be offline"),
}


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, bytes]:
    """A store holding one finished run, its data folder, its run id and its weights' bytes."""
    root = tmp_path_factory.mktemp("populated")
    data = write_tiny_fashion_mnist(root / "data")
    store = root / "store"
    assert main(["run", "--method", "dense", "--data-dir", str(data), "--store", str(store), *TINY]) == 0
    (record,) = Store(store).records()
    return store, data, record.run_id, (store / record.run_id / "weights.pt").read_bytes()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_sentence_and_the_store_stays_consistent(
    case: str, populated: tuple[Path, Path, str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, data, kept_id, kept_weights = populated
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PRUNELAB_DATA", raising=False)

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # no network, whatever the machine has
    root = tmp_path / "case"
    shutil.copytree(data, root)
    make, fragment = CASES[case]
    argv = ["run", "--method", "progressive", "--store", str(store), *TINY, *make(root)]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("prunelab: error: ") and fragment in err[0], err
    assert not (root / "SENTINEL").exists()
    records = {r.run_id: r for r in Store(store).records()}
    assert records[kept_id].status == "ok"
    assert (store / kept_id / "weights.pt").read_bytes() == kept_weights
    assert all(r.status in ("ok", "failed") for r in records.values())
    assert not [p for p in store.rglob("*.tmp")]
    assert hashlib.sha256(kept_weights).hexdigest() == records[kept_id].summary["weights_sha256"]  # type: ignore[index]
