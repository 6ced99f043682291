"""Rebalancer checks: what it refuses at construction (option values, clusters it cannot
plan, counts its history cannot hold, combinations it cannot serve, GPU speeds it would
drop, an invalid initial placement) and at the first step, and what it takes or leaves
to the first plan.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_online import _DEAD, E, L, P, R

from eplb import Placement, Topology, plan
from eplb.online import Rebalancer, make_planner


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"incremental": True, "max_moves": -1}, "max_moves must be a non-negative int"),
        ({"incremental": True, "max_moves": 2.5}, "max_moves must be a non-negative int"),
        ({"max_moves": 5}, "pass incremental=True"),
        ({"skip_threshold": 0.01}, "pass incremental=True"),
        # (taken and ignored: every plan without incremental is fresh, and eplb.plan refuses
        # them without previous=)
        ({"move_price": 0.3}, "move_price: only for incremental plans"),
        ({"drift": 0.1, "group_share": 0.2}, "drift, group_share: only for incremental"),
        ({"incremental": True, "skip_threshold": -1.0}, "skip_threshold must be a fraction"),
        ({"incremental": "yes"}, "incremental must be True or False"),
        ({"polcy": "global"}, "does not take polcy"),
        ({"planner": "greedy", "seed": 1}, "'greedy' does not take seed"),
        ({"planner": "none", "policy": "global"}, "'none' does not take policy"),
        ({"move_price": 2.0}, "move_price must be a number in"),
        ({"active_gpus": [True, False]}, "active_gpus"),
    ],
)
def test_mistakes_surface_at_construction(kwargs: dict, match: str) -> None:
    """Not at the first rebalance, thousands of steps into serving."""
    with pytest.raises((ValueError, TypeError), match=match):
        Rebalancer(R, P, **kwargs)


def test_bad_inputs_raise() -> None:
    reb = Rebalancer(R, P, window=4, interval=4, planner="none")
    with pytest.raises(ValueError, match="no steps recorded"):
        reb.rebalance_now()
    with pytest.raises(ValueError, match="dimensions"):
        reb.record(torch.zeros(2, 2, 2, 2))
    reb.record(torch.zeros(L, E))
    with pytest.raises(ValueError, match="earlier steps had"):
        reb.record(torch.zeros(L, E + 1))
    with pytest.raises(ValueError, match=">= 0"):
        reb.record(-torch.ones(L, E))
    with pytest.raises(ValueError, match="window"):
        Rebalancer(R, P, window=0)
    with pytest.raises(ValueError, match="unknown planner 'magic'"):
        Rebalancer(R, P, planner="magic")
    with pytest.raises(ValueError, match="accepted specs"):
        Rebalancer(R, P, estimator="median")
    with pytest.raises(ValueError, match="need planner 'eplb'"):
        Rebalancer(R, P, planner="greedy", incremental=True)
    with pytest.raises(ValueError, match="multiple of num_gpus"):
        Rebalancer(10, 4)


@pytest.mark.parametrize("option", [
    {"policy": "bogus"}, {"seed": "x"}, {"dispatch": "bogus"}, {"slack": -1}, {"fair": "zzz"},
    {"num_candidates": 0}, {"options": "x"}, {"gpu_speed": [0] * 4},
    {"routing": torch.zeros(3, 4)}, {"move_price": 2.0}, {"group_share": -0.5},
])
def test_rebalancer_refuses_bad_option_values_at_construction(option):
    with pytest.raises((ValueError, TypeError)):
        Rebalancer(16, 4, window=4, interval=4, **option)


@pytest.mark.parametrize(("cluster", "option", "match"), [
    ((16, 4, 2, 1), {"policy": "hierarchical"}, r"num_groups \(1\) is not a multiple of num_nodes"),
    ((16, 4, 1, 2), {"policy": "hierarchical", "active_gpus": _DEAD}, "some GPUs are dead"),
    ((16, 4, 2, 2), {"policy": "hierarchical", "gpu_speed": [1, 1, 2, 2]}, "GPU speeds differ"),
    ((16, 4, 1, 1), {"policy": "locality", "dispatch": "nearest"}, "needs num_nodes > 1"),
    ((16, 4, 2, 2), {"policy": "locality", "dispatch": "nearest", "active_gpus": _DEAD},
     "dead GPUs are not supported by the locality policy"),
    ((16, 4, 2, 2), {"dispatch": "nearest", "gpu_speed": [1, 1, 2, 2]},
     "gpu_speed cannot be combined with dispatch='nearest'"),
    ((16, 4, 2, 2), {"dispatch": "nearest", "policy": "global", "incremental": True,
                     "skip_threshold": 0.01}, "skip_threshold is not supported"),
])
def test_rebalancer_refuses_what_its_cluster_cannot_plan_at_construction(
        cluster, option, match) -> None:
    # each was refused only at the first rebalance (interval steps into serving), though
    # the cluster, the dead GPUs and the speeds are known when the rebalancer is built
    with pytest.raises(ValueError, match=match):
        Rebalancer(*cluster, window=2, interval=2, **option)


def test_rebalancer_takes_skip_threshold_under_nearest_dispatch_on_one_node() -> None:
    # eplb.plan honours skip_threshold under dispatch="nearest" on one node (the even
    # split's planner takes it); the Rebalancer refused it at construction (attacker pass)
    torch.manual_seed(0)
    first = torch.randint(1, 100, (3, 16)).float()
    later = first * torch.exp(torch.randn(3, 16))
    rb = Rebalancer(24, 8, window=1, interval=1, incremental=True, skip_threshold=0.5,
                    dispatch="nearest")
    rb.record(first)
    rb.record(later)
    expected = plan(later, 24, 8, dispatch="nearest", skip_threshold=0.5,
                    previous=plan(first, 24, 8, dispatch="nearest"))
    assert torch.equal(rb.placement.phy2log, expected.phy2log)
    with pytest.raises(ValueError, match="skip_threshold is not supported"):
        Rebalancer(24, 8, incremental=True, skip_threshold=0.5, dispatch="nearest",
                   fair="divide")  # as eplb.plan refuses it there


def test_rebalancer_leaves_what_depends_on_the_experts_to_the_first_plan() -> None:
    # 7 experts do not split into 2 groups: known only from the counts
    rb = Rebalancer(16, 4, 2, 2, window=1, interval=1, policy="hierarchical")
    with pytest.raises(ValueError, match=r"num_experts \(7\) is not a multiple"):
        rb.record(torch.ones(2, 7))
    assert rb.record(torch.ones(2, 8)) is not None


def test_rebalancer_refuses_counts_its_history_cannot_hold():
    rb = Rebalancer(16, 4, window=4, interval=4)
    huge = torch.ones(2, 8, dtype=torch.float64)
    huge[0, 0] = 1e39  # finite in float64, inf in the float32 history
    with pytest.raises(ValueError, match="beyond what the history keeps"):
        rb.record(huge)
    # and at the other end: counts that float32 rounds to zeros (an attacker pass: they
    # were planned as zeros, silently)
    with pytest.raises(ValueError, match="below what the history keeps"):
        rb.record(torch.full((2, 8), 1e-300, dtype=torch.float64))
    assert rb.steps == 0
    for _ in range(8):  # not wedged: later steps rebalance on schedule
        rb.record(torch.ones(2, 8))
    assert rb.steps == 8 and len(rb.events) == 2
    with pytest.raises(ValueError, match="robust z"):
        Rebalancer(16, 4, window=4, interval=4, estimator="robust:1e308")


def test_rebalancer_refuses_combinations_and_histories_it_cannot_serve():
    with pytest.raises(ValueError, match="nearest dispatch"):
        Rebalancer(16, 4, window=4, interval=4, policy="locality")
    with pytest.raises(ValueError, match="max_moves with dispatch='nearest'"):
        Rebalancer(32, 8, 2, 4, window=4, interval=4, dispatch="nearest", incremental=True,
                   max_moves=10)  # auto is hierarchical here
    with pytest.raises(ValueError, match=r"^move_price: with dispatch='nearest' the "
                                         r"hierarchical policy re-plans"):
        # that plan scores no moves: the price changed nothing (as eplb.plan refuses it)
        Rebalancer(32, 8, 2, 4, window=4, interval=4, dispatch="nearest", incremental=True,
                   move_price=0.05)
    Rebalancer(32, 8, 2, 4, window=4, interval=4, dispatch="nearest", incremental=True,
               move_price=0.05, policy="global")
    with pytest.raises(ValueError, match="ema half-life"):
        Rebalancer(16, 4, window=4, interval=4, estimator="ema:1e308")
    rb = Rebalancer(16, 4, window=10**12, interval=4)
    with pytest.raises(ValueError, match="shorter window"):
        rb.record(torch.ones(2, 8))


def test_incremental_rebalancer_refuses_gpu_speeds_it_would_drop() -> None:
    # plans from the placement in force are made for equal GPUs: the second rebalance
    # dropped the speeds without a word (loads 11/11/11/13 on speeds 1/1/1/10 were
    # re-spread evenly, the balancedness in time falling 0.315 -> 0.300), where
    # eplb.plan refuses gpu_speed with previous=
    speeds = [1.0, 1.0, 1.0, 10.0]
    with pytest.raises(ValueError, match="gpu_speed cannot be combined with incremental"):
        Rebalancer(16, 4, window=2, interval=2, incremental=True, gpu_speed=speeds)
    with pytest.raises(ValueError, match="gpu_speed cannot be combined with previous"):
        plan(torch.ones(2, 8), 16, 4, gpu_speed=speeds,
                  previous=plan(torch.ones(2, 8), 16, 4))
    # fresh plans on every rebalance keep planning for the speeds
    rb = Rebalancer(16, 4, window=2, interval=2, gpu_speed=speeds)
    weight = torch.arange(1.0, 17.0).view(2, 8)
    for _ in range(4):
        rb.record(weight)
    fresh = plan(weight * 2, 16, 4, gpu_speed=speeds)
    assert torch.equal(rb.placement.phy2log, fresh.phy2log)


def test_an_invalid_initial_placement_is_refused_when_given() -> None:
    """It was accepted, reported as the placement in force, and refused ``interval`` steps
    later as the "previous placement" (never without incremental): attacker pass."""
    import dataclasses

    from eplb import PlacementError

    weight = torch.rand(6, 32, generator=torch.Generator().manual_seed(0)) * 100
    good = plan(weight, 48, 8)
    bad_ids = good.phy2log.clone()
    bad_ids[0, 0] = 37  # expert ids stop at 31
    for incremental in (True, False):
        with pytest.raises(PlacementError, match="initial placement: layer 0 slot 0"):
            Rebalancer(48, 8, window=10, interval=1000, incremental=incremental,
                       initial=dataclasses.replace(good, phy2log=bad_ids))
    # a map in force may stack an expert's replicas on a GPU (the forced moves spread them)
    stacked = Placement.from_phy2log(torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]]), 2,
                                     Topology(8, 2))
    assert Rebalancer(8, 2, window=10, interval=1000, initial=stacked).placement is stacked


def test_auto_half_lives_too_long_for_any_window_are_refused_up_front() -> None:
    """Found by an attacker pass: half-lives of 1e9 windows were accepted and failed every
    rebalance as an EMA half-life out of range (a name the user never set)."""
    from eplb.online.estimate import AdaptiveAverage

    with pytest.raises(ValueError, match=r"auto half-lives must be numbers in \(0, 1e\+09\]"):
        AdaptiveAverage(half_lives=(1e300,))
    reb = Rebalancer(32, 8, window=2, interval=2, estimator=AdaptiveAverage(half_lives=(1e9,)))
    assert reb.record(torch.rand(2, 2, 16) * 10) is not None


@pytest.mark.parametrize(("shape", "options", "match"), [
    ((24, 8, 2, 4, 30), {}, r"num_replicas \(24\) must be at least the number of experts"),
    ((24, 8, 2, 4, 30), {"planner": "greedy"}, r"num_replicas \(24\) must be at least"),
    ((40, 8, 2, 4, 18), {"policy": "hierarchical"},
     r"num_experts \(18\) is not a multiple of num_groups \(4\)"),
    # DeepSeek's greedy goes hierarchical whenever groups divide over nodes (review pass)
    ((40, 8, 2, 4, 18), {"planner": "greedy"},
     r"num_experts \(18\) is not a multiple of num_groups \(4\)"),
    # no rebalancing's layout, live slots, the locality policy's routing (attacker pass)
    ((8, 4, 1, 1, 16), {"planner": "none"}, r"num_replicas \(8\) must be at least"),
    ((32, 8, 1, 1, 16), {"active_gpus": [True] + [False] * 7},
     r"only 1 of 8 GPUs are live: 4 slots cannot hold 16 experts"),
    ((32, 8, 2, 4, 16), {"policy": "locality", "dispatch": "nearest",
                         "routing": torch.zeros(100, 7, 2, dtype=torch.int64)},
     r"routing must have shape \[tokens, 3 layers, top-k\]"),
    ((32, 8, 2, 4, 16), {"policy": "locality", "dispatch": "nearest",
                         "routing": torch.arange(40).remainder(40).reshape(10, 1, 4)
                         .expand(10, 3, 4).contiguous()},
     r"routing names expert 39, outside \[0, 16\)"),
    # a per-layer budget of another length: without an initial placement it failed at the
    # second rebalance, 2 x interval steps on, and at every one after it (attacker pass)
    ((16, 4, 1, 1, 8), {"incremental": True, "max_moves": [1, 1]},
     r"max_moves per layer needs one int per layer, 3; got 2"),
])
def test_counts_the_planner_cannot_plan_are_refused_at_the_first_step(shape, options,
                                                                      match) -> None:
    """Found by an attacker pass: such a rebalancer recorded `interval` steps (thousands, at
    an engine's cadence) and failed only at its first rebalance."""
    replicas, gpus, nodes, groups, experts = shape
    reb = Rebalancer(replicas, gpus, nodes, groups, window=3, interval=1000, **options)
    with pytest.raises(ValueError, match=match):
        reb.record(torch.ones(3, experts))
    assert reb.steps == 0


def test_the_first_steps_check_adds_no_warning_of_its_own() -> None:
    """The shape check at the first step is quiet: "planning globally" is said once, by
    the plan (review pass: it was said twice, from two places)."""
    reb = Rebalancer(40, 8, 2, 4, window=2, interval=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reb.record(torch.ones(2, 3, 18))
    said = [w for w in caught if "planning globally" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]


@pytest.mark.parametrize("planner", ["eplb", "greedy", "none"])
def test_make_planner_names_a_topology_that_is_no_topology(planner: str) -> None:
    # (an AttributeError "'tuple' object has no attribute 'grouped'" before, where
    # trivial_placement names it)
    with pytest.raises(TypeError, match=r"topology must be an eplb\.Topology, got tuple"):
        make_planner(planner, (R, P))
