"""Hostile or out-of-range configuration input: one sentence (a UserError), never a traceback, hang or huge allocation."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunelab import safe_yaml
from prunelab.cli import main
from prunelab.config.build import build_config, load_config, parse_set
from prunelab.config.schema import MAX_SEED
from prunelab.errors import UserError


def _laughs(levels: int = 9) -> str:
    """The "billion laughs" alias bomb: each anchor a list of nine aliases of the previous one."""
    names = "abcdefghijklmnop"[:levels]
    lines = [f"{names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{new}: &{new} [{', '.join([f'*{old}'] * 9)}]" for old, new in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


BOMBS = {
    "brackets-100000-deep": ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "nests deeper than the limit of 64 levels"),
    "flow-mappings-3000-deep": ("{a: " * 3000 + "1" + "}" * 3000 + "\n", "nests deeper than the limit of 64 levels"),
    "block-mappings-100-deep": (
        "".join(" " * i + "a:\n" for i in range(100)) + " " * 100 + "1\n", "nests deeper than the limit of 64 levels"
    ),
    "deep-through-aliases": (
        "a: &a " + "[" * 60 + "]" * 60 + "\nb: " + "[" * 10 + "*a" + "]" * 10 + "\n",
        "nests deeper than the limit of 64 levels once its aliases are expanded",
    ),
    "billion-laughs": (_laughs(), "expands to more than the limit of 100000 nodes"),
    "recursive-alias": ("a: &a {b: *a}\n", "has an alias that refers to a collection containing it"),
    "over-1-MiB": ("a: 1\n" + "#" * safe_yaml.MAX_BYTES + "\n", "is larger than the limit of 1048576 bytes"),
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_yaml_bombs_are_refused_in_one_sentence(case: str, tmp_path: Path) -> None:
    text, fragment = BOMBS[case]
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"config file {path} ") and fragment in message and "\n" not in message
    with pytest.raises(UserError, match="--set x "):
        parse_set([f"x={text}"])


def test_sweep_files_use_the_same_limits(tmp_path: Path) -> None:
    from prunelab.runs.sweep import read_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text("base: {epochs: 1}\ngrid:\n" + "".join(f"  {line}\n" for line in _laughs().splitlines()))
    with pytest.raises(UserError, match="expands to more than the limit of 100000 nodes"):
        read_sweep(path)


def test_a_real_config_is_well_within_the_limits(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("train: {<<: &short {lr: 0.05, epochs: 3}, momentum: 0.8}\nprune: {sparsity: 0.5}\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.momentum, cfg.prune.sparsity) == (0.05, 3, 0.8, 0.5)


def test_numbers_yaml_reads_as_strings_are_numbers() -> None:
    cfg = load_config(overrides=["train.lr=1e9", "epochs=1e3"])
    assert cfg.train.lr == 1e9 and cfg.train.epochs == 1000 and isinstance(cfg.train.epochs, int)
    assert load_config(overrides=["train.lr=1e9"]) == load_config(flags={"lr": 1e9})
    with pytest.raises(UserError, match="train.epochs must be an integer, got '1.5e0'"):
        load_config(overrides=["epochs=1.5e0"])
    with pytest.raises(UserError, match="train.lr must be a number, got True"):
        build_config({"train.lr": True})
    with pytest.raises(UserError, match="train.epochs must be an integer, got False"):
        build_config({"train.epochs": False})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("method:\n  power: .nan\n", "method.power must be a finite number, got nan"),
        ("train:\n  lr: .inf\n", "train.lr must be a finite number, got inf"),
        ("train:\n  weight_decay: .inf\n", "train.weight_decay must be a finite number, got inf"),
        ("train:\n  betas: [0.9, -.inf]\n", "train.betas must be a finite number, got -inf"),
        ("method: {name: oneshot, finetune_lr: .nan}\n", "method.finetune_lr must be a finite number, got nan"),
    ],
)
def test_float_fields_must_be_finite(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path)
    assert fragment in str(info.value)
    with pytest.raises(UserError, match="train.lr must be a finite number, got 'inf'"):
        build_config({"train.lr": "inf"})


@pytest.mark.parametrize("seed", [MAX_SEED + 1, 2**64, -1])
def test_seeds_outside_32_bits_are_refused(seed: int) -> None:
    with pytest.raises(UserError, match=rf"seed must be in \[0, 4294967295\], got {seed}$"):
        build_config({"seed": seed})
    assert build_config({"seed": MAX_SEED}).seed == 2**32 - 1


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"method": "synflow", "method.iterations": 0}, "method.iterations must be at least 1, got 0"),
        ({"method": "cyclic", "method.iterations": 0}, "method.iterations must be at least 1, got 0"),
        ({"method": "grasp", "method.samples_per_class": 0}, "method.samples_per_class must be at least 1, got 0"),
        ({"method": "sculpt", "method.samples_per_class": -3}, "method.samples_per_class must be at least 1, got -3"),
        ({"method": "oneshot", "method.batches": 0}, "method.batches must be at least 1, got 0"),
        ({"method": "iterative", "method.batches": 0}, "method.batches must be at least 1, got 0"),
        ({"method": "iterative", "method.step_epochs": -1}, "method.step_epochs must be at least 0, got -1"),
    ],
)
def test_method_counts_have_lower_bounds(raw: dict[str, object], fragment: str) -> None:
    with pytest.raises(UserError) as info:
        build_config(raw)
    assert fragment in str(info.value)


def test_crop_padding_is_bounded_by_the_image_size() -> None:
    with pytest.raises(UserError, match="crop_padding must be at most the image size 28 of fashion-mnist, got 1000000"):
        build_config({"data.augment.crop_padding": 1_000_000})
    with pytest.raises(UserError, match="at most the image size 32 of cifar10, got 33"):
        build_config({"dataset": "cifar10", "data.augment.crop_padding": 33})
    with pytest.raises(UserError, match="augment.crop_padding must be a whole number >= 0, got -1"):
        build_config({"data.augment.crop_padding": -1})
    assert build_config({"data.augment.crop_padding": 28}).data.augment.crop_padding == 28


def test_cli_refuses_a_yaml_bomb_with_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_laughs())
    code = main(["run", "--config", str(bomb), "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("prunelab: error: config file ")
    assert "expands to more than the limit of 100000 nodes" in err[0]
    assert not (tmp_path / "s").exists()
