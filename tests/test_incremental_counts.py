"""Incremental rebalancing's replica counts and packing: the group share that spreads
groups drifting together, repacking a bad packing of the right counts, the group term
against a direct sum, replica transfers ending at the Jefferson allocation, and slots
relabelled with stacked replicas.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_contract
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_incremental import initial_map

import eplb


def _group_crowding(placement: eplb.Placement, groups: int, experts: int) -> int:
    """Σ over GPUs and groups of (slots of the group's experts on the GPU)²."""
    grid = placement.phy2log.view(placement.phy2log.shape[0], placement.topology.num_gpus, -1)
    group = grid // (experts // groups)
    counts = torch.nn.functional.one_hot(group, groups).sum(2)  # [L, P, G]
    return int((counts * counts).sum())


def test_group_share_spreads_groups_that_drift_together():
    """With expert groups named, ``group_share`` of the drift is common to a group, so a
    GPU holding many experts of one group (vLLM's initial map puts consecutive ids, one
    group, on each GPU) is riskier: the plan spreads groups more. Without groups, or at
    ``group_share=0``, the groups play no part in a global plan."""
    layers, experts, groups, gpus, replicas = 4, 64, 8, 8, 80
    g = torch.Generator().manual_seed(0)
    weight = torch.exp(torch.randn(layers, experts, generator=g, dtype=torch.float64))
    # vLLM's initial map with two slots swapped per layer: as crowded by group, but no
    # longer the static map itself, which is replaced by a fresh plan whatever the score
    old = initial_map(layers, replicas, experts)
    old[:, [0, 9]] = old[:, [9, 0]]
    plans = {share: eplb.plan(weight, replicas, gpus, 1, groups, previous=old,
                              group_share=share) for share in (0.0, 0.09, 0.9)}
    for p in plans.values():
        assert_contract(p)
    crowding = {share: _group_crowding(p, groups, experts) for share, p in plans.items()}
    assert crowding[0.9] < crowding[0.0], crowding
    assert crowding[0.09] <= crowding[0.0], crowding
    ungrouped = eplb.plan(weight, replicas, gpus, 1, 1, previous=old)
    assert torch.equal(plans[0.0].phy2log, ungrouped.phy2log)
    assert torch.equal(ungrouped.phy2log, eplb.plan(weight, replicas, gpus, 1, 1, previous=old,
                                                    group_share=0.9).phy2log)
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="group_share"):
            eplb.plan(weight, replicas, gpus, 1, groups, previous=old, group_share=bad)
    with pytest.raises(ValueError, match="group_share"):
        eplb.plan(weight, replicas, gpus, 1, groups, group_share=0.5)  # no previous


def test_a_bad_packing_with_the_right_counts_is_repacked():
    """An old map with Jefferson's counts but the hot replicas first-fit onto the first
    GPUs: the warm-start ladder cannot undo it within its reach, so the fresh plan must be
    offered (and, at a balance of about a third, taken)."""
    from eplb.core.replication import replica_counts

    experts, gpus, replicas = 256, 32, 288
    slots = replicas // gpus
    for seed in (18, 35):
        w = torch.from_numpy(np.random.default_rng(seed).lognormal(0, 2.0, (1, experts)))
        counts = replica_counts(w, replicas)[0, 0]
        pieces = sorted(((float(w[0, e]) / int(counts[e]), e) for e in range(experts)
                         for _ in range(int(counts[e]))), reverse=True)
        rows = [[] for _ in range(gpus)]
        for _, e in pieces:
            next(r for r in rows if len(r) < slots and e not in r).append(e)
        old = torch.tensor([[e for r in rows for e in r]])
        new = eplb.plan(w, replicas, gpus, previous=old)
        assert_contract(new)
        fresh = eplb.plan(w, replicas, gpus)
        assert new.balancedness(w) >= fresh.balancedness(w) - 0.02, seed


