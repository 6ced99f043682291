"""Lower bounds and the balancedness ceiling (``eplb.core.bounds``).

A bound is only useful if it is valid: no placement — eplb's or DeepSeek's greedy — may
beat it. The exact parts (Jefferson's optimum, the group→node enumeration) are checked
against brute force.
"""

from __future__ import annotations

import itertools
import re
import warnings

import numpy as np
import pytest
import torch
from helpers import best_packing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import eplb
from eplb.core.baselines import plan_greedy
from eplb.core.bounds import (
    balancedness_ceiling,
    enumerated_node_bounds,
    group_partitions,
    hierarchical_node_bounds,
    layer_ceiling,
    layer_lower_bound,
)
from eplb.core.replication import max_replica_load, replica_bound

REL = 1e-9  # float64 round-off between bound and measured loads


def jefferson_brute(w: list[float], replicas: int) -> float:
    """The largest replica load after giving each extra replica to the largest w / c."""
    counts = [1] * len(w)
    for _ in range(replicas - len(w)):
        e = max(range(len(w)), key=lambda i: w[i] / counts[i])
        counts[e] += 1
    return max(wi / c for wi, c in zip(w, counts, strict=True))


def min_max_replica_exhaustive(w: list[float], replicas: int) -> float:
    """min over every allocation (c_e >= 1, sum = R) of max_e w_e / c_e."""
    best = float("inf")
    extra = replicas - len(w)
    for split in itertools.product(range(extra + 1), repeat=len(w)):
        if sum(split) == extra:
            best = min(best, max(wi / (1 + s) for wi, s in zip(w, split, strict=True)))
    return best


# --------------------------------------------------------------------------- exact parts
def test_group_partitions_8_on_4():
    parts = group_partitions(8, 4)
    assert parts.shape == (105, 8)
    assert parts.dtype == torch.int64
    for row in parts.tolist():
        assert sorted(np.bincount(row, minlength=4).tolist()) == [2, 2, 2, 2]
    # all distinct up to relabelling nodes: the set of node contents differs per row
    contents = {frozenset(frozenset(g for g in range(8) if row[g] == n) for n in range(4))
                for row in parts.tolist()}
    assert len(contents) == 105


@pytest.mark.parametrize(("groups", "nodes", "count"),
                         [(4, 2, 3), (6, 3, 15), (8, 2, 35), (6, 2, 10), (4, 4, 1), (5, 1, 1)])
def test_group_partitions_counts(groups, nodes, count):
    parts = group_partitions(groups, nodes)
    assert parts.shape == (count, groups)
    for row in parts.tolist():
        assert np.bincount(row, minlength=nodes).tolist() == [groups // nodes] * nodes


def test_group_partitions_too_many_or_invalid():
    assert group_partitions(32, 4) is None  # far too many to enumerate
    # 6,435 assignments but 12,870 node contents, each bounded on every layer: 1-2.6 GB and
    # seconds per call (quality attacker pass); 12 on 2 has 924 contents and is enumerated
    assert group_partitions(16, 2) is None
    assert group_partitions(12, 2).shape == (462, 12)
    with pytest.raises(ValueError, match=r"num_groups \(6\) must be a multiple of num_nodes \(4\)"):
        group_partitions(6, 4)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=6),
       st.integers(0, 8))
@example([0.0], 8)
@example([0.0, 0.0, 5.0], 8)
@example([7.0, 7.0, 7.0], 5)
def test_max_replica_load_is_jefferson(w, extra):
    replicas = len(w) + extra
    got = float(max_replica_load(torch.tensor([w], dtype=torch.float64), replicas)[0])
    assert got == pytest.approx(jefferson_brute(w, replicas), rel=1e-12, abs=1e-12)
    if len(w) <= 4 and extra <= 5:
        assert got == pytest.approx(min_max_replica_exhaustive(w, replicas), rel=1e-12, abs=1e-12)


@given(
    st.lists(
        st.lists(st.floats(0, 1000, allow_nan=False), min_size=6, max_size=6),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 12),
    st.lists(st.floats(0, 2, allow_nan=False), min_size=5, max_size=5),
)
@example([[0.0] * 6], 3, [0.0] * 5)
@example([[5.0, 0, 0, 0, 0, 1]], 6, [1.0] * 5)
def test_replica_bound_is_max_of_floor_and_jefferson(rows, extra, scale):
    """The shortcuts (floor >= W/extra, proportional fit) never change the value."""
    w = torch.tensor(rows, dtype=torch.float64)
    replicas = w.shape[1] + extra
    floor = w.sum(1) / 3 * torch.tensor(scale[: len(rows)], dtype=torch.float64)
    got = replica_bound(w, replicas, floor)
    want = torch.maximum(floor, max_replica_load(w, replicas))
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-12, abs=1e-12)


