"""The sparse safetensors format: bit-identical round trips, the smallest encoding, hostile files."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from memory_cap import requires_proc, user_error_under_cap

from prunelab.errors import UserError
from prunelab.deploy.export import save_dense
from prunelab.models import build_model
from prunelab.deploy.sparse_format import (
    choose_encoding,
    encoding_sizes,
    load_sparse,
    read_metadata,
    save_sparse,
)
from prunelab.sparsity.allocate import global_masks
from prunelab.sparsity.mask import prunable_parameters

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]
SHAPES = [(), (1,), (1, 1), (9,), (40, 33), (6, 3, 5, 5), (0, 3), (4, 0), (300, 70)]
SPARSITIES = [0.0, 0.5, 0.95, 1.0]
ENTRY_BYTES = 96  # prunelab.deploy.sparse_format.layout.ENTRY_BYTES: what one header entry is counted as


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and raw bytes (so -0.0 differs from 0.0 and NaN payloads count)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, sparsity: float, seed: int) -> torch.Tensor:
    """Nonzero random values with a ``sparsity`` fraction zeroed; half the float zeros are -0.0."""
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    elif dtype == torch.bool:
        t = torch.ones(shape, dtype=torch.bool)
    else:
        t = torch.randint(1, 100, shape, generator=g).to(dtype)
    drop = torch.rand(shape, generator=g) < sparsity if sparsity < 1 else torch.ones(shape, dtype=torch.bool)
    t = t.masked_fill(drop, 0)
    if dtype.is_floating_point:
        t = torch.where(drop & (torch.rand(shape, generator=g) < 0.5), torch.tensor(-0.0, dtype=dtype), t)
    return t


def stored_table(path: Path) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """The header's tensor table and the raw stored tensors, read with safetensors directly."""
    with safetensors.safe_open(str(path), "pt") as f:
        table = json.loads(f.metadata()["prunelab.tensors"])
    return table, safetensors.torch.load_file(str(path))


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_identical_and_picks_the_smallest_encoding(
    tmp_path: Path, dtype: torch.dtype, sparsity: float
) -> None:
    state = {f"t{i}": random_tensor(shape, dtype, sparsity, seed=i) for i, shape in enumerate(SHAPES)}
    path = tmp_path / "x.safetensors"
    save_sparse(state, path, {"note": "test"})
    loaded = load_sparse(path)
    assert list(loaded) == list(state)
    for name, t in state.items():
        assert same_bits(loaded[name], t), name
    table, stored = stored_table(path)
    for name, t in state.items():
        sizes, encoding = encoding_sizes(t), table[name]["encoding"]
        assert encoding == choose_encoding(t)
        parts = [v for k, v in stored.items() if k == name or k.startswith(f"{name}::")]
        # The size function is honest: the stored parts take exactly the bytes it predicts ...
        assert sum(p.numel() * p.element_size() for p in parts) == sizes[encoding]
        # ... and the chosen encoding is the smallest up to the header entries it adds.
        assert sizes[encoding] <= min(sizes.values()) + 3 * ENTRY_BYTES
        if t.numel() <= 1 or sparsity == 0.0:
            assert encoding == "dense", name
        if t.numel() >= 1000 and sparsity >= 0.95:
            assert encoding != "dense", name
    assert read_metadata(path) == {"note": "test"}


def test_special_float_bit_patterns_survive(tmp_path: Path) -> None:
    patterns = [0x7FC00001, 0xFFC12345, 0x7F800001, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001, 0]
    values = torch.tensor([p - (1 << 32) if p >= 1 << 31 else p for p in patterns], dtype=torch.int32)
    t = torch.zeros(200, dtype=torch.int32)
    t[::25] = values  # sparse enough to be stored as a sparse encoding
    t = t.view(torch.float32)
    save_sparse({"w": t, "m": t.reshape(8, 25)}, tmp_path / "nan.safetensors")
    loaded = load_sparse(tmp_path / "nan.safetensors")
    assert choose_encoding(t) != "dense"
    assert same_bits(loaded["w"], t) and same_bits(loaded["m"], t.reshape(8, 25))


