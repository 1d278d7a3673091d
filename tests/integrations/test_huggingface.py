"""The Hugging Face ``Pruning`` callback on a tiny BERT built from its config (no download).

The Trainer itself needs ``accelerate``; without it the tests drive the callback with the
Trainer's own ``TrainerState``, its JSON checkpoint file and the events in the Trainer's order.
"""

from __future__ import annotations

import importlib
import math
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="pip install 'prunelab[huggingface]'")

from transformers import BertConfig, BertForSequenceClassification, TrainerControl, TrainerState  # noqa: E402

from prunelab.errors import UserError  # noqa: E402
from prunelab.integrations.huggingface import Pruning, pack, unpack  # noqa: E402

# Linear weights: 2 layers x (4 x 40x40 attention + 2 x 40x80 feed-forward) + pooler 40x40
# + classifier 2x40 = 27280, of which 90% (24552) is a whole number.
PRUNABLE = 27280
BATCHES, BATCH = 4, 8


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=40, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=80, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def examples() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (BATCHES * BATCH, 12), generator=generator)
    labels = torch.randint(0, 2, (BATCHES * BATCH,), generator=generator)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels[i]}
            for i in range(len(ids))]


def batches() -> list[dict[str, torch.Tensor]]:
    rows = examples()
    return [{k: torch.stack([r[k] for r in rows[i:i + BATCH]]) for k in rows[0]}
            for i in range(0, len(rows), BATCH)]


def check_pruned(model: torch.nn.Module, pruning: Pruning, optimizer: torch.optim.Optimizer | None) -> None:
    """Exactly 90% of the Linear weights are 0, all of them pruned ones, with zero Adam moments."""
    params = dict(model.named_parameters())
    assert all(name.endswith(".weight") and "embeddings" not in name for name in pruning.masks)
    assert sum(m.numel() for m in pruning.masks.values()) == PRUNABLE
    assert pruning.sparsity == 0.9
    assert sum(int((params[n] == 0).sum()) for n in pruning.masks) == PRUNABLE * 9 // 10
    for name, mask in pruning.masks.items():
        assert not params[name][~mask].any(), name
        if optimizer is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                assert not optimizer.state[params[name]][key][~mask].any(), (name, key)


class Loop:
    """The Trainer's sequence of callback events around a plain AdamW loop (for machines without accelerate)."""

    def __init__(self, pruning: Pruning, model: torch.nn.Module) -> None:
        self.pruning, self.model = pruning, model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        self.args = SimpleNamespace(gradient_accumulation_steps=1)
        self.state = TrainerState(stateful_callbacks=[pruning])
        self.control = TrainerControl()

    def train(self, epochs: int, data: list[dict[str, torch.Tensor]], checkpoint_at: int = 0,
              folder: Path | None = None) -> None:
        self.pruning.on_train_begin(self.args, self.state, self.control, model=self.model,
                                    optimizer=self.optimizer, train_dataloader=data)
        while self.state.global_step < epochs * len(data):
            batch = data[self.state.global_step % len(data)]
            self.model(**batch).loss.backward()
            self.optimizer.step()
            self.model.zero_grad()
            self.state.global_step += 1
            self.pruning.on_step_end(self.args, self.state, self.control)
            check_pruned_so_far(self.model, self.pruning, self.optimizer)
            if self.state.global_step == checkpoint_at and folder is not None:
                self.save(folder)
        self.pruning.on_train_end(self.args, self.state, self.control)

    def save(self, folder: Path) -> None:
        """As ``Trainer._save_checkpoint``: model, optimizer and trainer_state.json with callback states."""
        folder.mkdir(parents=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, folder / "w.pt")
        self.state.stateful_callbacks[Pruning.__name__] = self.pruning.state()
        self.state.save_to_json(str(folder / "trainer_state.json"))

    @classmethod
    def resume(cls, pruning: Pruning, folder: Path) -> Loop:
        """As ``Trainer.train(resume_from_checkpoint=folder)`` before ``on_train_begin``."""
        loop = cls(pruning, tiny_bert())
        weights = torch.load(folder / "w.pt", weights_only=True)
        loop.model.load_state_dict(weights["model"])
        loop.optimizer.load_state_dict(weights["optimizer"])
        loop.state = TrainerState.load_from_json(str(folder / "trainer_state.json"))
        return loop


def check_pruned_so_far(model: torch.nn.Module, pruning: Pruning, optimizer: torch.optim.Optimizer) -> None:
    params = dict(model.named_parameters())
    for name, mask in pruning.masks.items():
        assert not params[name][~mask].any(), name
        assert not optimizer.state[params[name]]["exp_avg"][~mask].any(), name


