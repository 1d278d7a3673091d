"""The Lightning ``Pruning`` callback: exact sparsity, zeros in weights and optimizer state, resumes."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch", reason="pip install 'prunelab[lightning]'")

from prunelab.errors import UserError  # noqa: E402
from prunelab.integrations.lightning import Pruning  # noqa: E402


class MLP(pl.LightningModule):
    """A small MLP on random tensors (1680 prunable weights: 90% is a whole number), with the optimizer asked for."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 4))
        self.optimizer_name = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def loader(batches: int = 5) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batches * 8, 20, generator=generator)
    y = torch.randint(0, 4, (batches * 8,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def trainer(max_epochs: int, callbacks: list[Any], root: Path | None = None, **kwargs: Any) -> Any:
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, logger=False,
                      enable_checkpointing=root is not None, default_root_dir=root, **kwargs)


def pruned(module: MLP, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return {name: params[name] for name in masks}


def check_zeros(module: MLP, masks: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Every pruned weight and its per-weight optimizer state is exactly 0."""
    for name, param in pruned(module, masks).items():
        assert torch.equal(param[~masks[name]], torch.zeros_like(param[~masks[name]])), name
        state = optimizer.state[param]
        buffers = [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape]
        assert buffers, f"no optimizer state for {name}"
        for value in buffers:
            assert not value[~masks[name]].any(), name


class ZeroWatch(pl.Callback):
    """Checks the zeros after every optimizer step (after Pruning's own batch-end hook)."""

    def __init__(self, pruning: Pruning) -> None:
        self.pruning = pruning
        self.checked = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        check_zeros(pl_module, self.pruning.masks, trainer.optimizers[0])
        self.checked += 1


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_progressive_pruning_reaches_exact_sparsity_with_zero_state(optimizer: str) -> None:
    torch.manual_seed(0)
    module = MLP(optimizer)
    pruning = Pruning(sparsity=0.9, start=0, end=2, power=3, scope="layerwise")
    watch = ZeroWatch(pruning)
    fit = trainer(4, [pruning, watch])
    fit.fit(module, loader())
    total = sum(m.numel() for m in pruning.masks.values())
    zeros = sum(int((p == 0).sum()) for p in pruned(module, pruning.masks).values())
    assert set(pruning.masks) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    assert sum(int((~m).sum()) for m in pruning.masks.values()) == round(0.9 * total)
    assert pruning.sparsity == 0.9
    assert total == 1680 and zeros == 1512  # the unpruned weights are not 0, the pruned ones all are
    assert watch.checked == 20
    check_zeros(module, pruning.masks, fit.optimizers[0])


def test_one_shot_prunes_at_start_and_keeps_masks_with_accumulation() -> None:
    torch.manual_seed(0)
    module = MLP("adam")
    pruning = Pruning(sparsity=0.75, start=1, end=1, scope="layerwise", exclude=("net.4",))
    seen: list[float] = []

    class Record(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            seen.append(pruning.sparsity)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            check_zeros(pl_module, pruning.masks, trainer.optimizers[0])

    fit = trainer(3, [pruning, Record()], accumulate_grad_batches=2)
    fit.fit(module, loader(5))
    assert fit.global_step == 9  # 3 optimizer steps an epoch (the last one after a single batch)
    assert seen == [0.0, 0.75, 0.75]  # pruned once, as epoch 1 starts; the masks kept after
    assert set(pruning.masks) == {"net.0.weight", "net.2.weight"}
    for mask in pruning.masks.values():
        assert int((~mask).sum()) == round(0.75 * mask.numel())


def test_resumed_fit_gives_the_masks_of_an_uninterrupted_fit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    start = MLP("adam").state_dict()

    def run(epochs: int, root: Path, ckpt: Path | None = None) -> tuple[Pruning, Any]:
        module = MLP("adam")
        module.load_state_dict(start)
        pruning = Pruning(sparsity=0.9, start=0, end=4, power=3)
        checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
        fit = trainer(epochs, [pruning, checkpoints], root)
        fit.fit(module, loader(), ckpt_path=ckpt)
        return pruning, module

    whole, whole_module = run(5, tmp_path / "whole")
    half, _ = run(2, tmp_path / "half")
    assert 0 < half.sparsity < 0.9
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without pruning state")  # restored, not caught up
        resumed, resumed_module = run(5, tmp_path / "resumed", tmp_path / "half" / "last.ckpt")
    assert resumed.pruning.pruner is not None and resumed.pruning.pruner.steps == 25
    assert set(resumed.masks) == set(whole.masks)
    assert all(torch.equal(resumed.masks[n], whole.masks[n]) for n in whole.masks)
    assert resumed.sparsity == whole.sparsity == 0.9
    for name, param in resumed_module.state_dict().items():
        assert torch.equal(param, whole_module.state_dict()[name]), name


def test_resuming_a_checkpoint_without_pruning_state_catches_up(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dense = trainer(1, [pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)], tmp_path)
    dense.fit(MLP(), loader())
    pruning = Pruning(sparsity=0.5, start=0, end=2)
    with pytest.warns(UserWarning, match="resumes at optimizer step 5 without pruning state"):
        trainer(2, [pruning]).fit(MLP(), loader(), ckpt_path=tmp_path / "last.ckpt")
    assert pruning.sparsity == 0.5


def test_checkpoint_holds_masks_and_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pruning = Pruning(sparsity=0.5, start=0, end=1)
    fit = trainer(1, [pruning], tmp_path)
    fit.fit(MLP(), loader())
    fit.save_checkpoint(tmp_path / "final.ckpt")
    saved = torch.load(tmp_path / "final.ckpt", weights_only=True)["callbacks"]["Pruning"]
    assert saved["steps"] == 5
    assert all(torch.equal(saved["masks"][n], pruning.masks[n].cpu()) for n in pruning.masks)


def test_bad_settings_fail_on_construction() -> None:
    with pytest.raises(UserError, match="start <= end"):
        Pruning(sparsity=0.9, start=3, end=1)
    with pytest.raises(UserError, match="sparsity must be in"):
        Pruning(sparsity=1.0)
    with pytest.raises(UserError, match="exclude must be a sequence"):
        Pruning(sparsity=0.5, exclude="net.4")
    with pytest.raises(UserError, match="allocation"):
        Pruning(sparsity=0.5, scope="global-ish")


def test_data_without_length_needs_steps_per_epoch() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self) -> Any:
            generator = torch.Generator().manual_seed(0)
            for _ in range(16):
                yield torch.randn(20, generator=generator), torch.tensor(1)

    with pytest.raises(UserError, match="steps_per_epoch"):
        trainer(1, [Pruning(sparsity=0.5)]).fit(MLP(), DataLoader(Stream(), batch_size=4))
    pruning = Pruning(sparsity=0.5, start=0, end=1, steps_per_epoch=4)
    trainer(2, [pruning]).fit(MLP(), DataLoader(Stream(), batch_size=4))
    assert pruning.sparsity == 0.5


def test_missing_lightning_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "prunelab.integrations.lightning")
    with pytest.raises(UserError, match=r"^prunelab.integrations.lightning needs lightning: pip install "
                                        r"'prunelab\[lightning\]'$"):
        importlib.import_module("prunelab.integrations.lightning")
