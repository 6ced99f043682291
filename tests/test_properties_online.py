"""Property tests of online rebalancing's other ways in (``test_properties_engines`` drives
the ``Rebalancer`` with eplb's planner and no ``initial``): every built-in planner
(``eplb``, DeepSeek's ``greedy``, the static ``none``), the placement in force given as
``initial=`` in every origin (the engines' trivial layout, DeepSeek's greedy, eplb's own
plan, vLLM's initial map with its slots shuffled, plans made while a GPU was dead that is
live now or before one died), dead GPUs, GPU speeds, SGLang's nearest dispatch, and each
estimator (whose ``multi`` scenarios go through ``plan_estimate`` with the map in force as
a candidate).

Every placement the rebalancer holds must keep the contract its planner promises (eplb's:
anti-affinity too; the greedy and the static layout may stack replicas), leave dead GPUs
empty, and be the same for two rebalancers fed alike.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from helpers import assert_contract
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import eplb
from eplb.core import plan_greedy
from eplb.online import Rebalancer, trivial_placement

INITIAL = ("none", "trivial", "greedy", "eplb", "shuffled", "revived", "died")
ESTIMATORS = ("sum", "ema:4", "robust:1.0", "multi:2:2", "auto:2:2")


@st.composite
def online_runs(draw):
    nodes = draw(st.integers(1, 2))
    gpus = nodes * draw(st.integers(1, 3))
    slots = draw(st.integers(1, 5))
    replicas = gpus * slots
    groups = nodes * draw(st.integers(1, 2)) if nodes > 1 and draw(st.booleans()) else 1
    if groups > replicas:
        groups = nodes
    experts = groups * draw(st.integers(1, max(1, replicas // groups)))
    layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    planner = draw(st.sampled_from(["eplb", "eplb", "greedy", "none"]))
    live = None
    spare = (replicas - experts) // slots
    if planner != "greedy" and spare >= 1 and draw(st.integers(0, 2)) == 0:
        live = torch.ones(gpus, dtype=torch.bool)
        live[torch.from_numpy(rng.choice(gpus, int(rng.integers(1, spare + 1)),
                                         replace=False))] = False
    whole = live is None
    options: dict = {}
    incremental = planner == "eplb" and draw(st.booleans())
    if planner == "eplb":
        kinds = ["plain"]
        if groups > 1 and whole:
            kinds.append("hierarchical")
        if not incremental:
            kinds.append("speed")
        if whole and (nodes == 1 or groups == 1):
            kinds.append("nearest")
        kind = draw(st.sampled_from(kinds))
        options["policy"] = "hierarchical" if kind == "hierarchical" else "global"
        if kind == "speed":
            options["gpu_speed"] = torch.from_numpy(rng.uniform(0.5, 2.0, gpus))
        if kind == "nearest":
            options["dispatch"] = "nearest"
        if incremental and draw(st.booleans()):
            options["max_moves"] = int(rng.integers(0, layers * replicas + 1))
    return {"nodes": nodes, "gpus": gpus, "slots": slots, "replicas": replicas,
            "groups": groups, "experts": experts, "layers": layers, "live": live,
            "planner": planner, "incremental": incremental, "options": options,
            "initial": draw(st.sampled_from(INITIAL)),
            "estimator": draw(st.sampled_from(ESTIMATORS)) if planner != "none" else "sum",
            "chunks": draw(st.lists(st.integers(1, 6), min_size=1, max_size=5)), "rng": rng}


def initial_placement(run: dict) -> eplb.Placement | None:
    """The placement in force before the first rebalance, of the drawn origin."""
    origin, rng = run["initial"], run["rng"]
    args = (run["replicas"], run["gpus"], run["nodes"], run["groups"])
    topo = eplb.Topology(*args)
    w0 = torch.from_numpy(np.exp(rng.normal(0, 1.0, (run["layers"], run["experts"])))) * 100
    if origin == "none":
        return None
    if origin == "trivial":
        return trivial_placement(run["experts"], run["layers"], topo, run["live"])
    if origin == "greedy":
        return plan_greedy(w0, *args)
    if origin == "eplb":  # eplb's own plan for this cluster (as the rebalancer plans it)
        policy = run["options"].get("policy", "auto")
        return eplb.plan(w0, *args, policy=policy, active_gpus=run["live"])
    if origin == "shuffled":  # vLLM's initial map, its slots shuffled
        order = torch.from_numpy(rng.permutation(run["replicas"]))
        phy2log = torch.arange(run["replicas"]).remainder(run["experts"])[order]
        return eplb.Placement.from_phy2log(phy2log.repeat(run["layers"], 1), run["experts"],
                                           topo)
    if origin == "revived":  # planned while the last GPU was dead
        live = torch.ones(run["gpus"], dtype=torch.bool)
        live[-1] = (run["gpus"] - 1) * run["slots"] < run["experts"]
        return eplb.plan(w0, *args, policy="global", active_gpus=live)
    return eplb.plan(w0, *args, policy="global")  # "died": planned with every GPU live


def replay(run: dict, initial: eplb.Placement | None, steps: list[torch.Tensor]):
    """The rebalancer's placements after each chunk that leaves one in force."""
    kwargs = dict(run["options"])
    if run["live"] is not None:
        kwargs["active_gpus"] = run["live"]
    if run["planner"] == "eplb":
        kwargs["incremental"] = run["incremental"]
    rebalancer = Rebalancer(run["replicas"], run["gpus"], run["nodes"], run["groups"],
                            window=4, interval=3, estimator=run["estimator"],
                            planner=run["planner"], initial=initial, **kwargs)
    seen = []
    for counts in steps:
        rebalancer.record(counts)
        if rebalancer.placement is not None:
            seen.append(rebalancer.placement)
    return seen, rebalancer.events


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run=online_runs())
def test_every_planner_and_initial_placement_keeps_the_contract(run):
    event(f"{run['planner']}, initial {run['initial']}")
    initial = initial_placement(run)
    rng = run["rng"]
    shape = (run["layers"], run["experts"])
    steps = [torch.from_numpy(rng.integers(0, 50, (n, *shape))) for n in run["chunks"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        seen, events = replay(run, initial, steps)
        again, _ = replay(run, initial, steps)
    eplbs = run["planner"] == "eplb"
    slot_live = torch.ones(run["replicas"], dtype=torch.bool) if run["live"] is None else \
        run["live"].repeat_interleave(run["slots"])
    planned = seen if initial is None else [p for p in seen if p is not initial]
    for p in planned:
        p.validate(anti_affinity=eplbs)
        assert_contract(p, anti_affinity=eplbs)
        assert p.phy2log.shape == (run["layers"], run["replicas"])
        assert bool((p.phy2log[:, ~slot_live] == -1).all()), "a dead GPU holds an expert"
        assert bool((p.phy2log[:, slot_live] >= 0).all()), "a live slot is empty"
        if "policy" in run["options"]:
            assert p.policy == run["options"]["policy"]
    for mine, theirs in zip(seen, again, strict=True):
        assert torch.equal(mine.phy2log, theirs.phy2log), "two rebalancers fed alike differ"
    budget = run["options"].get("max_moves")
    if budget is not None and run["initial"] == "eplb" and events:
        # eplb's own plan for these live GPUs and policy: the first rebalance moves no
        # more than the budget
        assert int(events[0].moved_slots.sum()) <= budget


@settings(max_examples=40, deadline=None)
@given(experts=st.integers(1, 20), layers=st.integers(0, 3), gpus=st.integers(1, 6),
       slots=st.integers(1, 17), seed=st.integers(0, 2**32 - 1))
def test_the_trivial_layout_holds_every_expert_on_the_live_gpus(experts, layers, gpus, slots,
                                                                 seed):
    rng = np.random.default_rng(seed)
    live = torch.from_numpy(rng.random(gpus) < 0.7) if gpus > 1 else None
    live_slots = slots * (gpus if live is None else int(live.sum()))
    topo = eplb.Topology(gpus * slots, gpus)
    if live_slots < experts:
        try:
            trivial_placement(experts, layers, topo, live)
        except ValueError as exc:
            assert "cannot hold" in str(exc)
            return
        raise AssertionError("too few live slots were not refused")
    p = trivial_placement(experts, layers, topo, live)
    p.validate(anti_affinity=False)
    assert_contract(p, anti_affinity=False)
    if live is not None:
        assert bool((p.phy2log[:, ~live.repeat_interleave(slots)] == -1).all())