@pytest.mark.parametrize(("experts", "groups", "gpus", "slots", "big"), [
    (64, 8, 8, 9, False),  # dense, exact sums
    (64, 8, 2, 128, True),  # dense, GPU loads beyond 2**26 units: group by group
    (4096, 4096, 512, 8, False),  # more than 4M cells: the occupied ones only
], ids=["dense", "loop", "sparse"])
def test_group_term_matches_a_direct_sum(experts, groups, gpus, slots, big):
    """The group term of the next-window score, Σ_groups (a group's load on a GPU)², on
    each of its three paths, against a direct sum."""
    from eplb.online import score

    rng = np.random.default_rng(0)
    cands, rows = 2, 2
    slot_expert = rng.integers(0, experts, (cands, rows, gpus * slots))
    high = 1 << 20 if big else 1 << 12
    load = rng.integers(high // 2, high, (cands, rows, gpus * slots)).astype(np.float64)
    index = slot_expert + (np.arange(cands * rows) * experts).reshape(cands, rows, 1)
    exact = bool(load.reshape(cands, rows, gpus, slots).sum(3).max() < 2.0**26)
    assert exact != big
    got = score._group_squares(torch.from_numpy(load), torch.from_numpy(index), experts, gpus,
                               groups, exact)
    group = slot_expert // (experts // groups)
    want = np.zeros((cands, rows, gpus))
    for c, r, g in np.ndindex(cands, rows, gpus):
        part = slice(g * slots, (g + 1) * slots)
        sums = np.bincount(group[c, r, part], weights=load[c, r, part], minlength=groups)
        want[c, r, g] = (sums.astype(object) ** 2).sum()  # exact integers
    if not big:  # sums of integers below 2**53: equal to the last bit
        assert np.array_equal(got, want)
    np.testing.assert_allclose(got, want, rtol=1e-15)


@settings(max_examples=80, deadline=None)
@given(experts=st.integers(2, 40), gpus=st.integers(1, 12), slots=st.integers(1, 5),
       integer=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_replica_transfers_end_at_jefferson_either_way(experts, gpus, slots, integer, seed):
    """The transfers toward Jefferson's counts: D'Hondt's exchange (up to
    ``EXCHANGE_LIMIT`` per row) and the sorted differences of a whole allocation (longer
    lists) end at allocations of the same largest replica load; where they differ (exact
    ties) the exchange moves no more, and a list past the limit is the table's."""
    from eplb.online import ladder

    replicas = gpus * slots
    assume(replicas >= experts)
    rng = np.random.default_rng(seed)
    rows = 3
    weight = (rng.integers(0, 20, (rows, experts)).astype(np.float64) if integer
              else rng.random((rows, experts)) ** 3 * 100)
    weight[weight.sum(1) == 0, 0] = 1.0
    counts = np.ones((rows, experts), np.int64)
    for row in counts:
        np.add.at(row, rng.integers(0, experts, replicas - experts), 1)
    unused = np.zeros((rows, replicas), np.int64)  # neither path reads the map itself
    exchange = ladder.transfer_order(weight, unused, counts, gpus)
    table = ladder._transfers_by_table(weight, unused, counts, gpus)

    def final(donor, receiver, count):
        out = counts.copy()
        for row in range(rows):
            np.subtract.at(out[row], donor[row, :count[row]], 1)
            np.add.at(out[row], receiver[row, :count[row]], 1)
        return out

    ends = [final(*exchange), final(*table)]
    for end in ends:
        assert (end.sum(1) == replicas).all() and (end >= 1).all()
    np.testing.assert_allclose((weight / ends[0]).max(1), (weight / ends[1]).max(1))
    assert (exchange[2] <= table[2]).all()
    for row in np.nonzero(exchange[2] > ladder.EXCHANGE_LIMIT)[0]:  # the table's list
        length = table[2][row]
        assert exchange[2][row] == length
        for got, want in zip(exchange[:2], table[:2], strict=True):
            assert np.array_equal(got[row, :length], want[row, :length])


def test_a_map_far_from_jefferson_takes_the_whole_allocation():
    # vLLM's first map gives every expert about one replica: the hot experts of skewed
    # loads need dozens of transfers, past the exchange's limit
    from eplb.online import ladder, moves

    weight = np.exp(np.random.default_rng(0).normal(size=(2, 64)) * 1.5)
    counts = moves.counts_of(initial_map(2, 192, 64).numpy(), 64)  # 128 extra replicas
    unused = np.zeros((2, 192), np.int64)
    got = ladder.transfer_order(weight, unused, counts, 16)
    want = ladder._transfers_by_table(weight, unused, counts, 16)
    assert (want[2] > ladder.EXCHANGE_LIMIT).all()
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)


def _align_reference(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """_align_slots by its definition, one item at a time: an item whose expert an old slot
    of its row holds goes to the first such slot, unless an earlier item of its expert in
    the row took it; the other items fill the free slots in order."""
    out = np.full_like(new, -2)
    for b in range(new.shape[0]):
        seen, rest = set(), []
        for expert in new[b]:
            slots = np.flatnonzero(old[b] == expert) if expert >= 0 else []
            if len(slots) and expert not in seen:
                out[b, slots[0]] = expert
            else:
                rest.append(expert)
            seen.add(int(expert))
        out[b, np.flatnonzero(out[b] == -2)] = rest
    return out


def test_relabelled_slots_follow_their_definition_with_stacked_replicas() -> None:
    """The slots of a relabelled fresh plan, stacked replicas among them; the later items of
    an expert were found by a Python loop over a table of slot pairs, S³ (attacker pass: a
    map of 4,096 slots per GPU took 8 s, 8,192 about a minute; now a sort per row)."""
    from eplb.online.align import _align_slots

    rng = np.random.default_rng(0)
    for _ in range(500):
        rows, slots, experts = rng.integers(1, 5), rng.integers(1, 12), rng.integers(1, 8)
        new = rng.integers(-1, experts, (rows, slots))
        old = rng.integers(-1, experts, (rows, slots))
        assert np.array_equal(_align_slots(new, old), _align_reference(new, old))
    stacked = eplb.plan(torch.tensor([[1.0, 1.0]]), 4096, 2)
    again = eplb.plan(torch.tensor([[1.0, 3.0]]), 4096, 2, previous=stacked)
    assert_contract(again)
    # (a relabelling that kept every expert where it was: 2,048 of each on each GPU)
    assert int(again.moved_slots(stacked).sum()) == 0
