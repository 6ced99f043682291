"""Options of the public API as users pass them: previous plans and old maps of the wrong
kind or shape, problems beyond what eplb plans (refused before planning or allocating),
options that would be ignored, option names and schedules given as arrays, nodes that do
not divide the GPUs, and GPU speeds (float64, overflow, the speed ratio limit).

``G`` is ``test_api_inputs.py``'s generator, imported: the tests here draw from it after
that file's tests, in the order they did there.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_api_inputs import G, W

import eplb
from eplb import Placement, PlacementError
from eplb.core import balancedness_ceiling
from eplb.online import MultiWindow, Rebalancer
from eplb.tools import generate_trace


def test_rebalance_experts_takes_previous_as_plan_calls_it():
    weight = torch.rand(4, 16, generator=G) * 10
    old = eplb.plan(weight, 32, 8)
    got = eplb.rebalance_experts(weight * 2 + 1, 32, 1, 1, 8, previous=old)[0]
    assert torch.equal(got, eplb.rebalance_experts(weight * 2 + 1, 32, 1, 1, 8,
                                                   old_phy2log=old.phy2log)[0])
    with pytest.raises(TypeError, match="once"):
        eplb.rebalance_experts(weight, 32, 1, 1, 8, previous=old, old_phy2log=old.phy2log)


def test_rebalance_experts_errors_name_old_phy2log_as_the_caller_did():
    """Errors about the map in force name the argument the caller used: ``old_phy2log``
    in rebalance_experts, ``previous`` in plan (they all said "previous" before)."""
    weight = torch.arange(16, dtype=torch.float32).view(2, 8) + 1
    cases = [(torch.zeros(2, 5, dtype=torch.int64), ValueError, "has shape (2, 5)"),
             (torch.full((2, 10), 9), ValueError, "holds expert ids outside"),
             ("placement.json", TypeError, "must be a Placement or a phy2log"),
             (torch.rand(2, 10), TypeError, "must hold integer expert ids")]
    for old, kind, what in cases:
        with pytest.raises(kind, match=r"^old_phy2log " + re.escape(what)):
            eplb.rebalance_experts(weight, 10, 1, 1, 2, old_phy2log=old)
        with pytest.raises(kind, match=r"^previous (placement |phy2log )?" + re.escape(what)):
            eplb.rebalance_experts(weight, 10, 1, 1, 2, previous=old)
        with pytest.raises(kind, match=r"^previous (placement |phy2log )?" + re.escape(what)):
            eplb.plan(weight, 10, 2, previous=old)


def test_rebalance_experts_names_old_phy2log_further_on_in_its_errors_too():
    """Mentions after the subject name it too ("gpu_speed cannot be combined with previous",
    "(plan without previous=)" still said previous), and a Placement's own fields are
    "old_phy2log's" (not "old_phy2log placement's"); plan's wording is kept."""
    weight = torch.arange(16, dtype=torch.float32).view(2, 8) + 1
    fresh = eplb.plan(weight, 10, 2)
    cases = [({"old_phy2log": fresh.phy2log, "gpu_speed": torch.tensor([1.0, 2.0])},
              ValueError, "gpu_speed cannot be combined with old_phy2log (incremental"),
             ({"old_phy2log": eplb.plan(weight, 12, 2)}, ValueError,
              "old_phy2log is for 12 slots on 2 GPUs, this call for 10 on 2: its slots would "
              "be read as other GPUs' (plan without old_phy2log=)"),
             ({"old_phy2log": dataclasses.replace(fresh, topology=None)}, TypeError,
              "old_phy2log's topology is a NoneType")]
    for kwargs, kind, words in cases:
        with pytest.raises(kind) as caught:
            eplb.rebalance_experts(weight, 10, 1, 1, 2, **kwargs)
        assert words in str(caught.value) and "previous" not in str(caught.value)
        kwargs["previous"] = kwargs.pop("old_phy2log")
        with pytest.raises(kind, match="previous"):
            eplb.rebalance_experts(weight, 10, 1, 1, 2, **kwargs)


def test_absurd_slots_per_gpu_are_refused_before_planning():
    with pytest.raises(ValueError, match="8192 slots per GPU on 8 GPUs"):
        eplb.plan(torch.rand(1, 64), 8 * 8192, 8)


