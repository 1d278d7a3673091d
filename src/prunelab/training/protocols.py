"""The interfaces the training engine is written against, with no implementation behind them.

They live apart from :mod:`prunelab.training.loop` so that modules the loop
itself imports (:mod:`prunelab.training.distributed`, the resume code) can
name them without importing the loop back.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

# Contravariant: a hook written for the full Trainer also serves wherever a StepHook[Trainer] is asked for.
TrainerT = TypeVar("TrainerT", contravariant=True)


class Checkpointer(Protocol):
    """Where a run's checkpoints live (the store implements it; training knows nothing of the store)."""

    def save(self, state: dict[str, Any]) -> None:
        """Keep ``state`` as the run's newest checkpoint."""
        ...

    def load(self) -> dict[str, Any] | None:
        """The newest intact checkpoint, or None when the run starts afresh."""
        ...


class StepHook(Protocol[TrainerT]):
    """Called around every optimizer step of a cycle (progressive pruning and dynamic sparse training are ones).

    A hook subclasses it explicitly to inherit the default of :meth:`after_backward`.

    Generic over the trainer it is handed, so this module need not import the
    trainer: :mod:`prunelab.training.loop` uses ``StepHook[Trainer]``.
    """

    def before_step(self, step: int, trainer: TrainerT) -> None:
        """Act before the batch of ``step`` (0-based over the cycle) is trained."""
        ...

    def after_backward(self, step: int, trainer: TrainerT) -> bool:
        """Act once the batch of ``step`` has its dense gradients, before they are masked.

        Returns True when the step's gradients were spent on changing the masks
        and the optimizer must not step (RigL's update steps). Default: nothing.
        """
        return False

    def state_dict(self) -> dict[str, Any]:
        """What the hook must remember across an interruption (checkpointed with the cycle). Default: nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned. Default: nothing to restore."""
        return None
