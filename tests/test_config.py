"""Config parsing, validation and the run-id hash (golden ids pinned)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunelab.config.build import build_config, load_config, parse_set
from prunelab.config.identity import non_default, run_id
from prunelab.runs.sweep import expand, read_sweep
from prunelab.config.schema import RunConfig
from prunelab.errors import UserError


def test_defaults_are_progressive_lenet300_fashion_mnist_90() -> None:
    cfg = build_config({})
    assert (cfg.method.name, cfg.model.name, cfg.data.dataset) == ("progressive", "lenet300", "fashion-mnist")
    assert cfg.prune.sparsity == 0.9 and cfg.train.epochs == 30
    assert non_default(cfg) == {}


# Golden ids: changing any of these renames every stored run. Only change them on purpose.
GOLDEN = [
    ({}, "44136fa355b3"),
    ({"method": "progressive", "sparsity": 0.9, "epochs": 30}, "44136fa355b3"),
    ({"method": "dense"}, "9c054a239e6a"),
    ({"epochs": 2}, "203d3de04a60"),
    ({"method.power": 3.0, "seed": 1}, "ab21cc624645"),
]


@pytest.mark.parametrize(("raw", "expected"), GOLDEN)
def test_golden_run_ids(raw: dict, expected: str) -> None:
    assert run_id(build_config(raw)) == expected


def test_explicit_default_equals_omitted() -> None:
    assert run_id(build_config({"train.lr": 0.1, "method.power": 1})) == run_id(RunConfig())


def test_device_options_enter_the_id_only_when_set() -> None:
    defaults = {"train.precision": "fp32", "train.channels_last": False}
    assert run_id(build_config(defaults)) == run_id(RunConfig()) == GOLDEN[0][1]
    assert run_id(build_config({"train.precision": "bf16"})) != GOLDEN[0][1]
    assert run_id(build_config({"train.channels_last": True})) != GOLDEN[0][1]


def test_dense_ignores_pruning_settings() -> None:
    a = build_config({"method": "dense", "sparsity": 0.5})
    b = build_config({"method": "dense", "sparsity": 0.98, "prune.allocation": "layerwise"})
    assert run_id(a) == run_id(b) and a.prune.sparsity == 0.0


def test_yaml_then_set_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("method: progressive\nmodel: lenet5\ntrain: {lr: 0.05, epochs: 10}\n"
                    "data:\n  augment: {hflip: true}\n")
    cfg = load_config(path, ["train.lr=0.02", "method.power=3"], {"epochs": 4, "seed": None})
    assert cfg.model.name == "lenet5" and cfg.train.lr == 0.02 and cfg.train.epochs == 4
    assert cfg.method.settings.power == 3.0 and cfg.data.augment.hflip is True


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"sparsity": 1.5}, "sparsity must be in [0, 1)"),
        ({"sparsity": -0.1}, "sparsity must be in [0, 1)"),
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"model": "lenet3000"}, "did you mean 'lenet300'"),
        ({"dataset": "fmnist"}, "unknown dataset"),
        ({"train.epoch": 3}, "did you mean 'train.epochs'"),
        ({"method.powr": 3}, "did you mean 'method.power'"),
        ({"train.epochs": "many"}, "train.epochs must be an integer"),
        ({"train.nesterov": "yes"}, "must be true or false"),
        ({"train.optimizer": "sgdd"}, "did you mean 'sgd'"),
        ({"method.end_epoch": 40}, "method.end_epoch <= train.epochs"),
        ({"method": "dense", "method.power": 3}, "unknown config key 'method.power'"),
        ({"train.precision": "bf61"}, "unknown precision 'bf61' (did you mean 'bf16'?); choose one of: fp32, bf16"),
        ({"train.channels_last": "yes"}, "train.channels_last must be true or false"),
        ({"prune.structure": "2-4"}, "prune.structure must be 'unstructured', 'channel' or N:M such as '2:4', got '2-4'"),
        ({"prune.structure": "2:4", "sparsity": 0.9}, "its sparsity is 0.5, not 0.9; leave prune.sparsity unset"),
        ({"prune.structure": "2:4", "method": "rigl"}, "rigl cannot prune with prune.structure=2:4; it supports unstructured"),
        ({"prune.structure": "2:4", "method": "lottery", "method.layer_rates": ["fc1=0.1"]},
         "method.layer_rates sets each layer's density itself"),
    ],
)
def test_bad_values_are_one_sentence(raw: dict, fragment: str) -> None:
    with pytest.raises(UserError) as info:
        build_config(raw)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_reads_n_colon_m_as_text_not_a_base_60_integer() -> None:
    # YAML 1.1 reads 2:4 as 124 (base 60); prunelab's loader, like YAML 1.2, leaves it text.
    assert parse_set(["prune.structure=2:4", "a=1:30.5", "b=124", "c=0x10", "d=1.5"]) == {
        "prune.structure": "2:4", "a": "1:30.5", "b": 124, "c": 16, "d": 1.5}


def test_nm_structure_fixes_the_sparsity_and_enters_the_id() -> None:
    cfg = build_config({"prune.structure": "1:4"})
    assert cfg.prune.sparsity == 0.75 and cfg.prune.structure == "1:4"
    assert build_config({"prune.structure": "1:4", "sparsity": 0.75}) == cfg
    assert run_id(cfg) != run_id(build_config({"sparsity": 0.75}))
    assert run_id(build_config({"prune.structure": "unstructured"})) == GOLDEN[0][1]


def test_parse_set_values_are_yaml() -> None:
    assert parse_set(["a=1", "b=0.5", "c=true", "d=[1, 2]", "e=null", "f=text"]) == {
        "a": 1, "b": 0.5, "c": True, "d": [1, 2], "e": None, "f": "text"}
    with pytest.raises(UserError):
        parse_set(["novalue"])


@pytest.mark.parametrize("text", ["train: [unclosed", "- just\n- a list\n", "train:\n  lr: 0.1\n   bad: 1\n"])
def test_bad_yaml_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError):
        load_config(path)


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_studies_expand() -> None:
    studies = sorted(p for p in (Path(__file__).parents[1] / "studies").glob("*.yaml") if p.name != "claims.yaml")
    assert len(studies) == 6
    for path in studies:
        assert expand(read_sweep(path)).points, path  # every point builds a valid config


def test_shipped_examples_load() -> None:
    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        cfg = load_config(path)
        assert cfg.method.name == "progressive"
