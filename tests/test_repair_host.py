"""The host repair (eplb.core.packing.repair._repair_host) makes the torch repair's
swaps bit for bit: random states full of anti-affinity conflicts, ties, experts with as
many replicas as GPUs, and rows that cannot be settled (re-dealt round-robin)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb.core.packing import repair as repair_module
from eplb.core.packing.repair import (
    MAX_HOST_REPAIR,
    MAX_HOST_TABLE,
    host_repair_applies,
    repair_conflicts,
)
from eplb.core.packing.state import EXPERT, make_items

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conflicted_states(draw):
    """``state [2, S, rows, P]``: random items dealt to random GPUs (``S`` each), so an
    expert's replicas often share a GPU; at most ``P`` replicas per expert unless
    ``crowded`` (then some rows cannot be made anti-affine)."""
    gpus = draw(st.integers(1, 12))
    slots = draw(st.integers(2, 20))
    rows = draw(st.integers(1, 12))
    crowded = draw(st.booleans())
    # at most P replicas of an expert need at least S experts; crowded rows may have more
    experts = draw(st.integers(1 if crowded else slots, slots * gpus))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["lognormal", "ties", "few-values"]))
    num_items = slots * gpus
    # every expert a slot, the rest to random experts, at most P each unless crowded
    expert = np.empty((rows, num_items), np.int64)
    for r in range(rows):
        extra = rng.integers(0, experts, num_items - experts)
        if not crowded:
            counts = np.bincount(extra, minlength=experts) + 1
            while counts.max() > gpus:
                over = counts.argmax()
                under = np.flatnonzero(counts < gpus)[0]
                counts[over] -= 1
                counts[under] += 1
            extra = np.repeat(np.arange(experts), counts - 1)
        expert[r] = rng.permutation(np.concatenate([np.arange(experts), extra]))
    if kind == "lognormal":
        per_expert = np.exp(rng.normal(0, 1.5, (rows, experts)))
    elif kind == "ties":
        per_expert = np.full((rows, experts), 3.0)
    else:
        per_expert = rng.integers(1, 4, (rows, experts)).astype(float)
    load = np.take_along_axis(per_expert, expert, 1)
    items = make_items(torch.from_numpy(load), torch.from_numpy(expert))
    state = items.view(2, rows, slots, gpus).transpose(1, 2).contiguous()  # [2, S, rows, P]
    shared = None
    if crowded:
        counts = np.stack([np.bincount(e, minlength=experts) for e in expert])
        shared = torch.from_numpy(counts.max(1) > gpus)
    suspects = None
    if draw(st.booleans()):
        suspects = torch.from_numpy(np.flatnonzero(rng.random(rows) < 0.7))
    return state, shared, suspects


def _repair(state, shared, suspects, host: bool, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(repair_module, "host_repair_applies", lambda sub: host)
        return repair_conflicts(state.clone(), shared, suspects)


@given(conflicted_states())
@SETTINGS
def test_host_repair_matches_torch(case):
    state, shared, suspects = case
    with pytest.MonkeyPatch.context() as monkeypatch:
        expected = _repair(state, shared, suspects, False, monkeypatch)
        got = _repair(state, shared, suspects, True, monkeypatch)
    assert torch.equal(expected, got)
    # anti-affine wherever the repair had to make it so
    ids = got[EXPERT]
    rows = range(ids.shape[1]) if suspects is None else suspects.tolist()
    for r in rows:
        if shared is not None and bool(shared[r]):
            continue
        for g in range(ids.shape[2]):
            column = ids[:, r, g]
            assert len(column.unique()) == len(column)


def test_which_repairs_run_on_the_host():
    assert host_repair_applies(torch.zeros(2, 17, 33, 8))
    assert not host_repair_applies(torch.zeros(2, 17, 33, 8, dtype=torch.float64))
    slots, gpus = 16, 64
    rows = MAX_HOST_REPAIR // (slots * slots * gpus) + 1
    assert not host_repair_applies(torch.zeros(2, slots, rows, gpus))
    # many expert ids on many GPUs: the table of replicas per (row, GPU, id) is too big
    wide = torch.zeros(2, 2, 1, 4096)
    wide[EXPERT, 0, 0, 0] = MAX_HOST_TABLE // 4096
    assert not host_repair_applies(wide)
    wide[EXPERT, 0, 0, 0] = MAX_HOST_TABLE // 4096 - 1
    assert host_repair_applies(wide)


@pytest.mark.parametrize("host", [True, False])
def test_a_stacked_previous_map_is_spread_by_swaps_not_redealt(host, monkeypatch):
    """A map in force with two experts stacked on each of two GPUs is made valid by one
    swap per stacked replica (at most 8 slots), whatever the budget. The repair once
    swapped GPU 0's stacked replica with GPU 1's first copy of its own stacked expert,
    kept GPU 1's flag on the copy that was no longer stacked, found no legal move for it
    and re-dealt the layer round-robin: 18-19 of 20 slots moved under max_moves=0."""
    import eplb

    monkeypatch.setattr(repair_module, "host_repair_applies", lambda sub: host)
    old = torch.tensor([[0, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11, 12, 13, 14, 15, 15]])
    for weight in (torch.zeros(1, 16), torch.ones(1, 16), torch.arange(1.0, 17.0)[None]):
        placement = eplb.plan(weight, 20, 2, previous=old, max_moves=0).validate()
        assert int(placement.moved_slots(old).sum()) <= 8
