"""The host polish (eplb.core.packing.polish) makes the torch polish's swaps bit for bit:
random states of the sizes it serves, ties, shared experts and move budgets."""

from __future__ import annotations

import sys

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb.core.packing.construct import construct
from eplb.core.packing.polish import MAX_MASKED_SEARCH, host_polish_applies
from eplb.core.packing.refine import Tracking
from eplb.core.packing.repair import repair_conflicts
from eplb.core.packing.state import EXPERT, make_items, round_robin

refine_module = sys.modules["eplb.core.packing.refine"]  # the package re-exports refine()
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def states(draw):
    """``(state [2, S, rows, P], steps)``: a constructed packing (or a round-robin deal,
    which may stack an expert's replicas on one GPU) of random loads, within the masked
    search size."""
    gpus = draw(st.integers(1, 24))
    slots = draw(st.integers(1, 6))
    rows = draw(st.integers(1, min(40, MAX_MASKED_SEARCH // (slots * slots * gpus))))
    experts = draw(st.integers(1, gpus * slots))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["lognormal", "ties", "few-values"]))
    if kind == "lognormal":
        per = np.exp(rng.normal(0, 1.5, (rows, gpus * slots)))
    elif kind == "ties":
        per = np.full((rows, gpus * slots), 3.0)
    else:
        per = rng.integers(1, 4, (rows, gpus * slots)).astype(float)
    # every expert gets a slot, the rest go to random experts (replica loads vary);
    # items heaviest first
    expert = np.concatenate([np.tile(np.arange(experts), (rows, 1)),
                             rng.integers(0, experts, (rows, gpus * slots - experts))], 1)
    order = np.argsort(-per, axis=1, kind="stable")
    load = np.take_along_axis(per, order, 1)
    expert = np.take_along_axis(expert, order, 1)
    items = make_items(torch.from_numpy(load), torch.from_numpy(expert))
    if draw(st.booleans()):
        state = repair_conflicts(construct(items, gpus))
    else:
        state = round_robin(items, gpus)
    return state, draw(st.integers(1, 20))


@given(states())
@SETTINGS
def test_host_polish_matches_torch(case):
    state, steps = case
    assert host_polish_applies(state)
    expected = refine_module._refine_max(state.clone(), steps, host=False)
    got = refine_module._refine_max(state.clone(), steps, host=True)
    assert torch.equal(expected, got)


@given(states(), st.integers(0, 8))
@SETTINGS
def test_host_polish_matches_torch_under_a_budget(case, allowance):
    state, steps = case
    _, _, rows, gpus = state.shape
    gen = torch.Generator().manual_seed(allowance)
    origin = state[EXPERT].clone()
    # some slots already moved, and each row a few more to spend
    moved = torch.rand(origin.shape, generator=gen) < 0.1
    origin[moved] = -1.0
    spent = (state[EXPERT] != origin).sum((0, 2))
    budget = spent + torch.randint(0, allowance + 1, (rows,), generator=gen)
    tracks = [Tracking(gpu=torch.arange(gpus, dtype=torch.float32).expand(rows, -1),
                       origin=origin, budget=budget) for _ in range(2)]
    expected = refine_module._refine_max(state.clone(), steps, tracks[0], host=False)
    got = refine_module._refine_max(state.clone(), steps, tracks[1], host=True)
    assert torch.equal(expected, got)


def test_larger_states_keep_the_torch_polish():
    big = torch.zeros(2, 5, 100, 32)  # 25 · 100 · 32 > MAX_MASKED_SEARCH entries
    assert not host_polish_applies(big)
    assert not host_polish_applies(torch.zeros(2, 2, 4, 4, dtype=torch.float64))
