"""The count builders that keep the first k of Jefferson's extra replicas and give the
rest to the coldest experts (``filler_counts`` for few slots per GPU, ``ladder_counts``
for nodes of few GPUs, ``layer_counts`` for a few experts filling whole layers of GPUs),
and the plans the documented few-slot cases get."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_contract
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb.core import balancedness_ceiling
from eplb.core.count_fillers import filler_counts, hot_counts, ladder_counts, layer_counts
from eplb.core.replication import cap_counts, replica_counts


@st.composite
def rows_and_slots(draw):
    experts = draw(st.integers(2, 12))
    gpus = draw(st.integers(2, 6))
    slots = draw(st.integers(1, 4))
    replicas = max(slots * gpus, experts)
    replicas += (-replicas) % gpus
    layers = draw(st.integers(1, 3))
    loads = draw(st.lists(st.integers(0, 50), min_size=layers * experts,
                          max_size=layers * experts))
    w = torch.tensor(loads, dtype=torch.float64).view(layers, experts)
    w[:, 0] += 1  # no all-idle row
    return w, replicas, gpus


@settings(max_examples=150, deadline=None)
@given(rows_and_slots())
def test_every_rung_and_filler_keeps_the_slots_and_the_cap(case):
    w, replicas, gpus = case
    experts = w.shape[1]
    jefferson = cap_counts(w, replica_counts(w, replicas, (0.0,))[0], gpus)
    for filled in (filler_counts(w, jefferson, gpus), layer_counts(w, jefferson, gpus)):
        assert (filled.sum(1) == replicas).all() and (filled >= 1).all()
        if gpus * experts >= replicas:
            assert (filled <= gpus).all()
    if replicas < gpus * experts:
        rungs = ladder_counts(w, replicas, gpus, 4)  # [K, rows, E]
        assert (rungs.sum(2) == replicas).all() and (rungs >= 1).all()
        assert (rungs <= gpus).all()
        # the last rung keeps every one of Jefferson's steps: Jefferson's capped counts
        assert torch.equal(rungs[-1], jefferson)
    tried, rows = hot_counts(w, jefferson, gpus)  # [n, E] for rows [n]
    if len(rows):
        assert (tried.sum(1) == replicas).all() and (tried >= 1).all()
        assert (tried <= gpus).all()
        hot = w[rows] > w[rows].sum(1, keepdim=True) / gpus
        assert (torch.where(hot, tried, 0).sum(1) == gpus).all()


def test_fillers_let_hot_experts_stay_whole():
    # filler_counts' own example: two hot experts on 8 GPUs of 3 slots, 14 idle ones.
    # Jefferson's 6 + 4 replicas are pieces just above half a GPU's mean load, paired on
    # two GPUs (0.64 of the ideal balance); 5 + 3 and two idle experts twice reach 0.9375
    # (every GPU one hot replica: 133.3 against a mean of 125)
    w = torch.zeros(1, 16, dtype=torch.float64)
    w[0, 0], w[0, 1] = 600.0, 400.0
    w[0, 2:] = 1e-3
    jefferson = cap_counts(w, replica_counts(w, 24, (0.0,))[0], 8)
    assert jefferson[0, :2].tolist() == [6, 4]
    filled = filler_counts(w, jefferson, 8)
    assert filled[0, :2].tolist() == [5, 3] and int(filled.sum()) == 24
    planned = eplb.plan(w, 24, 8)
    assert_contract(planned)
    assert planned.balancedness(w) >= 0.9375 - 1e-9


def test_ladder_counts_refuses_slots_its_counts_cannot_fill():
    # with R >= cap * E (or R < E) its counts summed to less than R, silently
    w = torch.ones(2, 4, dtype=torch.float64)
    for replicas, cap in ((6, 1), (8, 2), (3, 4)):
        with pytest.raises(ValueError, match="ladder_counts needs E <= R < cap"):
            ladder_counts(w, replicas, cap, 4)


@pytest.mark.parametrize(("experts", "slots", "hot"), [(4096, 3, 4), (1024, 5, 5)])
def test_a_few_dominant_experts_fill_whole_layers_of_gpus(experts, slots, hot):
    # 4 experts carrying nearly all the load on 4,096 GPUs of 3 slots: Jefferson's 2,049
    # replicas each are 8,196 pieces just below half a GPU's mean load, so four GPUs
    # carried three (0.668); 2,048 each fill two layers exactly. 5 of 1,024 experts on
    # 1,024 GPUs of 5 slots: 4,101 pieces, five GPUs carried five (0.801)
    w = torch.ones(1, experts, dtype=torch.float64)
    w[0, torch.linspace(7, experts - 1, hot).long()] = 1e6
    replicas = slots * experts
    jefferson = cap_counts(w, replica_counts(w, replicas, (0.0,))[0], experts)
    layered = layer_counts(w, jefferson, experts)
    assert int(layered.sum()) == replicas and (layered >= 1).all()
    heavy = layered[0][w[0] > 1]
    assert int(heavy.sum()) == (slots - 1) * experts and int(heavy.max() - heavy.min()) <= 1
    planned = eplb.plan(w, replicas, experts)
    assert_contract(planned)
    balance = planned.balancedness(w)
    assert balance > 0.999
    assert float(balancedness_ceiling(w, replicas, experts)) >= balance - 1e-12


@pytest.mark.parametrize(("experts", "slots", "hot", "load"),
                         [(4096, 3, 3, 1e3), (1024, 5, 3, 1e2)])
def test_a_few_hot_experts_fill_one_layer_of_gpus(experts, slots, hot, load):
    # 3 experts of 1,000 among 4,093 of load 1 on 4,096 GPUs of 3 slots: Jefferson's
    # 1,368 + 1,367 + 1,367 replicas (pieces of 0.731, below half the mean 1.732) put two
    # on six GPUs beside a cold half, and the divisor rule packed instead (1,251 each)
    # left two cold halves beside every hot piece (0.962); 4,096 hot pieces, one on every
    # GPU, reach 0.9995. 3 of 100 among 1,021 idle experts at 5 slots: 0.971 before
    w = torch.ones(1, experts)
    w[0, torch.linspace(3, experts - 1, hot).long()] = load
    _assert_plans_near_ideal(w, slots, experts)


def _assert_plans_near_ideal(w: torch.Tensor, slots: int, gpus: int) -> None:
    """``eplb.plan`` of ``w [1, E]`` on ``gpus`` GPUs of ``slots`` keeps the contract and
    balances above 0.997, never above the ceiling."""
    replicas = slots * gpus
    planned = eplb.plan(w, replicas, gpus)
    assert_contract(planned)
    balance = planned.balancedness(w)
    assert balance > 0.997
    assert float(balancedness_ceiling(w, replicas, gpus)) >= balance - 1e-12


@pytest.mark.parametrize(("experts", "slots", "hot"),
                         [(4096, 3, (3,)), (1024, 3, (1, 200, 500, 900))])
def test_hot_experts_get_one_replica_per_gpu(experts, slots, hot):
    # one expert of 100 among 4,095 of load 1 on 4,096 GPUs of 3 slots: Jefferson's 201
    # hot replicas left GPUs with a cold half and two thirds, 1.167 against a mean of
    # 1.024 (0.878); 4,096 hot pieces, one per GPU, reach 0.9998. Four of 100 among 1,024
    # experts: 0.950 before
    w = torch.ones(1, experts)
    w[0, list(hot)] = 100.0
    _assert_plans_near_ideal(w, slots, experts)
