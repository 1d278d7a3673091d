"""The ``prunelab`` command line: :mod:`~prunelab.cli.parser` (arguments),
:mod:`~prunelab.cli.commands` (one function per subcommand),
:mod:`~prunelab.cli.output` (what is printed) and :mod:`~prunelab.cli.entry`
(errors and signals). The top layer: it may import every other.
"""

from prunelab.cli.entry import console, main
from prunelab.cli.parser import EXPORT_FORMATS, build_parser

__all__ = ["EXPORT_FORMATS", "build_parser", "console", "main"]
