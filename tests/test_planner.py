"""The planner through its public API: ``eplb.plan`` and ``eplb.rebalance_experts``.

Output contract, policy selection, input errors, all-zero layers, determinism, dead GPUs,
GPU speeds, CUDA, and quality floors against DeepSeek's greedy on fixed seeded inputs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import assert_contract

import eplb
from eplb.core.baselines import plan_greedy
from eplb.core.bounds import balancedness_ceiling, layer_lower_bound
from eplb.core.options import DEFAULT_NOISE, FEW_SLOT_NOISE


def lognormal(layers: int, experts: int, sigma: float, seed: int,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(layers, experts, generator=g, dtype=torch.float64) * sigma)
    return w.to(dtype)


W = lognormal(4, 32, 0.8, seed=0)


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize(
    ("shape", "replicas", "gpus", "nodes", "groups", "policy"),
    [
        ((4, 32), 40, 8, 1, 1, "global"),
        ((4, 32), 48, 8, 2, 4, "hierarchical"),
        ((3, 16), 16, 4, 1, 1, "global"),  # no redundant slot
        ((2, 12), 36, 6, 3, 3, "hierarchical"),
        ((5, 7), 21, 3, 1, 1, "global"),  # E does not divide anything
        ((2, 3), 30, 10, 1, 1, "global"),  # many more replicas than experts (c > P)
    ],
)
def test_plan_output_contract(shape, replicas, gpus, nodes, groups, policy):
    w = lognormal(*shape, 0.9, seed=sum(shape))
    p = eplb.plan(w, replicas, gpus, nodes, groups)
    assert p.policy == policy
    assert p.topology == eplb.Topology(replicas, gpus, nodes, groups)
    assert p.phy2log.shape == (shape[0], replicas)
    assert p.logcnt.shape == shape
    assert p.log2phy.shape == (*shape, int(p.logcnt.max()))
    assert p.active_gpus is None
    p.validate()
    assert_contract(p, device="cpu")
    assert (p.logcnt.sum(1) == replicas).all()


def test_rebalance_experts_matches_plan():
    phy2log, log2phy, logcnt = eplb.rebalance_experts(W, 48, 4, 2, 8, seed=3)
    p = eplb.plan(W, 48, 8, 2, 4, seed=3)
    assert torch.equal(phy2log, p.phy2log)
    assert torch.equal(log2phy, p.log2phy)
    assert torch.equal(logcnt, p.logcnt)
    for t in (phy2log, log2phy, logcnt):
        assert t.dtype == torch.int64


def test_rebalance_experts_one_layer_tensor_drops_layer_dim():
    w = W[1].clone()
    phy2log, log2phy, logcnt = eplb.rebalance_experts(w, 40, 1, 1, 8)
    assert phy2log.shape == (40,)
    assert logcnt.shape == (32,)
    assert log2phy.shape == (32, int(logcnt.max()))
    full = eplb.plan(w[None], 40, 8)
    assert torch.equal(phy2log, full.phy2log[0])
    assert torch.equal(log2phy, full.log2phy[0])
    assert torch.equal(logcnt, full.logcnt[0])
    # plan always keeps the layer dimension
    assert eplb.plan(w, 40, 8).phy2log.shape == (1, 40)
    assert eplb.plan(w.numpy(), 40, 8).logcnt.shape == (1, 32)
    assert eplb.plan(w.tolist(), 40, 8).log2phy.shape[:2] == (1, 32)


@pytest.mark.parametrize("kind", ["numpy", "list"])
def test_rebalance_experts_one_layer_array_drops_layer_dim(kind):
    """A 1-D numpy array or list is one layer too, like a 1-D tensor (and like the greedy's
    ``rebalance_experts_greedy``)."""
    w = W[1].numpy() if kind == "numpy" else W[1].tolist()
    phy2log, _log2phy, logcnt = eplb.rebalance_experts(w, 40, 1, 1, 8)
    assert phy2log.shape == (40,)
    assert logcnt.shape == (32,)


@pytest.mark.parametrize("kind", ["numpy", "list", "float32", "float16", "int32", "int64"])
def test_input_kinds_give_valid_plans(kind):
    counts = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(1))
    w = {
        "numpy": counts.numpy().astype(np.float64),
        "list": counts.tolist(),
        "float32": counts.float(),
        "float16": counts.half(),
        "int32": counts.int(),
        "int64": counts,
    }[kind]
    p = eplb.plan(w, 24, 4)
    p.validate()
    assert_contract(p, device="cpu")
    if kind in ("numpy", "list", "int32", "int64"):
        # the same float64 loads whatever the container: the same plan
        ref = eplb.plan(counts.double(), 24, 4)
        assert torch.equal(p.phy2log, ref.phy2log)


def test_slot_to_gpu_convention():
    """Slot s lives on GPU s // (R / P): a dead GPU's block of slots is the one emptied."""
    active = torch.ones(8, dtype=torch.bool)
    active[5] = False
    p = eplb.plan(W, 40, 8, active_gpus=active)
    assert (p.phy2log[:, 25:30] == -1).all()
    assert (p.phy2log[:, :25] >= 0).all() and (p.phy2log[:, 30:] >= 0).all()
    loads = p.replica_loads(W).view(4, 8, 5).sum(2)
    assert torch.allclose(p.gpu_loads(W), loads)


