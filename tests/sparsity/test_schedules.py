"""The polynomial schedule reproduces the seed's formula and reaches the target exactly."""

from __future__ import annotations

import pytest

from prunelab.sparsity.schedules import PolynomialSchedule


def test_seed_formula_per_epoch() -> None:
    # Seed 1: at the start of epoch e, s_e = min(s_f, s_f * (e + 1) / E_ramp); steps = epochs here.
    sched = PolynomialSchedule(initial=0.0, final=0.9, start=0, end=10, every=1)
    for e in range(10):
        assert sched.is_update(e)
        assert sched.sparsity_at(e) == pytest.approx(min(0.9, 0.9 * (e + 1) / 10))
    assert not sched.is_update(10)


def test_updates_every_n_steps_and_final_target() -> None:
    sched = PolynomialSchedule(initial=0.0, final=0.8, start=100, end=1000, every=250)
    updates = [t for t in range(1200) if sched.is_update(t)]
    assert updates == [100, 350, 600, 850]
    assert sched.sparsity_at(updates[-1]) == 0.8


def test_cubic_is_front_loaded() -> None:
    linear = PolynomialSchedule(0.0, 0.9, 0, 10, 1, power=1)
    cubic = PolynomialSchedule(0.0, 0.9, 0, 10, 1, power=3)
    assert cubic.sparsity_at(2) > linear.sparsity_at(2)
    assert cubic.sparsity_at(9) == linear.sparsity_at(9) == 0.9


def test_invalid_steps_rejected() -> None:
    with pytest.raises(ValueError):
        PolynomialSchedule(0.0, 0.9, 5, 5, 1)
