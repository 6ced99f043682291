"""Property tests: every plan on random shapes, loads, dtypes and containers honours the
output contract (checked by ``validate`` and by the independent ``assert_contract``)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import assert_contract, divisors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb

SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw, allow_dead: bool = False):
    """A random planning problem: shape, topology, loads (kind, dtype, container), seed."""
    gpus = draw(st.integers(1, 12))
    slots = draw(st.integers(1, 5))
    replicas = gpus * slots
    experts = draw(st.integers(1, min(40, replicas)))
    layers = draw(st.integers(1, 6))
    nodes = draw(st.sampled_from(divisors(gpus)))
    groups = draw(st.sampled_from(divisors(experts)))
    kind = draw(st.sampled_from(
        ["lognormal", "zeros", "ties", "huge", "integers", "sparse", "mixed"]))
    dtype = draw(st.sampled_from(["float16", "float32", "float64", "int32", "int64"]))
    if kind == "huge" and dtype not in ("float32", "float64"):
        dtype = "float64"  # 1e30 only fits these
    container = draw(st.sampled_from(["tensor", "numpy", "list"]))
    seed = draw(st.integers(0, 2**31 - 1))

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (layers, experts)
    if kind == "lognormal":
        w = np.exp(rng.normal(0, draw(st.floats(0.1, 2.0)), shape)) * 100
    elif kind == "zeros":
        w = np.zeros(shape)
    elif kind == "ties":
        w = np.full(shape, float(draw(st.integers(1, 50))))
    elif kind == "huge":
        w = rng.uniform(0.5, 1.0, shape) * 1e30
    elif kind == "integers":
        w = rng.integers(0, 20, shape).astype(np.float64)
    elif kind == "sparse":  # one hot expert per layer, the rest zero
        w = np.zeros(shape)
        w[np.arange(layers), rng.integers(0, experts, layers)] = 1000.0
    else:  # a mix: an all-zero layer, a tie layer, a skewed layer
        w = np.exp(rng.normal(0, 1.0, shape)) * 100
        w[0] = 0
        if layers > 1:
            w[1] = 7
    if dtype.startswith("int") or dtype == "float16":
        w = np.minimum(np.round(w), 60000.0)
    w = w.astype(dtype)
    weight = {"tensor": torch.from_numpy(w), "numpy": w, "list": w.tolist()}[container]

    active = None
    if allow_dead and gpus > 1 and draw(st.booleans()):
        # kill some GPUs, keeping enough live slots for every expert
        order = rng.permutation(gpus)
        need = math.ceil(experts / slots)
        dead = draw(st.integers(0, gpus - need))
        active = torch.ones(gpus, dtype=torch.bool)
        active[torch.from_numpy(order[:dead])] = False
    return {"weight": weight, "float64": w.astype(np.float64), "replicas": replicas,
            "gpus": gpus, "nodes": nodes, "groups": groups, "seed": seed, "active": active}


def expected_policy(prob) -> str:
    nodes, groups = prob["nodes"], prob["groups"]
    all_live = prob["active"] is None or bool(prob["active"].all())
    if groups > 1 and nodes > 1 and groups % nodes == 0 and all_live:
        return "hierarchical"  # groups divide experts and nodes divide GPUs by construction
    return "global"


@SETTINGS
@given(problems())
def test_plan_is_valid(prob):
    p = eplb.plan(prob["weight"], prob["replicas"], prob["gpus"], prob["nodes"], prob["groups"],
                  seed=prob["seed"])
    assert p.policy == expected_policy(prob)
    p.validate()
    assert_contract(p, device="cpu")
    w = torch.from_numpy(prob["float64"])
    bal = p.balancedness(w)
    assert 0 < bal <= 1 + 1e-9
    if not w.any():
        # all-zero input: spread evenly
        assert int((p.logcnt.amax(1) - p.logcnt.amin(1)).max()) <= 1


@SETTINGS
@given(problems(), st.sampled_from(["global", "hierarchical"]))
def test_forced_policy_is_valid(prob, policy):
    if policy == "hierarchical" and prob["groups"] % prob["nodes"]:
        with pytest.raises(ValueError, match="not a multiple of num_nodes"):
            eplb.plan(prob["weight"], prob["replicas"], prob["gpus"], prob["nodes"],
                      prob["groups"], policy=policy)
        return
    p = eplb.plan(prob["weight"], prob["replicas"], prob["gpus"], prob["nodes"], prob["groups"],
                  seed=prob["seed"], policy=policy)
    assert p.policy == policy
    assert_contract(p)
    if policy == "hierarchical":
        # locality holds per node: each group's replicas on one node
        p.validate()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(allow_dead=True))
def test_plan_with_dead_gpus_is_valid(prob):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto falls back to global with dead GPUs
        p = eplb.plan(prob["weight"], prob["replicas"], prob["gpus"], prob["nodes"],
                      prob["groups"], seed=prob["seed"], active_gpus=prob["active"])
    assert p.policy == expected_policy(prob)
    p.validate()
    assert_contract(p)
    live_slots = prob["replicas"] if prob["active"] is None else \
        int(prob["active"].sum()) * (prob["replicas"] // prob["gpus"])
    assert (p.logcnt.sum(1) == live_slots).all()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_rebalance_experts_contract(prob):
    w = torch.from_numpy(prob["float64"])
    args = (prob["replicas"], prob["groups"], prob["nodes"], prob["gpus"])
    phy2log, log2phy, logcnt = eplb.rebalance_experts(w, *args, seed=prob["seed"])
    for t in (phy2log, log2phy, logcnt):
        assert t.dtype == torch.int64
    assert phy2log.shape == (w.shape[0], prob["replicas"])
    assert (logcnt >= 1).all() and (logcnt.sum(1) == prob["replicas"]).all()
    # one layer in → no layer dimension out, and the same plan as that layer alone
    one = eplb.rebalance_experts(w[0], *args, seed=prob["seed"])
    alone = eplb.plan(w[:1], prob["replicas"], prob["gpus"], prob["nodes"], prob["groups"],
                      seed=prob["seed"])
    assert one[0].shape == (prob["replicas"],)
    assert one[2].shape == (w.shape[1],)
    for got, want in zip(one, alone.as_tuple(), strict=True):
        assert torch.equal(got, want[0])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_deterministic(prob):
    args = (prob["weight"], prob["replicas"], prob["gpus"], prob["nodes"], prob["groups"])
    a = eplb.plan(*args, seed=prob["seed"])
    b = eplb.plan(*args, seed=prob["seed"])
    for x, y in zip(a.as_tuple(), b.as_tuple(), strict=True):
        assert torch.equal(x, y)
    other = eplb.plan(*args, seed=prob["seed"] + 1)
    assert_contract(other)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.floats(0.25, 4.0))
def test_gpu_speed_is_valid(prob, fast):
    gpus = prob["gpus"]
    speed = torch.ones(gpus, dtype=torch.float64)
    speed[: gpus // 2] = fast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto falls back to global with speeds
        p = eplb.plan(prob["weight"], prob["replicas"], gpus, prob["nodes"], prob["groups"],
                      seed=prob["seed"], gpu_speed=speed)
    assert_contract(p)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=st.integers(2, 6),
    gpus_per_node=st.integers(1, 4),
    slots=st.integers(1, 5),
    groups_per_node=st.integers(0, 2),
    experts_per_group=st.integers(1, 6),
    skew=st.sampled_from([0.0, 1.0, 3.0]),
    seed=st.integers(0, 1000),
)
def test_locality_plans_keep_the_contract_or_refuse_clearly(
    nodes, gpus_per_node, slots, groups_per_node, experts_per_group, skew, seed
):
    """Every shape: a valid locality plan, or a ValueError that names why."""
    gpus = nodes * gpus_per_node
    groups = nodes * groups_per_node if groups_per_node else 1
    experts = groups * experts_per_group if groups > 1 else experts_per_group * nodes
    replicas = gpus * slots
    if replicas < experts:
        return
    gen = torch.Generator().manual_seed(seed)
    w = torch.exp(skew * torch.randn(2, experts, generator=gen))
    try:
        p = eplb.plan(w, replicas, gpus, nodes, groups, policy="locality", dispatch="nearest")
    except ValueError as exc:
        assert "locality" in str(exc) or "slots" in str(exc)
        return
    p.validate()
    assert_contract(p)
