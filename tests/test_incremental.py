"""Incremental rebalancing: ``previous=``, ``max_moves=``, ``skip_threshold=`` and
``rebalance_experts(..., old_phy2log=...)``."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_contract
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import eplb
from eplb.core.baselines import plan_greedy

L, E, P, S = 6, 32, 8, 5
R = P * S
TOPOLOGIES = [pytest.param("global", 1, 1, id="global"),
              pytest.param("hierarchical", 2, 4, id="hierarchical")]


def drifted(seed: int = 1, layers: int = L, experts: int = E, drift: float = 0.5
            ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.exp(torch.randn(layers, experts, generator=g, dtype=torch.float64) * 0.8)
    w1 = w0 * torch.exp(torch.randn(layers, experts, generator=g, dtype=torch.float64) * drift)
    return w0, w1


W0, W1 = drifted()


def old_plan(policy: str, nodes: int, groups: int) -> eplb.Placement:
    return eplb.plan(W0, R, P, nodes, groups, policy=policy)


@pytest.mark.parametrize(("policy", "nodes", "groups"), TOPOLOGIES)
def test_unlimited_incremental_is_valid_and_not_worse(policy, nodes, groups):
    old = old_plan(policy, nodes, groups)
    new = eplb.plan(W1, R, P, nodes, groups, policy=policy, previous=old)
    assert new.policy == policy
    new.validate()
    assert_contract(new)
    # never worse than keeping the old placement, and close to planning from scratch
    assert (new.layer_balancedness(W1) >= old.layer_balancedness(W1) - 1e-9).all()
    fresh = eplb.plan(W1, R, P, nodes, groups, policy=policy)
    assert new.balancedness(W1) >= fresh.balancedness(W1) - 2e-3


@pytest.mark.parametrize(("policy", "nodes", "groups"), TOPOLOGIES)
@pytest.mark.parametrize("budget", [0, 1, 5, 20, 60, 500])
def test_total_move_budget(policy, nodes, groups, budget):
    old = old_plan(policy, nodes, groups)
    new = eplb.plan(W1, R, P, nodes, groups, policy=policy, previous=old, max_moves=budget)
    new.validate()
    assert_contract(new)
    moved = new.moved_slots(old)
    assert int(moved.sum()) <= budget, moved.tolist()
    assert (new.layer_balancedness(W1) >= old.layer_balancedness(W1) - 1e-9).all()


@pytest.mark.parametrize(("policy", "nodes", "groups"), TOPOLOGIES)
def test_per_layer_move_budget(policy, nodes, groups):
    old = old_plan(policy, nodes, groups)
    budget = [0, 2, 4, 6, 8, 40]
    for given_as in (budget, torch.tensor(budget)):
        new = eplb.plan(W1, R, P, nodes, groups, policy=policy, previous=old, max_moves=given_as)
        new.validate()
        assert_contract(new)
        moved = new.moved_slots(old)
        assert (moved <= torch.tensor(budget)).all(), moved.tolist()
        assert int(moved[0]) == 0
        assert torch.equal(new.phy2log[0], old.phy2log[0])


@pytest.mark.parametrize(("policy", "nodes", "groups"), TOPOLOGIES)
def test_zero_budget_and_skip_threshold_keep_the_placement(policy, nodes, groups):
    old = old_plan(policy, nodes, groups)
    for kwargs in ({"max_moves": 0}, {"skip_threshold": 1.0}, {"max_moves": [0] * L}):
        new = eplb.plan(W1, R, P, nodes, groups, policy=policy, previous=old, **kwargs)
        for got, want in zip(new.as_tuple(), old.as_tuple(), strict=True):
            assert torch.equal(got, want), kwargs
        assert new.policy == policy
        assert int(new.moved_slots(old).sum()) == 0


def test_skip_threshold_only_touches_layers_that_gain_enough():
    old = old_plan("global", 1, 1)
    before = old.layer_balancedness(W1)
    new = eplb.plan(W1, R, P, previous=old, skip_threshold=0.05)
    assert_contract(new)
    moved = new.moved_slots(old)
    # a layer already within 5% of perfect balance gains < 5% by re-planning: it is skipped
    assert (moved[before >= 0.95 + 1e-9] == 0).all()
    assert int(moved.sum()) > 0  # the drift leaves layers worth fixing


@pytest.mark.parametrize(("policy", "nodes", "groups"), TOPOLOGIES)
def test_same_weight_moves_only_for_a_gain(policy, nodes, groups):
    # re-planning the same weight may only move a layer when that layer gains (the warm
    # start runs a further local search and sometimes finds one); with a skip threshold
    # above such gains nothing moves at all
    old = old_plan(policy, nodes, groups)
    new = eplb.plan(W0, R, P, nodes, groups, policy=policy, previous=old)
    assert_contract(new)
    moved = new.moved_slots(old)
    gain = new.layer_balancedness(W0) - old.layer_balancedness(W0)
    assert bool((gain[moved > 0] > 1e-4).all()), (moved, gain)
    assert bool((gain >= -1e-12).all())
    assert new.balancedness(W0) >= old.balancedness(W0) - 1e-9
    same = eplb.plan(W0, R, P, nodes, groups, policy=policy, previous=old, skip_threshold=0.01)
    assert int(same.moved_slots(old).sum()) == 0


def test_previous_as_placement_tensor_or_old_phy2log_agree():
    old = old_plan("global", 1, 1)
    a = eplb.plan(W1, R, P, previous=old, max_moves=12)
    b = eplb.plan(W1, R, P, previous=old.phy2log.clone(), max_moves=12)
    phy2log, log2phy, logcnt = eplb.rebalance_experts(W1, R, 1, 1, P, old_phy2log=old.phy2log,
                                                      max_moves=12)
    assert torch.equal(a.phy2log, b.phy2log)
    assert torch.equal(a.phy2log, phy2log)
    assert torch.equal(a.log2phy, log2phy) and torch.equal(a.logcnt, logcnt)
    assert int((phy2log != old.phy2log).sum()) <= 12


def test_one_layer_incremental():
    old = eplb.rebalance_experts(W0[2], R, 1, 1, P)[0]
    new, log2phy, logcnt = eplb.rebalance_experts(W1[2], R, 1, 1, P, old_phy2log=old, max_moves=4)
    assert new.shape == (R,) and logcnt.shape == (E,)
    assert int((new != old).sum()) <= 4
    assert_contract(eplb.Placement(new[None], log2phy[None], logcnt[None], eplb.Topology(R, P)))


def test_gpu_dies():
    old = old_plan("global", 1, 1)  # planned on the full cluster
    active = torch.ones(P, dtype=torch.bool)
    active[3] = False
    for budget in (None, 0, 3):
        new = eplb.plan(W1, R, P, previous=old, active_gpus=active, max_moves=budget,
                        policy="global")
        new.validate()
        assert_contract(new)
        assert (new.phy2log[:, 15:20] == -1).all()
        assert (new.logcnt >= 1).all() and (new.logcnt.sum(1) == R - S).all()
    # with a budget the other GPUs keep most of their experts
    kept = eplb.plan(W1, R, P, previous=old, active_gpus=active, max_moves=0, policy="global")
    assert int(kept.moved_slots(old).sum()) <= L * S * 2


def test_gpu_dies_under_hierarchical_topology():
    old = old_plan("hierarchical", 2, 4)
    active = torch.ones(P, dtype=torch.bool)
    active[6] = False
    with pytest.warns(RuntimeWarning, match="dead"):
        new = eplb.plan(W1, R, P, 2, 4, previous=old, active_gpus=active)
    assert new.policy == "global"
    new.validate()
    assert_contract(new)


def test_gpu_dies_after_a_hierarchical_plan_with_no_budget():
    """The old plan may stack two replicas of an expert on one GPU of its node (legal under
    the hierarchical rule); after a GPU dies the plan is global, where that is not legal."""
    w0, w1 = drifted(0, 2, 4, 0.0)
    old = eplb.plan(w0, 8, 4, 2, 4)
    assert old.policy == "hierarchical"
    active = torch.tensor([False, True, True, True])
    with pytest.warns(RuntimeWarning, match="dead"):
        new = eplb.plan(w1, 8, 4, 2, 4, previous=old, max_moves=0, active_gpus=active)
    new.validate()
    assert_contract(new)


def test_gpu_comes_back():
    active = torch.ones(P, dtype=torch.bool)
    active[0] = False
    old = eplb.plan(W0, R, P, active_gpus=active)
    for budget in (None, 0):
        new = eplb.plan(W1, R, P, previous=old, max_moves=budget)
        new.validate()
        assert_contract(new)
        assert (new.phy2log >= 0).all()


def test_incremental_with_zero_layer():
    w1 = W1.clone()
    w1[2] = 0
    old = old_plan("global", 1, 1)
    new = eplb.plan(w1, R, P, previous=old, max_moves=10)
    assert_contract(new)
    assert int(new.moved_slots(old).sum()) <= 10


def test_migrating_from_the_greedy_placement():
    """DeepSeek's greedy may put two replicas of an expert on one GPU; with no move budget
    the incremental plan must still honour eplb's contract (anti-affinity included)."""
    g = torch.Generator().manual_seed(0)
    w = torch.exp(torch.randn(4, 16, generator=g, dtype=torch.float64) * 1.2)
    old = plan_greedy(w, 24, 4, policy="global")
    with pytest.raises(eplb.PlacementError, match="anti-affinity"):
        old.validate()  # the premise: the greedy shares a GPU here
    new = eplb.plan(w, 24, 4, previous=old)
    new.validate()
    assert_contract(new)
    assert new.balancedness(w) >= old.balancedness(w) - 1e-9