def test_max_replica_load_batched_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.exp(torch.randn(20, 30, generator=g, dtype=torch.float64))
    got = max_replica_load(w, 47)
    want = [jefferson_brute(row, 47) for row in w.tolist()]
    assert got.tolist() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("replicas", [12, 12288])
def test_max_replica_load_of_integer_loads(replicas):
    # attacker pass: integer loads with one dominant expert took the ragged table, whose
    # -inf padding cannot be an int64 (RuntimeError); both tables now divide in float64
    w = torch.ones(1, 64 if replicas > 64 else 8, dtype=torch.int64)
    w[0, 0] = 10**6
    got = max_replica_load(w, replicas)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([jefferson_brute(w[0].tolist(), replicas)], rel=1e-12)


def hierarchical_bound_brute(w: list[float], replicas: int, gpus: int, nodes: int,
                             groups: int) -> float:
    """min over every group→node assignment (G/N groups per node) of the worst node's
    max(W_n / (P/N), T_rep(n)), by itertools."""
    size = len(w) // groups
    per_node = groups // nodes

    def splits(rest: tuple[int, ...]):
        """Every way to cut ``rest`` into blocks of ``per_node`` groups (unordered)."""
        if not rest:
            yield []
            return
        for others in itertools.combinations(rest[1:], per_node - 1):
            block = (rest[0], *others)
            remaining = tuple(g for g in rest if g not in block)
            for tail in splits(remaining):
                yield [block, *tail]

    best = float("inf")
    for blocks in splits(tuple(range(groups))):
        worst = 0.0
        for block in blocks:
            load = [w[e] for g in block for e in range(g * size, (g + 1) * size)]
            worst = max(worst, sum(load) / (gpus // nodes),
                        jefferson_brute(load, replicas // nodes))
        best = min(best, worst)
    return best


@pytest.mark.parametrize(("experts", "replicas", "gpus", "nodes", "groups"),
                         [(8, 16, 4, 2, 4), (12, 24, 6, 3, 6), (8, 12, 4, 2, 4), (16, 32, 8, 4, 8)])
def test_hierarchical_bound_is_exact_enumeration(experts, replicas, gpus, nodes, groups):
    g = torch.Generator().manual_seed(experts + groups)
    w = torch.exp(torch.randn(3, experts, generator=g, dtype=torch.float64) * 1.2)
    got = layer_lower_bound(w, replicas, gpus, nodes, groups, policy="hierarchical")
    glob = layer_lower_bound(w, replicas, gpus)
    for layer, row in enumerate(w.tolist()):
        want = max(float(glob[layer]), hierarchical_bound_brute(row, replicas, gpus, nodes, groups))
        assert float(got[layer]) == pytest.approx(want, rel=1e-12)


def test_bound_simple_values():
    uniform = torch.ones(1, 16)
    assert layer_lower_bound(uniform, 32, 8).tolist() == [2.0]
    hot = torch.tensor([[9.0, 1.0, 1.0, 1.0]])
    # R == E: the hot expert's GPU holds one more expert
    assert layer_lower_bound(hot, 4, 2).tolist() == [10.0]
    assert layer_lower_bound(hot, 8, 2).tolist() == [6.0]  # mean 12 / 2
    assert layer_ceiling(hot, 4, 2).tolist() == pytest.approx([6.0 / 10.0])
    assert balancedness_ceiling(torch.zeros(2, 4), 8, 2) == 1.0
    one_layer = layer_lower_bound(torch.tensor([9.0, 1.0, 1.0, 1.0]), 4, 2)
    assert one_layer.shape == (1,) and one_layer.dtype == torch.float64


@pytest.mark.parametrize(("experts", "replicas"), [(1, 4), (2, 8), (3, 30), (8, 64), (4, 4)])
def test_bound_of_all_zero_rows(experts, replicas):
    zero = torch.zeros(2, experts)
    assert float(max_replica_load(zero.double(), replicas).abs().max()) == 0.0
    assert layer_lower_bound(zero, replicas, 2).tolist() == [0.0, 0.0]
    assert layer_ceiling(zero, replicas, 2).tolist() == [1.0, 1.0]
    assert balancedness_ceiling(zero, replicas, 2) == 1.0
    if experts % 2 == 0:
        hier = layer_lower_bound(zero, replicas, 2, 2, 2, policy="hierarchical")
        assert hier.tolist() == [0.0, 0.0]


def test_bound_rejects_bad_input():
    with pytest.raises(ValueError, match="finite"):
        layer_lower_bound(torch.tensor([[1.0, float("nan")]]), 2, 1)
    with pytest.raises(ValueError, match="every GPU dead"):
        layer_lower_bound(torch.ones(1, 4), 4, 2, active_gpus=torch.zeros(2, dtype=torch.bool))


# --------------------------------------------------------------------------- validity
@st.composite
def bound_problems(draw):
    gpus = draw(st.sampled_from([2, 4, 6, 8, 12]))
    slots = draw(st.integers(1, 5))
    nodes = draw(st.sampled_from([n for n in (1, 2, 3, 4) if gpus % n == 0]))
    groups = nodes * draw(st.integers(1, min(3, gpus * slots // nodes)))  # G <= R
    size = draw(st.integers(1, max(1, (gpus * slots) // groups)))
    experts = groups * size
    layers = draw(st.integers(1, 4))
    sigma = draw(st.floats(0.0, 2.0))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(layers, experts, generator=g, dtype=torch.float64) * sigma)
    if draw(st.booleans()):
        w = torch.round(w * 10)  # integer counts, zeros and ties included
    return w, gpus * slots, gpus, nodes, groups


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bound_problems())
def test_bound_below_every_placement(problem):
    w, replicas, gpus, nodes, groups = problem
    policies = ["global"] + (["hierarchical"] if groups > 1 and nodes > 1 else [])
    for policy in policies:
        bound = layer_lower_bound(w, replicas, gpus, nodes, groups, policy=policy)
        ceiling = balancedness_ceiling(w, replicas, gpus, nodes, groups, policy=policy)
        per_layer = layer_ceiling(w, replicas, gpus, nodes, groups, policy=policy)
        assert bound.dtype == torch.float64 and bound.shape == (w.shape[0],)
        assert (bound >= w.sum(1) / gpus * (1 - REL)).all()
        assert (per_layer <= 1 + REL).all() and ceiling <= 1 + REL
        placements = [
            eplb.plan(w, replicas, gpus, nodes, groups, policy=policy),
            plan_greedy(w, replicas, gpus, nodes, groups, policy=policy),
        ]
        if policy == "global":
            # the hierarchical placements are global placements too
            placements.append(plan_greedy(w, replicas, gpus, nodes, groups))
        for p in placements:
            peak = p.gpu_loads(w).amax(1)
            assert (bound <= peak * (1 + REL) + 1e-12).all(), (policy, bound, peak)
            assert p.balancedness(w) <= ceiling * (1 + REL)
            assert (p.layer_balancedness(w) <= per_layer * (1 + REL) + 1e-12).all()


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(2, 2), (2, 3), (2, 4), (3, 2), (4, 2), (3, 3)]),
       st.floats(0.0, 3.0), st.integers(0, 2**31 - 1), st.booleans())
def test_bound_without_spare_slots_is_below_the_best_packing(shape, sigma, seed, whole):
    """Slots = experts: the cardinality bound never passes the best packing, and the
    planner's plan never beats it."""
    gpus, slots = shape
    experts = gpus * slots
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(2, experts, generator=g, dtype=torch.float64) * sigma)
    if whole:
        w = torch.round(w * 5)  # ties and zeros
    bound = layer_lower_bound(w, experts, gpus)
    peak = eplb.plan(w, experts, gpus).gpu_loads(w).amax(1)
    for layer, row in enumerate(w.tolist()):
        best = best_packing(row, gpus)
        assert float(bound[layer]) <= best * (1 + REL) + 1e-12
        assert float(bound[layer]) <= float(peak[layer]) * (1 + REL) + 1e-12
        if slots <= 2:  # exact there: one expert a GPU, or the optimal pairing
            assert float(bound[layer]) == pytest.approx(best, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(4, 2, 4), (8, 2, 4), (8, 4, 4), (6, 2, 6)]), st.floats(0.0, 3.0),
       st.integers(0, 2**31 - 1))
def test_hierarchical_bound_without_spare_slots_is_exact_at_two_slots(shape, sigma, seed):
    """Slots = experts, 2 slots a GPU, groups on nodes: the bound is the best over every
    group→node assignment of the worst node's optimal pairing, and no plan beats it."""
    gpus, nodes, groups = shape
    experts = 2 * gpus
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(2, experts, generator=g, dtype=torch.float64) * sigma)
    bound = layer_lower_bound(w, experts, gpus, nodes, groups, policy="hierarchical")
    size, per_node = experts // groups, groups // nodes
    for layer, row in enumerate(w.tolist()):
        best = float("inf")
        for order in itertools.permutations(range(groups)):
            worst = 0.0
            for node in range(nodes):
                members = order[node * per_node:(node + 1) * per_node]
                items = sorted(row[k * size + i] for k in members for i in range(size))
                worst = max(worst, max(a + b for a, b in zip(items, items[::-1], strict=True)))
            best = min(best, worst)
        assert float(bound[layer]) == pytest.approx(best, rel=1e-12)
    planned = eplb.plan(w, experts, gpus, nodes, groups, policy="hierarchical")
    assert (bound <= planned.gpu_loads(w).amax(1) * (1 + REL)).all()