@pytest.mark.parametrize(("shape", "replicas", "gpus", "named"), [
    ((1, 64), 196_611, 65_537, "at most 65536 GPUs"),  # the packing's 16-bit GPU index
    ((1000, 64), 65_536, 32_768, "at most 3.36e+07 slots over all layers"),
])
def test_problems_beyond_what_eplb_plans_are_refused_before_allocating(shape, replicas,
                                                                       gpus, named):
    with pytest.raises(ValueError, match="beyond what eplb plans") as caught:
        eplb.plan(torch.rand(*shape), replicas, gpus)
    assert named in str(caught.value)


def test_a_nearest_plan_past_its_call_size_is_refused_at_once(tmp_path):
    """One layer of 2048 experts on 2048 GPUs passed the per-layer bound and ran for 266 s
    with no word (attacker pass): the whole call's layers × GPUs³ × experts is bounded.
    In child processes with a timeout, so that a regression fails instead of hanging."""
    np.save(tmp_path / "loads.npy", np.random.default_rng(0).random((2, 2048)) * 1000)
    script = """if True:
        import torch, eplb
        for shape, gpus, nodes in (((1, 2048), 2048, 16), ((58, 1024), 1024, 4)):
            try:
                eplb.plan(torch.rand(*shape), 2 * gpus, gpus, nodes, policy="global",
                          dispatch="nearest")
            except ValueError as error:
                print(error)
    """
    api = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "1 layer of 2048 experts on 2048 GPUs" in api
    # a quarter of the per-layer bound, but 58 layers: about 17 minutes
    assert "58 layers of 1024 experts on 1024 GPUs (layers × GPUs³ × experts" in api
    cli = subprocess.run(
        [sys.executable, "-m", "eplb.cli", "plan", str(tmp_path / "loads.npy"), "-r", "4096",
         "-g", "2048", "--nodes", "16", "--policy", "global", "--dispatch", "nearest", "-o",
         str(tmp_path / "plan.json")], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "2 layers of 2048 experts on 2048 GPUs" in cli.stderr
    assert not (tmp_path / "plan.json").exists()


def test_few_experts_with_thousands_of_replicas_each_plan_in_little_memory():
    # the dealing's anti-affinity check compared an expert's replicas pairwise: 12 GiB here
    weight = torch.rand(1, 16, generator=G) ** 3 * 1000
    eplb.plan(weight, 262_144, 65_536).validate()


def test_the_cli_refuses_them_before_reading_a_plan(tmp_path, capsys):
    from eplb.cli import main
    torch.save(torch.rand(40, 26, 64), tmp_path / "trace.pt")
    for argv in (["simulate", str(tmp_path / "trace.pt"), "--window", "10"],
                 ["bench", "--no-builtin", str(tmp_path / "trace.pt")]):
        assert main([*argv, "-r", "2000000000", "-g", "1"]) == 2
        assert "beyond what eplb plans" in capsys.readouterr().err


def test_layers_packed_in_chunks_keep_the_contract(monkeypatch):
    """Many layers of many slots are packed a few rows at a time (flat memory)."""
    import eplb.core.packing as packing

    weight = torch.rand(12, 64, generator=G) ** 4 * 100
    whole = eplb.plan(weight, 256, 8)
    monkeypatch.setattr(packing, "SWAPS_PER_CHUNK", 4 * 32 * 32 * 3)  # 3 rows per chunk
    chunked = eplb.plan(weight, 256, 8).validate()
    assert abs(chunked.balancedness(weight) - whole.balancedness(weight)) < 0.01


def test_routing_and_previous_of_the_wrong_kind_are_named():
    w = torch.rand(2, 8)
    with pytest.raises(TypeError, match="routing must be integer top-k ids"):
        eplb.plan(w, 16, 4, 2, 2, policy="locality", dispatch="nearest", routing={"a": 1})
    meta = torch.empty(3, 2, 2, dtype=torch.long, device="meta")
    with pytest.raises(TypeError, match="meta"):
        eplb.plan(w, 16, 4, 2, 2, policy="locality", dispatch="nearest", routing=meta)
    with pytest.raises(TypeError, match="meta"):
        eplb.plan(w, 16, 4, previous=torch.empty(2, 16, dtype=torch.long, device="meta"))
    p = eplb.plan(w, 16, 4, 2, 2, policy="locality", dispatch="nearest", slack=np.float32(0.1))
    p.validate()
    # an int past float's range raised OverflowError (review pass)
    for bad in (10**400, -1, float("inf"), True, torch.tensor([0.1])):
        with pytest.raises(ValueError, match="slack must be a finite number >= 0"):
            eplb.plan(w, 16, 4, 2, 2, policy="locality", dispatch="nearest", slack=bad)


def test_options_that_would_be_ignored_are_refused():
    w = torch.rand(2, 16) + 0.1
    with pytest.raises(ValueError, match="move_price: only for incremental plans"):
        eplb.plan(w, 24, 4, move_price=0.01)
    with pytest.raises(ValueError, match="routing gives the locality policy"):
        eplb.plan(w, 24, 4, 2, 2, policy="global", dispatch="nearest",
                  routing=torch.zeros(5, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="fair and source"):
        eplb.plan(w, 24, 4, 2, 2, dispatch="nearest", fair="expect")  # auto: hierarchical
    eplb.plan(w, 24, 4, 2, 2, policy="global", dispatch="nearest", fair="expect").validate()


def test_a_slack_the_policy_does_not_use_is_refused():
    # found by the twelfth-session newcomer pass: slack=0.5 without the locality policy
    # was dropped without a word (the CLI's --slack was already refused there)
    w = torch.rand(2, 16) + 0.1
    for kwargs in ({}, {"dispatch": "nearest", "policy": "global"}):
        with pytest.raises(ValueError, match="slack is the locality policy's knob"):
            eplb.plan(w, 24, 4, 2, 2, slack=0.5, **kwargs)
    from eplb.online import Rebalancer
    with pytest.raises(ValueError, match="slack is the locality policy's knob"):
        Rebalancer(24, 4, window=2, slack=0.5)
    eplb.plan(w, 24, 4, 2, 2, policy="locality", dispatch="nearest", slack=0.5).validate()


# --------------------------------------------------- found by the fifth session's attack
@pytest.mark.parametrize(("gpus", "nodes"), [(6, 4), (8, 16)])
def test_nearest_dispatch_needs_whole_nodes(gpus, nodes):
    with pytest.raises(ValueError, match=f"num_gpus \\({gpus}\\) is not a multiple of num_nodes"):
        eplb.plan(W, 4 * gpus * 4, gpus, nodes, 1, dispatch="nearest")


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**70])
def test_seed_out_of_range_is_named(seed):
    with pytest.raises(ValueError, match="seed must be in"):
        eplb.plan(W, 96, 16, seed=seed)


