"""The shape pruning may take: any weights (``unstructured``), whole channels (``channel``, see
:mod:`prunelab.sparsity.channels`) or at most N of every M weights (``N:M``).

N:M groups follow NVIDIA's sparse tensor cores (and their ASP library): M
consecutive weights along a tensor's input dimension (dim 1: a Linear's
input features, a convolution's input channels at each kernel position, a
recurrent or attention projection's inputs). A tensor whose input size is
not a multiple of M has no such groups; it must be left out of pruning
(``prune.exclude``) rather than silently kept dense, so that the achieved
sparsity is exactly ``1 - N/M``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from prunelab.errors import UserError

UNSTRUCTURED = "unstructured"
CHANNEL = "channel"
#: The largest M accepted: groups are sorted per step of the allocation, and hardware uses M <= 16.
MAX_GROUP = 256


@dataclass(frozen=True)
class NM:
    """At most ``n`` kept weights in every group of ``m`` consecutive input weights."""

    n: int
    m: int

    @property
    def density(self) -> float:
        """The fraction of weights an N:M mask keeps."""
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_structure(text: str) -> NM | None:
    """The :class:`NM` of ``"N:M"``; None for ``unstructured`` and ``channel``; a :class:`UserError` otherwise."""
    if text in (UNSTRUCTURED, CHANNEL):
        return None
    match = re.fullmatch(r"(\d{1,3}):(\d{1,3})", text)
    if match is None:
        raise UserError(f"prune.structure must be 'unstructured', 'channel' or N:M such as '2:4', got {text!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m <= MAX_GROUP:
        raise UserError(f"prune.structure {text!r} needs 0 < N < M <= {MAX_GROUP}")
    return NM(n, m)


def structure_kind(text: str) -> str:
    """``unstructured``, ``channel`` or ``N:M`` (the kind of an N:M setting such as ``2:4``)."""
    return "N:M" if parse_structure(text) is not None else text


def check_sparsity(nm: NM | None, sparsity: float, hint: str) -> None:
    """A :class:`UserError` when ``sparsity`` is not the ``1 - N/M`` that ``nm`` fixes (``hint`` says what to do)."""
    if nm is not None and abs(sparsity - (1 - nm.density)) > 1e-12:
        raise UserError(f"structure {nm} keeps {nm.n} of every {nm.m} weights, so its sparsity is "
                        f"{1 - nm.density:.4g}, not {sparsity}; {hint}")


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """``t``'s entries as rows of ``m`` consecutive input weights (a view's copy; see :func:`_ungroup`)."""
    return t.movedim(1, -1).reshape(-1, m)


def _ungroup(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    shape = like.movedim(1, -1).shape
    return groups.reshape(shape).movedim(-1, 1)


def ungroupable(shapes: Mapping[str, torch.Size], nm: NM) -> list[str]:
    """Names of the tensors that cannot be split into groups of ``nm.m`` input weights."""
    return [name for name, shape in shapes.items() if len(shape) < 2 or shape[1] % nm.m]


def check_groupable(shapes: Mapping[str, torch.Size], nm: NM, api: bool = False) -> None:
    """A :class:`UserError` naming the tensors whose input size is not a multiple of M, with the
    setting that leaves them out (``--set`` of the config, or the API's ``exclude=`` when ``api``)."""
    bad = ungroupable(shapes, nm)
    if bad:
        modules = [n.rsplit(".", 1)[0] for n in bad]
        fix = f"exclude={modules}" if api else f"--set 'prune.exclude=[{', '.join(modules)}]'"
        raise UserError(
            f"structure {nm} groups {nm.m} consecutive input weights, but the input size of "
            f"{', '.join(bad)} is not a multiple of {nm.m}; leave them out with {fix}"
        )


def nm_top(scores: torch.Tensor, nm: NM) -> torch.Tensor:
    """Boolean mask of the ``n`` highest scores in every group (ties to the lower index)."""
    groups = _groups(scores, nm.m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, : nm.n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, True)
    return _ungroup(keep, scores)


def check_nm(weights: Mapping[str, torch.Tensor], nm: NM) -> None:
    """Raise ``RuntimeError`` (a bug, not a user error) when any group holds more than ``n`` nonzero weights."""
    bad = nm_violations(weights, nm)
    if bad:
        raise RuntimeError(f"internal error: groups with more than {nm.n} of {nm.m} nonzero weights in "
                           + ", ".join(f"{name} ({count})" for name, count in bad.items()))


def nm_violations(weights: Mapping[str, torch.Tensor], nm: NM) -> dict[str, int]:
    """For each tensor with any, the number of groups holding more than ``n`` nonzero weights."""
    out = {}
    for name, w in weights.items():
        count = int(((_groups(w.detach(), nm.m) != 0).sum(1) > nm.n).sum())
        if count:
            out[name] = count
    return out
