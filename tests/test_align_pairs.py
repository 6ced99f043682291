"""Relabelling a fresh plan onto the map in force with two slots per GPU
(``eplb.online.align.match_pair_blocks``): as many experts kept in place as the
assignment problem keeps, with every GPU used once."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from eplb.online.align import _overlap, match_pair_blocks


@st.composite
def layouts(draw) -> tuple[np.ndarray, np.ndarray, int]:
    """``(new, old, E)``: ``[B, n, 2]`` blocks of expert ids (-1: empty); ``old`` often a
    shuffled, partly changed copy of ``new`` (as a drifted plan is)."""
    rows, blocks = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    experts = draw(st.integers(1, 2 * blocks + 2))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    new = rng.integers(-1, experts, size=(rows, blocks, 2))
    if draw(st.booleans()):
        old = rng.permuted(new.reshape(rows, -1), axis=1).reshape(rows, blocks, 2)
        changed = rng.random(old.shape) < draw(st.sampled_from([0.0, 0.2, 0.6]))
        old = np.where(changed, rng.integers(-1, experts, size=old.shape), old)
    else:
        old = rng.integers(-1, experts, size=(rows, blocks, 2))
    return new, old, experts


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_pair_matching_keeps_as_many_as_the_assignment_problem(case) -> None:
    new, old, experts = case
    matched = match_pair_blocks(new, old, experts)
    rows, blocks, _ = new.shape
    assert (np.sort(matched, 1) == np.arange(blocks)).all()  # a permutation per row
    common = _overlap(new, old, experts, small=False)  # experts in common, as sets
    for row in range(rows):
        new_idx, old_idx = linear_sum_assignment(common[row], maximize=True)
        best = common[row][new_idx, old_idx].sum()
        assert common[row][np.arange(blocks), matched[row]].sum() == best
