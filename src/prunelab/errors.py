"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a :class:`UserError` into one sentence on stderr and a non-zero
exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input (names, values, files), told in one sentence.

    A ``ValueError``, so library callers can catch it as the usual bad-argument error.
    """


class BudgetTooSmall(UserError):
    """``train.budget`` leaves one of a method's cycles (or steps) less than one epoch.

    A single run stops with its sentence; a sweep skips that grid point and lists it in its plan.
    """


class Diverged(UserError):
    """Training produced a non-finite loss or weights: the run is stored as ``diverged``, not as a result."""

    def __init__(self, message: str, epoch: int | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