# --------------------------------------------------------------------------- errors
def test_bad_previous():
    old = old_plan("global", 1, 1)
    with pytest.raises(ValueError, match=r"previous placement has shape \(6, 32\)"):
        eplb.plan(W1, R, P, previous=old.phy2log[:, :32])
    with pytest.raises(ValueError, match=r"previous placement has shape \(5, 40\)"):
        eplb.plan(W1, R, P, previous=old.phy2log[:5])
    bad = old.phy2log.clone()
    bad[0, 0] = E
    with pytest.raises(ValueError, match=r"outside \[-1, 32\)"):
        eplb.plan(W1, R, P, previous=bad)
    with pytest.raises(TypeError, match="integers"):
        eplb.plan(W1, R, P, previous=old.phy2log.double())


def test_bad_budget_arguments():
    old = old_plan("global", 1, 1)
    with pytest.raises(ValueError, match="max_moves must be >= 0"):
        eplb.plan(W1, R, P, previous=old, max_moves=-1)
    with pytest.raises(ValueError, match="6 non-negative ints"):
        eplb.plan(W1, R, P, previous=old, max_moves=[1, 2, 3])
    with pytest.raises(ValueError, match="need the previous placement"):
        eplb.plan(W1, R, P, max_moves=5)
    with pytest.raises(ValueError, match="need the previous placement"):
        eplb.plan(W1, R, P, skip_threshold=0.1)
    with pytest.raises(ValueError, match="skip_threshold must be >= 0"):
        eplb.plan(W1, R, P, previous=old, skip_threshold=-0.5)
    with pytest.raises(ValueError, match="gpu_speed cannot be combined with previous"):
        eplb.plan(W1, R, P, previous=old, gpu_speed=torch.ones(P))


