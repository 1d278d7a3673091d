"""Progressive (or one-shot) pruning inside a Hugging Face ``transformers.Trainer``: the :class:`Pruning` callback.

::

    from prunelab.integrations.huggingface import Pruning

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[Pruning(sparsity=0.9, start=0, end=2)])
    trainer.train()

The masks and the step count are saved in every checkpoint folder's ``trainer_state.json``
(bit-packed and compressed, about 1/8 byte per prunable weight or less), so
``trainer.train(resume_from_checkpoint=...)`` resumes with the same masks, wherever the
folder has been moved.
"""

from __future__ import annotations

import base64
import binascii
import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from prunelab.errors import UserError
from prunelab.integrations._pruning import PruningCallback

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import ExportableState
except ImportError as error:  # the framework is an optional extra
    raise UserError("prunelab.integrations.huggingface needs transformers: "
                    "pip install 'prunelab[huggingface]'") from error

_SAVED = "saved_pruning"  # the attribute under which trainer_state.json keeps the masks


class Pruning(PruningCallback, TrainerCallback, ExportableState):
    """A ``TrainerCallback`` that prunes the Trainer's model as :class:`prunelab.ProgressivePruner` does.

    Arguments are those of ``ProgressivePruner`` (``sparsity``, ``start``, ``end`` in epochs,
    ``power``, ``initial_sparsity``, ``every``, ``scope``, ``exclude``, ``embeddings``,
    ``structure``) and ``steps_per_epoch``; start == end prunes once and keeps the masks.
    Steps per epoch are the Trainer's optimizer steps in an epoch,
    ``ceil(len(train_dataloader) / gradient_accumulation_steps)``, unless ``steps_per_epoch`` is
    given (needed for data without a length). Linear weights are pruned, embedding tables are
    not (``embeddings=True`` prunes them too). Pruning starts in ``on_train_begin`` (after a
    checkpoint has been restored) and follows ``state.global_step`` at every step's end; pruned
    weights and their optimizer state are exactly 0 after every optimizer step. ``masks`` and
    ``sparsity`` read the current masks. With ``restore_callback_states_from_checkpoint=True`` the
    Trainer replaces this object by a copy on resume: read the masks from the copy in
    ``trainer.callback_handler.callbacks`` then.
    """

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        """Start pruning: from the checkpoint's masks when resuming, else by the schedule's first step."""
        model, optimizer, loader = kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("train_dataloader")
        if model is None or optimizer is None:
            raise UserError("Pruning needs the Trainer's model and optimizer when training begins")
        if state.global_step > 0:
            self.pruning.load_state_dict(unpack(_saved_entry(state)))
        batches = len(loader) if loader is not None and hasattr(loader, "__len__") else math.inf
        self.pruning.begin(model, _unwrapped(optimizer), state.global_step, batches,
                           args.gradient_accumulation_steps)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """Count the optimizer step just made; update the masks on schedule."""
        self.pruning.follow(state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        """Detach the gradient hooks (the zeros and the masks stay)."""
        self.pruning.close()

    def state(self) -> dict[str, Any]:
        """What the Trainer writes to ``trainer_state.json``: the settings, the step count and packed masks."""
        return {"args": self.settings.as_kwargs(), "attributes": {_SAVED: pack(self.pruning.state_dict())}}


def _saved_entry(state: TrainerState) -> Mapping[str, Any]:
    """The packed pruning state in a resumed ``trainer_state.json`` (empty if it has none)."""
    entry = (state.stateful_callbacks or {}).get(Pruning.__name__, {})
    if isinstance(entry, list):
        raise UserError("a Trainer can run one Pruning callback, the checkpoint has several")
    return dict(entry.get("attributes", {}).get(_SAVED) or {})


def _unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper, whose state holds the moments to zero."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def pack(state: Mapping[str, Any]) -> dict[str, Any]:
    """A pruner's :meth:`~prunelab.ProgressivePruner.state_dict` as JSON values: masks as compressed bits."""
    if not state:
        return {}
    masks = {}
    for name, mask in state["masks"].items():
        bits = np.packbits(mask.detach().cpu().numpy().astype(bool).ravel())
        masks[name] = {"shape": list(mask.shape),
                       "bits": base64.b64encode(zlib.compress(bits.tobytes())).decode("ascii")}
    return {"steps": int(state["steps"]), "masks": masks}


def unpack(saved: Mapping[str, Any]) -> dict[str, Any]:
    """Undo :func:`pack`; a :class:`UserError` if the saved masks are damaged."""
    if not saved:
        return {}
    masks = {}
    try:
        for name, entry in saved["masks"].items():
            shape = tuple(int(n) for n in entry["shape"])
            raw = np.frombuffer(zlib.decompress(base64.b64decode(entry["bits"])), dtype=np.uint8)
            if raw.size != math.ceil(math.prod(shape) / 8):  # unpackbits would pad a short one with zeros
                raise ValueError(f"{name} has {raw.size} bytes of bits for shape {list(shape)}")
            bits = np.unpackbits(raw, count=math.prod(shape))
            masks[name] = torch.from_numpy(bits.astype(bool)).reshape(shape)
        return {"steps": int(saved["steps"]), "masks": masks}
    except (KeyError, TypeError, ValueError, RuntimeError, zlib.error, binascii.Error) as error:
        raise UserError(f"the pruning masks in the checkpoint's trainer_state.json are damaged ({error})") from error
