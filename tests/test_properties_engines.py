"""Property tests of the entry points beside ``eplb.plan`` (thirteenth-session property
audit): the vLLM policy, SGLang's ``eplb_rebalance``, the ``Rebalancer``, and placements
read back from every file format as the placement in force.

Each draws a cluster, loads as the engine passes them (vLLM: int32 windows; SGLang:
``[T, L, E]`` or ``[L, E]`` counts) and an old map of any origin the engine may hold
(none, its initial map, DeepSeek's greedy, random, stacked, with slots of GPUs being
added (-1), of another shape), and checks that what comes back is a placement that passes
the whole contract (under the hierarchical policy where the call resolves to it), and is
the same for the same call.
"""

from __future__ import annotations

import logging
import warnings
from typing import ClassVar

import numpy as np
import pytest
import torch
from helpers import assert_contract
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb import Placement, Topology
from eplb.core import plan_greedy
from eplb.formats import EMITS, read_placement, write_placement
from eplb.integrations import sglang as sglang_plugin
from eplb.integrations import vllm as vllm_plugin
from eplb.online import Rebalancer

ENGINE_SETTINGS = settings(max_examples=30, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow])
OLD_MAPS = ("none", "initial", "greedy", "random", "stacked", "adding-gpus", "other-shape")


