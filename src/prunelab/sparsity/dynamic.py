"""Dynamic sparse training's parts: drop and regrow connections per layer, the drop-fraction
schedule, and the history of the masks (in-time over-parameterisation).

The methods ``set``, ``rigl`` and ``granet`` (:mod:`prunelab.methods.dynamic`)
are short programs over these; see docs/methods.md, section "Dynamic sparse
training". Counts are exact: in every layer, as many connections are regrown
as were dropped, so each layer's density (and the total) is unchanged by an
update. Ties are broken as in :mod:`~prunelab.sparsity.allocate`, towards the
lower index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from prunelab.sparsity.allocate import top_k_mask
from prunelab.sparsity.mask import Masks, count_total


def cosine_fraction(initial: float, step: int, end: int) -> float:
    """RigL's drop fraction at ``step``: initial / 2 * (1 + cos(pi * step / end)); 0 from ``end`` on."""
    if step >= end:
        return 0.0
    return initial / 2 * (1 + math.cos(math.pi * step / end))


def drop_and_grow(
    weights: Mapping[str, torch.Tensor],
    masks: Masks,
    fraction: float,
    grow_scores: Mapping[str, torch.Tensor],
    round_up: bool = False,
) -> tuple[Masks, int]:
    """New masks after dropping and regrowing ``fraction`` of each layer's active connections.

    In each layer, n = floor(fraction x active) (``round_up``: ceil, as
    GraNet's code counts) connections go: the active
    ones of smallest |weight|. As many come back: the positions outside the
    remaining mask with the highest ``grow_scores`` (|dense gradient| for
    RigL and GraNet, random for SET). A connection dropped may be chosen again
    in the same update (RigL does the same); it then keeps its value.
    Returns the masks and how many connections were newly activated.
    """
    new: Masks = {}
    grown = 0
    for name, mask in masks.items():
        active = int(mask.sum())
        n = min(active, (math.ceil if round_up else math.floor)(fraction * active))
        if n == 0:
            new[name] = mask.clone()
            continue
        magnitude = torch.where(mask, weights[name].detach().abs().float(), torch.full_like(mask, -math.inf,
                                                                                            dtype=torch.float32))
        kept = top_k_mask(magnitude, active - n)
        score = grow_scores[name].detach().float()
        candidates = torch.where(kept, torch.full_like(score, -math.inf), torch.nan_to_num(score, nan=-math.inf))
        new[name] = kept | top_k_mask(candidates, n)
        grown += int((new[name] & ~mask).sum())
    return new, grown


class MaskHistory:
    """Which connections were ever trained, and how many were (re)activated after the start.

    The in-time over-parameterisation rate (Liu et al. 2021) is the fraction
    of prunable weights active in at least one training step. A mask set
    counts once a step's forward pass has run under it (masks installed
    before training starts, as a pruning-at-initialisation mask replaces the
    dense start, do not count); :meth:`pretrained` counts the current (dense)
    masks for a run that starts from a stored dense network.
    """

    def __init__(self, masks: Masks) -> None:
        self.current = {n: m.clone() for n, m in masks.items()}
        self.ever = {n: torch.zeros_like(m) for n, m in masks.items()}
        self.moved = 0
        self._trained = False

    def installed(self, masks: Masks) -> None:
        """New masks are in force: keep the old ones if they were trained; count the connections that came in."""
        self._settle()
        self.moved += sum(int((masks[n] & ~self.current[n]).sum()) for n in masks)
        self.current = {n: m.clone() for n, m in masks.items()}

    def stepped(self) -> None:
        """A training step runs under the current masks."""
        self._trained = True

    def pretrained(self) -> None:
        """The current (dense) masks were trained, in the stored dense run this run starts from."""
        self._trained = True

    def _settle(self) -> None:
        if self._trained:
            for n, m in self.current.items():
                self.ever[n] |= m
            self._trained = False

    def itop_rate(self) -> float:
        """Fraction of the prunable weights that were active in at least one training step."""
        self._settle()
        total = count_total(self.ever)
        return sum(int(m.sum()) for m in self.ever.values()) / total if total else 0.0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (the masks in force are checkpointed separately)."""
        return {"ever": {n: m.clone() for n, m in self.ever.items()}, "moved": self.moved,
                "trained": self._trained}

    def load_state_dict(self, state: Mapping[str, Any], masks: Masks) -> None:
        """Continue from a checkpoint whose masks in force are ``masks``."""
        self.ever = {n: state["ever"][n].to(masks[n].device) for n in masks}
        self.moved = int(state["moved"])
        self._trained = bool(state["trained"])
        self.current = {n: m.clone() for n, m in masks.items()}
