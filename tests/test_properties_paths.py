"""Property tests over every planning input path of the public API, in one strategy each
for fresh and incremental plans (thirteenth-session property audit).

The other property modules draw one path at a time (``test_planner_properties``: fresh
plans by policy; ``test_incremental_properties``: old maps of six origins;
``test_dispatch_planning``: the nearest planners). Here one draw combines them, so the
combinations are checked too:

- fresh: policy ``auto``/``global``/``hierarchical``/``locality``, dispatch
  ``even``/``nearest`` with ``fair``, ``source``, ``slack`` and a routing trace, dead GPUs,
  ``gpu_speed``, int/unsigned/float16-64 loads as tensors, arrays or lists, idle layers;
- incremental: old maps of every origin (eplb's own as a tensor or as a ``Placement`` of
  the same or another topology, vLLM's initial map, DeepSeek's greedy, random maps, maps
  with stacked replicas, with empty live slots, with GPUs that died or came back, nearest
  and locality plans, a ``Placement`` for another GPU count), budgets as an int, a list,
  a tensor or an array, ``skip_threshold``;
- incremental plans that re-plan and relabel (nearest dispatch on several nodes with the
  locality or hierarchical policy, or dead GPUs), from old maps of every origin;
- the forced device path (``eplb.core.device_path.FORCE``), which CPU-only machines
  otherwise never run on random shapes.

Every result must pass ``validate`` and the independent ``assert_contract`` (every expert
held, anti-affinity, hierarchical locality), leave dead GPUs empty, and come out the same
for the same input. Where the old map needs no forced move (an eplb plan for the same
live GPUs and policy) the incremental promises are checked too: a budget is kept, a
``skip_threshold`` of 0.999 keeps the map, and no layer gets worse on the window at hand.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import assert_contract
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import eplb
import eplb.core.device_path as device_path
from eplb.core import plan_greedy, realised_gpu_loads
from eplb.core.rank_draws import split_draw_peaks


@st.composite
def clusters(draw, max_slots: int = 5, min_nodes: int = 1, grouped: bool = False,
             dead: bool = True, max_nodes: int = 3):
    """A cluster and an expert count that fits it: nodes, GPUs, slots, groups, experts,
    layers, a live mask (or None) and a NumPy generator for the rest of the draw.
    ``grouped``: expert groups, a multiple of the nodes; ``dead``: some GPUs may be dead."""
    nodes = draw(st.integers(min_nodes, max_nodes))
    gpus = nodes * draw(st.integers(1, 4))
    slots = draw(st.integers(1, max_slots))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    live = None
    if dead and gpus > 1 and draw(st.integers(0, 3)) == 0:
        live = torch.ones(gpus, dtype=torch.bool)
        live[torch.from_numpy(rng.choice(gpus, draw(st.integers(1, gpus - 1)), replace=False))] \
            = False
    live_slots = slots * (gpus if live is None else int(live.sum()))
    groups = nodes * draw(st.integers(1, 2)) if grouped or (
        nodes > 1 and draw(st.booleans())) else 1
    per_group = min(draw(st.integers(1, 6)), live_slots // groups)
    if per_group < 1:  # more groups than slots: fewer groups (never below the nodes)
        groups = nodes if grouped else 1
        per_group = min(draw(st.integers(1, 6)), live_slots // groups)
    return {"nodes": nodes, "gpus": gpus, "slots": slots, "replicas": gpus * slots,
            "groups": groups, "experts": groups * per_group, "layers": draw(st.integers(1, 3)),
            "live": live, "rng": rng}


def draw_loads(draw, c: dict) -> tuple[object, torch.Tensor]:
    """Loads for cluster ``c`` in a drawn kind, dtype and container; also as float64."""
    rng, shape = c["rng"], (c["layers"], c["experts"])
    kind = draw(st.sampled_from(["lognormal", "idle-layer", "zeros", "ties", "one-hot"]))
    w = np.exp(rng.normal(0, 1.5, shape)) * 100
    if kind == "idle-layer":
        w[0] = 0  # a dense layer in a real dump
    elif kind == "zeros":
        w[:] = 0
    elif kind == "ties":
        w[:] = 7
    elif kind == "one-hot":
        w[:] = 0
        w[:, int(rng.integers(c["experts"]))] = 1000
    dtype = draw(st.sampled_from(["float64", "float32", "float16", "int32", "int64", "uint8"]))
    w = np.minimum(np.round(w), 255 if dtype == "uint8" else 30000).astype(dtype)
    container = draw(st.sampled_from(["tensor", "numpy", "list"]))
    given_as = {"tensor": torch.from_numpy(w), "numpy": w, "list": w.tolist()}[container]
    return given_as, torch.from_numpy(w.astype(np.float64))


def routing_trace(rng: np.random.Generator, layers: int, experts: int) -> torch.Tensor:
    """``[T, L, k]`` top-k expert ids of 32 recorded tokens (distinct within a token)."""
    k = min(2, experts)
    ids = [[rng.choice(experts, k, replace=False) for _ in range(layers)] for _ in range(32)]
    return torch.from_numpy(np.array(ids, dtype=np.int64))


def plan_quietly(*args, **kwargs) -> eplb.Placement:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto falls back to global, noted
        return eplb.plan(*args, **kwargs)


def check(p: eplb.Placement, c: dict, again: eplb.Placement) -> None:
    """The whole contract, dead GPUs empty, live slots filled, and determinism."""
    p.validate()
    assert_contract(p, device="cpu")
    dead = torch.zeros(c["replicas"], dtype=torch.bool) if c["live"] is None else \
        (~c["live"]).repeat_interleave(c["slots"])
    assert bool((p.phy2log[:, dead] == -1).all()), "a dead GPU holds an expert"
    assert bool((p.phy2log[:, ~dead] >= 0).all()), "a live slot is empty"
    for mine, theirs in zip(p.as_tuple(), again.as_tuple(), strict=True):
        assert torch.equal(mine, theirs), "the same input planned differently"


# ------------------------------------------------------------------------- fresh plans
FRESH_PATHS = ("auto", "global", "speed", "hierarchical", "nearest", "nearest-one-node",
               "locality")


@st.composite
def fresh_calls(draw, path: str):
    """``(cluster, loads as given, loads float64, plan kwargs, expected policy)`` of a
    call that takes ``path``."""
    several = path in ("hierarchical", "nearest", "locality")
    c = draw(clusters(min_nodes=2 if several else 1, grouped=path == "hierarchical",
                      dead=path not in ("hierarchical", "locality"),
                      max_nodes=1 if path == "nearest-one-node" else 3))
    weight, w64 = draw_loads(draw, c)
    whole = c["live"] is None
    kwargs = {"seed": draw(st.integers(0, 2**31 - 1)), "active_gpus": c["live"]}
    rng = c["rng"]
    hierarchical_fits = c["groups"] > 1 and c["nodes"] > 1 and whole
    expected = "hierarchical" if path == "auto" and hierarchical_fits else "global"
    if path == "speed":
        kwargs["gpu_speed"] = rng.uniform(0.5, 2.0, c["gpus"]).tolist()
    elif path in ("global", "hierarchical"):
        kwargs["policy"] = expected = path
    elif path == "nearest":
        kwargs.update(policy="global", dispatch="nearest",
                      fair=draw(st.sampled_from(["auto", "avoid", "expect"])))
        if draw(st.booleans()):
            kwargs["source"] = torch.from_numpy(rng.uniform(0.1, 1.0, c["gpus"]))
    elif path == "nearest-one-node":  # SGLang's runtime table (fair "divide", or "auto")
        kwargs.update(policy="global", dispatch="nearest",
                      fair=draw(st.sampled_from(["auto", "divide", "expect", "avoid"])))
    elif path == "locality":
        kwargs.update(policy="locality", dispatch="nearest")
        expected = "locality"
        if draw(st.booleans()):
            kwargs["slack"] = draw(st.sampled_from([0.0, 0.03, 0.5]))
        if draw(st.booleans()):
            kwargs["routing"] = routing_trace(rng, c["layers"], c["experts"])
    return c, weight, w64, kwargs, expected


@pytest.mark.parametrize("path", FRESH_PATHS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fresh_plans_of_every_input_path_keep_the_contract(path, data):
    c, weight, w64, kwargs, expected = data.draw(fresh_calls(path))
    event("dead GPUs" if c["live"] is not None else "every GPU live")
    args = (weight, c["replicas"], c["gpus"], c["nodes"], c["groups"])
    try:
        p = plan_quietly(*args, **kwargs)
    except ValueError as exc:
        # the locality policy refuses shapes it cannot serve, and says so; fair="divide"
        # plans for every GPU live
        if kwargs.get("fair") == "divide" and c["live"] is not None:
            assert "fair='divide'" in str(exc) and "dead GPUs" in str(exc), exc
            return
        assert expected == "locality" and "locality policy is impossible" in str(exc), exc
        return
    assert p.policy == expected
    check(p, c, plan_quietly(*args, **kwargs))
    assert 0 < p.balancedness(w64) <= 1 + 1e-9


# ------------------------------------------------------------------- incremental plans
ORIGINS = ("eplb", "eplb-placement", "eplb-other-topology", "vllm-initial", "greedy",
           "random", "stacked", "empty-slots", "revived", "died", "nearest-plan",
           "locality-plan", "other-gpu-count")


def old_map(origin: str, c: dict, w0: torch.Tensor, policy: str):
    """The placement in force, of ``origin``, for cluster ``c`` (tensor or Placement)."""
    replicas, gpus, nodes, groups = c["replicas"], c["gpus"], c["nodes"], c["groups"]
    layers, experts, rng = c["layers"], c["experts"], c["rng"]
    initial = torch.arange(replicas).remainder(experts).repeat(layers, 1)
    if origin in ("eplb", "eplb-placement"):  # planned for this call's live GPUs and policy
        p = plan_quietly(w0, replicas, gpus, nodes, groups, policy=policy, active_gpus=c["live"])
        return p if origin == "eplb-placement" else p.phy2log
    if origin == "eplb-other-topology":  # the same slots, planned as one node, one group
        return plan_quietly(w0, replicas, gpus, policy="global")
    if origin == "vllm-initial":
        return initial
    if origin == "greedy":
        return plan_greedy(w0, replicas, gpus, nodes, groups).phy2log
    if origin == "random":
        return torch.from_numpy(rng.integers(0, experts, (layers, replicas)))
    if origin == "stacked":  # GPU 0 holds one expert in every slot
        initial[:, :c["slots"]] = experts - 1
        return initial
    if origin == "empty-slots":
        initial[torch.from_numpy(rng.random((layers, replicas)) < 0.3)] = -1
        return initial
    if origin in ("revived", "died"):  # planned with GPU 0 dead / with every GPU live
        live = torch.ones(gpus, dtype=torch.bool)
        live[0] = origin == "died"
        if (gpus - 1) * c["slots"] < experts:
            live[0] = True
        return plan_quietly(w0, replicas, gpus, active_gpus=live).phy2log
    if origin == "nearest-plan":
        return plan_quietly(w0, replicas, gpus, max(nodes, 2) if gpus % 2 == 0 else 1,
                            policy="global", dispatch="nearest" if gpus % 2 == 0 else "even")
    if origin == "locality-plan":
        try:
            return plan_quietly(w0, replicas, gpus, nodes, groups, policy="locality",
                                dispatch="nearest")
        except ValueError:  # a shape the locality policy refuses
            return initial
    return plan_quietly(w0, replicas * 2, gpus * 2, policy="global")  # other-gpu-count


@st.composite
def incremental_calls(draw, origin: str):
    c = draw(clusters(max_slots=4))
    whole = c["live"] is None
    paths = ["auto", "global", "nearest"]  # (nearest on one node: SGLang's runtime table)
    if c["nodes"] > 1 and whole and c["groups"] > 1:
        paths.append("hierarchical")
    path = draw(st.sampled_from(paths))
    policy = "hierarchical" if path == "hierarchical" or (
        path == "auto" and whole and c["groups"] > 1) else "global"
    kwargs = {"policy": policy, "seed": draw(st.integers(0, 2**31 - 1)),
              "active_gpus": c["live"]}
    if path == "nearest":
        kwargs["dispatch"] = "nearest"
    rng = c["rng"]
    w0 = torch.from_numpy(np.exp(rng.normal(0, 1.0, (c["layers"], c["experts"]))) * 100)
    old = old_map(origin, c, w0, policy)
    drifted = w0 * torch.from_numpy(np.exp(rng.normal(0, draw(st.floats(0, 1.5)), w0.shape)))
    if draw(st.integers(0, 4)) == 0:
        drifted[0] = 0  # an idle layer
    dtype = draw(st.sampled_from([torch.float64, torch.int32, torch.int64]))
    weight = drifted.round().to(dtype)
    # a budget where the call takes one (nearest: global, every GPU live)
    budgeted = path != "nearest" or whole
    budget = draw(st.sampled_from(["none", "int", "list", "tensor", "array", "zero", "skip"]))
    per_layer = rng.integers(0, c["replicas"] + 1, c["layers"])
    if budgeted and budget == "int":
        kwargs["max_moves"] = int(rng.integers(0, c["layers"] * c["replicas"] + 1))
    elif budgeted and budget == "zero":
        kwargs["max_moves"] = 0
    elif budgeted and budget in ("list", "tensor", "array"):
        kwargs["max_moves"] = {"list": per_layer.tolist(), "tensor": torch.from_numpy(per_layer),
                               "array": per_layer}[budget]
    elif budget == "skip" and path != "nearest":
        kwargs["skip_threshold"] = 0.999  # a gain is below 1 - 1/P: none reaches this
    return c, weight, old, origin, kwargs


def moves_are_optional(origin: str) -> bool:
    """True when the old map needs no forced move for this call: eplb's own plan for the
    same live GPUs and policy (as a tensor or a record)."""
    return origin in ("eplb", "eplb-placement")


@pytest.mark.parametrize("origin", ORIGINS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_incremental_plans_from_old_maps_of_every_origin_keep_every_promise(origin, data):
    c, weight, old, origin, kwargs = data.draw(incremental_calls(origin))
    event(f"{kwargs['policy']}, dispatch {kwargs.get('dispatch', 'even')}")
    args = (weight, c["replicas"], c["gpus"], c["nodes"], c["groups"])
    if origin == "other-gpu-count":
        with pytest.raises(ValueError, match=r"previous placement is for \d+ slots on \d+ GPUs"):
            plan_quietly(*args, previous=old, **kwargs)
        return
    p = plan_quietly(*args, previous=old, **kwargs)
    assert p.policy == kwargs["policy"]
    check(p, c, plan_quietly(*args, previous=old, **kwargs))
    if (origin == "greedy" and c["live"] is None and "dispatch" not in kwargs
            and "max_moves" not in kwargs and "skip_threshold" not in kwargs):
        # spreading the greedy's stacked replicas is forced, but costs no balance: each
        # layer ends no worse than the greedy's map or a fresh plan on these loads
        w = weight.to(torch.float64)
        fresh = plan_quietly(*args, **kwargs)
        kept = eplb.Placement.from_phy2log(old, c["experts"], p.topology)
        floor = torch.minimum(kept.layer_balancedness(w), fresh.layer_balancedness(w))
        assert bool((p.layer_balancedness(w) >= floor - 1e-9).all())
    if isinstance(old, eplb.Placement):  # a record and its map are the same placement in force
        assert torch.equal(plan_quietly(*args, previous=old.phy2log, **kwargs).phy2log,
                           p.phy2log)
    if not moves_are_optional(origin):
        return
    old_map_ = old.phy2log if isinstance(old, eplb.Placement) else old
    moved = p.moved_slots(old_map_)
    budget = kwargs.get("max_moves")
    if isinstance(budget, int):
        assert int(moved.sum()) <= budget, (moved.tolist(), budget)
    elif budget is not None:
        assert bool((moved <= torch.as_tensor(budget)).all()), (moved.tolist(), budget)
    if kwargs.get("skip_threshold") == 0.999:
        assert int(moved.sum()) == 0
    # no layer gets worse on the window at hand (under the rule it is planned for)
    w = weight.to(torch.float64)
    if kwargs.get("dispatch") == "nearest" and c["nodes"] == 1 and c["live"] is None:
        def balance(phy: torch.Tensor) -> torch.Tensor:  # under SGLang's runtime table
            mean = w.sum(1).numpy() / c["gpus"]
            return torch.from_numpy(mean / np.maximum(split_draw_peaks(w, phy, c["gpus"]),
                                                      1e-300))

        before, after = balance(old_map_), balance(p.phy2log)
        after = torch.where(w.sum(1) > 0, after, before)
    elif kwargs.get("dispatch") == "nearest":
        def balance(phy: torch.Tensor) -> torch.Tensor:
            loads = realised_gpu_loads(w, phy, c["gpus"], c["nodes"], active_gpus=c["live"])
            return loads.mean(1) / loads.amax(1).clamp(min=1e-300)

        before, after = balance(old_map_), balance(p.phy2log)
        after = torch.where(w.sum(1) > 0, after, before)
    else:
        old_p = eplb.Placement.from_phy2log(old_map_, c["experts"], p.topology, p.policy,
                                            c["live"])
        before, after = old_p.layer_balancedness(w), p.layer_balancedness(w)
    assert bool((after >= before - 1e-9).all()), (before.tolist(), after.tolist())


# ------------------------------------- nearest dispatch on several nodes: re-plan, relabel
RELABELLED = ("locality", "hierarchical", "global-dead")


@st.composite
def relabelled_calls(draw, path: str):
    """A call from a map in force that eplb answers by re-planning whole and relabelling
    onto the old GPUs: nearest dispatch on several nodes with the locality or hierarchical
    policy, or the global policy with dead GPUs (the incremental strategy above draws only
    global and even-split hierarchical calls)."""
    c = draw(clusters(max_slots=4, min_nodes=2, grouped=path == "hierarchical",
                      dead=path == "global-dead"))
    if path == "global-dead" and c["live"] is None:
        live = torch.ones(c["gpus"], dtype=torch.bool)
        live[int(c["rng"].integers(c["gpus"]))] = False
        if int(live.sum()) * c["slots"] >= c["experts"]:
            c["live"] = live
    policy = "global" if path == "global-dead" else path
    kwargs = {"policy": policy, "dispatch": "nearest", "active_gpus": c["live"],
              "seed": draw(st.integers(0, 2**31 - 1))}
    rng = c["rng"]
    if path == "locality" and draw(st.booleans()):
        kwargs["slack"] = draw(st.sampled_from([0.0, 0.03, 0.5]))
    if path == "locality" and draw(st.booleans()):
        kwargs["routing"] = routing_trace(rng, c["layers"], c["experts"])
    w0 = torch.from_numpy(np.exp(rng.normal(0, 1.0, (c["layers"], c["experts"]))) * 100)
    origin = draw(st.sampled_from([o for o in ORIGINS if o != "other-gpu-count"]))
    old = old_map(origin, c, w0, "hierarchical" if path == "hierarchical" else "global")
    drifted = w0 * torch.from_numpy(np.exp(rng.normal(0, draw(st.floats(0, 1.5)), w0.shape)))
    if draw(st.integers(0, 4)) == 0:
        drifted[0] = 0  # an idle layer
    weight = drifted.round().to(draw(st.sampled_from([torch.float64, torch.int32])))
    return c, weight, old, origin, kwargs


@pytest.mark.parametrize("path", RELABELLED)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_relabelled_plans_from_old_maps_of_every_origin_keep_the_contract(path, data):
    c, weight, old, origin, kwargs = data.draw(relabelled_calls(path))
    event(f"from {origin}" + (", no GPU dead" if c["live"] is None else ""))
    args = (weight, c["replicas"], c["gpus"], c["nodes"], c["groups"])
    try:
        p = plan_quietly(*args, previous=old, **kwargs)
    except ValueError as exc:  # a shape the locality policy refuses, and says so
        assert path == "locality" and "locality policy is impossible" in str(exc), exc
        event("refused")
        return
    assert p.policy == kwargs["policy"]
    check(p, c, plan_quietly(*args, previous=old, **kwargs))
    if path == "global-dead" and c["live"] is None:
        return  # no GPU could die (no spare slot): the global call takes a budget
    if path == "locality":  # it takes a budget (fifty-fifth session), a valid plan within it
        budget = data.draw(st.integers(0, c["replicas"]))
        capped = plan_quietly(*args, previous=old, max_moves=budget, **kwargs)
        check(capped, c, plan_quietly(*args, previous=old, max_moves=budget, **kwargs))
        return
    # a move budget cannot be kept on this path: refused, in its keyword's name
    with pytest.raises(ValueError, match="max_moves with dispatch='nearest'"):
        plan_quietly(*args, previous=old, max_moves=c["replicas"], **kwargs)


# ------------------------------------------------------------- the forced device path
@contextlib.contextmanager
def forced_device_path():
    """Run the torch construction and expansion a CUDA problem takes, on CPU tensors."""
    saved = device_path.FORCE
    device_path.FORCE = "device"
    try:
        yield
    finally:
        device_path.FORCE = saved


@pytest.mark.parametrize("path", ["global", "speed", "hierarchical", "nearest"])
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), incremental=st.booleans())
def test_plans_through_the_device_path_keep_the_contract(path, data, incremental):
    c, weight, _, kwargs, expected = data.draw(fresh_calls(path))
    args = (weight, c["replicas"], c["gpus"], c["nodes"], c["groups"])
    with forced_device_path():
        if incremental and "gpu_speed" not in kwargs and "source" not in kwargs:
            # from vLLM's initial map: forced moves, the ladder and a fresh candidate
            rows = [i % c["experts"] if c["live"] is None or bool(
                c["live"][i // c["slots"]]) else -1 for i in range(c["replicas"])]
            kwargs["previous"] = torch.tensor(rows).repeat(c["layers"], 1)
        p = plan_quietly(*args, **kwargs)
        again = plan_quietly(*args, **kwargs)
    assert p.policy == expected
    check(p, c, again)
    assert math.isfinite(p.balancedness(weight if isinstance(weight, torch.Tensor) else
                                        torch.as_tensor(np.asarray(weight, dtype=np.float64))))
