"""Incremental plans for SGLang's nearest rule: move budgets (total, per layer, one slot)
buy the moves that pay and no others, old maps of every origin, expected balance over
the live GPUs, and the move knobs refused where re-plans score no moves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_dispatch import SETTINGS

import eplb
from eplb import Placement
from eplb.core.dispatch import (
    realised_gpu_loads,
)
from eplb.online.nearest import expected_balance


def test_nearest_incremental_respects_the_budget():
    """Through the public API: ``dispatch="nearest"`` with the placement in force."""
    rng = np.random.default_rng(4)
    w = torch.from_numpy(np.exp(rng.normal(0, 1.2, (3, 32))) * 100)
    old = eplb.plan(w, 48, 8, 4, policy="global", dispatch="nearest").phy2log
    drifted = w * torch.from_numpy(np.exp(rng.normal(0, 0.3, w.shape)))
    before = realised_gpu_loads(drifted, old, 8, 4).amax(1)
    for budget in (None, [6, 6, 6], [0, 0, 0]):
        placed = eplb.plan(drifted, 48, 8, 4, policy="global", dispatch="nearest",
                           previous=old, max_moves=budget)
        placed.validate()
        new = placed.phy2log
        moved = (new != old).sum(1)
        # a layer is only re-planned where its realised peak drops
        assert bool((realised_gpu_loads(drifted, new, 8, 4).amax(1) <= before + 1e-9).all())
        if budget is not None:
            assert bool((moved <= torch.tensor(budget)).all())
            if max(budget) == 0:
                assert torch.equal(new, old)


def test_nearest_per_layer_budgets_of_one_slot_buy_what_pays():
    # attacker pass: the warm start took 85 % of each layer's budget, int(0.85) = 0
    # slots, so per-layer budgets of 1 moved nothing where a total of 1 bought a slot
    g = torch.Generator().manual_seed(2)
    w0 = torch.exp(torch.randn(5, 32, generator=g, dtype=torch.float64))
    w1 = w0 * torch.exp(torch.randn(5, 32, generator=g, dtype=torch.float64) * 0.8)
    kwargs = {"policy": "global", "dispatch": "nearest"}
    old = eplb.plan(w0, 48, 8, 2, **kwargs)
    total = eplb.plan(w1, 48, 8, 2, previous=old, max_moves=1, **kwargs).moved_slots(old)
    each = eplb.plan(w1, 48, 8, 2, previous=old, max_moves=[1] * 5, **kwargs).moved_slots(old)
    assert int(total.sum()) == 1 and (each <= 1).all()
    assert int(each.sum()) >= 1


def drifted_nearest_case(seed: int, layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A nearest-rule plan ``[L, 96]`` of random loads ``[L, 64]`` on 16 GPUs (4 nodes),
    and those loads drifted by ×exp(0.3·Z)."""
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(np.exp(rng.normal(0, 1.0, (layers, 64))) * 100)
    old = eplb.plan(w, 96, 16, 4, policy="global", dispatch="nearest").phy2log
    return old, w * torch.from_numpy(np.exp(rng.normal(0, 0.3, w.shape)))


def test_nearest_incremental_spends_a_total_budget_where_it_pays():
    # a total budget is not split evenly over the layers (a share of 1–2 slots per layer
    # buys no swap): it goes where a moved slot gains most, and a small one still helps
    old, drifted = drifted_nearest_case(11, 8)

    def balance(phy):
        loads = realised_gpu_loads(drifted, phy, 16, 4)
        return float(loads.mean(1).sum() / loads.amax(1).sum())

    before, last = balance(old), balance(old)
    for total in (0, 8, 40, 200):
        placed = eplb.plan(drifted, 96, 16, 4, policy="global", dispatch="nearest",
                           previous=old, max_moves=total)
        placed.validate()
        moved = int((placed.phy2log != old).sum())
        assert moved <= total
        got = balance(placed.phy2log)
        assert got >= last - 1e-12  # a larger budget never buys less here
        last = got
        if total == 0:
            assert torch.equal(placed.phy2log, old)
        if total == 8:  # one slot per layer if split evenly: no swap would fit
            assert moved > 0 and got > before


