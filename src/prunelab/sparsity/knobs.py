"""The settings of the criteria, each with its default written once (the original authors' values).

The criterion registry (:mod:`prunelab.sparsity.criteria`), the scoring
functions and the methods' settings dataclasses all take their defaults
and help texts from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Knob:
    """One setting of a criterion: its name, default and a help line."""

    name: str
    default: Any
    help: str

    def field(self, note: str = "") -> Any:
        """A dataclass field with this default and help (``note`` prefixes the help, e.g. ``grasp``)."""
        text = f"{note}: {self.help}" if note else self.help
        return dataclasses.field(default=self.default, metadata={"help": text})


BATCHES = Knob("batches", 8, "training batches the score is averaged over")
TEMPERATURE = Knob("temperature", 200.0, "softmax temperature on the logits (GraSP: 200)")
SAMPLES_PER_CLASS = Knob("samples_per_class", 10, "training images per class (GraSP: 10)")
ITERATIONS = Knob("iterations", 100, "pruning iterations, density d^(k/n) (SynFlow: 100)")
REINIT = Knob("reinit", False, "score on a copy whose Linear weights are redrawn (Xavier normal), "
              "as GraSP's code does; the mask applies to the real weights")
