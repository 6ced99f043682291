"""``eplb.core.ordering.argsort_rows`` and ``sort_integers``: the NumPy fast paths give
torch's stable order."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from eplb.core.ordering import argsort_rows, sort_integers


def reference(keys: torch.Tensor, descending: bool) -> torch.Tensor:
    if keys.is_floating_point():
        keys = keys.to(torch.float32) + 0.0
    return torch.sort(keys, dim=1, descending=descending, stable=True).indices


@settings(max_examples=60, deadline=None)
@given(
    values=arrays(
        "float64",
        st.tuples(st.integers(1, 6), st.integers(1, 300)),
        elements=st.sampled_from([0.0, -0.0, 1.0, 2.5, 1e-30, 3e30, 7.0]) | st.floats(0, 1e6),
    ),
    descending=st.booleans(),
)
def test_floats_match_torch_stable_sort(values, descending):
    keys = torch.from_numpy(values)
    assert torch.equal(argsort_rows(keys, descending), reference(keys, descending))


@settings(max_examples=60, deadline=None)
@given(
    values=arrays(
        "int64",
        st.tuples(st.integers(1, 6), st.integers(1, 300)),
        elements=st.integers(0, 2**32 - 1) | st.integers(0, 5),
    ),
    descending=st.booleans(),
)
def test_integers_match_torch_stable_sort(values, descending):
    keys = torch.from_numpy(values)
    assert torch.equal(argsort_rows(keys, descending), reference(keys, descending))


def test_long_rows_fall_back_to_torch():
    keys = torch.randint(0, 3, (2, (1 << 16) + 5))
    assert torch.equal(argsort_rows(keys), reference(keys, False))


@settings(max_examples=60, deadline=None)
@given(
    values=arrays(
        "float64",
        st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 40)),
        # ties, zeros, and values on both sides of the packed path's limit (2**47)
        elements=st.integers(0, 5) | st.integers(0, 2**53) | st.sampled_from([2**47 - 1, 2**47])
        | st.floats(0, 10),  # fractions take torch's sort
    ),
)
def test_sort_integers_matches_torch_stable_sort(values):
    keys = torch.from_numpy(values)
    ordered, order = sort_integers(keys)
    expected = torch.sort(keys, dim=-1, stable=True)
    assert torch.equal(order, expected.indices)
    assert torch.equal(ordered, expected.values)