@SETTINGS
@given(
    gpus=st.sampled_from([4, 8]),
    slots=st.integers(2, 4),
    layers=st.integers(1, 4),
    origin=st.sampled_from(["eplb", "vllm-initial", "random"]),
    budget=st.one_of(st.none(), st.integers(0, 40), st.just("per-layer")),
    seed=st.integers(0, 2**31 - 1),
)
def test_nearest_incremental_from_old_maps_of_every_origin(gpus, slots, layers, origin,
                                                             budget, seed):
    # valid, deterministic, and within a budget (beyond the forced moves, which an
    # eplb map needs none of)
    rng = np.random.default_rng(seed)
    replicas, experts = gpus * slots, gpus * slots * 2 // 3
    w = torch.from_numpy(np.exp(rng.normal(0, 1.0, (layers, experts))) * 100)
    if origin == "eplb":
        old = eplb.plan(w, replicas, gpus, 2, policy="global", dispatch="nearest").phy2log
    elif origin == "vllm-initial":
        old = torch.arange(replicas).remainder(experts).repeat(layers, 1)
    else:
        old = torch.from_numpy(rng.integers(0, experts, (layers, replicas)))
    drifted = w * torch.from_numpy(np.exp(rng.normal(0, 0.3, w.shape)))
    limit = [int(rng.integers(0, 12)) for _ in range(layers)] if budget == "per-layer" else budget
    kwargs = {"policy": "global", "dispatch": "nearest", "previous": old, "max_moves": limit}
    new = eplb.plan(drifted, replicas, gpus, 2, **kwargs)
    new.validate()
    assert torch.equal(eplb.plan(drifted, replicas, gpus, 2, **kwargs).phy2log, new.phy2log)
    if origin == "eplb" and limit is not None:
        moved = (new.phy2log != old).sum(1)
        if isinstance(limit, list):
            assert bool((moved <= torch.tensor(limit)).all())
        else:
            assert int(moved.sum()) <= limit


def test_nearest_incremental_without_a_budget_moves_only_what_pays():
    # an unchanged workload keeps (almost) its whole map; a drifted one is re-planned,
    # and what moves buys more realised balance than move_price × the share moved
    rng = np.random.default_rng(7)
    w = torch.from_numpy(np.exp(rng.normal(0, 1.0, (6, 64))) * 100)
    old = eplb.plan(w, 96, 16, 4, policy="global", dispatch="nearest").phy2log
    same = eplb.plan(w, 96, 16, 4, policy="global", dispatch="nearest", previous=old)
    assert float((same.phy2log != old).float().mean()) < 0.02
    drifted = w * torch.from_numpy(np.exp(rng.normal(0, 0.3, w.shape)))
    new = eplb.plan(drifted, 96, 16, 4, policy="global", dispatch="nearest",
                    previous=old).phy2log
    share = (new != old).float().mean(1)
    assert float(share.max()) > 0.1  # the drift is worth re-planning somewhere

    def balance(phy):
        loads = realised_gpu_loads(drifted, phy, 16, 4)
        return loads.mean(1) / loads.amax(1)

    gain = balance(new) - balance(old)
    # the default move price, 0.01 at 9 slots per GPU, follows the slots per GPU: 6 here
    price = 0.01 * 6 / 9
    assert bool((gain >= price * share - 1e-12).all())
    # and on the next window expected under the default drift (0.2): a move that only
    # pays in sample is not made
    expected, _ = expected_balance(drifted, torch.stack([old, new]), 16, 4, 0.2)
    assert bool((expected[1] - expected[0] >= price * share - 1e-12).all())
    # a dear move price: only moves that gain that much per share moved are made
    dear = eplb.plan(drifted, 96, 16, 4, policy="global", dispatch="nearest",
                     previous=old, move_price=0.5).phy2log
    dear_share = (dear != old).float().mean(1)
    assert float(dear_share.mean()) < float(share.mean())
    assert bool((balance(dear) - balance(old) >= 0.5 * 6 / 9 * dear_share - 1e-12).all())


def test_nearest_expected_balance_is_over_the_live_gpus():
    # without drift the expected next window is the window at hand: both over the live
    # GPUs' mean (the expected one was over all P, 7/8 of it with one of 8 GPUs dead)
    generator = torch.Generator().manual_seed(5)
    weight = torch.rand(3, 16, generator=generator, dtype=torch.float64)
    active = torch.ones(8, dtype=torch.bool)
    active[7] = False
    plan = eplb.plan(weight, 32, 8, 2, policy="global", dispatch="nearest", active_gpus=active)
    expected, peak = expected_balance(weight, plan.phy2log[None], 8, 2, drift=0.0,
                                      active_gpus=active)
    in_sample = weight.sum(1) / 7 / peak[0]
    assert torch.allclose(expected[0], in_sample, rtol=1e-12)


