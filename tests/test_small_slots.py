"""One and two slots per GPU (eplb.core.small_slots) against brute force on tiny inputs.

- S = 1: the plan's max GPU load is the optimum over every allocation (brute force).
- S = 2: for fixed counts, largest-with-smallest pairing equals the best of every perfect
  matching (brute force, anti-affinity aside); the count search never ends worse than its
  start, and its ``F`` is exactly the pairing max of the counts it returns; plans honour
  the output contract and are never better than the brute-force optimum (a bug in the
  pairing or the repair would show as an impossible value).
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb import Placement, Topology
from eplb.core.map_tables import slot_gpu_loads
from eplb.core.replication import replica_counts
from eplb.core.small_slots import (
    best_two_slot_max_load,
    pair_max,
    plan_one_slot,
    plan_two_slots,
    search_two_slot_counts,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def compositions(total: int, parts: int, low: int = 1):
    """Every tuple of ``parts`` integers >= ``low`` summing to ``total``."""
    if parts == 1:
        if total >= low:
            yield (total,)
        return
    for first in range(low, total - low * (parts - 1) + 1):
        for rest in compositions(total - first, parts - 1, low):
            yield (first, *rest)


def matchings(items: list[int]):
    """Every perfect matching of ``items`` (an even-length list)."""
    if not items:
        yield []
        return
    first = items[0]
    for k in range(1, len(items)):
        rest = items[1:k] + items[k + 1 :]
        for m in matchings(rest):
            yield [(first, items[k]), *m]


def best_matching(w: list[int], counts: tuple[int, ...], anti_affine: bool) -> Fraction | None:
    pieces = [(e, Fraction(w[e], c)) for e, c in enumerate(counts) for _ in range(c)]
    best = None
    for m in matchings(list(range(len(pieces)))):
        if anti_affine and any(pieces[a][0] == pieces[b][0] for a, b in m):
            continue
        peak = max(pieces[a][1] + pieces[b][1] for a, b in m)
        best = peak if best is None or peak < best else best
    return best


tiny_loads = st.lists(st.integers(0, 60), min_size=2, max_size=5).filter(lambda w: sum(w) > 0)


@given(w=tiny_loads, extra=st.integers(0, 4))
@SETTINGS
def test_one_slot_is_the_optimum(w, extra):
    experts = len(w)
    replicas = experts + extra
    weight = torch.tensor([w], dtype=torch.float64)
    phy2log = plan_one_slot(weight, replicas)
    placement = Placement.from_phy2log(phy2log, experts, Topology(replicas, replicas))
    placement.validate()
    brute = min(
        max(Fraction(w[e], c) for e, c in enumerate(counts))
        for counts in compositions(replicas, experts)
    )
    peak = placement.gpu_loads(weight).max().item()
    assert peak == pytest.approx(float(brute), rel=1e-12, abs=1e-12)
    assert best_two_slot_max_load(weight, replicas, replicas).item() == pytest.approx(peak)


@given(w=tiny_loads, data=st.data())
@SETTINGS
def test_sorted_pairing_is_the_best_matching_for_fixed_counts(w, data):
    experts = len(w)
    gpus = data.draw(st.integers(max(1, (experts + 1) // 2), 4))
    counts = data.draw(st.sampled_from(list(compositions(2 * gpus, experts))))
    f, top, bottom = pair_max(np.array([w], dtype=np.float64), np.array([counts]))
    assert f[0] == pytest.approx(float(best_matching(w, counts, anti_affine=False)), abs=1e-12)
    # the pair that sets F is a real pair of pieces
    assert w[top[0]] / counts[top[0]] + w[bottom[0]] / counts[bottom[0]] == pytest.approx(f[0])


@given(w=tiny_loads, data=st.data())
@SETTINGS
def test_count_search_never_worsens_and_reports_its_counts(w, data):
    experts = len(w)
    gpus = data.draw(st.integers(max(1, (experts + 1) // 2), 5))
    start = np.array([data.draw(st.sampled_from(list(compositions(2 * gpus, experts))))])
    weight = np.array([w], dtype=np.float64) + 1e-3  # the search takes no all-zero rows
    hall = data.draw(st.integers(0, 2), label="hall_receivers")
    counts, f = search_two_slot_counts(weight, start, iterations=20, donors=3,
                                       hall_receivers=hall)
    assert counts.sum() == 2 * gpus and counts.min() >= 1
    # F is the anti-affine plan's max: never below the free pairing max of its counts,
    # and the plan of those counts reaches it exactly
    assert f[0] >= pair_max(weight, counts)[0][0] - 1e-12
    _, f_start = search_two_slot_counts(weight, start, iterations=0)
    assert f[0] <= f_start[0] + 1e-12
    best = min(
        pair_max(weight, np.array([c]))[0][0] for c in compositions(2 * gpus, experts)
    )
    assert f[0] >= best - 1e-12


@given(w=tiny_loads, data=st.data())
@SETTINGS
def test_two_slot_plans_are_valid_and_never_beat_the_optimum(w, data):
    experts = len(w)
    gpus = data.draw(st.integers(max(1, (experts + 1) // 2), 4))
    replicas = 2 * gpus
    weight = torch.tensor([w], dtype=torch.float64)
    hall = data.draw(st.sampled_from([None, 0, 1, 2]), label="hall_receivers")
    phy2log = plan_two_slots(weight, replicas, hall_receivers=hall)
    placement = Placement.from_phy2log(phy2log, experts, Topology(replicas, gpus))
    placement.validate()  # anti-affinity included (or round-robin where unavoidable)
    if sum(w) == 0:
        return
    peak = Fraction(placement.gpu_loads(weight).max().item())
    counts = placement.logcnt.numpy()
    if counts.max() <= gpus:
        # the plan is never below the free pairing of its counts, and the search's value
        # for these counts bounds it, unless pieces of two experts tie: the search then
        # counts them as one run and can miss the anti-affinity exchange (found by
        # hypothesis: [0, 1, 15, 21, 60] on 4 GPUs, counts [1, 1, 1, 1, 4], plan 36
        # against a search value of 30; see test_two_slot_tie_that_hid_an_anti_affinity_cost)
        scaled = weight.numpy() / weight.sum().item() * gpus
        scale = weight.sum().item() / gpus
        assert float(peak) >= pair_max(scaled, counts)[0][0] * scale * (1 - 1e-6)
        pieces = {Fraction(x, int(c)) for x, c in zip(w, counts[0], strict=True) if x}
        tied = len(pieces) < sum(1 for x in w if x)
        if not tied:
            _, f = search_two_slot_counts(scaled, counts, iterations=0)
            assert float(peak) <= f[0] * scale * (1 + 1e-6)
    allowed = [
        c for c in compositions(replicas, experts) if max(c) <= gpus or experts == 1
    ]
    optimum = min(
        v for c in allowed if (v := best_matching(w, c, anti_affine=True)) is not None
    )
    assert peak >= optimum - Fraction(1, 10**9)


def test_two_slot_search_improves_a_known_case():
    # Jefferson splits the warm expert 6 and pairs its halves with the 6s' partner 1; the
    # best counts keep both 6s whole and split the cold expert into two tiny partners
    weight = torch.tensor([[6.0, 6.0, 1.0]])
    start = pair_max(weight.numpy(), np.array([[2, 1, 1]]))[0][0]
    best = best_two_slot_max_load(weight, 4, 2).item()
    assert best == pytest.approx(6.5) and start == pytest.approx(7.0)
    placement = eplb.plan(weight, 4, 2)
    assert placement.gpu_loads(weight).max().item() == pytest.approx(6.5)


def test_two_slot_search_grows_the_expert_halls_condition_points_at():
    # on 3 GPUs the critical pair's experts alone stall at counts [1, 2, 2, 1], largest pair
    # 349 + 46.5: no single move from any donor (donors=4 is all of them) lowers it. It
    # drops once a lighter partner exists: a second replica of the expert of 47 (two
    # pieces of 23.5), with 93 whole again, gives 349 + 23.5. That expert lies outside the
    # pair; the search with a Hall receiver finds it
    weight = np.array([[47.0, 512.0, 93.0, 349.0]]) / 1001 * 3
    start = np.array([[1, 2, 1, 2]])
    _, stalled = search_two_slot_counts(weight, start, iterations=20, donors=4)
    counts, f = search_two_slot_counts(weight, start, iterations=20, donors=4,
                                       hall_receivers=1)
    assert f[0] < stalled[0] * (1 - 1e-3)
    assert f[0] == pytest.approx(pair_max(weight, counts)[0][0])
    # the planner takes it where asked (by default only from 64 extra replicas on, and
    # where they are at least half the slots)
    torch_weight = torch.tensor([[47.0, 512.0, 93.0, 349.0]], dtype=torch.float64)
    with_hall = plan_two_slots(torch_weight, 6, hall_receivers=1)
    placement = Placement.from_phy2log(with_hall, 4, Topology(6, 3))
    placement.validate()
    default = Placement.from_phy2log(plan_two_slots(torch_weight, 6), 4, Topology(6, 3))
    assert placement.gpu_loads(torch_weight).max() < default.gpu_loads(torch_weight).max()


@pytest.mark.parametrize(("replicas", "gpus"), [(8, 8), (12, 12), (8, 4), (16, 8), (12, 6)])
def test_small_slot_plans_keep_the_contract_through_the_api(replicas, gpus):
    gen = torch.Generator().manual_seed(replicas * 31 + gpus)
    weight = torch.rand(5, 6, generator=gen, dtype=torch.float64) ** 4 * 100
    weight[1] = 0  # a dense layer in a dump: planned as uniform
    weight[2, 0] = 1e6  # one expert that wants more replicas than there are GPUs
    placement = eplb.plan(weight, replicas, gpus)
    placement.validate()
    assert placement.phy2log.shape == (5, replicas)
    # hierarchical: two slots per GPU inside every node
    if gpus % 2 == 0:
        eplb.plan(weight, replicas, gpus, num_nodes=2, num_groups=2).validate()


def test_two_slots_beat_the_divisor_rules_on_skewed_loads():
    gen = torch.Generator().manual_seed(0)
    weight = torch.exp(torch.randn(8, 64, generator=gen, dtype=torch.float64) * 1.0)
    ours = eplb.plan(weight, 96, 48).gpu_loads(weight).amax(1)
    counts = replica_counts(weight, 96, (0.0,))[0].numpy()
    jefferson = torch.from_numpy(pair_max(weight.numpy(), counts)[0])
    assert bool((ours <= jefferson * (1 + 1e-9)).all())
    assert float(ours.sum()) < float(jefferson.sum())


def test_every_composition_helper_is_complete():
    assert len(list(compositions(6, 3))) == len(
        [c for c in itertools.product(range(1, 5), repeat=3) if sum(c) == 6]
    )


def test_two_slot_tie_that_hid_an_anti_affinity_cost():
    """Found by hypothesis: the count search valued counts [1, 1, 1, 1, 4] at 30, but the
    hot expert's four replicas then pair with everything and the plan peaked at 36. The
    planner now checks its plan against the search's value and tries the portfolio's
    allocations where it came out dearer."""
    weight = torch.tensor([[0.0, 1.0, 15.0, 21.0, 60.0]])
    placement = Placement.from_phy2log(plan_two_slots(weight, 8), 5, Topology(8, 4))
    placement.validate()
    assert placement.gpu_loads(weight).max().item() == 30.5  # best known: 27.5


@pytest.mark.parametrize(("weight", "gpus", "best"), [([7.0, 0, 8], 2, 8.0),
                                                     ([0.0, 0, 5, 0, 5], 4, 2.5)])
def test_two_slot_search_grows_the_exchanged_partners_of_a_straddling_expert(
        weight, gpus, best):
    """Where the heaviest plain pair is an expert paired with itself (its run straddles the
    median), the max is set by the exchanged pairs; the count search grew only that expert
    and stopped (11 and 4.17 here, found by a brute force over tiny instances)."""
    w = torch.tensor([weight])
    placement = eplb.plan(w, 2 * gpus, gpus)
    placement.validate()
    assert float(slot_gpu_loads(w.double(), placement.phy2log, gpus).amax()) == best


def _few_slot_loads(seed: int, experts: int, idle: float) -> torch.Tensor:
    """``[4, E]`` integer loads with a few dominant experts and ``idle`` of the others at
    zero: the inputs where Jefferson's counts at S = 3-4 leave more than P replicas above
    half the mean GPU load."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.empty(4, experts, dtype=torch.float64).log_normal_(0, 0.5, generator=gen)
    w[torch.rand(4, experts, generator=gen, dtype=torch.float64) < idle] = 0
    hot = torch.rand(4, experts, generator=gen).argsort(1)[:, :3]  # three per layer
    share = torch.rand(4, 3, generator=gen, dtype=torch.float64) * 3 + 0.2
    w.scatter_(1, hot, share * w.sum(1, keepdim=True).clamp(min=1))
    return (w * 1000).round()


