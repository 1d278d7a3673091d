"""A tiny name -> builder registry with "did you mean" answers.

Models, datasets and methods each keep one :class:`Registry`. Registering is
done at import time by the module that defines the builder, so the set of
names is exactly the set of modules imported by the package.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from prunelab.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: the object and a one-line description."""

    name: str
    obj: T
    summary: str


class Registry(Generic[T]):
    """Maps names to objects; unknown names get an error naming the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, summary: str = "") -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (names are unique)."""

        def decorate(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, summary)
            return obj

        return decorate

    def get(self, name: str) -> T:
        """The object registered under ``name``; a :class:`UserError` otherwise."""
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        """The entry registered under ``name``; a :class:`UserError` otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        """One sentence: the name is unknown, maybe a near match, and the valid names."""
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(self.names())}"

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())
