"""Property tests over the slot counts the README promises (1 to 17 slots per GPU) and the
edge ``R == E`` (no redundant slot), which the other property modules draw rarely or never
(their clusters stop at 4 or 5 slots per GPU).

One draw picks a cluster (global, or hierarchical nodes and groups), dead GPUs where the
live slots still hold every expert, loads, an old map of any origin (none, eplb's own,
vLLM's initial ``i -> i % E``, DeepSeek's greedy, random, planned with a GPU dead that is
live now, planned before a GPU died) and a move budget, and sends it through
``eplb.plan``, the drop-in ``rebalance_experts`` (``old_phy2log=``) and the vLLM policy.
Each answer must keep the whole contract.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np
import torch
from helpers import assert_contract
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import eplb
from eplb.core import plan_greedy
from eplb.integrations import vllm as vllm_plugin

ORIGINS = ("none", "eplb", "vllm-initial", "greedy", "random", "revived", "died")


@st.composite
def wide_calls(draw):
    nodes = draw(st.integers(1, 3))
    gpus = nodes * draw(st.integers(1, 3))
    slots = draw(st.integers(1, 17))
    replicas = gpus * slots
    groups = nodes * draw(st.integers(1, 2)) if nodes > 1 and draw(st.integers(0, 3)) else 1
    if groups > replicas:  # a group per slot at most
        groups = nodes
    exact = draw(st.integers(0, 2)) == 0  # R == E: every expert exactly one slot
    if exact and replicas % groups == 0:
        experts = replicas
    else:
        experts = groups * draw(st.integers(1, max(1, replicas // groups)))
    layers = draw(st.integers(1, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    origin = draw(st.sampled_from(ORIGINS))
    live = None
    spare_gpus = (replicas - experts) // slots  # GPUs that may die, every expert still held
    if spare_gpus >= 1 and origin != "revived" and draw(st.integers(0, 2)) == 0:
        live = torch.ones(gpus, dtype=torch.bool)
        live[torch.from_numpy(rng.choice(gpus, int(rng.integers(1, spare_gpus + 1)),
                                         replace=False))] = False
    hierarchical = groups > 1 and live is None and draw(st.integers(0, 3)) > 0
    budget = None
    if origin != "none" and draw(st.booleans()):
        budget = int(rng.integers(0, layers * replicas + 1))
    w = torch.from_numpy(np.round(np.exp(rng.normal(0, 1.5, (layers, experts))) * 50))
    if draw(st.integers(0, 4)) == 0:
        w[0] = 0  # an idle layer
    return {"nodes": nodes, "gpus": gpus, "slots": slots, "replicas": replicas,
            "groups": groups, "experts": experts, "layers": layers, "live": live,
            "policy": "hierarchical" if hierarchical else "global", "origin": origin,
            "budget": budget, "weight": w, "rng": rng, "seed": draw(st.integers(0, 1000))}


def old_map(call: dict) -> torch.Tensor | None:
    """The placement in force, of the call's origin, as an ``[L, R]`` map."""
    origin, layers, experts = call["origin"], call["layers"], call["experts"]
    replicas, gpus, rng = call["replicas"], call["gpus"], call["rng"]
    w0 = call["weight"] * torch.from_numpy(np.exp(rng.normal(0, 0.5, call["weight"].shape)))
    w0 = w0 + 1
    if origin == "none":
        return None
    if origin == "eplb":
        return eplb.plan(w0, replicas, gpus, call["nodes"], call["groups"],
                         policy=call["policy"], active_gpus=call["live"]).phy2log
    if origin == "vllm-initial":
        return torch.arange(replicas).remainder(experts).repeat(layers, 1)
    if origin == "greedy":
        return plan_greedy(w0, replicas, gpus, call["nodes"], call["groups"]).phy2log
    if origin == "random":
        return torch.from_numpy(rng.integers(0, experts, (layers, replicas)))
    if origin == "revived":  # planned while the last GPU was dead (if it could be)
        dead = torch.ones(gpus, dtype=torch.bool)
        dead[-1] = (gpus - 1) * call["slots"] < experts
        return eplb.plan(w0, replicas, gpus, active_gpus=dead).phy2log
    return eplb.plan(w0, replicas, gpus).phy2log  # "died": planned with every GPU live


def check(p: eplb.Placement, call: dict) -> None:
    p.validate()
    assert_contract(p)
    assert p.phy2log.shape == (call["layers"], call["replicas"])
    slots_live = torch.ones(call["replicas"], dtype=torch.bool) if call["live"] is None \
        else call["live"].repeat_interleave(call["slots"])
    assert bool((p.phy2log[:, ~slots_live] == -1).all()), "a dead GPU holds an expert"
    assert bool((p.phy2log[:, slots_live] >= 0).all()), "a live slot is empty"
    if call["experts"] == call["replicas"]:  # no redundant slot: one replica each
        assert bool((p.logcnt == 1).all())


def planned(call: dict, old: torch.Tensor | None) -> eplb.Placement:
    kwargs = {"policy": call["policy"], "seed": call["seed"], "active_gpus": call["live"]}
    if old is not None:
        kwargs.update(previous=old, max_moves=call["budget"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return eplb.plan(call["weight"], call["replicas"], call["gpus"], call["nodes"],
                         call["groups"], **kwargs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=wide_calls())
def test_plans_for_1_to_17_slots_per_gpu_and_no_spare_slot_keep_the_contract(call):
    event(f"{call['policy']}, R == E" if call["experts"] == call["replicas"] else call["policy"])
    old = old_map(call)
    p = planned(call, old)
    assert p.policy == call["policy"]
    check(p, call)
    assert torch.equal(planned(call, old).phy2log, p.phy2log), "the same input planned twice"
    if old is not None and call["budget"] is not None and call["origin"] == "eplb":
        # eplb's own map for these live GPUs and policy: no forced move, the budget holds
        assert int(p.moved_slots(old).sum()) <= call["budget"]
    # the drop-in: the same plan, as DeepSeek's three tensors
    args = (call["replicas"], call["groups"], call["nodes"], call["gpus"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        phy2log, log2phy, logcnt = eplb.rebalance_experts(
            call["weight"], *args, policy=call["policy"], seed=call["seed"],
            old_phy2log=old, active_gpus=call["live"],
            **({} if old is None else {"max_moves": call["budget"]}))
    assert torch.equal(phy2log, p.phy2log)
    assert torch.equal(logcnt, p.logcnt)
    assert torch.equal(log2phy, p.log2phy)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=wide_calls())
def test_the_vllm_policy_answers_1_to_17_slots_per_gpu_with_a_valid_plan(call):
    """vLLM calls with int32 loads and its map in force; every GPU is live there."""
    call = dict(call, live=None)
    if call["origin"] in ("revived", "died"):
        call["origin"] = "eplb"
    old = old_map(call)

    class Policy(vllm_plugin.EplbPolicy):
        options: ClassVar[dict] = {"agree_timeout_s": 0, "policy": call["policy"]}

    phy2log = Policy.rebalance_experts(call["weight"].to(torch.int32), call["replicas"],
                                       call["groups"], call["nodes"], call["gpus"], old)
    topo = eplb.Topology(call["replicas"], call["gpus"], call["nodes"], call["groups"])
    check(eplb.Placement.from_phy2log(phy2log, call["experts"], topo, call["policy"]), call)
