"""The ``prunelab`` entry point: parse, run one command, turn every error into one sentence.

Every user error ends as one sentence on stderr and exit status 2; Ctrl-C
(and SIGTERM, SIGHUP) ends with 128 + the signal and says how to resume.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from prunelab.cli.commands import COMMANDS
from prunelab.cli.parser import build_parser
from prunelab.errors import Diverged, UserError
from prunelab.io import json_text


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled as Ctrl-C is (the run is marked interrupted and can resume)."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


@contextmanager
def _signals_interrupt(exiting: bool) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise once in the main thread; later ones are ignored while we clean up.

    A second Ctrl-C arriving during the cleanup of the first (marking the run
    interrupted, closing the index) would otherwise end in a traceback.
    ``exiting``: the process ends after the block (the console script), so
    once a signal came the later ones stay ignored through interpreter shutdown.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)

    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, handler) for signum in wanted}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, signal.SIG_IGN if fired and exiting else old)


def _fail(message: str, as_json: bool, status: str = "error", prefix: str = "error: ", **fields: Any) -> None:
    """One sentence on stderr and, with ``--json``, one JSON object as the last line of stdout."""
    print(f"prunelab: {prefix}{message}", file=sys.stderr, flush=True)
    if as_json:
        print(json_text({"status": status, "error": message, **fields}), flush=True)


def console() -> int:
    """Entry point of the ``prunelab`` console script and ``python -m prunelab``: :func:`main`, then exit."""
    return main(sys.argv[1:], exiting=True)


def main(argv: Sequence[str] | None = None, exiting: bool = False) -> int:
    """Run the ``prunelab`` command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    ``exiting``: the process ends right after (see :func:`console`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    with _signals_interrupt(exiting):
        try:
            return COMMANDS[args.command](args)
        except Diverged as exc:
            _fail(str(exc), as_json, "diverged", epoch=exc.epoch, step=exc.step)
            return 2
        except UserError as exc:
            _fail(str(exc), as_json)
            return 2
        except KeyboardInterrupt as exc:  # a RunInterrupted says which checkpoint is kept
            message = str(exc) or "interrupted; run the same command again to resume from the last checkpoint"
            code = 130
            cause = exc if isinstance(exc, Terminated) else exc.__context__
            if isinstance(cause, Terminated):
                code = 128 + cause.signum
                message = f"{signal.Signals(cause.signum).name}: {message}"
            _fail(message, as_json, "interrupted", prefix="")
            return code