def test_nearest_small_total_budget_buys_what_one_layer_alone_would():
    # the even split spends a total where the even split gains most: a total of 3 on two
    # layers moved nothing, where 3 slots given to layer 0 alone bought 0.468 -> 0.513
    # under the rule (second attacker pass); each layer's own warm start is offered too
    rng = np.random.default_rng(0)
    w0 = torch.tensor(rng.gamma(0.5, 100, size=(2, 16)))
    w1 = w0 * torch.tensor(np.exp(rng.normal(0, 1, size=(2, 16))))
    kwargs = {"dispatch": "nearest"}
    old = eplb.plan(w0, 24, 8, 2, **kwargs)

    def balance(placement):
        loads = realised_gpu_loads(w1, placement.phy2log, 8, 2, dispatch="nearest")
        return float((w1.sum(1) / 8 / loads.amax(1)).sum())

    total = eplb.plan(w1, 24, 8, 2, previous=old, max_moves=3, **kwargs)
    alone = eplb.plan(w1, 24, 8, 2, previous=old, max_moves=[3, 0], **kwargs)
    assert 0 < int(total.moved_slots(old).sum()) <= 3
    assert int(alone.moved_slots(old).sum()) <= 3
    assert balance(total) >= balance(alone) - 1e-12 > balance(old)


def test_nearest_budget_buys_no_move_that_does_not_pay():
    # a budget caps the moves that pay; at a dear move price it buys no others (before,
    # a budget was spent on realised balance alone, whatever the price)
    old, drifted = drifted_nearest_case(7, 6)

    def balance(phy):
        loads = realised_gpu_loads(drifted, phy, 16, 4)
        return loads.mean(1) / loads.amax(1)

    for budget in (10**6, [10**6] * 6):
        new = eplb.plan(drifted, 96, 16, 4, policy="global", dispatch="nearest",
                        previous=old, move_price=0.5, max_moves=budget).phy2log
        share = (new != old).float().mean(1)
        assert bool((balance(new) - balance(old) >= 0.5 * share - 1e-12).all()), budget
        expected, _ = expected_balance(drifted, torch.stack([old, new]), 16, 4, 0.2)
        assert bool((expected[1] - expected[0] >= 0.5 * share - 1e-12).all()), budget


def test_nearest_total_budget_is_not_spent_on_layers_without_load():
    # an all-zero layer is scored on uniform loads and its moves are undone afterwards:
    # the slots the budget gave it were lost to the layers that gain (here all of them)
    g = torch.Generator().manual_seed(17)
    w = torch.rand(2, 12, generator=g, dtype=torch.float64) ** 3
    w[1] = 0
    old = torch.arange(16).remainder(12).repeat(2, 1)
    old[0] = old[0, torch.randperm(16, generator=g)]
    kwargs = {"policy": "global", "dispatch": "nearest", "max_moves": 10}
    both = eplb.plan(w, 16, 4, 2, previous=old, **kwargs).phy2log
    alone = eplb.plan(w[:1], 16, 4, 2, previous=old[:1], **kwargs).phy2log
    assert torch.equal(both[1], old[1])
    assert torch.equal(both[:1], alone) and not torch.equal(alone, old[:1])