def test_gpu_speed_lists_are_read_in_float64():
    """A list of speeds is not squeezed through float32 (1e300 became inf, 1e-50 zero)."""
    for scale in (1e300, 1e-50):
        speeds = [scale] + [2 * scale] * 15
        p = eplb.plan(W, 96, 16, gpu_speed=speeds)
        assert p.balancedness(W, gpu_speed=speeds) > 0


def test_gpu_speeds_whose_sum_overflows_are_refused():
    """Every speed finite but their sum inf: the mean speed, and every score in time, came
    out 0 (balancedness 0.0) instead of an error."""
    with pytest.raises(ValueError, match="gpu_speed sums beyond float64's range"):
        eplb.plan(W, 96, 16, gpu_speed=[1e308] * 16)


def test_previous_placement_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="slots would be read as other GPUs'"):
        eplb.plan(W, 96, 16, previous=eplb.plan(W, 96, 8))
    with pytest.raises(ValueError, match="previous placement has 32 experts"):
        eplb.plan(W, 96, 16, previous=eplb.plan(W[:, :32], 96, 16))


def test_placement_records_refuse_bad_expert_counts_and_mask_types():
    placed = eplb.plan(W.double(), 96, 16)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_experts must be a positive int"):
            Placement.from_phy2log(placed.phy2log, bad, placed.topology)
    listed = dataclasses.replace(placed, active_gpus=[True] * 16)
    with pytest.raises(PlacementError, match="active_gpus is a list"):
        listed.validate()
    # loads as a list of rows (tensors or huge ints) are scored like the tensor
    rows = [row for row in W.double()]
    assert placed.balancedness(rows) == placed.balancedness(W.double())


