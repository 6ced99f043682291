"""The locality policy planned from a map in force (``eplb.online.locality``): the map
kept where nothing pays, re-packed inside its nodes or re-planned where that pays; maps
of other origins get the locality plan; valid plans from old maps of every origin; the
traffic estimate by source node equals the per-GPU one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_contract
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb.core.dispatch import (
    coactivation,
    realised_gpu_loads,
    remote_nodes_by_node,
    remote_nodes_from_coactivation,
)
from eplb.core.locality import group_pair_surrogate, pair_stats, surrogate_pair_times
from eplb.online import Rebalancer

R, P, N, G, E, L = 64, 16, 4, 8, 48, 4
KW = {"policy": "locality", "dispatch": "nearest"}


def _loads(seed: int, drift: float = 0.0, base_seed: int = 0) -> torch.Tensor:
    """``[L, E]`` skewed integer loads (log-normal, σ 1.2), drifted by ``exp(drift·Z)``."""
    rng = np.random.default_rng(base_seed)
    w = np.exp(rng.normal(0, 1.2, (L, E))) * 1000
    if drift:
        w = w * np.exp(drift * np.random.default_rng(seed).normal(size=w.shape))
    return torch.from_numpy(np.rint(w) + 1)


def _layer_balance(weight: torch.Tensor, phy2log: torch.Tensor) -> torch.Tensor:
    """``[L]`` mean / max GPU load as SGLang's nearest rule realises it."""
    loads = realised_gpu_loads(weight.double(), phy2log, P, N, "nearest")
    return loads.mean(1) / loads.amax(1)


