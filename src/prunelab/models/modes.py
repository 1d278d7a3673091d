"""The one way to switch a model to eval mode for a block and back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode for the block, then restore each module's own flag.

    ``model.train(flag)`` afterwards would set every submodule alike; a model
    may hold a frozen submodule in eval mode on purpose, so each flag is kept.
    """
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags.items():
            module.training = training