_NOT_NAMES = [np.arange(3), np.array([]), np.array(["global", "x"])]


@pytest.mark.parametrize("value", _NOT_NAMES, ids=["ints", "empty", "names"])
@pytest.mark.parametrize("call", [
    lambda v: eplb.plan(W, 96, 16, 2, policy=v),
    lambda v: eplb.plan(W, 96, 16, 2, policy=v, dispatch="nearest"),
    lambda v: eplb.plan(W, 96, 16, 2, dispatch=v),
    lambda v: eplb.plan(W, 96, 16, 2, dispatch="nearest", fair=v),
    lambda v: eplb.PackingOptions(construction=v),
    lambda v: eplb.Placement.from_phy2log(eplb.plan(W, 96, 16).phy2log, 64,
                                          eplb.Topology(96, 16), policy=v).validate(),
    lambda v: balancedness_ceiling(W, 96, 16, policy=v),
    lambda v: Rebalancer(96, 16, planner=v),
    lambda v: MultiWindow(reduce=v),
], ids=["policy", "policy-nearest", "dispatch", "fair", "construction", "validate", "bounds",
        "planner", "reduce"])
def test_option_names_given_as_arrays_are_refused_by_name(call, value):
    """``array in names`` compares element-wise: an array where an option name belongs
    raised NumPy's "truth value of an array is ambiguous", naming nothing (found by the
    twelfth-session fuzz pass)."""
    with pytest.raises(ValueError, match=r"policy|dispatch|fair|construction|planner|reduce"):
        call(value)


def test_a_regime_schedule_may_be_an_array_of_pairs():
    """``regime == "config"`` on an array of (start, regime) pairs raised NumPy's
    truth-value error; a list of the same pairs worked."""
    pairs = [(0, 0), (10, 0)]
    want = generate_trace("mixtral-8x7b", steps=20, regime=pairs).counts
    assert torch.equal(generate_trace("mixtral-8x7b", steps=20, regime=np.array(pairs)).counts,
                       want)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"packing": None}, TypeError, "packing must be an eplb.PackingOptions"),
    ({"packing": {"num_candidates": 2}}, TypeError, "packing must be an eplb.PackingOptions"),
    ({"incremental": 3}, TypeError, "incremental must be an eplb.IncrementalOptions"),
    ({"hamilton": "no"}, ValueError, "hamilton must be True or False"),
    ({"portfolio_threshold": float("nan")}, ValueError, "portfolio_threshold must be a number"),
    ({"portfolio_threshold": "high"}, ValueError, "portfolio_threshold must be a number"),
    ({"shifts": "0"}, ValueError, "shifts must be a tuple of numbers"),
    ({"shifts": torch.zeros(2, 2)}, ValueError, "shifts must be a tuple of numbers"),
    # each shift is an allocation counted and compared: 10**4 took 24 s and 5.3 GB on a
    # 3×16 plan, 10**5 ran out of memory (attacker pass)
    ({"shifts": [-i / 100 for i in range(65)]}, ValueError, "holds 65 divisor shifts; at most 64"),
    ({"incremental": eplb.IncrementalOptions}, TypeError, "incremental must be"),
])
def test_plan_options_of_the_wrong_kind_are_named(kwargs, error, match):
    """A wrong record failed deep in planning with an AttributeError ('NoneType' object has
    no attribute 'candidates_for'); hamilton='no' and a NaN threshold were taken (found by
    the twelfth-session fuzz pass)."""
    with pytest.raises(error, match=match):
        eplb.plan(W, 96, 16, options=eplb.PlanOptions(**kwargs))


def test_incremental_steps_are_bounded():
    """Every warm-start step is a candidate placement of every layer, built and scored:
    10**9 steps was killed for memory (attacker pass); refused by name instead."""
    assert eplb.IncrementalOptions(steps=256).steps == 256
    with pytest.raises(ValueError, match="steps must be at most 256, got 257"):
        eplb.IncrementalOptions(steps=257)