def _node_holdings(phy2log: torch.Tensor) -> torch.Tensor:
    """``[L, N, E]`` replicas of every expert on every node."""
    held = torch.zeros(phy2log.shape[0], N, E, dtype=torch.int64)
    node = (torch.arange(R) // (R // N)).expand_as(phy2log)
    held.view(phy2log.shape[0], -1).scatter_add_(1, node * E + phy2log, torch.ones_like(phy2log))
    return held


def _remote(weight: torch.Tensor, phy2log: torch.Tensor) -> torch.Tensor:
    freq, pair = group_pair_surrogate(weight.double(), G, 8, G // 2)
    return remote_nodes_by_node(phy2log, freq, lambda x: torch.bmm(pair, x), N)


def test_the_same_loads_keep_the_map():
    w = _loads(0)
    old = eplb.plan(w, R, P, N, G, **KW)
    new = eplb.plan(w, R, P, N, G, previous=old, **KW)
    assert torch.equal(new.phy2log, old.phy2log)


def test_drifted_loads_move_few_slots_each_paying_in_sample():
    """A drift of 0.05: the fresh locality plan moves most slots, the plan from the map
    keeps most of them; every layer it changes serves the window at hand better than the
    map in force, and a layer whose nodes keep their experts keeps its traffic."""
    w0, w1 = _loads(0), _loads(1, 0.05)
    old = eplb.plan(w0, R, P, N, G, **KW).phy2log
    new = eplb.plan(w1, R, P, N, G, previous=old, **KW)
    assert_contract(new)
    moved = (new.phy2log != old).float().mean()
    fresh = (eplb.plan(w1, R, P, N, G, **KW).phy2log != old).float().mean()
    assert moved < 0.5 * fresh, (moved, fresh)
    changed = (new.phy2log != old).any(1)
    assert changed.any()  # the drift leaves something worth moving
    gain = _layer_balance(w1, new.phy2log) - _layer_balance(w1, old)
    assert bool((gain[changed] > 0).all()), gain
    kept_nodes = (_node_holdings(new.phy2log) == _node_holdings(old)).flatten(1).all(1)
    assert torch.allclose(_remote(w1, new.phy2log)[kept_nodes], _remote(w1, old)[kept_nodes],
                          rtol=0, atol=1e-12)


@pytest.mark.parametrize("origin", ["global", "hierarchical", "vllm-initial"])
def test_a_map_of_another_origin_gets_the_locality_plan(origin):
    """A map planned without regard to traffic gets the fresh locality plan for its fewer
    remote nodes; vLLM's initial map (each group's experts on one node: few remote nodes
    under grouped routing, but never balanced) for its balance."""
    w0, w1 = _loads(0), _loads(1, 0.05)
    if origin == "vllm-initial":
        old = torch.arange(R).remainder(E).repeat(L, 1)
    else:
        dispatch = "nearest" if origin == "global" else "even"
        old = eplb.plan(w0, R, P, N, G, policy=origin, dispatch=dispatch).phy2log
    new = eplb.plan(w1, R, P, N, G, previous=old, **KW).phy2log
    fresh = eplb.plan(w1, R, P, N, G, **KW).phy2log
    assert torch.allclose(_remote(w1, new), _remote(w1, fresh), rtol=1e-9, atol=0)
    if origin == "vllm-initial":
        assert bool((_layer_balance(w1, new) > _layer_balance(w1, old)).all())
    else:
        assert _remote(w1, new).mean() < _remote(w1, old).mean()


def test_a_layer_without_load_keeps_the_map():
    """An idle layer (all-zero loads, planned as uniform) moves nothing, as under the
    other policies: its uniform surrogate's traffic took the fresh plan (47 of 64 slots
    moved, attacker pass); a map with empty slots there is only made valid."""
    w0 = _loads(0)
    old = eplb.plan(w0, R, P, N, G, **KW).phy2log
    w1 = _loads(1, 0.05)
    w1[1] = 0
    new = eplb.plan(w1, R, P, N, G, previous=old, **KW)
    assert torch.equal(new.phy2log[1], old[1])
    holed = old.clone()
    holed[1, :3] = -1
    again = eplb.plan(w1, R, P, N, G, previous=holed, **KW)
    assert_contract(again)
    assert torch.equal(again.phy2log[1, 3:], old[1, 3:])


def test_a_higher_move_price_moves_no_more():
    w0, w1 = _loads(0), _loads(2, 0.15)
    old = eplb.plan(w0, R, P, N, G, **KW).phy2log
    moved = [int((eplb.plan(w1, R, P, N, G, previous=old, move_price=price, **KW).phy2log
                  != old).sum()) for price in (0.0, 0.01, 0.05, 0.99)]
    assert moved == sorted(moved, reverse=True) and moved[0] > 0 and moved[-1] == 0, moved


def test_group_share_is_refused_where_it_changes_nothing():
    """The locality policy values its candidates under the nearest rule, each expert
    drifting alone: ``group_share`` was taken and changed no plan (attacker pass); the
    Rebalancer refuses it when made, as ``eplb.plan`` at the call."""
    w0, w1 = _loads(0), _loads(1, 0.05)
    old = eplb.plan(w0, R, P, N, G, **KW).phy2log
    with pytest.raises(ValueError, match=r"^group_share: with dispatch='nearest' the "
                                         r"locality policy values its moves"):
        eplb.plan(w1, R, P, N, G, previous=old, group_share=0.5, **KW)
    with pytest.raises(ValueError, match=r"^group_share: "):
        Rebalancer(R, P, N, G, window=4, interval=4, incremental=True, group_share=0.5,
                   **KW)
    Rebalancer(R, P, N, G, window=4, interval=4, incremental=True, move_price=0.05,
                    drift=0.1, **KW)


def test_a_move_budget_caps_the_plan_without_one():
    """``max_moves`` under the locality policy: a total or per-layer cap on the slots
    changed (the map in force is valid here, so nothing is forced), never a reason to
    move a layer more than without a budget; 0 keeps the map; the Rebalancer takes it
    too (it was refused: no budget)."""
    w0, w1 = _loads(0), _loads(2, 0.15)
    old = eplb.plan(w0, R, P, N, G, **KW).phy2log
    free = eplb.plan(w1, R, P, N, G, previous=old, **KW).phy2log
    free_moved = (free != old).sum(1)
    assert int(free_moved.sum()) > 8
    for total in (0, 3, 8, int(free_moved.sum()), 10**6):
        new = eplb.plan(w1, R, P, N, G, previous=old, max_moves=total, **KW)
        assert_contract(new)
        moved = (new.phy2log != old).sum(1)
        assert int(moved.sum()) <= total and bool((moved <= free_moved).all()), total
    assert torch.equal(eplb.plan(w1, R, P, N, G, previous=old, max_moves=0, **KW).phy2log, old)
    caps = [2, 0, 5, 1]
    capped = eplb.plan(w1, R, P, N, G, previous=old, max_moves=caps, **KW).phy2log
    assert bool(((capped != old).sum(1) <= torch.tensor(caps)).all())
    Rebalancer(R, P, N, G, window=4, interval=4, incremental=True, max_moves=4, **KW)


def test_a_budget_takes_the_traffic_cuts_first():
    """From a map planned by another policy the fresh locality plan pays on traffic in
    every layer: a total that affords some of them buys those whole, largest cut per slot
    first, rather than balance swaps elsewhere."""
    w0, w1 = _loads(0), _loads(1, 0.05)
    old = eplb.plan(w0, R, P, N, G, policy="global", dispatch="nearest").phy2log
    free = eplb.plan(w1, R, P, N, G, previous=old, **KW).phy2log
    per_layer = (free != old).sum(1)
    budget = int(per_layer.min()) + 1  # one layer's fresh plan fits, not two
    new = eplb.plan(w1, R, P, N, G, previous=old, max_moves=budget, **KW).phy2log
    whole = [layer for layer in range(L) if torch.equal(new[layer], free[layer])
             and per_layer[layer] > 0]
    assert len(whole) == 1 and int((new != old).sum()) <= budget


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    origin=st.sampled_from(["locality", "global-nearest", "hierarchical", "vllm-initial",
                            "random", "stacked"]),
    drift=st.floats(0.0, 1.0),
    routed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_old_maps_of_every_origin_give_valid_plans(origin, drift, routed, seed):
    rng = np.random.default_rng(seed)
    w0, w1 = _loads(seed % 997, 0.0, seed % 7), _loads(seed % 991, drift, seed % 7)
    # [64, L, 4] distinct top-4 ids per token
    routing = (torch.from_numpy(np.argsort(rng.random((64, L, E)), -1)[..., :4])
               if routed else None)
    if origin == "locality":
        old = eplb.plan(w0, R, P, N, G, routing=routing, **KW).phy2log
    elif origin == "global-nearest":
        old = eplb.plan(w0, R, P, N, G, policy="global", dispatch="nearest").phy2log
    elif origin == "hierarchical":
        old = eplb.plan(w0, R, P, N, G, policy="hierarchical").phy2log
    elif origin == "vllm-initial":
        old = torch.arange(R).remainder(E).repeat(L, 1)
    else:
        old = torch.from_numpy(rng.integers(0, E, (L, R)))
        if origin == "stacked":  # two replicas of one expert on GPU 0 of every layer
            old[:, 1] = old[:, 0]
    new = eplb.plan(w1, R, P, N, G, previous=old, routing=routing, **KW)
    again = eplb.plan(w1, R, P, N, G, previous=old, routing=routing, **KW)
    new.validate()
    assert_contract(new)
    assert torch.equal(new.phy2log, again.phy2log)  # deterministic
    assert (new.phy2log >= 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_remote_nodes_by_source_node_equal_the_per_gpu_estimate(seed):
    """On placements whose experts have one replica, several on one node, or replicas on
    other nodes (the fair choice), with a routing trace's co-selection."""
    rng = np.random.default_rng(seed)
    phy2log = torch.from_numpy(np.stack([rng.permutation(np.arange(R) % E) for _ in range(L)]))
    ids = torch.from_numpy(np.stack([np.stack([rng.choice(E, 4, replace=False)
                                               for _ in range(L)]) for _ in range(200)]))
    freq, pair = pair_stats(ids, E)
    by_node = remote_nodes_by_node(phy2log, freq, lambda x: torch.bmm(pair, x), N)
    per_gpu = remote_nodes_from_coactivation(phy2log, coactivation(ids, E), 200, P, N)
    assert torch.allclose(by_node, per_gpu, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("groups", "topk_groups"), [(1, None), (4, 2), (8, 4)])
def test_the_surrogate_product_equals_the_matrix_product(groups, topk_groups):
    gen = torch.Generator().manual_seed(groups)
    w = torch.rand(3, E, generator=gen, dtype=torch.float64) ** 3 * 100
    x = torch.rand(3, E, 5, generator=gen, dtype=torch.float64)
    _, pair = group_pair_surrogate(w, groups, 8, topk_groups)
    assert torch.allclose(surrogate_pair_times(w, groups, 8, topk_groups, x),
                          torch.bmm(pair, x), rtol=1e-12, atol=1e-12)