@st.composite
def engine_calls(draw):
    """A cluster (experts a multiple of the groups), int loads and an old map."""
    nodes = draw(st.integers(1, 3))
    gpus = nodes * draw(st.integers(1, 3))
    slots = draw(st.integers(1, 4))
    groups = nodes * draw(st.integers(1, 2)) if draw(st.booleans()) else 1
    replicas = gpus * slots
    per_group = min(draw(st.integers(1, 5)), replicas // groups)
    if per_group < 1:
        groups, per_group = 1, min(draw(st.integers(1, 5)), replicas)
    experts, layers = groups * per_group, draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = torch.from_numpy(rng.integers(0, 1000, (layers, experts))).to(torch.int32)
    if draw(st.integers(0, 3)) == 0:
        weight[0] = 0  # vLLM's profile run, a dense layer
    origin = draw(st.sampled_from(OLD_MAPS))
    initial = torch.arange(replicas).remainder(experts).repeat(layers, 1)
    old = {
        "none": None,
        "initial": initial,
        "greedy": None,
        "random": torch.from_numpy(rng.integers(0, experts, (layers, replicas))),
        "stacked": torch.cat([torch.zeros(layers, slots, dtype=torch.int64),
                              initial[:, slots:]], 1) if replicas - slots >= experts else initial,
        "adding-gpus": torch.cat([initial[:, :-1], torch.full((layers, 1), -1)], 1),
        "other-shape": torch.arange(replicas + gpus).remainder(experts).repeat(layers, 1),
    }[origin]
    if origin == "greedy":
        old = plan_greedy(weight.double() + 1, replicas, gpus, nodes, groups).phy2log
    if old is not None and draw(st.booleans()):
        old = old.to(torch.int32)  # engines hold their maps in int32 too
    options = draw(st.fixed_dictionaries({}, optional={
        "policy": st.sampled_from(["auto", "global"]), "max_moves": st.integers(0, 40),
        "skip_threshold": st.sampled_from([0.0, 0.02]), "move_price": st.sampled_from([0.0, 0.5]),
        "seed": st.integers(0, 5)}))
    return {"nodes": nodes, "gpus": gpus, "slots": slots, "groups": groups,
            "replicas": replicas, "experts": experts, "weight": weight, "old": old,
            "options": options}


def hierarchical_fits(call: dict) -> bool:
    """DeepSeek's rule for ``auto``: groups over several nodes, evenly."""
    return call["groups"] > 1 and call["nodes"] > 1 and call["groups"] % call["nodes"] == 0


def placement_of(call: dict, phy2log: torch.Tensor, policy: str) -> Placement:
    """``phy2log`` as a record of the call's cluster, checked against the whole contract."""
    topo = Topology(call["replicas"], call["gpus"], call["nodes"], call["groups"])
    p = Placement.from_phy2log(phy2log, call["experts"], topo, policy)
    p.validate()
    assert_contract(p)
    return p


@ENGINE_SETTINGS
@given(engine_calls())
def test_the_vllm_policy_answers_every_old_map_with_a_valid_plan(call):
    class Policy(vllm_plugin.EplbPolicy):
        # one process: no agreement between ranks
        options: ClassVar[dict] = dict(call["options"], agree_timeout_s=0)

    def ask() -> torch.Tensor:
        return Policy.rebalance_experts(call["weight"], call["replicas"], call["groups"],
                                        call["nodes"], call["gpus"], call["old"])

    phy2log = ask()
    assert phy2log.dtype == torch.int64 and phy2log.device.type == "cpu"
    auto = call["options"].get("policy", "auto") == "auto"
    placement_of(call, phy2log, "hierarchical" if auto and hierarchical_fits(call) else "global")
    assert torch.equal(ask(), phy2log)


@ENGINE_SETTINGS
@given(engine_calls(), st.booleans(), st.sampled_from([None, "static", "normal"]),
       st.sampled_from(["auto", "even", "nearest"]), st.booleans())
def test_sglangs_rebalance_answers_every_old_map_with_a_valid_plan(
        call, hierarchical, sglang_dispatch, dispatch, per_pass):
    options = dict(call["options"], dispatch=dispatch)
    tokens = torch.stack([call["weight"], call["weight"]]) if per_pass else call["weight"]
    old = None if call["old"] is None else call["old"].to(torch.int64)
    groups = call["groups"] if call["groups"] > 1 else None

    def ask() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return sglang_plugin.eplb_rebalance(tokens, call["replicas"], call["slots"], groups,
                                                call["nodes"], hierarchical, options, old,
                                                sglang_dispatch)

    logging.disable(logging.WARNING)  # the plugin notes options it drops
    try:
        phy2log, log2phy, logcnt = ask()
        again = ask()
    finally:
        logging.disable(logging.NOTSET)
    nearest = dispatch == "nearest" or (dispatch == "auto" and sglang_dispatch == "static")
    nearest = nearest and call["nodes"] > 1
    asked = options.get("policy") or ("global" if nearest or not hierarchical else "hierarchical")
    local = asked in ("hierarchical", "auto") and hierarchical_fits(call)
    p = placement_of(call, phy2log, "hierarchical" if local else "global")
    # SGLang reads all three maps: they must be the ones phy2log implies
    assert torch.equal(logcnt, p.logcnt)
    assert torch.equal(log2phy, p.log2phy[:, :, :log2phy.shape[2]])
    assert bool((p.log2phy[:, :, log2phy.shape[2]:] == -1).all())
    for mine, theirs in zip((phy2log, log2phy, logcnt), again, strict=True):
        assert torch.equal(mine, theirs)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(engine_calls(), st.sampled_from(["sum", "ema:4", "robust:1.0", "multi:2:2"]),
       st.booleans(), st.sampled_from([None, 0, 5]), st.booleans(),
       st.lists(st.integers(1, 7), min_size=1, max_size=5))
def test_every_rebalancer_placement_keeps_the_contract(call, estimator, incremental, budget,
                                                       dead, chunks):
    live = None
    if dead and call["gpus"] > 1 and (call["gpus"] - 1) * call["slots"] >= call["experts"]:
        live = torch.ones(call["gpus"], dtype=torch.bool)
        live[-1] = False
    policy = "hierarchical" if hierarchical_fits(call) and live is None else "global"
    kwargs = {"window": 5, "interval": 4, "estimator": estimator, "incremental": incremental,
              "active_gpus": live, "policy": policy}
    if incremental:
        kwargs["max_moves"] = budget
    rng = np.random.default_rng(len(chunks))
    steps = [torch.from_numpy(rng.integers(0, 50, (n, *call["weight"].shape))) for n in chunks]
    runs = []
    for _ in range(2):  # two rebalancers fed alike plan alike
        rebalancer = Rebalancer(call["replicas"], call["gpus"], call["nodes"], call["groups"],
                                **kwargs)
        seen = []
        for counts in steps:
            rebalancer.record(counts)
            p = rebalancer.placement
            if p is None:
                continue
            assert p.policy == policy
            p.validate()
            assert_contract(p)
            if live is not None:
                assert bool((p.phy2log[:, -call["slots"]:] == -1).all())
            seen.append(p.phy2log)
        for before, event in zip([None, *seen], rebalancer.events, strict=False):
            if incremental and budget is not None and before is not None:
                assert int(event.moved_slots.sum()) <= budget  # eplb's own map: no forced move
        runs.append(seen)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def _suffix(emit: str) -> str:
    return {"json": "json", "pt": "pt", "sglang": "json", "trtllm": "yaml"}[emit]


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(engine_calls(), st.floats(0.0, 1.0))
def test_a_placement_read_from_any_file_plans_like_the_one_written(tmp_path_factory, call,
                                                                   drift):
    """Every format gives back the placement in force: the next plan from the file is
    valid and the same as from the record it was written from."""
    w = call["weight"].double() + 1
    policy = "hierarchical" if hierarchical_fits(call) else "global"
    args = (call["replicas"], call["gpus"], call["nodes"], call["groups"])
    written = eplb.plan(w, *args, policy=policy)
    later = w * torch.from_numpy(np.exp(np.random.default_rng(0).normal(0, drift, w.shape)))
    want = eplb.plan(later, *args, policy=policy, previous=written)
    folder = tmp_path_factory.mktemp("files")
    for emit in EMITS:
        path = write_placement(written, folder / f"p.{emit}.{_suffix(emit)}", emit)
        back = read_placement(path, num_gpus=call["gpus"], num_nodes=call["nodes"],
                              num_groups=call["groups"], num_experts=call["experts"])
        assert torch.equal(back.phy2log, written.phy2log), emit
        got = eplb.plan(later, *args, policy=policy, previous=back)
        got.validate()
        assert_contract(got)
        assert torch.equal(got.phy2log, want.phy2log), emit


def test_an_engine_file_read_for_another_cluster_is_refused_as_the_placement_in_force(
        tmp_path):
    # SGLang's file records no GPU count: read for 2 GPUs, its 16 slots would be read as
    # other GPUs' by a call for 4
    w = torch.rand(2, 8)
    path = write_placement(eplb.plan(w, 16, 4), tmp_path / "p.json", "sglang")
    other = read_placement(path, num_gpus=2, num_experts=8)
    with pytest.raises(ValueError, match="previous placement is for 16 slots on 2 GPUs"):
        eplb.plan(w, 16, 4, previous=other)
