"""Sparsity schedules: when masks are updated during training and to what sparsity."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PolynomialSchedule:
    """s(t) = final + (initial - final) * (1 - progress)^power, updated every ``every`` steps.

    Updates happen at steps ``start, start + every, ...`` while ``< end``
    (steps counted from the start of the cycle). An update at step t already
    targets the sparsity of the end of its interval: progress =
    (t - start + every) / (end - start), so with per-epoch updates the first
    prune happens before the first batch at ``final * 1 / E_ramp`` and the
    target is reached at the start of the last ramp epoch (the seed's
    ``min(s_f, s_f * (e + 1) / E_ramp)`` for power 1 and initial 0).
    """

    initial: float
    final: float
    start: int
    end: int
    every: int
    power: float = 1.0

    def __post_init__(self) -> None:
        if self.every < 1 or self.end <= self.start or self.start < 0:
            raise ValueError(f"invalid schedule steps: start={self.start} end={self.end} every={self.every}")

    def is_update(self, step: int) -> bool:
        """Whether the mask is recomputed before the batch of ``step``."""
        return self.start <= step < self.end and (step - self.start) % self.every == 0

    def sparsity_at(self, step: int) -> float:
        """Target sparsity of the update at ``step`` (final once the ramp is over)."""
        progress = (step - self.start + self.every) / (self.end - self.start)
        progress = min(1.0, max(0.0, progress))
        return self.final + (self.initial - self.final) * (1.0 - progress) ** self.power


ITERATIVE_SCHEDULES = ("constant", "geometric", "hybrid")


def iterative_sparsities(target: float, schedule: str, steps: int, fraction: float, first: float) -> list[float]:
    """Sparsity after each pruning step of iterative pruning (docs/methods.md section 2); the last is ``target``.

    constant: step i of ``steps`` reaches target * i / steps (each prunes target/steps of ALL weights).
    geometric: each step removes ``fraction`` of the remaining weights; the
    first step that would pass the target stops exactly at it.
    hybrid: a first step to ``first * target``, then geometric steps of ``fraction``.
    """
    if schedule == "constant":
        return [target * i / steps for i in range(1, steps + 1)]
    if schedule not in ("geometric", "hybrid"):
        raise ValueError(f"unknown iterative schedule {schedule!r}")
    sparsities = [first * target] if schedule == "hybrid" else []
    density = 1.0 - (sparsities[-1] if sparsities else 0.0)
    while not sparsities or sparsities[-1] < target:
        density *= 1.0 - fraction
        reached = 1.0 - density >= target - 1e-12  # float round-off must not add an empty step
        sparsities.append(target if reached else 1.0 - density)
    return sparsities
