"""The placement record: the output contract, checked independently of ``Placement.validate``,
and ``validate`` itself on hand-made broken placements.

``assert_contract`` (tests/helpers.py) is the independent checker every planner test uses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_contract

import eplb
from eplb import Placement, PlacementError, Topology

# --------------------------------------------------------------------------- fixtures
# R = 8 slots, P = 4 GPUs (2 slots each), N = 2 nodes (GPUs 0-1, 2-3), G = 2 groups of 2
TOPO = Topology(num_replicas=8, num_gpus=4, num_nodes=2, num_groups=2)
GOOD = [[0, 1, 1, 0, 2, 3, 3, 2], [1, 0, 0, 1, 3, 2, 2, 3]]


def good(policy: str = "hierarchical") -> Placement:
    return Placement.from_phy2log(torch.tensor(GOOD), 4, TOPO, policy)


def replace(p: Placement, **fields) -> Placement:
    values = {
        "phy2log": p.phy2log, "log2phy": p.log2phy, "logcnt": p.logcnt,
        "topology": p.topology, "policy": p.policy, "active_gpus": p.active_gpus,
    }
    values.update(fields)
    return Placement(**values)


# --------------------------------------------------------------------------- valid records
def test_hand_made_placement_is_valid_under_both_policies():
    for policy in ("global", "hierarchical"):
        p = good(policy)
        assert p.validate() is p
        assert_contract(p)
        assert p.logcnt.tolist() == [[2, 2, 2, 2]] * 2
        assert p.log2phy[0].tolist() == [[0, 3], [1, 2], [4, 7], [5, 6]]


def test_from_phy2log_accepts_one_layer_and_dead_gpus():
    topo = Topology(6, 3)
    active = torch.tensor([True, False, True])
    p = Placement.from_phy2log(torch.tensor([0, 1, -1, -1, 2, 0]), 3, topo, active_gpus=active)
    p.validate()
    assert_contract(p)
    assert p.phy2log.shape == (1, 6)
    assert p.logcnt.tolist() == [[2, 1, 1]]
    assert p.log2phy.tolist() == [[[0, 5], [1, -1], [4, -1]]]


def test_from_phy2log_refuses_what_is_not_a_map_of_integer_ids():
    with pytest.raises(TypeError, match="phy2log must hold integer expert ids"):
        Placement.from_phy2log(torch.tensor([[0.7, 1.2, 2.9, 3, 0, 1, 2, 3]]), 4, Topology(8, 4))
    with pytest.raises(TypeError, match=r"topology must be an eplb\.Topology, got tuple"):
        Placement.from_phy2log(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]), 4, (8, 4))


def test_moving_a_placement_to_a_device_torch_cannot_use_is_a_clear_error():
    # torch raised a bare AssertionError ("Torch not compiled with CUDA enabled") for CUDA
    # on a CPU-only build, and a RuntimeError for a misspelt device
    p = good()
    assert torch.equal(p.to("cpu").phy2log, p.phy2log)
    with pytest.raises(ValueError, match="cannot move the placement to device 'bogus'"):
        p.to("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cannot move the placement to device 'cuda'"):
            p.to("cuda")


def test_placement_repr_is_one_line():
    p = Placement.from_phy2log(torch.tensor([0, 1, -1, -1, 2, 0]), 3, Topology(6, 3),
                               active_gpus=torch.tensor([True, False, True]))
    text = repr(p)
    assert "\n" not in text and "layers=1" in text and "dead_gpus=1" in text
    assert "tensor(" not in text


def test_topology_properties_and_errors():
    topo = Topology(288, 32, 4, 8)
    assert topo.slots_per_gpu == 9
    assert topo.gpus_per_node == 8
    assert topo.as_dict() == {"num_replicas": 288, "num_gpus": 32, "num_nodes": 4, "num_groups": 8}
    with pytest.raises(ValueError, match="multiple of num_gpus"):
        Topology(10, 4)
    with pytest.raises(ValueError, match="num_gpus must be a positive integer"):
        Topology(8, 0)
    with pytest.raises(ValueError, match="num_nodes"):
        _ = Topology(12, 3, 2).gpus_per_node


def test_loads_and_balancedness():
    p = good("global")
    w = torch.tensor([[4.0, 2.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # layer 0: slots carry 2,1,1,2,1,0,0,1 → GPUs 3,3,1,1 ; layer 1: every slot 0.5 → GPUs 1
    assert p.replica_loads(w)[0].tolist() == [2, 1, 1, 2, 1, 0, 0, 1]
    assert p.gpu_loads(w).tolist() == [[3, 3, 1, 1], [1, 1, 1, 1]]
    assert p.layer_balancedness(w).tolist() == pytest.approx([2 / 3, 1.0])
    assert p.balancedness(w) == pytest.approx((2 + 1) / (3 + 1))
    speed = torch.tensor([1.0, 3.0, 1.0, 1.0])
    assert p.gpu_loads(w, speed)[0].tolist() == pytest.approx([3, 1, 1, 1])
    zero = torch.zeros(2, 4)
    assert p.balancedness(zero) == 1.0
    with pytest.raises(ValueError, match="shape"):
        p.gpu_loads(torch.ones(3, 4))


@pytest.mark.parametrize("scales", [(1e300, 1e-300), (1.0, 1e-300), (1e300, 1.0), (1e-320, 1.0)])
def test_each_layer_reads_its_own_balance_whatever_the_others_weigh(scales):
    # attacker pass: one power of two for every layer let a layer 1e-300 beside one of
    # 1e300 vanish (read 1.0) or lose its digits (0.41 for 0.65)
    p = good("global")
    w = torch.tensor([[4.0, 2.0, 2.0, 0.0], [3.0, 1.0, 1.0, 2.0]], dtype=torch.float64)
    expected = p.layer_balancedness(w)
    scaled = w * torch.tensor(scales, dtype=torch.float64)[:, None]
    assert p.layer_balancedness(scaled).tolist() == pytest.approx(expected.tolist(), rel=1e-12)


def test_moved_slots_and_device_move():
    p = good("global")
    q = Placement.from_phy2log(torch.tensor([[0, 1, 1, 0, 2, 3, 2, 3], GOOD[1]]), 4, TOPO)
    assert q.moved_slots(p).tolist() == [2, 0]
    assert q.moved_slots(p.phy2log).tolist() == [2, 0]
    with pytest.raises(ValueError, match="shape"):
        q.moved_slots(p.phy2log[:1])
    moved = p.to("cpu")
    assert torch.equal(moved.phy2log, p.phy2log) and moved.policy == p.policy


# --------------------------------------------------------------------------- broken records
def test_validate_rejects_wrong_dtype():
    p = good()
    with pytest.raises(PlacementError, match=r"phy2log has dtype torch\.int32"):
        replace(p, phy2log=p.phy2log.to(torch.int32)).validate()
    with pytest.raises(PlacementError, match=r"logcnt has dtype torch\.float32"):
        replace(p, logcnt=p.logcnt.float()).validate()
    with pytest.raises(PlacementError, match="log2phy is a list"):
        replace(p, log2phy=p.log2phy.tolist()).validate()


def test_validate_rejects_a_placement_without_data():
    p = good()
    meta = replace(p, phy2log=p.phy2log.to("meta"), log2phy=p.log2phy.to("meta"),
                   logcnt=p.logcnt.to("meta"))
    with pytest.raises(PlacementError, match="phy2log is a meta tensor"):
        meta.validate()


def test_placement_error_is_a_value_error():
    assert issubclass(PlacementError, ValueError)
    assert eplb.PlacementError is PlacementError


def test_validate_rejects_inconsistent_logcnt():
    p = good()
    logcnt = p.logcnt.clone()
    logcnt[1, 0] += 1
    logcnt[1, 1] -= 1  # still sums to R
    msg = "layer 1 expert 0: logcnt says 3 replicas but phy2log holds 2"
    with pytest.raises(PlacementError, match=msg):
        replace(p, logcnt=logcnt).validate()
    logcnt = p.logcnt.clone()
    logcnt[0, 2] += 1
    with pytest.raises(PlacementError, match="layer 0: logcnt sums to 9, expected 8"):
        replace(p, logcnt=logcnt).validate()


def test_validate_rejects_log2phy_not_ascending():
    p = good()
    log2phy = p.log2phy.clone()
    log2phy[0, 2] = log2phy[0, 2].flip(0)  # [7, 4]
    with pytest.raises(PlacementError, match=r"layer 0 expert 2: log2phy lists \[7, 4\]"):
        replace(p, log2phy=log2phy).validate()


def test_validate_rejects_bad_log2phy_padding():
    p = good()
    padded = torch.cat([p.log2phy, torch.full((2, 4, 1), 5, dtype=torch.int64)], dim=2)
    with pytest.raises(PlacementError, match="-1 beyond the replica count"):
        replace(p, log2phy=padded).validate()
    ok = torch.cat([p.log2phy, torch.full((2, 4, 1), -1, dtype=torch.int64)], dim=2)
    replace(p, log2phy=ok).validate()  # extra -1 columns are fine


def test_validate_rejects_expert_out_of_range():
    p2l = torch.tensor(GOOD)
    p2l[1, 5] = 4  # only experts 0..3 exist
    p = Placement.from_phy2log(p2l, 4, TOPO, "global")
    with pytest.raises(PlacementError, match=r"layer 1 slot 5 holds expert 4, outside \[0, 4\)"):
        p.validate()
    p2l[1, 5] = -3
    p = replace(good("global"), phy2log=p2l)
    with pytest.raises(PlacementError, match=r"layer 1 slot 5 holds expert -3"):
        p.validate()


def test_validate_rejects_wrong_slot_count():
    p = good()
    with pytest.raises(PlacementError, match="phy2log has 8 slots but the topology has 12"):
        replace(p, topology=Topology(12, 4, 2, 2)).validate()


def test_validate_rejects_two_replicas_on_one_gpu():
    # expert 0's two replicas both on GPU 0 (slots 0, 1), expert 1's both on GPU 1
    p = Placement.from_phy2log(torch.tensor([[0, 0, 1, 1, 2, 3, 2, 3]]), 4, TOPO, "global")
    msg = "anti-affinity: layer 0 GPU 0 holds 2 replicas of expert 0"
    with pytest.raises(PlacementError, match=msg):
        p.validate()
    p.validate(anti_affinity=False)  # everything else is fine
    # more replicas than GPUs may share: 5 replicas on 4 GPUs → 2 on one GPU is allowed
    topo = Topology(8, 4)
    ok = Placement.from_phy2log(torch.tensor([[0, 0, 0, 1, 0, 2, 0, 3]]), 4, topo)
    ok.validate()
    assert_contract(ok)
    # ... but never 3: with 3 slots per GPU, 5 replicas over 4 GPUs allow ceil(5/4) = 2 per GPU
    bad = Placement.from_phy2log(
        torch.tensor([[0, 0, 0, 0, 1, 2, 0, 3, 1, 2, 3, 1]]), 4, Topology(12, 4))
    bad.validate(anti_affinity=False)
    msg = "anti-affinity: layer 0 GPU 0 holds 3 replicas of expert 0"
    with pytest.raises(PlacementError, match=msg):
        bad.validate()


def test_validate_hierarchical_anti_affinity_counts_the_node_gpus():
    # 3 replicas of expert 0 inside node 0 (2 GPUs): 2 on one GPU is the best possible
    p = Placement.from_phy2log(torch.tensor([[0, 0, 1, 0, 2, 3, 2, 3]]), 4, TOPO, "hierarchical")
    p.validate()
    assert_contract(p)


def test_validate_rejects_group_split_across_nodes():
    # group 0 = experts {0, 1}: expert 1 also sits on node 1 (slot 4)
    p = Placement.from_phy2log(torch.tensor([[0, 1, 2, 0, 1, 3, 3, 2]]), 4, TOPO, "hierarchical")
    msg = r"hierarchical locality: layer 0 group 0 has replicas on nodes 0\.\.1"
    with pytest.raises(PlacementError, match=msg):
        p.validate()
    # the same slots are a valid global placement
    Placement.from_phy2log(p.phy2log, 4, TOPO, "global").validate()


def test_validate_rejects_empty_slot_on_live_gpu_and_filled_slot_on_dead_gpu():
    p2l = torch.tensor([[0, 1, 1, 0, 2, 3, 3, -1]])
    p = Placement.from_phy2log(p2l, 4, TOPO, "global")
    msg = r"layer 0 slot 7 is empty \(-1\) but its GPU 3 is live"
    with pytest.raises(PlacementError, match=msg):
        p.validate()
    dead = torch.tensor([True, True, True, False])
    p = Placement.from_phy2log(torch.tensor([[0, 1, 2, 0, 3, 1, 2, 3]]), 4, TOPO, "global", dead)
    with pytest.raises(PlacementError, match="layer 0 slot 6 is filled but its GPU 3 is dead"):
        p.validate()
    p = Placement.from_phy2log(torch.tensor([[0, 1, 2, 0, 3, 1, -1, -1]]), 4, TOPO, "global", dead)
    p.validate()
    assert_contract(p)


def test_validate_rejects_expert_without_replica():
    p = Placement.from_phy2log(torch.tensor([[0, 1, 1, 0, 2, 0, 2, 1]]), 4, TOPO, "global")
    with pytest.raises(PlacementError, match="layer 0 expert 3 has 0 replicas, needs >= 1"):
        p.validate()


def test_validate_rejects_bad_policy_and_active_gpus_shape():
    p = good()
    with pytest.raises(PlacementError, match="unknown policy 'mixed'"):
        replace(p, policy="mixed").validate()
    with pytest.raises(PlacementError, match=r"active_gpus has shape \(3,\), expected \[4\]"):
        replace(p, active_gpus=torch.ones(3, dtype=torch.bool)).validate()
    # (attacker pass: a float mask of 0.5 was read as live, and no topology met an
    # AttributeError)
    for mask in (torch.full((4,), 0.5), torch.full((4,), 2)):
        with pytest.raises(PlacementError, match=r"active_gpus is a torch\.\w+ tensor, "
                                                 r"expected a bool"):
            replace(p, active_gpus=mask).validate()
    with pytest.raises(PlacementError, match="topology is a NoneType, expected an eplb"):
        replace(p, topology=None).validate()
    # from_phy2log checks the mask as the planners do: a list of bools is taken, a uint8
    # mask refused (it built a record validate() and the writers refused)
    live = [True, True, False, True]
    built = Placement.from_phy2log(torch.tensor([[0, 1, 2, 3, -1, -1, 0, 1]]), 4, TOPO,
                                   active_gpus=live)
    assert built.active_gpus.dtype == torch.bool and built.validate() is built
    with pytest.raises(TypeError, match="active_gpus must be a boolean mask"):
        Placement.from_phy2log(built.phy2log, 4, TOPO, active_gpus=torch.tensor(live).byte())


def test_assert_contract_itself_catches_violations():
    """The independent checker must fail where validate fails (it is not vacuous)."""
    split = Placement.from_phy2log(torch.tensor([[0, 1, 2, 0, 1, 3, 3, 2]]), 4, TOPO,
                                   "hierarchical")
    with pytest.raises(AssertionError, match="spans nodes"):
        assert_contract(split)
    shared = Placement.from_phy2log(torch.tensor([[0, 0, 1, 1, 2, 3, 2, 3]]), 4, TOPO, "global")
    with pytest.raises(AssertionError, match="replicas on one GPU"):
        assert_contract(shared)
    assert_contract(shared, anti_affinity=False)
    p = good()
    log2phy = p.log2phy.clone()
    log2phy[0, 2] = log2phy[0, 2].flip(0)
    with pytest.raises(AssertionError, match="log2phy"):
        assert_contract(replace(p, log2phy=log2phy))


@pytest.mark.parametrize("experts", [5, 200, 256, 300])
def test_log2phy_of_long_rows_matches_a_plain_inversion(experts):
    # rows of 128+ slots and at most 256 expert ids (255 with a dead GPU's -1) take the
    # 8-bit radix sort in build_log2phy; the others the packed sort
    from eplb.core.map_tables import build_log2phy

    rng = np.random.default_rng(experts)
    phy2log = torch.from_numpy(rng.integers(0, experts, (6, 320)))
    phy2log[2, :40] = -1  # dead slots
    log2phy, logcnt = build_log2phy(phy2log, experts)
    for layer in range(6):
        for e in range(experts):
            slots = np.flatnonzero(phy2log[layer].numpy() == e).tolist()
            assert logcnt[layer, e] == len(slots)
            row = log2phy[layer, e].tolist()
            assert row == slots + [-1] * (log2phy.shape[2] - len(slots))


def test_a_wrong_weight_is_named_by_the_shape_it_was_given() -> None:
    """A one-layer ``[E]`` weight for a many-layer placement is named as passed, not as
    the ``[1, E]`` it is read as."""
    p = good("global")
    with pytest.raises(ValueError, match=r"weight has shape \(4,\), the placement needs \[2, 4\]"):
        p.balancedness(torch.ones(4))
    with pytest.raises(ValueError, match=r"weight has shape \(2, 5\), the placement needs"):
        p.gpu_loads(torch.ones(2, 5))


def test_loads_of_a_placement_with_expert_ids_beyond_its_experts_are_refused_by_name():
    # from_phy2log builds without validating; the load methods must not fail with torch's
    # index error on such a record
    topo = Topology(8, 4)
    bad = Placement.from_phy2log(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 14]]), 8, topo)
    for method in (bad.balancedness, bad.gpu_loads, bad.replica_loads):
        with pytest.raises(ValueError, match=r"expert ids outside \[-1, 8\)"):
            method(torch.ones(8))


def test_moved_slots_per_gpu_takes_a_bool_only() -> None:
    """Attacker pass: ``per_gpu="no"`` is true, and returned per-GPU counts."""
    weight = torch.rand(2, 8, dtype=torch.float64)
    a, b = eplb.plan(weight, 16, 4), eplb.plan(weight.flip(1), 16, 4)
    assert b.moved_slots(a).shape == (2,) and b.moved_slots(a, per_gpu=True).shape == (4,)
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="per_gpu must be True or False"):
            b.moved_slots(a, per_gpu=bad)


def test_a_placement_keeps_its_map_when_the_callers_changes_in_place():
    # from_phy2log kept an int64 contiguous map (an engine's live one, or a NumPy array)
    # as its own phy2log, so the caller's later in-place rearrangement rewrote the record
    # under its log2phy and logcnt (and a Rebalancer's initial placement); review pass
    from eplb.online import Rebalancer

    topology = Topology(16, 4)
    for live in ((torch.arange(16) % 8).repeat(2, 1), np.tile(np.arange(16) % 8, (2, 1))):
        placement = Placement.from_phy2log(live, 8, topology)
        rebalancer = Rebalancer(16, 4, window=2, interval=2, incremental=True,
                                initial=Placement.from_phy2log(live, 8, topology))
        live[0, :2] = 7  # the engine rearranges its map in place
        assert_contract(placement.validate())
        assert int(placement.phy2log[0, 0]) == 0
        assert int(rebalancer.placement.phy2log[0, 0]) == 0
        for _ in range(2):
            rebalancer.record(torch.ones(2, 8))
        assert_contract(rebalancer.placement.validate())


def test_a_placement_keeps_its_live_mask_when_the_callers_changes_in_place():
    # eplb.plan and from_phy2log kept the caller's bool mask as the record's active_gpus,
    # so marking another GPU dead in the same tensor later made the plan invalid ("slot 0
    # is filled but its GPU 0 is dead"); review pass
    live = torch.tensor([True, True, True, False])
    planned = eplb.plan(torch.rand(2, 8), 16, 4, active_gpus=live)
    rebuilt = Placement.from_phy2log(planned.phy2log, 8, Topology(16, 4), active_gpus=live)
    live[0], live[3] = False, True
    for placement in (planned, rebuilt):
        assert placement.active_gpus.tolist() == [True, True, True, False]
        assert_contract(placement.validate())


def test_scores_in_time_take_speeds_of_any_scale() -> None:
    # only the speeds' ratios matter (eplb.plan plans 1e-300 and 1 alike), but a GPU's
    # time was load / speed as given: 1e10 tokens over speeds near 1e-300 overflowed, and
    # balancedness and placement_scores read nan (attacker pass)
    from eplb.core import placement_scores

    w = torch.rand(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    speed = torch.tensor([1.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    p = eplb.plan(w, 16, 4, gpu_speed=speed)
    expected = p.balancedness(w, gpu_speed=speed)
    for loads, speeds in ((w * 2.0**40, speed * 2.0**-1000), (w, speed * 2.0**-1070),
                          (w * 2.0**-40, speed * 2.0**1000)):
        assert p.balancedness(loads, gpu_speed=speeds) == expected
        assert placement_scores(p, loads, gpu_speed=speeds)["balancedness"] == expected