def test_an_array_of_shifts_plans_like_the_tuple():
    """Two or more shifts as a tensor raised torch's "Boolean value of Tensor with more
    than one value is ambiguous"."""
    want = eplb.plan(W, 96, 16, options=eplb.PlanOptions(shifts=(0.0, -0.5))).phy2log
    for shifts in (torch.tensor([0.0, -0.5]), np.array([0.0, -0.5]), [0, -0.5]):
        options = eplb.PlanOptions(shifts=shifts)
        assert options.shifts == (0.0, -0.5)
        assert torch.equal(eplb.plan(W, 96, 16, options=options).phy2log, want)


def test_nodes_that_do_not_divide_the_gpus_are_planned_as_one_node_with_a_warning(
        tmp_path, capsys):
    """Found by an attacker pass: ``num_nodes=3`` on 8 GPUs (one group) was planned
    silently and recorded as 3 nodes, a cluster the CLI refuses (a file written from it
    could not be scored). Engines pass such shapes (vLLM resets ``num_nodes`` to 1, SGLang
    passes its node count), so the API warns and plans one node; what needs whole nodes
    still raises."""
    from eplb.cli import main
    from eplb.formats import write_placement

    message = r"num_gpus \(16\) is not a multiple of num_nodes \(3\).*one node"
    with pytest.warns(RuntimeWarning, match=message) as caught:
        placement = eplb.plan(W, 96, 16, num_nodes=3)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert placement.topology.num_nodes == 1 and placement.policy == "global"
    assert torch.equal(placement.phy2log, eplb.plan(W, 96, 16).phy2log)
    with pytest.warns(RuntimeWarning, match=message):
        phy2log = eplb.rebalance_experts(W, 96, 1, 3, 16)[0]
    assert torch.equal(phy2log, placement.phy2log)
    for kwargs in ({"policy": "locality", "dispatch": "nearest"}, {"dispatch": "nearest"},
                   {"policy": "hierarchical"}):
        with pytest.raises(ValueError, match=r"num_gpus \(16\) is not a multiple"):
            eplb.plan(W, 96, 16, 3, 1, **kwargs)
    # the placement is one the CLI reads and scores; the CLI refuses the cluster itself
    write_placement(placement, tmp_path / "p.json")
    np.save(tmp_path / "loads.npy", W.numpy())
    assert main(["eval", "--placement", str(tmp_path / "p.json"),
                 str(tmp_path / "loads.npy"), "--summary"]) == 0
    assert main(["plan", str(tmp_path / "loads.npy"), "-r", "96", "-g", "16", "--nodes", "3",
                 "-o", str(tmp_path / "q.json")]) == 2
    assert "must be a multiple of --nodes" in capsys.readouterr().err


@pytest.mark.parametrize("slowest", [1e-7, 1e-300, 1e-310, 1e-320])
def test_a_gpu_far_slower_than_the_rest_is_refused(slowest):
    # it sets every layer's time whatever it holds (0.0000 at 1e-9), and at 1e-310 the
    # speed-aware packing's times overflowed with a NumPy warning (attacker pass); at
    # 1e-320 the message said "inf times slower" (files attacker pass)
    speeds = [1.0] * 3 + [slowest] + [1.0] * 12
    with pytest.raises(ValueError, match=r"GPU 3 is .* times slower than the fastest.*--dead"
                       ) as refused:
        eplb.plan(W, 96, 16, gpu_speed=speeds)
    assert "inf" not in str(refused.value)
    # a dead GPU's speed is not read, and scoring takes any speeds (second attacker pass)
    live = [True] * 3 + [False] + [True] * 12
    assert eplb.plan(W, 96, 16, gpu_speed=speeds, active_gpus=live).gpu_loads(W)[:, 3].eq(0).all()
    assert eplb.plan(W, 96, 16).balancedness(W, gpu_speed=speeds) >= 0


def test_the_speed_ratio_limit_holds_at_its_boundary():
    # a decimal 1e6 may round above it (second attacker pass): still planned
    for scale in (1.0, 3.7, 1e-3, 123.456):
        eplb.plan(W, 96, 16, gpu_speed=[scale] * 15 + [scale * 1e-6]).validate()