def test_bound_without_spare_slots_on_live_gpus():
    """Two of four GPUs dead and 8 experts on the 8 live slots: the forced counts hold
    there too; with a spare live slot the cardinality bound does not apply."""
    w = torch.tensor([[9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    active = torch.tensor([True, False, True, False])
    assert layer_lower_bound(w, 16, 4, active_gpus=active).tolist() == [12.0]
    assert layer_lower_bound(w, 8, 2).tolist() == [12.0]
    assert layer_lower_bound(w, 10, 2).tolist() == [8.0]  # the mean: 9 split in two


@pytest.mark.parametrize("groups", [16, 32])
def test_relaxed_hierarchical_bound_is_valid(groups):
    """Too many group→node assignments to enumerate: the relaxed bound still holds."""
    g = torch.Generator().manual_seed(groups)
    w = torch.exp(torch.randn(4, 64, generator=g, dtype=torch.float64) * 1.5)
    bound = layer_lower_bound(w, 96, 16, 4, groups, policy="hierarchical")
    assert (bound >= layer_lower_bound(w, 96, 16)).all()
    for p in (eplb.plan(w, 96, 16, 4, groups, policy="hierarchical"),
              plan_greedy(w, 96, 16, 4, groups, policy="hierarchical")):
        assert (bound <= p.gpu_loads(w).amax(1) * (1 + REL)).all()
        assert p.balancedness(w) <= balancedness_ceiling(w, 96, 16, 4, groups,
                                                         policy="hierarchical") * (1 + REL)


def test_bound_with_dead_gpus():
    g = torch.Generator().manual_seed(3)
    w = torch.exp(torch.randn(5, 24, generator=g, dtype=torch.float64))
    active = torch.tensor([True, False, True, True, True, False, True, True])
    bound = layer_lower_bound(w, 40, 8, active_gpus=active)
    assert (bound >= w.sum(1) / 6 * (1 - REL)).all()  # the mean over 6 live GPUs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = eplb.plan(w, 40, 8, active_gpus=active)
    assert (bound <= p.gpu_loads(w)[:, active].amax(1) * (1 + REL)).all()
    assert p.balancedness(w) <= balancedness_ceiling(w, 40, 8, active_gpus=active) * (1 + REL)
    with pytest.raises(ValueError, match="some GPUs are dead"):
        layer_lower_bound(w, 40, 8, 2, 4, policy="hierarchical", active_gpus=active)


def test_node_bounds_of_any_assignment_match_the_cached_enumeration():
    g = torch.Generator().manual_seed(3)
    w = torch.exp(torch.randn(5, 64, generator=g, dtype=torch.float64))
    partitions, per_node = enumerated_node_bounds(w, 72, 8, 4, 8)
    assert torch.equal(partitions, group_partitions(8, 4))
    general = hierarchical_node_bounds(w, group_partitions(8, 4), 72, 8, 4, 8, per_node=True)
    assert torch.allclose(general, per_node, rtol=1e-12, atol=0)


def test_auto_policy_of_the_bounds_is_the_planners():
    w = torch.rand(3, 64, generator=torch.Generator().manual_seed(5)) ** 4
    hier = balancedness_ceiling(w, 96, 16, 4, 8, policy="hierarchical")
    glob = balancedness_ceiling(w, 96, 16, 4, 8, policy="global")
    assert hier < glob
    assert balancedness_ceiling(w, 96, 16, 4, 8) == hier  # what eplb.plan(…, 4, 8) plans
    assert eplb.plan(w, 96, 16, 4, 8).policy == "hierarchical"
    assert balancedness_ceiling(w, 96, 16, 4, 6) == glob  # groups uneven over nodes: global
    dead = torch.ones(16, dtype=torch.bool)
    dead[3] = False
    assert torch.equal(layer_lower_bound(w, 96, 16, 4, 8, active_gpus=dead),
                       layer_lower_bound(w, 96, 16, active_gpus=dead))


@pytest.mark.parametrize("value", [1e308, 1e-310, 5e-324])
def test_scores_of_extreme_loads_are_finite(value, tmp_path):
    """Sums of loads near float64's ends overflow or vanish; every score is a ratio, so
    it is computed on the loads rescaled by a power of two (exact), in the API and in
    the CLI's summary and files (no NaN in the JSON)."""
    from eplb.cli import main

    weight = torch.full((2, 8), value, dtype=torch.float64)
    weight[0, 0] = value / 2
    placement = eplb.plan(weight, 12, 4)
    scores = [placement.balancedness(weight), balancedness_ceiling(weight, 12, 4),
              *placement.layer_balancedness(weight).tolist()]
    assert all(0 < s <= 1 for s in scores), scores
    np.save(tmp_path / "w.npy", weight.numpy())
    assert main(["plan", str(tmp_path / "w.npy"), "-r", "12", "-g", "4", "--json",
                 "-o", str(tmp_path / "p.json")]) == 0
    assert "NaN" not in (tmp_path / "p.json").read_text()


@pytest.mark.parametrize(("policy", "nodes"), [("global", 1), ("hierarchical", 2)])
def test_the_lower_bound_of_loads_near_the_float_ends_is_the_scaled_bound(policy, nodes):
    """The bound is in the loads' units: loads near float64's largest (their sums
    overflow) or smallest give the bound of the same loads at a normal scale, scaled by
    the same power of two, not inf or 0 (16 loads of 1e307 read inf)."""
    rng = np.random.default_rng(5)
    weight = torch.from_numpy(rng.uniform(0.5, 2.0, (3, 16)))
    weight[2] = 0  # an all-zero row stays 0
    plain = layer_lower_bound(weight, 24, 8, nodes, 4, policy)
    for power in (1020, -1000):
        scaled = layer_lower_bound(torch.ldexp(weight, torch.tensor(power)), 24, 8, nodes, 4,
                                   policy)
        assert torch.equal(scaled, torch.ldexp(plain, torch.tensor(power))), (power, scaled)


@pytest.mark.parametrize(("args", "kwargs", "error", "message"), [
    ((24, 8, 2, 6, "hierarchical"), {}, ValueError, "not a multiple of num_groups"),
    ((8, 8), {}, ValueError, "cannot hold 16 experts"),
    ((10, 8), {}, ValueError, "multiple of num_gpus"),
    ((24, 8, 1, 1, "bogus"), {}, ValueError, "policy must be one of"),
    ((24, 8, 0), {}, ValueError, "num_nodes must be a positive integer"),
    ((24, 0), {}, ValueError, "num_gpus must be a positive integer"),
    ((24, 8, 3, 3, "hierarchical"), {}, ValueError, "num_gpus (8) is not a multiple of"),
    ((24, 8), {"active_gpus": torch.ones(7, dtype=torch.bool)}, ValueError, "shape [8]"),
    ((24, 8), {"active_gpus": torch.tensor([3] * 8)}, TypeError, "boolean mask"),
])
def test_bounds_check_their_arguments(args, kwargs, error, message):
    # the bounds once answered numbers for clusters that cannot exist (or crashed)
    weight = torch.rand(3, 16, generator=torch.Generator().manual_seed(0))
    for bound in (balancedness_ceiling, layer_ceiling, layer_lower_bound):
        with pytest.raises(error, match=re.escape(message)):
            bound(weight, *args, **kwargs)


def test_a_global_bound_takes_gpus_that_do_not_divide_over_the_nodes():
    # as eplb.plan does (a regression of the argument checks, found by a review pass),
    # which plans such a cluster as one node and says so
    weight = torch.rand(3, 16, generator=torch.Generator().manual_seed(0)) + 0.1
    with pytest.warns(RuntimeWarning, match=r"num_gpus \(9\) is not a multiple"):
        placement = eplb.plan(weight, 18, 9, 2)
    ceiling = balancedness_ceiling(weight, 18, 9, 2)
    assert 0 < ceiling <= 1 + 1e-12  # (a ratio of float sums: the last bit may round up)
    assert placement.balancedness(weight) <= ceiling + 1e-12


def test_placement_scores_names_a_bare_tensor_as_the_wrong_type():
    """A phy2log tensor where a Placement belongs raised AttributeError from deep inside
    (found by a newcomer pass)."""
    from eplb.core.bounds import placement_scores

    w = torch.rand(2, 8) * 10 + 1
    placement = eplb.plan(w, 12, 4)
    assert placement_scores(placement, w)["balancedness"] > 0
    with pytest.raises(TypeError, match=r"placement must be an eplb\.Placement.*Tensor"):
        placement_scores(placement.phy2log, w)