# --------------------------------------------------------------------------- policy selection
@pytest.mark.parametrize(
    ("experts", "gpus", "nodes", "groups", "expected"),
    [
        (16, 8, 2, 4, "hierarchical"),
        (16, 8, 4, 4, "hierarchical"),
        (16, 8, 1, 4, "global"),  # one node
        (16, 8, 2, 1, "global"),  # one group
        (12, 8, 4, 6, "global"),  # groups % nodes != 0
        (16, 8, 4, 2, "global"),  # fewer groups than nodes
    ],
)
def test_auto_policy(experts, gpus, nodes, groups, expected):
    w = lognormal(2, experts, 0.7, seed=experts)
    replicas = gpus * (experts // gpus + 2)
    if nodes > 1 and groups > 1 and groups % nodes:
        # several nodes and groups asked for: falling back to global says why (new-user
        # pass: DeepSeek's argument order, plan(w, R, P, 8 groups, 4 nodes), was silent)
        with pytest.warns(RuntimeWarning, match=rf"num_groups \({groups}\) is not a "
                                                rf"multiple of num_nodes \({nodes}\).*"
                                                r"takes num_nodes before num_groups"):
            p = eplb.plan(w, replicas, gpus, nodes, groups)
        # DeepSeek's drop-in (and the engines' calls through it) plans globally silently,
        # as DeepSeek's function does; so does a forced global policy
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            eplb.rebalance_experts(w, replicas, groups, nodes, gpus)
            eplb.plan(w, replicas, gpus, nodes, groups, policy="global")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # auto resolves without warning here
            p = eplb.plan(w, replicas, gpus, nodes, groups)
    assert p.policy == expected
    p.validate()
    assert_contract(p)


def test_the_groups_warning_takes_numpy_sizes_and_only_good_calls():
    """NumPy sizes warn as ints do; a call the checks refuse, and GPUs that do not divide
    over the nodes (planned as one node, with their own warning), say nothing of groups
    (a later attacker pass)."""
    w = lognormal(2, 16, 0.7, seed=5)
    with pytest.warns(RuntimeWarning, match=r"num_groups \(2\) is not a multiple of num_no"):
        eplb.plan(w, 24, 8, np.int64(4), np.int64(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError):
            eplb.plan(w, 23, 8, 4, 2)  # R not a multiple of P
        eplb.plan(w, 24, 8, 3, 2)  # 8 GPUs on 3 nodes: one node
    assert not [c for c in caught if "num_groups" in str(c.message)]


def test_forced_policies():
    w = lognormal(2, 16, 0.7, seed=4)
    assert eplb.plan(w, 24, 8, 2, 4, policy="global").policy == "global"
    p = eplb.plan(w, 24, 8, 2, 4, policy="hierarchical")
    assert p.policy == "hierarchical"
    assert_contract(p)
    # a single node is a legal (trivial) hierarchy
    assert eplb.plan(w, 24, 8, 1, 4, policy="hierarchical").validate().policy == "hierarchical"


@pytest.mark.parametrize(
    ("experts", "replicas", "gpus", "nodes", "groups", "named"),
    [
        (18, 24, 8, 2, 4, r"num_experts \(18\) is not a multiple of num_groups \(4\)"),
        (16, 24, 6, 4, 4, r"num_gpus \(6\) is not a multiple of num_nodes \(4\)"),
        (18, 24, 8, 2, 3, r"num_groups \(3\) is not a multiple of num_nodes \(2\)"),
    ],
)
def test_forced_hierarchical_impossible(experts, replicas, gpus, nodes, groups, named):
    w = lognormal(2, experts, 0.7, seed=5)
    with pytest.raises(ValueError, match=named):
        eplb.plan(w, replicas, gpus, nodes, groups, policy="hierarchical")


def test_plans_are_ordinary_tensors_the_caller_may_write():
    # the planner runs in inference mode; what it hands back must not be an inference
    # tensor (an engine copying into or editing the map in place would raise)
    fresh = eplb.plan(W, 48, 8, 2, 4)
    again = eplb.plan(W, 48, 8, 2, 4, previous=fresh.phy2log, max_moves=10)
    dead = eplb.plan(W, 48, 8, active_gpus=torch.tensor([True] * 7 + [False]))
    outputs = [*fresh.as_tuple(), *again.as_tuple(), *dead.as_tuple(), dead.active_gpus,
               *eplb.rebalance_experts(W, 48, 4, 2, 8)]
    for t in outputs:
        assert not t.is_inference()
        t.copy_(t.clone())  # in place, outside inference mode
    assert_contract(again)


def test_auto_falls_back_to_global_with_warning():
    w = lognormal(2, 16, 0.7, seed=6)
    # groups divide over nodes, GPUs do not
    with pytest.warns(RuntimeWarning,
                      match=r"num_gpus \(6\) is not a multiple of num_nodes \(4\)") as caught:
        p = eplb.plan(w, 24, 6, 4, 4)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert p.policy == "global"
    assert_contract(p)
    # experts do not divide into groups
    with pytest.warns(RuntimeWarning, match=r"num_experts \(18\)"):
        p = eplb.plan(lognormal(2, 18, 0.7, seed=6), 24, 8, 2, 4)
    assert p.policy == "global"
    assert_contract(p)


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy 'greedy'"):
        eplb.plan(W, 40, 8, policy="greedy")


# --------------------------------------------------------------------------- input errors
@pytest.mark.parametrize(
    ("value", "where"),
    [(float("nan"), r"weight\[2, 7\] \(layer 2, expert 7\) is nan"),
     (float("inf"), r"weight\[2, 7\] \(layer 2, expert 7\) is inf"),
     (-1.0, r"weight\[2, 7\] \(layer 2, expert 7\) is -1.0")],
)
def test_bad_load_values_name_layer_and_expert(value, where):
    w = W.clone()
    w[2, 7] = value
    with pytest.raises(ValueError, match=where):
        eplb.plan(w, 40, 8)
    with pytest.raises(ValueError, match=where):
        eplb.rebalance_experts(w, 40, 1, 1, 8)


def test_negative_integer_load():
    w = torch.ones(2, 8, dtype=torch.int64)
    w[1, 3] = -5
    with pytest.raises(ValueError, match=r"weight\[1, 3\].*>= 0"):
        eplb.plan(w, 8, 2)


@pytest.mark.parametrize("w", [torch.tensor(3.0), torch.ones(2, 3, 8)])
def test_wrong_number_of_dims(w):
    with pytest.raises(ValueError, match=f"got {w.dim()} dimensions"):
        eplb.plan(w, 8, 2)


@pytest.mark.parametrize(
    ("w", "missing"), [(torch.zeros(0, 8), "no layers"), (torch.zeros(3, 0), "no experts")]
)
def test_empty_loads(w, missing):
    with pytest.raises(ValueError, match=missing):
        eplb.plan(w, 8, 2)


@pytest.mark.parametrize("w", [float("nan"), float("inf"), -float("inf"), -1.0])
def test_bad_value_in_float32_and_float64(w):
    for dtype in (torch.float32, torch.float64):
        loads = torch.ones(3, 8, dtype=dtype)
        loads[2, 5] = w
        with pytest.raises(ValueError, match=r"weight\[2, 5\]"):
            eplb.plan(loads, 8, 2)


def test_loads_whose_sum_overflows_are_accepted():
    loads = torch.full((2, 8), 3e38, dtype=torch.float32)  # float32 sum is inf, values finite
    eplb.plan(loads, 8, 2).validate()


@pytest.mark.parametrize("w", ["loads", {"logical_count": [1, 2]}, None, 3.5])
def test_non_tensor_input(w):
    with pytest.raises(TypeError, match=r"torch\.Tensor, numpy\.ndarray or a nested list"):
        eplb.plan(w, 8, 2)
    with pytest.raises(TypeError, match=type(w).__name__):
        eplb.rebalance_experts(w, 8, 1, 1, 2)


def test_ragged_list():
    # where it goes wrong, as the load files say it (NumPy's "inhomogeneous shape")
    with pytest.raises(TypeError, match=r"rectangular.*\[1\] has 1 entries where \[0\] has 2"):
        eplb.plan([[1, 2], [3]], 4, 2)
    with pytest.raises(TypeError, match=r"\[0\]\[1\] is an object, not a number"):
        eplb.plan([[1, {"a": 1}], [2, 3]], 4, 2)


def test_too_few_replicas():
    msg = r"num_replicas \(24\) must be at least the number of experts \(32\)"
    with pytest.raises(ValueError, match=msg):
        eplb.plan(W, 24, 8)


def test_replicas_not_multiple_of_gpus():
    msg = r"num_replicas \(42\) must be a multiple of num_gpus \(8\)"
    with pytest.raises(ValueError, match=msg):
        eplb.plan(W, 42, 8)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_bad_topology_numbers(bad):
    with pytest.raises(ValueError, match="positive integer"):
        eplb.plan(W, 40, bad)


@pytest.mark.parametrize("active", [torch.ones(7, dtype=torch.bool),
                                    torch.ones(2, 8, dtype=torch.bool), [True] * 9])
def test_bad_active_gpus_shape(active):
    with pytest.raises(ValueError, match=r"active_gpus must have shape \[8\]"):
        eplb.plan(W, 40, 8, active_gpus=active)


@pytest.mark.parametrize(("speed", "named"), [
    ([1.0] * 7 + [0.0], r"gpu_speed\[7\] is 0.0"),
    ([1.0, -2.0] + [1.0] * 6, r"gpu_speed\[1\] is -2.0"),
    ([1.0] * 7 + [float("nan")], r"gpu_speed\[7\] is nan"),
    ([1.0] * 4, r"gpu_speed must have shape \[8\]"),
])
def test_bad_gpu_speed(speed, named):
    with pytest.raises(ValueError, match=named):
        eplb.plan(W, 40, 8, gpu_speed=torch.tensor(speed))


def test_bad_seed_type():
    with pytest.raises(TypeError, match="seed must be an int"):
        eplb.plan(W, 40, 8, seed="1")


def test_previous_with_wrong_shape():
    msg = r"previous placement has shape \(4, 32\), expected \[4, 40\]"
    with pytest.raises(ValueError, match=msg):
        eplb.plan(W, 40, 8, previous=torch.zeros(4, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(3, 40\)"):
        eplb.rebalance_experts(W, 40, 1, 1, 8, old_phy2log=torch.zeros(3, 40, dtype=torch.int64))


# --------------------------------------------------------------------------- all-zero layers
@pytest.mark.parametrize(
    ("experts", "replicas", "gpus", "nodes", "groups"),
    [(5, 12, 3, 1, 1), (8, 16, 4, 2, 4), (32, 40, 8, 1, 1), (16, 48, 8, 2, 4), (3, 30, 10, 1, 1),
     (8, 64, 8, 2, 4)],  # 8 slots per expert
)
def test_all_zero_layer_is_even(experts, replicas, gpus, nodes, groups):
    w = lognormal(3, experts, 0.8, seed=experts)
    w[1] = 0
    p = eplb.plan(w, replicas, gpus, nodes, groups)
    assert_contract(p)
    cnt = p.logcnt[1]
    assert int(cnt.max() - cnt.min()) <= 1, cnt.tolist()
    # the zero layer's GPU loads under uniform traffic are as even as the counts allow
    uniform = torch.ones(3, experts)
    loads = p.gpu_loads(uniform)[1]
    assert float(loads.max()) <= float(uniform[1].sum()) / gpus * 1.5 + 1e-9
    all_zero = eplb.plan(torch.zeros(2, experts), replicas, gpus, nodes, groups)
    assert_contract(all_zero)
    assert int((all_zero.logcnt.amax(1) - all_zero.logcnt.amin(1)).max()) <= 1
    assert all_zero.balancedness(torch.zeros(2, experts)) == 1.0


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize(("nodes", "groups"), [(1, 1), (2, 4)])
def test_same_seed_same_output(nodes, groups):
    a = eplb.plan(W, 48, 8, nodes, groups, seed=11)
    b = eplb.plan(W.clone(), 48, 8, nodes, groups, seed=11)
    for x, y in zip(a.as_tuple(), b.as_tuple(), strict=True):
        assert torch.equal(x, y)
    for seed in (0, 1, 12345):
        p = eplb.plan(W, 48, 8, nodes, groups, seed=seed, num_candidates=4)
        assert_contract(p)


def test_search_options_give_valid_plans():
    for candidates, steps in ((1, 0), (1, 1), (8, 64)):
        p = eplb.plan(W, 48, 8, 2, 4, num_candidates=candidates, refine_steps=steps)
        assert_contract(p)
    with pytest.raises(ValueError, match="num_candidates"):
        eplb.plan(W, 48, 8, num_candidates=0)


def test_nearest_dispatch_with_the_auto_policy_warns_where_it_plans_hierarchically():
    w = lognormal(3, 32, 1.0, seed=2)
    with pytest.warns(RuntimeWarning, match="policy='global'") as caught:
        p = eplb.plan(w, 48, 8, 2, 4, dispatch="nearest")
    assert p.policy == "hierarchical" and caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eplb.plan(w, 48, 8, 2, 4, policy="hierarchical", dispatch="nearest")
        eplb.plan(w, 48, 8, 2, 4, policy="global", dispatch="nearest")
    with pytest.raises(ValueError, match="noise must be a number"):
        eplb.PackingOptions(noise="x")  # type: ignore[arg-type]


def test_float32_loads_keep_their_portfolio_pick():
    # float32 loads used to be planned in float32, where the allocations' means differ by
    # rounding, so the planner's shortcut for rows whose Jefferson bound is the mean (exact
    # in float64) had to be kept off for them. Every dtype is planned in float64 now
    # (twenty-fifth session): float32 loads get the float64 plan of their values.
    # Expected counts: what eplb 7c07a8e (before the shortcut) returned for this input,
    # [2, 1, 2, 1, 2, 2, 1, 1] at 0.911, until the filler ladder (rows of at most 4 GPUs
    # packed far above their bound) found [2, 1, 2, 2, 2, 1, 1, 1] at 0.944, and the count
    # vectors one replica from Jefferson's in every expert (rows of at most 8 experts)
    # these at 0.982
    w = torch.tensor([[39.66, 3.65, 35.12, 1.25, 21.46, 17.62, 1.26, 15.23]])
    for dtype in (torch.float32, torch.float64):
        placement = eplb.plan(w.to(dtype), 12, 4, policy="global")
        assert placement.logcnt.tolist() == [[2, 2, 3, 1, 1, 1, 1, 1]], dtype
        assert placement.balancedness(w) > 0.98
    # on 5 GPUs float32 loads planned in float32 got [4, 4, 1, 4, 1, 1] at 0.984; planned
    # in float64 they get the float64 plan, 0.9976
    w = torch.tensor([[33.80, 35.45, 2.82, 31.92, 10.82, 9.64]])
    for dtype in (torch.float32, torch.float64):
        placement = eplb.plan(w.to(dtype), 15, 5, policy="global")
        assert placement.logcnt.tolist() == [[3, 4, 1, 3, 2, 2]], dtype
        assert placement.balancedness(w) > 0.997


def test_three_slots_per_gpu_pack_two_starts_by_default():
    """Where a GPU has 3 slots and there are no more GPUs than polish steps the packing
    tries a second, randomised start unless ``num_candidates`` is given; elsewhere one
    start. The default never does worse than one start there (the best start per layer
    is kept)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(6, 36, generator=g, dtype=torch.float64) + 0.5) * 1000
    three = eplb.plan(w, 48, 16)  # S = 3, 16 GPUs
    assert torch.equal(three.phy2log, eplb.plan(w, 48, 16, num_candidates=2).phy2log)
    one = eplb.plan(w, 48, 16, num_candidates=1)
    assert not torch.equal(three.phy2log, one.phy2log)  # the second start won somewhere
    assert (three.layer_balancedness(w) >= one.layer_balancedness(w) - 1e-12).all()
    six = eplb.plan(w, 48, 8)  # S = 6
    assert torch.equal(six.phy2log, eplb.plan(w, 48, 8, num_candidates=1).phy2log)
    wide = torch.rand(3, 256, generator=g, dtype=torch.float64) + 0.5
    # S = 3 on 96 GPUs, more than the 24 polish steps: one start
    assert torch.equal(eplb.plan(wide, 288, 96).phy2log,
                       eplb.plan(wide, 288, 96, num_candidates=1).phy2log)
    assert eplb.PackingOptions().candidates_for(3) == 2
    assert eplb.PackingOptions().candidates_for(3, 16) == 2
    assert eplb.PackingOptions().candidates_for(3, 96) == 1
    assert eplb.PackingOptions(num_candidates=1).candidates_for(3) == 1
    assert eplb.PackingOptions(num_candidates=3).candidates_for(3, 96) == 3
    assert eplb.PackingOptions().candidates_for(9) == 1


def test_few_slots_perturb_the_first_start():
    """Where a GPU has at most 3 slots the replica packing's first start is perturbed too
    (by FEW_SLOT_NOISE); explicit options win, and other packings keep the exact first
    start and the default noise."""
    opts = eplb.PackingOptions()
    assert opts.perturbs_first(2) and opts.perturbs_first(3) and not opts.perturbs_first(4)
    assert not opts.perturbs_first()  # not the replica packing
    assert opts.noise_for(3) == FEW_SLOT_NOISE and opts.noise_for(4) == DEFAULT_NOISE
    assert opts.noise_for() == DEFAULT_NOISE
    assert not eplb.PackingOptions(perturb_first=False).perturbs_first(3)
    assert eplb.PackingOptions(noise=0.2).noise_for(3) == 0.2
    with pytest.raises(ValueError, match="perturb_first"):
        eplb.PackingOptions(perturb_first=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise"):
        eplb.PackingOptions(noise=1.5)
    g = torch.Generator().manual_seed(1)
    w = (torch.rand(6, 64, generator=g, dtype=torch.float64) + 0.5) * 1000
    exact = eplb.PlanOptions(packing=eplb.PackingOptions(perturb_first=False))
    default = eplb.plan(w, 96, 32)  # S = 3 on 32 GPUs
    assert not torch.equal(default.phy2log, eplb.plan(w, 96, 32, options=exact).phy2log)
    assert torch.equal(default.phy2log, eplb.plan(w, 96, 32).phy2log)  # seeded
    # S = 4 and 5: unchanged by the option
    for replicas in (128, 160):
        assert torch.equal(eplb.plan(w, replicas, 32).phy2log,
                           eplb.plan(w, replicas, 32, options=exact).phy2log)


# --------------------------------------------------------------------------- dead GPUs
def test_dead_gpus():
    active = torch.tensor([True, True, False, True, True, True, False, True])
    p = eplb.plan(W, 48, 8, active_gpus=active, policy="global")
    p.validate()
    assert_contract(p)
    assert torch.equal(p.active_gpus.cpu(), active)
    dead_slots = torch.cat([torch.arange(12, 18), torch.arange(36, 42)])
    assert (p.phy2log[:, dead_slots] == -1).all()
    assert (p.log2phy[..., None] != dead_slots).all()  # no expert lists a dead slot
    assert (p.logcnt >= 1).all() and (p.logcnt.sum(1) == 36).all()
    # balancedness over live GPUs only
    loads = p.gpu_loads(W)[:, active]
    want = float(loads.mean(1).sum() / loads.max(1).values.sum())
    assert p.balancedness(W) == pytest.approx(want)
    assert p.balancedness(W) > 0.9


def test_dead_gpus_with_hierarchical_topology():
    active = torch.ones(8, dtype=torch.bool)
    active[0] = False
    with pytest.warns(RuntimeWarning, match="dead"):
        p = eplb.plan(W, 48, 8, 2, 4, active_gpus=active)
    assert p.policy == "global"
    assert_contract(p)
    with pytest.raises(ValueError, match="dead"):
        eplb.plan(W, 48, 8, 2, 4, active_gpus=active, policy="hierarchical")


def test_all_gpus_alive_is_the_plain_plan():
    p = eplb.plan(W, 40, 8, active_gpus=torch.ones(8, dtype=torch.bool))
    assert torch.equal(p.phy2log, eplb.plan(W, 40, 8).phy2log)
    assert_contract(p)


def test_too_few_live_slots():
    active = torch.tensor([True, False, False, False, False, False, True, True])
    msg = r"only 3 of 8 GPUs are live: 15 slots cannot hold 32 experts"
    with pytest.raises(ValueError, match=msg):
        eplb.plan(W, 40, 8, active_gpus=active)


def test_dead_gpus_with_just_enough_slots():
    active = torch.tensor([False, True, True, True])
    w = lognormal(3, 12, 1.0, seed=8)
    p = eplb.plan(w, 16, 4, active_gpus=active)  # 12 live slots for 12 experts
    assert_contract(p)
    assert (p.logcnt == 1).all()


# --------------------------------------------------------------------------- GPU speeds
@pytest.mark.parametrize(("layers", "experts", "gpus", "slots", "seed"),
                         [(4, 32, 8, 5, 0), (4, 64, 16, 4, 1), (3, 16, 4, 6, 2)])
def test_gpu_speed_no_worse_than_equal_speed_plan(layers, experts, gpus, slots, seed):
    w = lognormal(layers, experts, 0.7, seed=seed)
    speed = torch.ones(gpus, dtype=torch.float64)
    speed[::2] = 2.0
    fast = eplb.plan(w, slots * gpus, gpus, gpu_speed=speed)
    fast.validate()
    assert_contract(fast)
    plain = eplb.plan(w, slots * gpus, gpus)
    ours = fast.gpu_loads(w, speed).amax(1)
    theirs = plain.gpu_loads(w, speed).amax(1)
    assert (ours <= theirs * (1 + 1e-9)).all(), (ours.tolist(), theirs.tolist())
    assert float(ours.sum()) < float(theirs.sum())  # 2x speeds must be exploited


def test_balancedness_with_gpu_speed_scores_time():
    """A speed-aware plan scored with its speeds: ideal time / actual time, as the CLI's
    eval does; equal speeds give the plain figure."""
    w = lognormal(4, 32, 0.7, seed=3)
    speed = torch.tensor([2.0, 1.0] * 4, dtype=torch.float64)
    p = eplb.plan(w, 40, 8, gpu_speed=speed)
    loads = p.gpu_loads(w).to(torch.float64)
    ideal = loads.sum(1) / speed.sum()
    want = float(ideal.sum() / (loads / speed).amax(1).sum())
    assert p.balancedness(w, gpu_speed=speed) == pytest.approx(want, rel=1e-12)
    assert p.balancedness(w, gpu_speed=speed) > p.balancedness(w)  # its load is uneven
    assert p.balancedness(w, gpu_speed=torch.ones(8)) == pytest.approx(p.balancedness(w))
    with pytest.raises(ValueError, match=r"gpu_speed\[1\]"):
        p.balancedness(w, gpu_speed=[1.0, 0.0] * 4)


def test_gpu_speed_with_hierarchical_topology():
    speed = torch.tensor([2.0, 1.0] * 4)
    with pytest.warns(RuntimeWarning, match="gpu_speed"):
        p = eplb.plan(W, 48, 8, 2, 4, gpu_speed=speed)
    assert p.policy == "global"
    assert_contract(p)
    with pytest.raises(ValueError, match="gpu_speed"):
        eplb.plan(W, 48, 8, 2, 4, gpu_speed=speed, policy="hierarchical")


def test_gpu_speed_with_dead_gpus_and_zero_layer():
    w = lognormal(3, 16, 0.7, seed=9)
    w[0] = 0
    speed = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.5, 1.0])
    active = torch.tensor([True, True, True, False, True, True])
    p = eplb.plan(w, 24, 6, gpu_speed=speed, active_gpus=active)
    assert_contract(p)


# --------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize(("nodes", "groups"), [(1, 1), (2, 4)])
def test_cuda_plan(nodes, groups):
    w = W.cuda()
    p = eplb.plan(w, 48, 8, nodes, groups)
    for t in p.as_tuple():
        assert t.is_cuda and t.dtype == torch.int64
    p.validate()
    assert_contract(p, device="cuda")
    phy2log, _log2phy, _logcnt = eplb.rebalance_experts(w[0], 48, groups, nodes, 8)
    assert phy2log.is_cuda and phy2log.shape == (48,)
    active = torch.ones(8, dtype=torch.bool, device="cuda")
    active[3] = False
    assert_contract(eplb.plan(w, 48, 8, active_gpus=active), device="cuda")


# --------------------------------------------------------------------------- quality floors
QUALITY_CASES = [
    # layers, experts, gpus, slots per GPU, sigma, seed
    pytest.param(8, 64, 8, 9, 0.8, 0, id="8x64-P8-S9"),
    pytest.param(4, 128, 32, 5, 0.6, 1, id="4x128-P32-S5"),
    pytest.param(8, 24, 16, 2, 1.1, 0, id="8x24-P16-S2"),  # few slots per GPU
    pytest.param(8, 64, 16, 4, 1.1, 2, id="8x64-P16-S4-no-redundancy"),  # R == E
]


@pytest.mark.parametrize(("layers", "experts", "gpus", "slots", "sigma", "seed"), QUALITY_CASES)
@pytest.mark.parametrize("policy", ["global", "hierarchical"])
def test_quality_not_below_greedy(layers, experts, gpus, slots, sigma, seed, policy):
    w = lognormal(layers, experts, sigma, seed)
    replicas = slots * gpus
    ours = eplb.plan(w, replicas, gpus, 4, 8, policy=policy)
    assert ours.policy == policy
    assert_contract(ours)
    greedy = plan_greedy(w, replicas, gpus, 4, 8, policy=policy)
    ceiling = balancedness_ceiling(w, replicas, gpus, 4, 8, policy=policy)
    b_ours, b_greedy = ours.balancedness(w), greedy.balancedness(w)
    assert b_ours <= ceiling + 1e-9
    try:
        greedy.validate()
        slack = 1e-12
    except eplb.PlacementError:
        # the greedy stacked two replicas of an expert on one GPU, which eplb's contract
        # forbids; with 2 slots per GPU that can buy it a sliver of balance
        slack = 1e-3
    assert b_ours >= b_greedy - slack, f"eplb {b_ours:.5f} < greedy {b_greedy:.5f}"
    if slots >= 5:
        assert b_ours >= 0.99 * ceiling, f"eplb {b_ours:.5f}, ceiling {ceiling:.5f}"


def test_one_gpu_plans_are_contiguous():
    """Engines view and copy the map; a transposed one cannot be viewed."""
    phy2log, log2phy, logcnt = eplb.rebalance_experts(torch.rand(2, 16), 32, 1, 1, 1)
    assert phy2log.is_contiguous() and log2phy.is_contiguous() and logcnt.is_contiguous()
    assert phy2log.view(-1).numel() == 64


def test_absurd_candidate_counts_are_refused():
    with pytest.raises(ValueError, match="num_candidates must be at most"):
        eplb.plan(W, 48, 8, num_candidates=10**6)


def test_the_portfolio_threshold_in_force() -> None:
    # automatic: 1/3 where the allocations are only ranked by their packing bound, 1/2
    # where each is packed and refined (BENCHMARKS.md §12); a given one is used as given
    auto = eplb.PlanOptions()
    assert auto.portfolio_threshold is None
    assert auto.portfolio_cut(each_packed=False) == 1 / 3
    assert auto.portfolio_cut(each_packed=True) == 1 / 2
    given = eplb.PlanOptions(portfolio_threshold=np.float32(0.25))
    assert given.portfolio_threshold == 0.25 and type(given.portfolio_threshold) is float
    assert given.portfolio_cut(each_packed=True) == given.portfolio_cut(each_packed=False)
    # a threshold above every layer's largest replica plans without the portfolio: at
    # S = 9 the automatic one must plan the same as 1/2 given explicitly
    w = torch.exp(torch.randn(6, 32, generator=torch.Generator().manual_seed(3)) * 1.5)
    half = eplb.PlanOptions(portfolio_threshold=0.5)
    assert torch.equal(eplb.plan(w, 72, 8, options=auto).phy2log,
                       eplb.plan(w, 72, 8, options=half).phy2log)


def test_number_knobs_take_zero_d_arrays_and_refuse_what_has_no_value() -> None:
    # a 0-d NumPy array was refused where a 0-d tensor was taken; a meta tensor raised
    # torch's NotImplementedError instead of the knob's ValueError
    from eplb.online.estimate import ExponentialAverage

    assert eplb.PlanOptions(portfolio_threshold=np.array(0.5)).portfolio_threshold == 0.5
    assert ExponentialAverage(np.array(3.0)).half_life == 3.0
    for bad in (torch.empty((), device="meta"), np.array([0.5]), np.array(True)):
        with pytest.raises(ValueError, match="portfolio_threshold must be a number"):
            eplb.PlanOptions(portfolio_threshold=bad)


def test_without_spare_slots_the_packing_reaches_the_ceiling():
    # slots = experts (vLLM's default of no redundant experts): every expert once, the
    # packing is the whole plan. 4 polish steps on 8 GPUs of 16 slots left these loads at
    # 0.9977 of the ceiling (Qwen3-30B-A3B's real ones below DeepSeek's greedy: new-user
    # pass); rows holding every expert once are searched again from 0.1 % above their bound
    g = torch.Generator().manual_seed(0)
    w = (torch.exp(torch.randn(48, 128, generator=g, dtype=torch.float64) * 0.5) * 1000).round()
    planned = eplb.plan(w, 128, 8)
    assert_contract(planned)
    assert planned.balancedness(w) >= 0.999 * balancedness_ceiling(w, 128, 8)


@pytest.mark.parametrize(("experts", "gpus"), [(384, 4), (384, 6), (384, 8)])
def test_one_very_hot_expert_on_gpus_of_many_slots_is_not_below_the_greedy(experts, gpus):
    # quality attacker pass: every expert once, one 50x the rest, on 4-8 GPUs of 48-96
    # slots: the second search's steps scale with the GPUs, and the hot GPU needs a swap
    # per item it sheds (on the attacker's inputs 0.76, 0.65, 0.68 against DeepSeek's
    # greedy's 0.91, 0.77, 0.76; on these, 2 of 3 below it)
    g = torch.Generator().manual_seed(gpus)
    w = torch.rand(1, experts, generator=g, dtype=torch.float64) * 100 + 1
    w[0, 0] *= 50
    planned = eplb.plan(w, experts, gpus)
    assert_contract(planned)
    assert planned.balancedness(w) >= plan_greedy(w, experts, gpus).balancedness(w) - 1e-9


def test_one_very_hot_expert_with_few_spare_slots_is_packed_near_the_ceiling():
    # found by a quality attacker pass: 136 experts on 16 GPUs with 9 slots (8 spare), one
    # expert 50x the others: the construction left six GPUs at 0.8 of the mean and the
    # automatic steps (no pair step and 8 polish steps at 16 GPUs) lifted one GPU per
    # step, 0.835 against DeepSeek's greedy's 0.965; such rows get a second search
    g = torch.Generator().manual_seed(5)
    w = torch.rand(1, 136, generator=g, dtype=torch.float64) * 100
    w[0, 0] *= 50
    planned = eplb.plan(w, 144, 16)
    assert planned.balancedness(w) >= plan_greedy(w, 144, 16).balancedness(w)
    assert planned.balancedness(w) >= 0.995 * balancedness_ceiling(w, 144, 16)


@pytest.mark.parametrize(("experts", "gpus"), [(12, 3), (16, 4), (32, 8)])
def test_every_expert_once_at_three_or_four_slots_is_never_below_the_greedy(experts, gpus):
    # slots = experts at 3-4 slots per GPU: the swap searches stopped in local optima the
    # greedy does not (new-user pass: 9 experts on 3 GPUs, 0.9376 against 0.9726; 3-6 of
    # these 100 rows below it); such rows now get the greedy's packing as a second opinion
    g = torch.Generator().manual_seed(experts)
    w = torch.exp(torch.randn(100, experts, generator=g, dtype=torch.float64))
    planned = eplb.plan(w, experts, gpus)
    assert_contract(planned)
    greedy = plan_greedy(w, experts, gpus)
    assert (planned.layer_balancedness(w) >= greedy.layer_balancedness(w) - 1e-9).all()


@pytest.mark.parametrize("loads", [
    [13, 0, 50, 145, 74, 4, 7, 17, 11, 97, 0, 11, 72, 16, 0, 65],
    [165, 0, 68, 0, 31, 40, 120, 112, 70, 209, 103, 45, 48, 58, 21, 81, 26, 38, 20, 9, 32, 38,
     38, 10, 161, 0, 36, 11, 99, 34, 20, 24]])
def test_the_greedy_opinion_keeps_ties_of_integer_loads(loads):
    # attacker pass: on float32 items over their mean, exact ties of integer GPU loads
    # split the other way, and eplb ended above the greedy (149 against 148, 228 against 224)
    w = torch.tensor([loads], dtype=torch.float64)
    gpus = len(loads) // 4
    planned = eplb.plan(w, len(loads), gpus)
    assert_contract(planned)
    assert float(planned.gpu_loads(w).amax()) <= float(
        plan_greedy(w, len(loads), gpus).gpu_loads(w).amax())


def test_the_greedy_opinion_packs_as_deepseeks_greedy():
    from eplb.core.baselines import balanced_packing
    from eplb.core.packing.greedy import greedy_positions
    g = torch.Generator().manual_seed(1)
    for rows, gpus, slots in ((5, 3, 3), (7, 8, 4), (3, 16, 3)):
        w = torch.rand(rows, gpus * slots, generator=g, dtype=torch.float64)
        w[0] = torch.round(w[0] * 4)  # ties
        w = w.sort(dim=1, descending=True, stable=True).values
        gpu, slot = greedy_positions(w.numpy(), gpus)
        pack, rank = balanced_packing(w, gpus)
        assert np.array_equal(gpu, pack.numpy()) and np.array_equal(slot, rank.numpy())


@pytest.mark.parametrize(("experts", "gpus"), [(192, 2), (192, 4), (768, 16)])
def test_one_expert_far_hotter_than_the_rest_reaches_the_cardinality_bound(experts, gpus):
    # attacker pass: every expert once, one 1000x the rest. The bound is that expert plus
    # the S - 1 lightest; its GPU sheds one item per swap, and the rows stopped 0.3-3.8 %
    # above it (under the third search's 5 % gap) where DeepSeek's greedy sat on it
    g = torch.Generator().manual_seed(0)
    w = torch.rand(4, experts, generator=g, dtype=torch.float64) + 0.01
    w[:, 0] *= 1000
    planned = eplb.plan(w, experts, gpus)
    assert_contract(planned)
    peak = planned.gpu_loads(w).amax(1)
    assert (peak <= layer_lower_bound(w, experts, gpus) * (1 + 1e-6)).all()


@pytest.mark.parametrize(("replicas", "gpus"), [(24, 4), (18, 3), (20, 4)])
def test_eight_experts_get_counts_that_move_several_replicas_at_once(replicas, gpus):
    # new-user pass: Mixtral's 8 experts on 4 GPUs of 6 slots got 3 replicas each from
    # every rule, packed at 0.983 where DeepSeek's greedy reached 0.990 and 4/2 splits
    # 0.99997; on these 60 rows eplb averaged 0.989 against the greedy's 0.990 (34 rows
    # below it, by up to 0.015). Rows of at most 8 experts now try every count vector
    # one replica from Jefferson's in each expert
    g = torch.Generator().manual_seed(7)
    w = torch.exp(torch.randn(60, 8, generator=g, dtype=torch.float64) * 0.6)
    planned = eplb.plan(w, replicas, gpus)
    assert_contract(planned)
    ours = planned.layer_balancedness(w)
    greedy = plan_greedy(w, replicas, gpus).layer_balancedness(w)
    assert float(ours.mean()) > float(greedy.mean()) + 0.004
    assert (ours >= greedy - 0.005).all()


def test_rows_of_eight_experts_rank_their_count_vectors_a_few_rows_at_a_time(monkeypatch):
    # helper pass: the count vectors of every row of at most 8 experts were ranked at
    # once, ~280 KB a row: 200 layers × 1024 experts on 128 nodes of 8 GPUs with 256
    # groups (8 experts a node) took over 8 GB. They are now ranked VECTORS_AT_ONCE
    # vectors at a time (1,107 a row at 8 experts), with the same plans
    import eplb.core.tiny_counts as tiny_counts

    g = torch.Generator().manual_seed(7)
    w = torch.exp(torch.randn(12, 8, generator=g, dtype=torch.float64) * 0.6)
    whole = eplb.plan(w, 24, 4)
    ranked: list[int] = []
    real_peaks = tiny_counts.greedy_peaks

    def counted(load, expert, num_gpus):
        ranked.append(len(load))
        return real_peaks(load, expert, num_gpus)

    monkeypatch.setattr(tiny_counts, "greedy_peaks", counted)
    monkeypatch.setattr(tiny_counts, "VECTORS_AT_ONCE", 2 * 1107)  # 2 rows at a time
    chunked = eplb.plan(w, 24, 4)
    assert torch.equal(chunked.phy2log, whole.phy2log)
    assert len(ranked) > 2 and max(ranked) <= 2 * 1107


@pytest.mark.parametrize(("experts", "gpus"), [(256, 8), (384, 8), (384, 6)])
def test_a_few_hot_experts_with_one_spare_slot_a_gpu_are_not_below_the_greedy(experts, gpus):
    # quality attacker pass: R = E + P, three experts 20x the rest, on GPUs of 17-65
    # slots. The hot experts take the spares and the rest pack whole; those rows ended
    # 0.05-0.2 % above their bound, under the second search's 1 % (384 experts on 8
    # GPUs: 0.9980 against DeepSeek's greedy's 0.9992); they now get the 0.1 % gap
    g = torch.Generator().manual_seed(experts + gpus)
    w = torch.rand(2, experts, generator=g, dtype=torch.float64) * 100 + 1
    w[:, :3] *= 20
    planned = eplb.plan(w, experts + gpus, gpus)
    assert_contract(planned)
    greedy = plan_greedy(w, experts + gpus, gpus)
    assert (planned.layer_balancedness(w) >= greedy.layer_balancedness(w) - 1e-9).all()


@pytest.mark.parametrize(("hot", "expected"), [([1.0, 1.0], 0.9999), ([1.0] * 4, 0.9999),
                                               ([2.0, 1.0], 0.98)])
@pytest.mark.parametrize("rest", [0.0, 1e-6])
@pytest.mark.parametrize(("experts", "slots"), [(256, 288), (32, 64)])  # S = 9, and S = 2
def test_a_few_hot_experts_among_idle_ones_get_counts_that_fit_the_gpus(hot, expected, rest,
                                                                         experts, slots):
    # found by an attacker pass: Jefferson's rule gave two equally hot experts among 254
    # idle ones 17 replicas each on 32 GPUs of 9 slots, two GPUs carried two of them, and
    # the plan scored 0.531 against a ceiling of 1.0 (DeepSeek's greedy too); 16 each,
    # with the spare slots on idle experts, balance it exactly. ([2, 1]: 21 + 11 replicas,
    # one per GPU, 0.984, is the best any counts give)
    # (at 2 slots per GPU the count search moves one replica at a time and saw no gain in
    # the first step back from 17 + 17)
    w = torch.full((1, experts), rest, dtype=torch.float64)
    w[0, :len(hot)] = torch.tensor(hot, dtype=torch.float64)
    planned = eplb.plan(w, slots, 32).validate()
    assert planned.balancedness(w) >= expected
    assert planned.balancedness(w) > plan_greedy(w, slots, 32).balancedness(w) + 0.4


def test_hierarchical_nodes_with_a_very_hot_expert_get_the_second_search_too():
    # the same pass, one log-normal layer on 2 nodes of 8 GPUs with 9 slots: 0.831 against
    # the greedy's 0.935 (ceiling 0.950); the greedy stacks no replica here
    w = torch.tensor([[5, 730, 81, 846, 1, 1040, 58, 4833, 3, 2, 1, 1904, 182, 4, 1263, 12,
                       192, 956, 4, 65, 177, 127, 84, 23, 128, 2, 1, 39256, 37, 0, 28, 41,
                       142, 47, 3, 352, 55, 274, 83, 1, 808, 14, 156, 149, 15130, 257, 225,
                       149, 112, 280, 7523, 3920, 865, 117, 600, 9, 9359, 70, 128, 37, 62,
                       13, 328, 3, 8, 194, 1261, 118, 469, 517, 71, 136, 41, 286, 2, 34, 33,
                       6, 2284, 82, 260, 167, 472, 63, 11, 1910, 1017, 4, 1364, 343, 5, 57,
                       7, 49, 52, 9, 1568, 810, 458, 253, 213, 1827, 71, 760, 296, 79, 17,
                       2836, 129, 82, 97, 127, 1, 17, 57, 7, 19, 187, 149, 59, 6, 3, 215,
                       104, 2587, 1310, 4, 54, 1526, 39, 27, 79, 184, 383, 170, 49]],
                     dtype=torch.float64)
    planned = eplb.plan(w, 144, 16, 2, 4, policy="hierarchical")
    greedy = plan_greedy(w, 144, 16, 2, 4, policy="hierarchical")
    assert planned.balancedness(w) >= greedy.balancedness(w) - 0.005
    assert planned.balancedness(w) >= 0.98 * balancedness_ceiling(w, 144, 16, 2, 4,
                                                                   policy="hierarchical")


@pytest.mark.parametrize("seed", range(6))
def test_the_same_loads_plan_alike_from_every_dtype(seed):
    """Loads exact in every dtype (integers up to 256: bfloat16 holds them) plan alike
    whether they come as int32 (vLLM), int64, float64 (a dump), float32, float16 or
    bfloat16, fresh and from a map in force (attacker pass: float32 planned otherwise)."""
    rng = np.random.default_rng(seed)
    slots, gpus = int(rng.integers(2, 10)), int(rng.choice([4, 8, 16]))
    experts = int(rng.integers(gpus, slots * gpus + 1))
    loads = torch.from_numpy(np.minimum(rng.pareto(1.2, (3, experts)) * 20, 256).round())
    previous = torch.arange(slots * gpus).remainder(experts).repeat(3, 1)
    plans = {}
    for dtype in (torch.int32, torch.int64, torch.float64, torch.float32, torch.float16,
                  torch.bfloat16):
        weight = loads.to(dtype)
        plans[dtype] = (eplb.plan(weight, slots * gpus, gpus, seed=seed).phy2log,
                        eplb.plan(weight, slots * gpus, gpus, previous=previous).phy2log)
    fresh, warm = plans[torch.float64]
    for dtype, (other_fresh, other_warm) in plans.items():
        assert torch.equal(other_fresh, fresh), dtype
        assert torch.equal(other_warm, warm), dtype
