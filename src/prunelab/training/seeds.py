"""Seeds derived from a run's seed and a name: stable across processes, platforms and resumes.

One derivation serves the whole run: the data order of every epoch and the
generators of the pruning criteria are all seeded from sha256 of
``prunelab/<seed>/<part>/<part>...``. Python's ``hash`` would not do (it is
salted per process), and neither would a shared global generator (its state
would depend on everything drawn before, which a resumed run does not redo).
"""

from __future__ import annotations

import hashlib
from typing import Literal

_LOW_63 = 0x7FFF_FFFF_FFFF_FFFF


def derive_seed(seed: int, *parts: object, keep: Literal["low", "high"] = "low") -> int:
    """A non-negative 63-bit seed for ``parts`` of the run seeded by ``seed``.

    The first 8 bytes of the sha256 of ``prunelab/<seed>/<part>/...`` are read
    as a little-endian integer, of which 63 bits are kept (so the seed fits a
    signed 64-bit integer whatever library takes it). ``keep`` chooses
    which 63: "low" (the epochs' data order) or "high" (the methods'
    generators). Both uses predate this function; each keeps its own choice
    so that the seeds, and with them every stored result, stay as they were.
    """
    text = "/".join(["prunelab", str(seed), *(str(p) for p in parts)])
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return value & _LOW_63 if keep == "low" else value >> 1