# --------------------------------------------------------------------------- properties
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gpus=st.sampled_from([2, 4, 6, 8]),
    slots=st.integers(1, 5),
    layers=st.integers(1, 4),
    hierarchical=st.booleans(),
    drift=st.floats(0.0, 1.5),
    budget=st.one_of(st.none(), st.integers(0, 30)),
    kill=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_incremental_properties(gpus, slots, layers, hierarchical, drift, budget, kill, seed):
    nodes, groups = (2, 4) if hierarchical else (1, 1)
    replicas = gpus * slots
    live_slots = replicas - (slots if kill else 0)
    experts = (live_slots * 3 // 4) // groups * groups
    assume(experts >= 1)  # every expert needs a live slot
    w0, w1 = drifted(seed % 1000, layers, experts, drift)
    policy = "hierarchical" if hierarchical else "global"
    old = eplb.plan(w0, replicas, gpus, nodes, groups, policy=policy, seed=seed)
    active = None
    if kill:
        active = torch.ones(gpus, dtype=torch.bool)
        active[seed % gpus] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        new = eplb.plan(w1, replicas, gpus, nodes, groups, seed=seed, previous=old,
                        max_moves=budget, active_gpus=active)
    new.validate()
    assert_contract(new)
    if budget is not None and active is None:
        assert int(new.moved_slots(old).sum()) <= budget
    if active is None:
        assert (new.layer_balancedness(w1) >= old.layer_balancedness(w1) - 1e-9).all()