def test_expected_encodings() -> None:
    assert choose_encoding(torch.zeros(300, 784)) == "csr"
    assert choose_encoding(torch.randn(300, 784)) == "dense"
    half = random_tensor((300, 784), torch.float32, 0.5, seed=0)
    assert choose_encoding(half) == "bitmask"  # 1 bit per element beats 2-byte indices at this density
    assert choose_encoding(torch.tensor(0.0)) == "dense" and choose_encoding(torch.zeros(3)) == "dense"


def _sparse_lenet300() -> torch.nn.Module:
    """LeNet-300-100 at exactly 95% global magnitude sparsity, pruned by multiplying (so -0.0 appears)."""
    torch.manual_seed(0)
    model = build_model("lenet300", 1, 28, 10)
    params = prunable_parameters(model)
    masks = global_masks({n: p.detach().abs() for n, p in params.items()}, 0.05)
    with torch.no_grad():
        for name, p in params.items():
            p.mul_(masks[name])
    total = sum(p.numel() for p in params.values())
    assert sum(int((p == 0).sum()) for p in params.values()) == total - round(0.05 * total)
    assert any(bool(torch.signbit(p[p == 0]).any()) for p in params.values())
    return model


def test_lenet300_at_95_percent_is_small_and_exact(tmp_path: Path) -> None:
    model = _sparse_lenet300()
    save_dense(model, tmp_path / "dense.pt")
    save_sparse(model, tmp_path / "sparse.safetensors", {"model": "lenet300"})
    ratio = (tmp_path / "sparse.safetensors").stat().st_size / (tmp_path / "dense.pt").stat().st_size
    assert ratio <= 0.12
    fresh = build_model("lenet300", 1, 28, 10)  # other random weights, overwritten by the load
    state = load_sparse(tmp_path / "sparse.safetensors", fresh)
    loaded_into = fresh.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(state[name], t) and torch.equal(loaded_into[name], t)
        assert same_bits(state[name], t) and same_bits(loaded_into[name], t), name


def test_load_into_a_model_that_does_not_fit(tmp_path: Path) -> None:
    save_sparse(build_model("lenet300", 1, 28, 10), tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="does not fit the model"):
        load_sparse(tmp_path / "m.safetensors", build_model("lenet5", 1, 28, 10))


@pytest.mark.parametrize(("state", "metadata", "fragment"), [
    ({"w": torch.zeros(3, dtype=torch.complex64)}, None, "cannot store"),
    ({"w": torch.zeros(10, 100), "w::values": torch.ones(1)}, None, "collides"),
    ({"w": torch.ones(2)}, {"prunelab.format": "x"}, "reserved"),
    ({"w": torch.ones(2)}, {"sparsity": 0.9}, "strings"),
])
def test_save_refuses_what_it_cannot_store(tmp_path: Path, state: dict, metadata: dict | None, fragment: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(UserError, match=fragment):
        save_sparse(state, path, metadata)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.safetensors"
    save_sparse({"w": torch.zeros(50, 50)}, path)
    save_sparse({"w": torch.ones(50, 50)}, path)  # replaces the old file
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]
    assert torch.equal(load_sparse(path)["w"], torch.ones(50, 50))


# ---------------------------------------------------------------- hostile files


def _valid(path: Path) -> Path:
    """A file with one tensor of each encoding (and -0.0 signs) for the tampering tests."""
    sparse = random_tensor((41, 200), torch.float32, 0.99, seed=1)  # csr
    half = random_tensor((41, 33), torch.float32, 0.6, seed=2)  # bitmask, with 7 padding bits
    state = {"csr": sparse, "bitmask": half, "dense": torch.randn(41, 33)}
    save_sparse(state, path)
    table, _ = stored_table(path)
    assert [table[k]["encoding"] for k in state] == ["csr", "bitmask", "dense"]
    assert table["csr"]["negative_zeros"] > 0 and table["bitmask"]["negative_zeros"] > 0
    return path


Edit = Callable[[dict[str, torch.Tensor], dict[str, dict], dict[str, str]], None]


def _tamper(tmp_path: Path, edit: Edit) -> Path:
    """A valid file rewritten with ``edit`` applied to its tensors, table and metadata."""
    src = _valid(tmp_path / "valid.safetensors")
    with safetensors.safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    tensors = safetensors.torch.load_file(str(src))
    original = meta["prunelab.tensors"]
    table = json.loads(original)
    edit(tensors, table, meta)
    if meta.get("prunelab.tensors") == original:  # the edit changed the table, not its text
        meta["prunelab.tensors"] = json.dumps(table)
    out = tmp_path / "tampered.safetensors"
    safetensors.torch.save_file(tensors, str(out), metadata=meta)
    return out


