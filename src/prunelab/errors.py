"""The one exception type that means "the user asked for something we cannot do".

The CLI turns a :class:`UserError` into one sentence on stderr and a non-zero
exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input (names, values, files), told in one sentence.

    A ``ValueError``, so library callers can catch it as the usual bad-argument error.
    """
