"""The planner through its public API: ``eplb.plan`` and ``eplb.rebalance_experts``.

Output contract, policy selection, all-zero layers, determinism, dead GPUs, GPU speeds and
CUDA. Input errors: ``test_planner_input_errors.py``; quality floors against DeepSeek's
greedy on fixed seeded inputs: ``test_planner_quality.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import assert_contract

import eplb
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