@pytest.mark.parametrize("dispatch", ["nearest", "even"])
def test_a_total_budget_goes_to_the_layers_that_carry_the_load(dispatch):
    # attacker pass: under the nearest rule a total went by balancedness gains alone, and
    # layers with a millionth of the others' load got most of it; a layer's MoE time is
    # its load times its peak, so the heavy layers come first
    g = torch.Generator().manual_seed(3)
    w0 = torch.exp(torch.randn(4, 32, generator=g, dtype=torch.float64))
    w1 = w0 * torch.exp(torch.randn(4, 32, generator=g, dtype=torch.float64) * 0.8)
    kwargs = {"policy": "global", "dispatch": dispatch}
    old = eplb.plan(w0, 48, 8, 2, **kwargs)
    light = w1 * torch.tensor([1.0, 1.0, 1e-6, 1e-6], dtype=torch.float64)[:, None]
    for budget in (4, 8):
        moved = eplb.plan(light, 48, 8, 2, previous=old, max_moves=budget,
                          **kwargs).moved_slots(old)
        assert int(moved[:2].sum()) > 0 and int(moved[2:].sum()) == 0, moved.tolist()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_nearest_per_layer_budget_of_unsigned_ints(dtype):
    w = torch.rand(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    old = torch.arange(16).remainder(12).repeat(3, 1)
    limit = np.array([1, 2, 3], dtype)
    new = eplb.plan(w, 16, 4, 2, policy="global", dispatch="nearest", previous=old,
                    max_moves=limit)
    assert bool(((new.phy2log != old).sum(1) <= torch.tensor([1, 2, 3])).all())


@pytest.mark.parametrize("policy", ["hierarchical"])
def test_nearest_replans_that_score_no_moves_refuse_the_move_knobs(policy):
    """Under ``dispatch="nearest"`` on several nodes the hierarchical policy re-plans and
    relabels onto the old GPUs, scoring no move: ``move_price``, ``drift`` and
    ``group_share`` were taken there and changed nothing (as ``max_moves`` and
    ``skip_threshold``, which are refused); the global policy still prices its moves (the
    locality policy too: ``test_locality_incremental.py``)."""
    rng = np.random.default_rng(5)
    w = torch.from_numpy(np.exp(rng.normal(0, 1.0, (2, 16))) * 100)
    old = eplb.plan(w, 32, 4, 2, 4, policy="hierarchical")
    drifted = w * torch.from_numpy(np.exp(rng.normal(0, 0.5, w.shape)))
    for knob in ({"move_price": 0.5}, {"drift": 0.01}, {"group_share": 0.5}):
        with pytest.raises(ValueError, match=f"^{next(iter(knob))}: with dispatch='nearest' "
                           f"the {policy} policy re-plans and relabels"):
            eplb.plan(drifted, 32, 4, 2, 4, policy=policy, dispatch="nearest", previous=old,
                      **knob)
    eplb.plan(drifted, 32, 4, 2, 4, policy=policy, dispatch="nearest", previous=old).validate()
    priced = eplb.plan(drifted, 32, 4, 2, 4, policy="global", dispatch="nearest",
                       previous=old, move_price=0.99)
    assert torch.equal(priced.phy2log, old.phy2log)  # nothing pays at that price


def _one_node_drift(seed: int) -> tuple[int, int, torch.Tensor, Placement, Placement]:
    """A random small one-node case under nearest dispatch: ``(replicas, gpus, loads of
    the next window [4, E], the map in force, its plan from that map without a budget)``
    (2-8 GPUs, 2-5 slots each, the loads drifted by ``exp(0.3·Z)``)."""
    rng = np.random.default_rng(seed)
    gpus, slots = int(rng.integers(2, 9)), int(rng.integers(2, 6))
    replicas = gpus * slots
    experts = int(rng.integers(max(2, replicas // 3), replicas + 1))
    w0 = torch.from_numpy(np.rint(rng.lognormal(0, 1.2, (4, experts)) * 100) + 1)
    w1 = torch.from_numpy(np.rint(w0.numpy() * np.exp(0.3 * rng.standard_normal(
        (4, experts)))) + 1)
    old = eplb.plan(w0, replicas, gpus, dispatch="nearest")
    return replicas, gpus, w1, old, eplb.plan(w1, replicas, gpus, dispatch="nearest",
                                              previous=old)


@pytest.mark.parametrize("budget", ["total", "per layer"])
def test_a_budget_above_what_pays_moves_no_layer_more_than_no_budget_on_one_node(budget):
    # README: a budget "never [moves] more slots in a layer than the plan without a
    # budget", under either rule. On one node (SGLang's runtime table) a budget also
    # offers the even split's own plan within it, and an ample budget moved layers that
    # the plan without one kept (stateful sequence tests: 20 of 60 random cases, e.g. 4
    # layers on 7 GPUs of 2 slots moved [4, 0, 5, 3] slots where no budget moved
    # [0, 0, 5, 4]); the layers' moves are now capped at the plan without a budget's
    failures = []
    for seed in range(12):
        replicas, gpus, w1, old, free = _one_node_drift(seed)
        ample = 10**6 if budget == "total" else [10**6] * 4
        capped = eplb.plan(w1, replicas, gpus, dispatch="nearest", previous=old,
                           max_moves=ample)
        moved, unlimited = capped.moved_slots(old), free.moved_slots(old)
        if bool((moved > unlimited).any()):
            failures.append((seed, moved.tolist(), unlimited.tolist()))
    assert not failures, f"(seed, slots moved with a budget, without) per layer: {failures}"


def test_a_budget_that_does_not_bind_gives_the_plan_without_a_budget_on_one_node():
    # a cap that does not bind changes nothing: an ample total (or per-layer cap) plans
    # as no budget does. A total was spent by MoE time among the budget's own candidates
    # (0.8911 against 0.8920 on the next window at 32 GPUs), and a scoring of the draws
    # that differed by an ulp with the number of candidates scored at once chose otherwise
    # in near-ties (seed 74: 4 slots of one layer, the same number moved)
    for seed in [*range(10), 74]:
        replicas, gpus, w1, old, free = _one_node_drift(seed)
        for ample in (10**6, [10**6] * 4):
            capped = eplb.plan(w1, replicas, gpus, dispatch="nearest", previous=old,
                               max_moves=ample)
            assert torch.equal(capped.phy2log, free.phy2log), (seed, ample)