def test_callback_prunes_bert_to_exact_sparsity_with_zero_moments() -> None:
    model = tiny_bert()
    pruning = Pruning(sparsity=0.9, start=0, end=2)
    loop = Loop(pruning, model)
    loop.train(3, batches())
    assert loop.pruning.pruning.pruner is not None and loop.pruning.pruning.pruner.steps == 12
    check_pruned(model, pruning, loop.optimizer)


def test_resume_from_trainer_state_json_gives_the_same_masks(tmp_path: Path) -> None:
    data = batches()
    whole = Loop(Pruning(sparsity=0.9, start=0, end=3, power=3), tiny_bert())
    whole.train(4, data, checkpoint_at=6, folder=tmp_path / "checkpoint-6")
    resumed = Loop.resume(Pruning(sparsity=0.9, start=0, end=3, power=3), tmp_path / "checkpoint-6")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without pruning state")  # restored, not caught up
        resumed.train(4, data)
    assert resumed.pruning.pruning.pruner is not None and resumed.pruning.pruning.pruner.steps == 16
    assert set(resumed.pruning.masks) == set(whole.pruning.masks)
    assert all(torch.equal(resumed.pruning.masks[n], whole.pruning.masks[n]) for n in whole.pruning.masks)
    check_pruned(resumed.model, resumed.pruning, resumed.optimizer)


def test_packed_masks_round_trip_and_damage_is_one_sentence() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = {"a.weight": torch.rand(7, 13, generator=generator) > 0.5, "b.weight": torch.zeros(3, 8, dtype=torch.bool)}
    saved = pack({"steps": 5, "masks": masks})
    back = unpack(saved)
    assert back["steps"] == 5 and all(torch.equal(back["masks"][n], masks[n]) for n in masks)
    assert pack({}) == {} and unpack({}) == {}
    # restore_callback_states_from_checkpoint=True rebuilds the callback from its saved arguments.
    settings = Pruning(sparsity=0.8, start=1, end=3, exclude=("classifier",), structure="unstructured").state()
    expected = Pruning(sparsity=0.8, start=1, end=3, exclude=["classifier"]).settings
    assert Pruning(**settings["args"]).settings == expected
    saved["masks"]["a.weight"]["shape"] = [7, 14]
    with pytest.raises(UserError, match="damaged"):
        unpack(saved)


def test_steps_per_epoch_come_from_the_loader_and_accumulation() -> None:
    pruning = Pruning(sparsity=0.5, start=1, end=1)
    loop = Loop(pruning, tiny_bert())
    loop.args.gradient_accumulation_steps = 3
    loop.pruning.on_train_begin(loop.args, loop.state, loop.control, model=loop.model,
                                optimizer=loop.optimizer, train_dataloader=list(range(10)))
    assert pruning.pruning.pruner is not None
    assert pruning.pruning.pruner.schedule.start == math.ceil(10 / 3)  # start=1 epoch = 4 steps
    with pytest.raises(UserError, match="steps_per_epoch"):
        Pruning(sparsity=0.5).on_train_begin(loop.args, loop.state, loop.control, model=loop.model,
                                             optimizer=loop.optimizer, train_dataloader=iter([]))


def trainer_args(folder: Path, epochs: int, **kwargs: Any) -> Any:
    return transformers.TrainingArguments(
        output_dir=str(folder), num_train_epochs=epochs, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        report_to="none", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, **kwargs)


@pytest.mark.integration
def test_trainer_prunes_bert_to_exact_sparsity(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    model = tiny_bert()
    pruning = Pruning(sparsity=0.9, start=0, end=2)
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path, 3, save_strategy="no"),
                                   train_dataset=examples(), callbacks=[pruning])
    trainer.train()
    assert trainer.state.global_step == 3 * BATCHES
    check_pruned(model, pruning, getattr(trainer.optimizer, "optimizer", trainer.optimizer))  # accelerate wraps it


@pytest.mark.integration
def test_trainer_resume_gives_the_same_masks(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")

    def train(folder: Path, resume: Path | None = None) -> Pruning:
        pruning = Pruning(sparsity=0.9, start=0, end=3, power=3)
        trainer = transformers.Trainer(model=tiny_bert(), args=trainer_args(folder, 4, save_strategy="epoch"),
                                       train_dataset=examples(), callbacks=[pruning])
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        return pruning

    whole = train(tmp_path / "whole")
    resumed = train(tmp_path / "resumed", tmp_path / "whole" / f"checkpoint-{2 * BATCHES}")
    assert all(torch.equal(resumed.masks[n], whole.masks[n]) for n in whole.masks)
    assert resumed.sparsity == whole.sparsity == 0.9


def test_missing_transformers_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "prunelab.integrations.huggingface")
    with pytest.raises(UserError, match=r"^prunelab.integrations.huggingface needs transformers: pip install "
                                        r"'prunelab\[huggingface\]'$"):
        importlib.import_module("prunelab.integrations.huggingface")
