"""Rebalancer plans against the placement in force: dead GPUs and the scenario choice,
callable planners (what they may return and receive), move budgets and the
multi-window estimate (scored as the engine realises plans, never keeping a layer that
breaks the contract), equal live speeds and nodes as ``eplb.plan`` makes them.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_online import _DEAD, E, L, P, R, RecordingPlanner, _steps

from eplb import Placement, Topology, plan
from eplb.core import realised_gpu_loads
from eplb.online import Rebalancer, make_planner, trivial_placement
from eplb.online.estimate import expected_max


# ------------------------------------------------------------------ the placement in force
@pytest.mark.parametrize("incremental", [False, True])
@pytest.mark.parametrize("estimator", ["multi:3", "multi:2:2"])
def test_a_gpu_that_died_is_not_kept_by_the_scenario_choice(estimator: str,
                                                             incremental: bool) -> None:
    # the placement in force uses GPU 1, which has died since: keeping any of its layers
    # would serve from a dead GPU (uniform loads make the old 4-GPU plan look the best)
    import eplb

    weight = torch.full((L, E), 100.0)
    live = torch.tensor([True, False, True, True])
    reb = Rebalancer(R, P, window=2, interval=2, estimator=estimator, incremental=incremental,
                     initial=eplb.plan(weight, R, P), active_gpus=live)
    reb.record(weight.repeat(4, 1, 1))
    placement = reb.placement
    assert placement is not None
    placement.validate()
    assert (placement.phy2log.view(L, P, -1)[:, 1] == -1).all()


def test_select_per_layer_refuses_candidates_with_other_dead_gpus_or_experts() -> None:
    from eplb.online.estimate import select_per_layer

    topo = Topology(4, 2)
    a = Placement.from_phy2log(torch.tensor([[0, 1, 2, 3]]), 4, topo)
    dead = Placement.from_phy2log(torch.tensor([[0, 1, -1, -1]]), 2, topo,
                                  active_gpus=torch.tensor([True, False]))
    other = Placement.from_phy2log(torch.tensor([[0, 1, 2, 0]]), 3, topo)
    for cand in (dead, other):
        with pytest.raises(ValueError, match="candidate 1 has"):
            select_per_layer([a, cand], torch.ones(1, 1, 4))


@pytest.mark.parametrize("shape", [(L, E + 1), (L + 1, E), (L, E - 2)])
def test_an_initial_placement_of_other_loads_fails_at_the_first_step(
        shape: tuple[int, int]) -> None:
    initial = trivial_placement(shape[1], shape[0], Topology(R, P))
    reb = Rebalancer(R, P, window=4, interval=100, initial=initial)
    with pytest.raises(ValueError, match="the initial placement has"):
        reb.record(_steps(1))
    assert reb.steps == 0 and reb.placement is initial


def test_a_callable_planner_that_leaves_an_expert_unserved_is_refused() -> None:
    # every slot on expert 0: the other experts' tokens go nowhere, and the replay used to
    # score the layer as perfectly balanced
    from eplb import PlacementError

    def one_expert(weight: torch.Tensor, previous: Placement | None) -> Placement:
        return Placement.from_phy2log(torch.zeros(weight.shape[0], R, dtype=torch.int64),
                                      weight.shape[1], Topology(R, P))

    for estimator in ("sum", "multi:2"):  # (a multi-window estimate mixes the plans' layers)
        reb = Rebalancer(R, P, window=2, interval=2, planner=one_expert, estimator=estimator)
        with pytest.raises(PlacementError, match="breaks the contract: layer 0 expert 1"):
            reb.record(_steps(2))
        assert reb.steps == 0 and reb.placement is None and not reb.events


def test_a_callable_planner_may_stack_replicas_on_a_gpu() -> None:
    # DeepSeek's greedy does; only eplb's own planner promises anti-affinity
    def stacked(weight: torch.Tensor, previous: Placement | None) -> Placement:
        row = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3])
        return Placement.from_phy2log(row.repeat(weight.shape[0], 1), weight.shape[1],
                                      Topology(R, P))

    reb = Rebalancer(R, P, window=2, interval=2, planner=stacked)
    reb.record(_steps(2))
    assert reb.placement is not None


@pytest.mark.parametrize("option", [
    {"max_moves": 3}, {"skip_threshold": 0.1}, {"policy": "global"}, {"dispatch": "nearest"},
    {"active_gpus": torch.tensor([True, True, True, False])}, {"no_such_option": 1},
])
def test_options_a_callable_planner_cannot_receive_are_refused(option: dict) -> None:
    # (attacker pass: they were accepted and dropped; a replay then scored a GPU given as
    # dead as serving, and moved 60 slots a rebalance under max_moves=3)
    planner = RecordingPlanner(Topology(R, P))
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"callable, which plans by itself: {name}"):
        Rebalancer(R, P, window=2, interval=2, planner=planner, **option)
    with pytest.raises(ValueError, match="callable, which plans by itself"):
        make_planner(planner, Topology(R, P), **option)
    # incremental=True is no such option: a callable always gets the placement in force
    reb = Rebalancer(R, P, window=2, interval=2, planner=planner, incremental=True)
    reb.record(_steps(4))
    assert [prev is None for _, prev in planner.calls] == [True, False]


def test_a_callable_planner_gets_one_window_of_layers_per_call_under_multi() -> None:
    # (attacker pass: the first rebalance, with no placement in force, stacked the
    # estimator's candidate windows into one [C·L, E] call)
    planner = RecordingPlanner(Topology(R, P))
    reb = Rebalancer(R, P, window=4, interval=4, planner=planner, estimator="multi:2")
    reb.record(_steps(12))
    assert planner.calls and all(w.shape == (L, E) for w, _ in planner.calls)


@pytest.mark.parametrize("limit", [{"max_moves": 0}, {"skip_threshold": 0.999}])
def test_a_rebalance_that_only_empties_a_dead_gpu_is_reported_as_a_change(limit: dict) -> None:
    # every expert has replicas on several GPUs, so a GPU's death forces no weight to
    # move: the new map still differs (its slots are emptied), and the engine must get it
    import eplb

    weight = torch.full((3, 8), 100.0)  # 3 layers × 8 experts: 4 replicas each
    before = eplb.plan(weight, 32, 8)
    live = torch.ones(8, dtype=torch.bool)
    live[0] = False
    reb = Rebalancer(32, 8, window=2, interval=2, incremental=True, initial=before,
                     active_gpus=live, **limit)
    new = reb.record(weight.repeat(2, 1, 1))
    assert new is not None and new is reb.placement
    new.validate()
    assert (new.phy2log.view(3, 8, 4)[:, 0] == -1).all()
    event = reb.events[-1]
    assert event.changed
    assert int(event.moved_slots.sum()) == 0  # no weights moved, yet the map changed


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), budget=st.integers(1, 40),
       estimator=st.sampled_from(["multi:3", "multi:2:3"]))
def test_a_total_move_budget_holds_for_a_multi_window_estimate(seed: int, budget: int,
                                                              estimator: str) -> None:
    # multi:K plans every candidate window within max_moves, then keeps the best plan per
    # layer: the mix of layers from several plans moved up to twice the budget
    import eplb

    gen = torch.Generator().manual_seed(seed)
    drift = torch.exp(torch.randn(9, 1, 16, generator=gen).cumsum(0) * 0.5)
    counts = (drift * torch.exp(torch.randn(9, 4, 16, generator=gen)) * 50).round()
    initial = eplb.plan(counts[:3].sum(0), 24, 8)
    reb = Rebalancer(24, 8, window=3, interval=3, estimator=estimator, incremental=True,
                     max_moves=budget, initial=initial)
    reb.record(counts)
    reb.placement.validate()
    assert max(int(e.moved_slots.sum()) for e in reb.events) <= budget


@pytest.mark.parametrize(("cluster", "option"), [
    ((16, 4, 1, 1), {"incremental": True, "gpu_speed": [2.0] * 4}),
    ((16, 4, 1, 1), {"incremental": True, "gpu_speed": [2.0, 9.0, 2.0, 2.0],
                     "active_gpus": _DEAD}),
    ((16, 4, 2, 2), {"policy": "hierarchical", "gpu_speed": [1.5] * 4}),
    ((16, 4, 2, 1), {"dispatch": "nearest", "gpu_speed": [1, 1, 1, 1]}),
])
def test_rebalancer_plans_equal_live_speeds_as_eplb_plan_does(cluster, option) -> None:
    # eplb.plan plans equal speeds of the live GPUs as equal GPUs (previous=, the
    # hierarchical policy and nearest dispatch open); the Rebalancer refused any
    # gpu_speed there at construction, hierarchical ones as "GPU speeds differ"
    # (attacker pass)
    weight = torch.arange(1.0, 17.0).view(2, 8)
    rb = Rebalancer(*cluster, window=1, interval=1, **option)
    rb.record(weight)
    rb.record(weight.flip(1))
    extra = {k: v for k, v in option.items() if k != "incremental"}
    first = plan(weight, *cluster, **extra)
    expected = plan(weight.flip(1), *cluster, **extra,
                    **({"previous": first} if option.get("incremental") else {}))
    assert torch.equal(rb.placement.phy2log, expected.phy2log)


def test_multi_window_choice_scores_plans_as_the_engine_realises_them() -> None:
    # a multi-window estimate picks per layer among plans made for the GPU speeds, and
    # the placement in force: scored as equal GPUs, the speed-aware plans (which load
    # the fast GPU more) lost to the static layout in force, kept on every layer
    layers, experts, slots, gpus = 4, 64, 64, 4
    speeds = torch.tensor([1.0, 1.0, 1.0, 3.0])
    initial = trivial_placement(experts, layers, Topology(slots, gpus))
    gen = torch.Generator().manual_seed(0)
    steps = [torch.rand(layers, experts, generator=gen) * 10 + 1 for _ in range(8)]
    rb = Rebalancer(slots, gpus, window=2, interval=4, estimator="multi:2",
                    gpu_speed=speeds, initial=initial)
    for counts in steps:
        rb.record(counts)
    window = steps[-2] + steps[-1]
    assert not torch.equal(rb.placement.phy2log, initial.phy2log)
    assert (rb.placement.balancedness(window, gpu_speed=speeds)
            > initial.balancedness(window, gpu_speed=speeds) + 0.1)
    # the score itself: time over ideal time; under SGLang's nearest rule, its loads
    placed = plan(window, slots, gpus, gpu_speed=speeds)
    time_ratio = expected_max(placed, window[None], gpu_speed=speeds)
    loads = placed.gpu_loads(window) / speeds.double()
    assert torch.allclose(time_ratio, loads.max(1).values / (window.double().sum(1) / 6.0))
    nearest = plan(window, 64, 16, 4, dispatch="nearest")
    realised = realised_gpu_loads(window, nearest.phy2log, 16, 4)
    assert torch.allclose(expected_max(nearest, window[None], dispatch="nearest"),
                          realised.max(1).values / realised.mean(1))


def test_a_multi_window_estimate_never_keeps_a_layer_that_breaks_the_contract() -> None:
    """Found by an attacker pass: the placement in force joined the per-layer choice of a
    ``multi`` estimate unchecked, so a map DeepSeek's greedy left with stacked replicas
    came back in the layers it scored best (``validate()`` failed in 3 of 20 trials), and
    vLLM's initial map under a forced hierarchical policy kept layers whose groups
    straddle nodes, labelled ``"global"``."""
    from eplb.core import plan_greedy

    layers, experts = 6, 16
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        w0 = torch.rand(layers, experts, generator=gen) ** 3 * 100
        stacked = plan_greedy(w0, 32, 8, 1, 1)
        reb = Rebalancer(32, 8, window=8, interval=8, estimator="multi:4", initial=stacked,
                         incremental=bool(trial % 2))
        reb.record(torch.poisson((w0 / 8).expand(8, layers, experts), generator=gen))
        reb.placement.validate()
    topo = Topology(32, 8, 2, 4)
    straddling = trivial_placement(experts, layers, topo)
    for seed in range(10):
        reb = Rebalancer(32, 8, 2, 4, window=8, interval=8, estimator="multi:4",
                         initial=straddling, policy="hierarchical")
        reb.record(torch.poisson(torch.full((8, layers, experts), 10.0),
                                 generator=torch.Generator().manual_seed(seed)))
        assert reb.placement.policy == "hierarchical"
        reb.placement.validate()  # the locality rule included
    # DeepSeek's greedy stacks replicas in some candidates' plans and not in others': their
    # per-layer mix is held to what every plan keeps (a review pass found it refused)
    for seed in range(30):
        steps = (torch.rand(8, 1, 16, generator=torch.Generator().manual_seed(seed)) ** 6
                 * 100).round()
        reb = Rebalancer(20, 10, window=8, interval=8, estimator="multi:4", planner="greedy")
        reb.record(steps)
        reb.placement.validate(anti_affinity=False)


def test_nodes_that_do_not_divide_the_gpus_are_one_node_as_eplb_plan_makes_them() -> None:
    """Found by an attacker pass: 3 nodes of 8 GPUs were accepted and recorded, then every
    rebalance refused the planner's own one-node plan (eplb.plan warns and plans one
    node). Now the rebalancer warns at construction, as eplb.plan does, and records one
    node; an initial placement made for the cluster as asked is taken."""
    with pytest.warns(RuntimeWarning, match=r"not a multiple of num_nodes \(3\).*one node"):
        reb = Rebalancer(32, 8, num_nodes=3, window=2, interval=2)
    assert reb.topology == Topology(32, 8)
    assert reb.record(torch.rand(2, 2, 16) * 10) is not None
    initial = trivial_placement(16, 2, Topology(32, 8, 3))
    with pytest.warns(RuntimeWarning):
        reb = Rebalancer(32, 8, 3, window=2, interval=2, initial=initial, incremental=True)
    assert reb.placement.topology == Topology(32, 8)
    reb.record(torch.rand(2, 2, 16) * 10)
    reb.placement.validate()
    with pytest.raises(ValueError, match="hierarchical placement is impossible"):
        Rebalancer(32, 8, 3, window=2, interval=2, policy="hierarchical")
    # nearest dispatch needs whole nodes, as eplb.plan says (not one node in their place):
    # refused when the rebalancer is made, no longer at its first rebalance
    with pytest.raises(ValueError, match=r"own node first.*num_gpus \(8\) is not a multiple"):
        Rebalancer(32, 8, 3, window=2, interval=2, dispatch="nearest")


def test_a_multi_window_estimate_plans_the_locality_policy_with_its_routing() -> None:
    """Candidates stacked as [C·L, E] for one planner call did not match the routing's
    [T, L, k] layers: the first rebalance failed ("routing must have shape [tokens, 8
    layers, top-k]") after the first step's check had passed (review pass)."""
    generator = torch.Generator().manual_seed(0)
    routing = torch.stack([torch.randperm(16, generator=generator)[:2]
                           for _ in range(100)]).view(50, 2, 2)
    steps = torch.randint(0, 100, (8, 2, 16), generator=generator)
    options = dict(window=8, interval=8, policy="locality", dispatch="nearest", routing=routing)
    multi = Rebalancer(32, 8, 2, estimator="multi:4", **options).record(steps)
    assert multi.policy == "locality"
    multi.validate()