@pytest.mark.parametrize(("seed", "experts", "slots", "gpus", "idle"), [
    (1, 32, 3, 16, 0.0), (2, 64, 4, 24, 0.5), (3, 16, 3, 8, 0.8), (4, 96, 4, 32, 0.3)])
def test_few_slots_never_lose_to_the_greedy_under_heavy_skew(seed, experts, slots, gpus, idle):
    # at S = 3-4 the packing bound is the mean GPU load for every allocation of such
    # layers, so it picked Jefferson's counts, which eplb packed below DeepSeek's greedy
    # (it stacks two replicas of one expert on a GPU, eplb may not): 0.71, 0.87, 0.78,
    # 0.64 against 0.72, 0.86, 0.82, 0.65 before the second look (policies/base.py),
    # 0.95, 0.94, 0.87, 0.96 after
    w = _few_slot_loads(seed, experts, idle)
    num_replicas = slots * gpus
    ours = eplb.plan(w, num_replicas, gpus).balancedness(w)
    greedy = eplb.core.plan_greedy(w, num_replicas, gpus).balancedness(w)
    assert ours >= greedy + 0.01, (ours, greedy)


def test_few_slots_give_idle_experts_a_second_replica():
    # two hot experts and 14 idle ones on 8 GPUs of 3 slots: Jefferson's 6 + 4 hot
    # replicas pair on two GPUs (0.64); 5 + 3 with two idle experts twice reach 0.94
    w = torch.zeros(1, 16, dtype=torch.float64)
    w[0, 0], w[0, 2], w[0, 10] = 1, 1556, 792
    placement = eplb.plan(w, 24, 8)
    assert placement.balancedness(w) > 0.93
    assert int(placement.logcnt[0, 2]) + int(placement.logcnt[0, 10]) <= 8