def _set(tensor_name: str, index: int, value: int) -> Edit:
    def edit(tensors: dict, table: dict, meta: dict) -> None:
        tensors[tensor_name] = tensors[tensor_name].clone()
        tensors[tensor_name][index] = value
    return edit


def _entry(name: str, key: str, value: object) -> Edit:
    def edit(tensors: dict, table: dict, meta: dict) -> None:
        table[name][key] = value
    return edit


def _replace(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Edit:
    def edit(tensors: dict, table: dict, meta: dict) -> None:
        tensors[name] = make(tensors[name]).contiguous()
    return edit


def _meta(key: str, value: str | None) -> Edit:
    def edit(tensors: dict, table: dict, meta: dict) -> None:
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    return edit


def _descending_pointers(tensors: dict, table: dict, meta: dict) -> None:
    indptr = tensors["csr::indptr"].clone()
    indptr[1] = indptr[-1] + 1  # the next pointer falls back
    tensors["csr::indptr"] = indptr


def _bomb(tensors: dict, table: dict, meta: dict) -> None:
    for key in [k for k in tensors if k.startswith("csr::")]:
        del tensors[key]
    tensors["csr::indptr"] = torch.zeros(2, dtype=torch.int64)
    tensors["csr::indices"] = torch.zeros(0, dtype=torch.int64)
    tensors["csr::values"] = torch.zeros(0, dtype=torch.float32)
    table["csr"].update(shape=[1, 10**15], negative_zeros=0)


TAMPERS: dict[str, tuple[Edit, str]] = {
    "index out of range": (_set("csr::indices", 0, 200), "column index"),
    "negative index": (_replace("csr::indices", lambda t: t.to(torch.int32) - 40), "column index"),
    "indices not rising": (_replace("csr::indices", lambda t: t.flip(0)), "do not rise"),
    "pointers not monotone": (_descending_pointers, "row pointers"),
    "pointers too short": (_replace("csr::indptr", lambda t: t[:-1]), "indptr"),
    "pointers not from 0": (_set("csr::indptr", 0, 1), "row pointers"),
    "count mismatch csr": (_replace("csr::values", lambda t: t[:-1]), "values"),
    "count mismatch bitmask": (_replace("bitmask::values", lambda t: t[:-1]), "values"),
    "padding bits": (_set("bitmask::bits", -1, 0xFF), "padding"),
    "values dtype": (_replace("bitmask::values", lambda t: t.double()), "values"),
    "zero among values": (_set("bitmask::values", 0, 0), "zero among"),
    "sign count": (lambda t, table, m: table["csr"].update(negative_zeros=table["csr"]["negative_zeros"] + 1),
                   "zero signs"),
    "signs on a dense tensor": (_entry("dense", "negative_zeros", 3), "negative_zeros"),
    "tampered shape dense": (_entry("dense", "shape", [33, 41]), "described as"),
    "tampered shape bitmask": (_entry("bitmask", "shape", [42, 33]), "bits"),
    "tampered shape csr": (_entry("csr", "shape", [40, 200]), "indptr"),
    "negative dimension": (_entry("dense", "shape", [-41, -33]), "shape"),
    "string dimension": (_entry("dense", "shape", ["41", 33]), "shape"),
    "dtype mismatch": (_entry("dense", "dtype", "float64"), "described as"),
    "unknown dtype": (_entry("dense", "dtype", "float128"), "unknown dtype"),
    "unknown encoding": (_entry("csr", "encoding", "rle"), "unknown encoding"),
    "missing field": (lambda t, table, m: table["csr"].pop("dtype"), "exactly"),
    "undescribed tensor": (lambda t, table, m: t.update({"extra": torch.ones(1)}), "do not match"),
    "missing part": (lambda t, table, m: t.pop("csr::indices"), "do not match"),
    "table not JSON": (lambda t, table, m: m.update({"prunelab.tensors": "{nope"}), "table"),
    "no table": (_meta("prunelab.tensors", None), "table"),
    "other version": (_meta("prunelab.format_version", "2"), "version"),
    "not our format": (_meta("prunelab.format", "other"), "not a prunelab sparse file"),
    "decompression bomb": (_bomb, "implausibly many"),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_headers_and_parts_are_refused(tmp_path: Path, case: str) -> None:
    edit, fragment = TAMPERS[case]
    path = _tamper(tmp_path, edit)
    with pytest.raises(UserError, match=fragment) as info:
        load_sparse(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def _random_bytes(path: Path) -> None:
    path.write_bytes(bytes(torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0)).tolist()))


def _truncated(path: Path) -> None:
    data = _valid(path.with_name("valid.safetensors")).read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _cut_in_header(path: Path) -> None:
    path.write_bytes(_valid(path.with_name("valid.safetensors")).read_bytes()[:60])


def _not_json(path: Path) -> None:
    path.write_bytes((8).to_bytes(8, "little") + b"not json")


def _plain_safetensors(path: Path) -> None:
    safetensors.torch.save_file({"w": torch.ones(3)}, str(path))


@pytest.mark.parametrize("write", [
    _random_bytes, _truncated, _cut_in_header, _not_json, _plain_safetensors,
    lambda p: p.write_bytes(b""), lambda p: p.write_bytes(b"abc"),
], ids=["random bytes", "truncated", "cut in header", "not json", "plain safetensors", "empty", "3 bytes"])
def test_foreign_and_damaged_files_are_refused(tmp_path: Path, write: Callable[[Path], None]) -> None:
    path = tmp_path / "bad.safetensors"
    write(path)
    with pytest.raises(UserError) as info:
        load_sparse(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    if write is not _truncated:  # read_metadata reads only the header, which a cut body leaves intact
        with pytest.raises(UserError):
            read_metadata(path)


class _Payload:
    """Unpickling this opens (so creates) the sentinel file: proof that a loader ran pickle."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return open, (str(self.sentinel), "w")


@pytest.mark.parametrize("dump", ["pickle", "torch.save"])
def test_a_pickle_renamed_safetensors_is_never_unpickled(tmp_path: Path, dump: str) -> None:
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "weights.safetensors"
    if dump == "pickle":
        path.write_bytes(pickle.dumps(_Payload(sentinel)))
    else:
        torch.save({"w": _Payload(sentinel)}, path)
    with pytest.raises(UserError, match="weights.safetensors"):
        load_sparse(path)
    with pytest.raises(UserError):
        load_sparse(path, build_model("lenet300", 1, 28, 10))
    assert not sentinel.exists()
    if dump == "pickle":  # the control: the payload does work when unpickled
        pickle.loads(path.read_bytes()).close()
        assert sentinel.exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_sparse(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------- decoding memory


def _hand_made(path: Path, table: dict[str, dict], parts: dict[str, tuple[str, list[int], bytes]]) -> Path:
    """A sparse file written byte by byte (8-byte little-endian header length, JSON header, data),
    so that no tensor of the claimed size is ever built by the test."""
    header: dict[str, object] = {}
    data = b""
    for name, (dtype, shape, raw) in parts.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    header["__metadata__"] = {"prunelab.format": "prunelab-sparse", "prunelab.format_version": "1",
                              "prunelab.tensors": json.dumps(table)}
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _empty_csr(name: str, shape: list[int], dtype: str = "bool") -> tuple[dict, dict]:
    """The table entry and parts of an all-zero CSR tensor of ``shape`` (one row pointer pair)."""
    entry = {"encoding": "csr", "shape": shape, "dtype": dtype, "negative_zeros": 0}
    parts = {f"{name}::indptr": ("I64", [2], bytes(16)), f"{name}::indices": ("U8", [0], b""),
             f"{name}::values": ({"bool": "BOOL", "float64": "F64"}[dtype], [0], b"")}
    return {name: entry}, parts


_LOAD = "from prunelab.deploy.sparse_format import load_sparse"


@requires_proc
@pytest.mark.parametrize(("shape", "dtype"), [([1, 2**32], "bool"), ([2**16, 2**13], "float64")])
def test_a_tiny_file_cannot_make_decoding_allocate_gigabytes(tmp_path: Path, shape: list[int], dtype: str) -> None:
    # 4 GiB of output, within the old limit on declared bytes, but the flags and int64
    # temporaries of decoding it are several times that: refused before anything is allocated.
    table, parts = _empty_csr("w", shape, dtype)
    if shape[0] > 1:  # many rows: a longer row pointer part, still all zeros
        parts["w::indptr"] = ("I64", [shape[0] + 1], bytes(8 * (shape[0] + 1)))
    path = _hand_made(tmp_path / "bomb.safetensors", table, parts)
    assert path.stat().st_size < 1 << 20
    message = user_error_under_cap(_LOAD, "load_sparse(Path(sys.argv[1]))", str(path))
    assert message.startswith(f"{path} is not a valid prunelab sparse file: decoding its csr tensor 'w' of "
                              f"{dtype} {shape} would take up to ")
    assert f"implausibly many for a {path.stat().st_size}-byte file (the limit is {4 << 30})" in message


@requires_proc
def test_the_limit_counts_the_tensors_decoded_before(tmp_path: Path) -> None:
    # Eight 512 MiB tensors: each alone fits (1 GiB with its flags), all together do not.
    table, parts = {}, {}
    for i in range(8):
        entry, stored = _empty_csr(f"t{i}", [1, 2**29])
        table.update(entry)
        parts.update(stored)
    path = _hand_made(tmp_path / "many.safetensors", table, parts)
    message = user_error_under_cap(_LOAD, "load_sparse(Path(sys.argv[1]))", str(path))
    # t0..t5 leave 3 GiB decoded; t6 needs 1 GiB (and a few bytes) more: past 4 GiB.
    assert "tensor 't6' of bool [1, 536870912]" in message and "implausibly many" in message


def test_a_hand_made_file_within_the_limit_loads(tmp_path: Path) -> None:
    table, parts = _empty_csr("w", [3, 5])
    parts["w::indptr"] = ("I64", [4], bytes(32))
    loaded = load_sparse(_hand_made(tmp_path / "ok.safetensors", table, parts))
    assert same_bits(loaded["w"], torch.zeros(3, 5, dtype=torch.bool))


_MEASURE = """
import json, sys
from pathlib import Path
import safetensors, safetensors.torch
from prunelab.deploy.sparse_format.decode import _decode_bytes, load_sparse


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


for name in sys.argv[1:]:  # once unmeasured: torch's lazy one-off initialisations stay resident
    load_sparse(Path(name))
out = {}
for name in sys.argv[1:]:
    with safetensors.safe_open(name, "pt") as f:
        table = json.loads(f.metadata()["prunelab.tensors"])
    (tensor, entry), = table.items()
    _, bound = _decode_bytes(safetensors.torch.load_file(name), tensor, entry)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
    except OSError:
        sys.exit(3)  # this kernel or container cannot reset the peak: the parent skips
    before = status("VmRSS:")
    state = load_sparse(Path(name))
    out[name] = [status("VmHWM:") - before, bound, Path(name).stat().st_size]
    del state
print(json.dumps(out))
"""


@pytest.mark.integration
@requires_proc
def test_the_memory_bound_covers_what_decoding_really_takes(tmp_path: Path) -> None:
    cases = {
        "bitmask_f32": random_tensor((2**11, 2**11), torch.float32, 0.6, seed=0),
        "csr_f32": random_tensor((2**11, 2**11), torch.float32, 0.999, seed=1),
        "csr_bool": random_tensor((2**10, 2**12), torch.bool, 0.99, seed=2),
        "bitmask_f16": random_tensor((2**22,), torch.float16, 0.7, seed=3),
    }
    paths = []
    for name, t in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_sparse({name: t}, path)
        assert stored_table(path)[0][name]["encoding"] == name.split("_")[0]
        paths.append(str(path))
    # Every allocation of 64 kB or more its own mmap, given back when freed: RSS sees what is live.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", _MEASURE, *paths], capture_output=True, text=True,
                          timeout=300, env=env)
    if done.returncode == 3:
        pytest.skip("cannot reset the peak RSS through /proc/self/clear_refs here")
    assert done.returncode == 0, done.stderr[-2000:]
    for name, (peak, bound, size) in json.loads(done.stdout).items():
        # Beyond the bound: the file's bytes and safetensors' copy of them, and allocator slack.
        assert peak <= bound + 2 * size + (2 << 20), (name, peak, bound)
        assert peak >= bound // 4, (name, peak, bound)  # the bound is not wildly loose
