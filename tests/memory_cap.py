"""Run a load of a hostile file in a child Python whose address space is capped.

A test of a decompression bomb must not be able to eat the machine when the
guard it tests is broken: the child sets ``RLIMIT_AS`` to its size after its
imports plus :data:`HEADROOM`, so an unbounded allocation fails the test with
a ``MemoryError`` (or torch's allocation error) instead.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# More than any refusal needs, far less than the multi-gigabyte bombs would take.
HEADROOM = 1 << 30

requires_proc = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="needs /proc/self/status (Linux)"
)

_CHILD = """
import resource
import sys
from pathlib import Path

{imports}
from prunelab.errors import UserError


def vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + {headroom}, hard))
try:
    {call}
except UserError as exc:
    print(exc)
    sys.exit(0)
sys.exit("no UserError was raised")
"""


def user_error_under_cap(imports: str, call: str, *args: str, timeout: float = 120) -> str:
    """The one-line UserError message that ``call`` raises in a memory-capped child.

    ``imports`` runs before the cap is set; ``call`` (one statement, which may
    use ``sys.argv[1:]`` = ``args``) runs under it. Fails the test if the child
    raises anything else, runs out of memory or ends without a UserError.
    """
    script = _CHILD.format(imports=textwrap.dedent(imports), call=call, headroom=HEADROOM)
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"child failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout.strip()
