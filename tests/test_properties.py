"""Property-based tests (hypothesis): the config parser and the mask allocation, on any input."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunelab.config.build import build_config, flatten, parse_set
from prunelab.config.identity import run_id, to_dict
from prunelab.errors import UserError
from prunelab.methods import METHODS
from prunelab.sparsity.allocate import ALLOCATIONS, allocate

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _raw_keys(method: str) -> list[str]:
    """The keys a user may set for ``method`` (``method.settings.x`` is written ``method.x``)."""
    keys = flatten(to_dict(build_config({"method": method})))
    return [k.replace("method.settings.", "method.") for k in keys]


KEYS = sorted({k for m in METHODS.names() for k in _raw_keys(m)} | {"method", "model", "dataset", "epochs"})
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["sgd", "adam", "cosine", "global", "erk", "lenet5", "dense", "0.5"]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=5), SCALARS, max_size=2))


@PROPERTY
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=15)), VALUES, max_size=6))
def test_any_config_mapping_is_a_config_or_one_sentence(raw: dict[str, object]) -> None:
    try:
        cfg = build_config(raw)
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message
        return
    assert run_id(cfg) == run_id(build_config(raw))  # deterministic
    assert len(run_id(cfg)) == 12


@PROPERTY
@given(st.sampled_from(METHODS.names()), st.data())
def test_explicit_defaults_never_change_the_run_id(method: str, data: st.DataObject) -> None:
    base = build_config({"method": method})
    defaults = {k.replace("method.settings.", "method."): v for k, v in flatten(to_dict(base)).items()}
    chosen = data.draw(st.lists(st.sampled_from(sorted(defaults)), unique=True, max_size=len(defaults)))
    explicit = build_config({"method": method} | {k: defaults[k] for k in chosen})
    assert explicit == base and run_id(explicit) == run_id(base)


@PROPERTY
@given(st.dictionaries(st.from_regex(r"[a-z][a-z_.]{0,15}", fullmatch=True), SCALARS, max_size=5))
def test_set_items_parse_back_to_their_yaml_values(values: dict[str, object]) -> None:
    items = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in values.items()]
    parsed = parse_set(items)
    assert set(parsed) == set(values)
    for key, value in values.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(parsed[key])  # type: ignore[arg-type]
        else:
            assert parsed[key] == value


@st.composite
def score_sets(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """1-4 tensors of 1-60 scores each, with ties (small integer pools), infinities and NaN."""
    pool = st.one_of(st.integers(-3, 3).map(float), st.floats(-1e6, 1e6, width=32),
                     st.sampled_from([math.inf, -math.inf, math.nan]))
    layers = draw(st.integers(1, 4))
    out = {}
    for i in range(layers):
        rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 10))
        out[f"layer{i}.weight"] = torch.tensor(draw(st.lists(pool, min_size=rows * cols, max_size=rows * cols)),
                                               dtype=torch.float32).reshape(rows, cols)
    return out


@PROPERTY
@given(score_sets(), st.floats(0.0, 1.0), st.sampled_from(ALLOCATIONS))
def test_allocation_keeps_the_exact_count_deterministically(
    scores: dict[str, torch.Tensor], density: float, scheme: str
) -> None:
    total = sum(s.numel() for s in scores.values())
    masks = allocate(scores, density, scheme)
    assert set(masks) == set(scores)
    assert all(m.dtype == torch.bool and m.shape == scores[n].shape for n, m in masks.items())
    assert sum(int(m.sum()) for m in masks.values()) == round(density * total)
    again = allocate({n: s.clone() for n, s in scores.items()}, density, scheme)
    assert all(torch.equal(masks[n], again[n]) for n in masks)


@PROPERTY
@given(score_sets(), st.floats(0.0, 1.0))
def test_global_allocation_keeps_the_highest_scores(scores: dict[str, torch.Tensor], density: float) -> None:
    masks = allocate(scores, density, "global")
    flat = torch.cat([torch.nan_to_num(s, nan=-math.inf).reshape(-1) for s in scores.values()])
    keep = torch.cat([masks[n].reshape(-1) for n in scores])
    if keep.any() and (~keep).any():
        assert flat[keep].min() >= flat[~keep].max()
        # Among equal scores at the threshold, the lower flat index is kept.
        threshold = flat[keep].min()
        tied = torch.nonzero(flat == threshold).reshape(-1)
        kept_tied = keep[tied]
        assert torch.equal(kept_tied, kept_tied.sort(descending=True).values)


@PROPERTY
@given(score_sets(), st.floats(0.05, 1.0), st.floats(0.0, 1.0), st.sampled_from(ALLOCATIONS))
def test_monotone_update_only_removes(
    scores: dict[str, torch.Tensor], first: float, second: float, scheme: str
) -> None:
    current = allocate(scores, first, scheme)
    active = sum(int(m.sum()) for m in current.values())
    total = sum(s.numel() for s in scores.values())
    masks = allocate(scores, min(second, first), scheme, current)
    assert all(not bool((masks[n] & ~current[n]).any()) for n in masks)  # nothing revived
    assert sum(int(m.sum()) for m in masks.values()) == min(round(min(second, first) * total), active)


@pytest.mark.parametrize("scheme", ALLOCATIONS)
def test_allocation_of_a_single_weight(scheme: str) -> None:
    scores = {"w": torch.tensor([[0.5]])}
    assert not allocate(scores, 0.4, scheme)["w"].item()
    assert allocate(scores, 0.6, scheme)["w"].item()
