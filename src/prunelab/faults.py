"""Deliberate faults at named points, for the reliability tests (``docs/reliability.md``).

Set ``PRUNELAB_FAULT=ACTION:POINT:N`` in a process's environment and the
N-th time that process reaches ``POINT`` it suffers ``ACTION``:

- ``kill``: SIGKILL itself (a crash: no cleanup, no ``finally``);
- ``sigint``: send itself SIGINT (Ctrl-C);
- ``enospc``: raise ``OSError(ENOSPC)`` (the disk is full).

Points: ``step`` (before each training step), ``mask`` (right after a mask
update), ``checkpoint`` (half-way through writing a checkpoint file),
``store`` (after a finished run's files are written, before its index row is).
Without the variable, :func:`fault_point` is one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "PRUNELAB_FAULT"
ACTIONS = ("kill", "sigint", "enospc")
POINTS = ("step", "mask", "checkpoint", "store")

# Per-process visit counts; only read when the variable is set (tests only).
_visits: dict[str, int] = {}


def fault_point(point: str) -> None:
    """Suffer the fault ``PRUNELAB_FAULT`` asks for, if it names this point and visit."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, target, count = _parse(spec)
    if target != point:
        return
    _visits[point] = _visits.get(point, 0) + 1
    if _visits[point] != count:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
    else:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _parse(spec: str) -> tuple[str, str, int]:
    action, _, rest = spec.partition(":")
    point, _, count = rest.partition(":")
    if action not in ACTIONS or point not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ENV} must be ACTION:POINT:N with ACTION in {ACTIONS} and POINT in {POINTS}, got {spec!r}")
    return action, point, int(count)
