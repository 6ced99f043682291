"""The planner's quality floors through its public API: never below DeepSeek's greedy on
fixed seeded inputs, the ceiling reached where the packing allows, the count search on
hot experts, and the same loads planned alike from every dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_contract
from test_planner import lognormal

import eplb
from eplb.core.baselines import plan_greedy
from eplb.core.bounds import balancedness_ceiling, layer_lower_bound

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


def _count_ranked_vectors(monkeypatch) -> list[int]:
    """The number of count vectors each call of ``tiny_counts.greedy_peaks`` ranks, as the
    planner calls it (appended per call)."""
    import eplb.core.tiny_counts as tiny_counts

    ranked: list[int] = []
    real_peaks = tiny_counts.greedy_peaks

    def counted(load, expert, num_gpus):
        ranked.append(len(load))
        return real_peaks(load, expert, num_gpus)

    monkeypatch.setattr(tiny_counts, "greedy_peaks", counted)
    return ranked


def test_rows_of_eight_experts_rank_their_count_vectors_a_few_rows_at_a_time(monkeypatch):
    # helper pass: the count vectors of every row of at most 8 experts were ranked at
    # once, ~280 KB a row: 200 layers × 1024 experts on 128 nodes of 8 GPUs with 256
    # groups (8 experts a node) took over 8 GB. They are now ranked VECTORS_AT_ONCE
    # vectors at a time (1,107 a row at 8 experts), with the same plans
    import eplb.core.tiny_counts as tiny_counts

    g = torch.Generator().manual_seed(7)
    w = torch.exp(torch.randn(12, 8, generator=g, dtype=torch.float64) * 0.6)
    whole = eplb.plan(w, 24, 4)
    ranked = _count_ranked_vectors(monkeypatch)
    monkeypatch.setattr(tiny_counts, "VECTORS_AT_ONCE", 2 * 1107)  # 2 rows at a time
    chunked = eplb.plan(w, 24, 4)
    assert torch.equal(chunked.phy2log, whole.phy2log)
    assert len(ranked) > 2 and max(ranked) <= 2 * 1107


def test_eight_experts_on_thousands_of_gpus_skip_the_count_vectors(monkeypatch):
    # attacker pass: one layer of 8 experts on 4,096 GPUs of 3 slots ranked 1,107 count
    # vectors by the greedy's packing over 12,288 slots × 4,096 GPUs each (over 2 minutes);
    # past TINY_MAX_WORK a row is not looked at, and the plan is still near the ideal
    import eplb.core.tiny_counts as tiny_counts

    assert tiny_counts.tiny_look_work(8, 3 * 4096, 4096) > tiny_counts.TINY_MAX_WORK
    assert tiny_counts.tiny_look_work(8, 6 * 4, 4) <= tiny_counts.TINY_MAX_WORK  # Mixtral's
    ranked = _count_ranked_vectors(monkeypatch)
    w = torch.tensor([[0.64, 0.27, 0.04, 0.02, 0.81, 0.91, 0.61, 0.73]], dtype=torch.float64)
    planned = eplb.plan(w, 3 * 4096, 4096)
    assert_contract(planned)
    assert not ranked
    assert float(planned.balancedness(w)) > 0.999
    eplb.plan(w, 24, 4)  # where the work is small, the vectors are ranked
    assert ranked


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
