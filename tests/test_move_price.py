"""The move price follows the slots per GPU (``IncrementalOptions.layer_price``): moving
all of a layer's slots sends ``S`` experts' weights into each GPU at ``S`` slots per GPU,
so ``move_price`` (stated at 9 slots per GPU) costs ``move_price × S / 9`` there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_contract, generated_drift, replan_drifted

import eplb
from eplb.core.options import IncrementalOptions
from eplb.online import score


def test_layer_price_follows_the_slots_per_gpu() -> None:
    options = IncrementalOptions(move_price=0.018)
    assert options.layer_price(9) == 0.018  # the shape the price is stated at, exactly
    assert options.layer_price(2) == pytest.approx(0.004)
    assert options.layer_price(18) == pytest.approx(0.036)
    assert IncrementalOptions(move_price=0.0).layer_price(2) == 0.0
    for bad in (0, -3, 2.5, True, "9"):
        with pytest.raises(ValueError, match="slots_per_gpu"):
            options.layer_price(bad)


def test_two_slot_moves_pay_the_price_of_their_bytes() -> None:
    """At 2 slots per GPU every layer's move gains at least the two-slot price × the share
    of its slots moved on the expected next window, and some gain less than the price of
    9 slots per GPU would ask (moves a price blind to the slots per GPU refused; at a
    weak drift, 0.05, where the gains are small). Global and hierarchical."""
    replicas, gpus = 96, 48
    options = IncrementalOptions()
    price = options.layer_price(replicas // gpus)
    cheap = 0
    for num_nodes, num_groups in ((1, 1), (2, 4)):
        for seed in range(3):
            drifted, old, new = replan_drifted(seed, 0.05, replicas, gpus, num_nodes,
                                               num_groups)
            both = np.stack([old.phy2log.numpy(), new.phy2log.numpy()])
            peak = score.expected_peak(drifted.numpy(), both, gpus, options.drift,
                                       groups=num_groups,
                                       group_share=options.group_share)[0]
            gain = 1.0 / peak[1] - 1.0 / peak[0]
            share = (both[1] != both[0]).mean(1)
            assert bool((gain >= price * share - 1e-9).all()), (gain, share)
            cheap += int(((share > 0) & (gain < options.move_price * share)).sum())
    assert cheap > 0


@pytest.mark.parametrize(("num_nodes", "num_groups"), [(1, 1), (4, 8)],
                         ids=["global", "hierarchical"])
@pytest.mark.parametrize("replicas", [64, 128], ids=["no spare slot", "spare slots"])
def test_one_slot_per_gpu_moves_only_replica_counts(num_nodes: int, num_groups: int,
                                                    replicas: int) -> None:
    """With one slot per GPU a plan with the placement in force's replica counts has its
    GPU loads on other GPUs: no move can pay, whatever the score's draws say (review
    pass: 910 slots moved at 256 experts on 256 GPUs, hierarchical, for nothing)."""
    for seed in range(3):
        drifted, old, new = replan_drifted(seed, 0.3, replicas, replicas, num_nodes,
                                           num_groups, experts=64)
        moved = (new.phy2log != old.phy2log).any(1)
        same_counts = (new.logcnt == old.logcnt).all(1)
        assert not bool((moved & same_counts).any()), (moved, same_counts)
        assert (new.layer_balancedness(drifted)
                >= old.layer_balancedness(drifted) - 1e-12).all()
    if replicas == 64:  # every expert once: nothing can move at all
        assert not bool(moved.any())


def test_the_ladder_reaches_as_far_in_price_at_every_slot_count() -> None:
    """Left to choose, the warm-start steps keep the ladder's reach (``(steps + 1) ·
    quota`` of a layer's slots) at the price 4 steps reach at 9 slots per GPU: more steps
    between 4 and 8 slots per GPU, where a slot's move costs less, and 4 elsewhere (at 3
    or fewer every layer is offered a fresh plan). A ``steps`` the caller sets is kept."""
    options = IncrementalOptions()
    assert [options.steps_for(s) for s in range(1, 19)] == (
        [4, 4, 4, 11, 8, 7, 6, 5] + [4] * 10)
    for slots in range(4, 9):  # at least the 9-slot reach's price, less than one step more
        reach = options.steps_for(slots) + 1
        assert reach * slots >= 5 * 9 > (reach - 1) * slots
    assert options.steps_for(np.int64(5)) == 8
    # nearest dispatch: the same on several nodes, 4 on one (SGLang's runtime table)
    assert options.steps_for(5, "nearest", 2) == 8
    assert options.steps_for(5, "nearest", 1) == options.steps_for(5, "nearest") == 4
    assert IncrementalOptions(steps=6).steps_for(5, "nearest") == 6
    assert IncrementalOptions(steps=2).steps_for(5) == 2
    assert IncrementalOptions(steps=0).steps_for(5) == 0


@pytest.mark.parametrize("slots", [0, -3, "5", 5.9, True, None])
def test_steps_for_refuses_what_layer_price_refuses(slots: object) -> None:
    # int() read "5" as 5 and 5.9 as 5, and 0 or -3 slots fell to the default steps
    with pytest.raises(ValueError, match="slots_per_gpu must be an int >= 1"):
        IncrementalOptions().steps_for(slots)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slots_per_gpu must be an int >= 1"):
        IncrementalOptions(steps=6).steps_for(slots)  # type: ignore[arg-type]


def test_steps_for_refuses_an_unknown_dispatch_or_node_count() -> None:
    # a misspelt rule, or a node count of 0, fell silently to some steps
    with pytest.raises(ValueError, match="dispatch must be 'even' or 'nearest', got 'Even'"):
        IncrementalOptions().steps_for(5, "Even")
    with pytest.raises(ValueError, match="num_nodes must be an integer >= 1"):
        IncrementalOptions().steps_for(5, "nearest", 0)


def test_plans_at_five_slots_per_gpu_take_the_longer_ladder() -> None:
    """At 5 slots per GPU a plan from the map in force runs 8 steps unless told otherwise
    (the same plan as ``steps=8``), and with 4 it reaches less far: fewer slots move in
    some layer (global and hierarchical, on drifted generated loads)."""
    replicas, gpus = 80, 16
    shorter = 0
    for nodes, groups in ((1, 1), (2, 4)):
        for seed in range(2):
            weight, drifted = generated_drift(seed, 0.3)
            old = eplb.plan(weight, replicas, gpus, nodes, groups)
            new = eplb.plan(drifted, replicas, gpus, nodes, groups, previous=old)
            assert_contract(new)
            eight = eplb.plan(drifted, replicas, gpus, nodes, groups, previous=old,
                              options=eplb.PlanOptions(incremental=IncrementalOptions(steps=8)))
            assert torch.equal(new.phy2log, eight.phy2log)
            four = eplb.plan(drifted, replicas, gpus, nodes, groups, previous=old,
                             options=eplb.PlanOptions(incremental=IncrementalOptions(steps=4)))
            assert_contract(four)
            moved = (new.phy2log != old.phy2log).sum(1)
            moved_four = (four.phy2log != old.phy2log).sum(1)
            shorter += int((moved_four < moved).sum())
    assert shorter > 0


def test_nearest_dispatch_on_several_nodes_takes_the_longer_ladder_too() -> None:
    """Under nearest dispatch on several nodes the even-split ladders the planner runs
    inside take the even split's steps, 8 at 5 slots per GPU (``_plan_nearest`` used to
    pin 4: the 2-node plans of seeds 1 and 2 differ). On one node, SGLang's runtime
    table keeps 4, which its rules for offering the fresh plan were set with."""
    replicas, gpus = 40, 8
    four = eplb.PlanOptions(incremental=IncrementalOptions(steps=4))
    eight = eplb.PlanOptions(incremental=IncrementalOptions(steps=8))
    differ = 0
    for num_nodes, same in ((1, four), (2, eight)):
        for seed in (1, 2):
            weight, drifted = generated_drift(seed, 0.3, experts=32)
            old = eplb.plan(weight, replicas, gpus, num_nodes, policy="global",
                            dispatch="nearest")
            kw = {"policy": "global", "dispatch": "nearest", "previous": old}
            new = eplb.plan(drifted, replicas, gpus, num_nodes, **kw)
            assert_contract(new)
            assert torch.equal(new.phy2log, eplb.plan(drifted, replicas, gpus, num_nodes,
                                                      options=same, **kw).phy2log)
            if num_nodes == 2:
                differ += not torch.equal(new.phy2log, eplb.plan(
                    drifted, replicas, gpus, num_nodes, options=four, **kw).phy2log)
    assert differ > 0


def test_nearest_dispatch_on_one_node_keeps_four_steps_on_every_path() -> None:
    """On one node every plan under nearest dispatch keeps 4 steps
    (``IncrementalOptions.steps_for(S, "nearest", 1)``): the runtime table's ladder, the
    even split's plan a budget also offers (``warm_even``; with the longer ladder budgets
    of 150 and 400 slots planned differently from ``steps=4`` at 5 slots per GPU, review
    pass), and the paths beside the table: a dead GPU, ``fair="expect"``, a skip
    threshold (each took the longer ladder after its first version, review pass)."""
    replicas, gpus = 40, 8
    four = eplb.PlanOptions(incremental=IncrementalOptions(steps=4))
    eight = eplb.PlanOptions(incremental=IncrementalOptions(steps=8))
    dead = torch.ones(gpus, dtype=torch.bool)
    dead[3] = False
    differ = 0
    for seed in (1, 2):
        weight, drifted = generated_drift(seed, 0.3, experts=32)
        old = eplb.plan(weight, replicas, gpus, 1, policy="global", dispatch="nearest")
        for extra in ({"max_moves": 150}, {"max_moves": 400}, {"active_gpus": dead},
                      {"fair": "expect"}, {"skip_threshold": 0.001}):
            kw = {"policy": "global", "dispatch": "nearest", "previous": old, **extra}
            new = eplb.plan(drifted, replicas, gpus, 1, **kw)
            assert_contract(new)
            assert torch.equal(new.phy2log, eplb.plan(drifted, replicas, gpus, 1,
                                                      options=four, **kw).phy2log), extra
            differ += not torch.equal(new.phy2log, eplb.plan(
                drifted, replicas, gpus, 1, options=eight, **kw).phy2log)
    assert differ > 0


def test_the_fine_ladders_line_stays_at_the_default_reach(monkeypatch) -> None:
    """Budgets below the ladder's reach also get a fine ladder. Where the steps choose
    themselves, that line stays at the reach of 4 steps (where it was measured) however
    many steps the slots per GPU give the ladder; a ``steps`` the caller sets draws it at
    its own reach, as before."""
    from eplb.online import incremental

    reaches = []
    real = incremental.fine_layers

    def spy(max_moves, reach, layers):
        reaches.append(reach)
        return real(max_moves, reach, layers)

    monkeypatch.setattr(incremental, "fine_layers", spy)
    replicas, gpus = 80, 16  # 5 slots per GPU: 8 steps
    weight, drifted = generated_drift(0, 0.3)
    old = eplb.plan(weight, replicas, gpus)
    quota = max(2, round(IncrementalOptions().quota * replicas))
    assert_contract(eplb.plan(drifted, replicas, gpus, previous=old, max_moves=40))
    assert reaches[-1] == quota * 4
    eight = eplb.PlanOptions(incremental=IncrementalOptions(steps=8))
    eplb.plan(drifted, replicas, gpus, previous=old, max_moves=40, options=eight)
    assert reaches[-1] == quota * 8
