"""``python -m prunelab`` (and ``torchrun -m prunelab``) runs the command-line tool."""

import sys

from prunelab.cli import console

sys.exit(console())
