"""Construction and its anti-affinity bookkeeping (``eplb.core.packing``).

The construction deals rounds of ``P`` items, rearranges split runs of one expert's
replicas into one round, settles the clashes left, and tells the repair which rows may
still conflict. These tests pin the invariants each step relies on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.core.map_tables import build_log2phy
from eplb.core.options import AUTO_MAX_STEPS, AUTO_PAIR_STEPS, PackingOptions
from eplb.core.packing.construct import _settle_clashes, _split_clashes, _whole_runs, construct
from eplb.core.packing.repair import repair_conflicts
from eplb.core.packing.state import EXPERT, LOAD, make_items
from eplb.core.replication import expand_replicas, replica_counts


@st.composite
def problems(draw):
    """Replica items of random loads: ``(items [2, rows, R], num_gpus)``."""
    num_gpus = draw(st.integers(1, 12))
    slots = draw(st.integers(1, 6))
    num_replicas = num_gpus * slots
    num_experts = draw(st.integers(max(1, num_replicas // 3), num_replicas))
    rows = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    skew = draw(st.sampled_from([0.5, 1.5, 3.0]))
    weight = torch.rand(rows, num_experts, generator=g, dtype=torch.float64) ** skew + 1e-3
    if draw(st.booleans()):
        weight = (weight * 4).round() + 1  # ties
    counts = replica_counts(weight, num_replicas)[0]
    load, expert = expand_replicas(weight, counts)
    return make_items(load, expert), num_gpus


def split_runs(expert: np.ndarray, num_gpus: int) -> int:
    boundary = np.arange(1, expert.shape[1] // num_gpus) * num_gpus
    return int((expert[:, boundary - 1] == expert[:, boundary]).sum())


@settings(max_examples=80, deadline=None)
@given(problems())
def test_whole_runs_keeps_rounds_sorted_and_splits_fewer_runs(problem):
    items, num_gpus = problem
    load = items[LOAD].numpy()
    expert = items[EXPERT].numpy().astype(np.int64)
    order = _whole_runs(expert, num_gpus)
    if order is None:
        return
    rows, num_items = order.shape
    assert (np.sort(order, axis=1) == np.arange(num_items)).all()  # a permutation per row
    moved_load = np.take_along_axis(load, order, 1).reshape(rows, -1, num_gpus)
    assert (np.diff(moved_load, axis=2) <= 0).all()  # every round still heaviest first
    moved_expert = np.take_along_axis(expert, order, 1)
    assert split_runs(moved_expert, num_gpus) < split_runs(expert, num_gpus)
    # an expert's replicas stay adjacent
    starts = (np.diff(moved_expert, axis=1) != 0).sum(1)
    assert (starts == (np.diff(expert, axis=1) != 0).sum(1)).all()


@settings(max_examples=80, deadline=None)
@given(problems(), st.integers(0, 2**31 - 1))
def test_settling_keeps_one_item_per_gpu_per_round(problem, seed):
    items, num_gpus = problem
    expert = items[EXPERT].numpy().astype(np.int64)
    rows, num_items = expert.shape
    rng = np.random.default_rng(seed)
    # any dealing: a random permutation of the GPUs in every round
    gpu = np.stack([rng.permutation(num_gpus) for _ in range(rows * num_items // num_gpus)])
    gpu = gpu.reshape(rows, num_items)
    left = _settle_clashes(expert, gpu, num_gpus)
    rounds = gpu.reshape(rows, -1, num_gpus)
    assert (np.sort(rounds, axis=2) == np.arange(num_gpus)).all()
    assert set(left.tolist()) == set(_split_clashes(expert, gpu, num_gpus)[0].tolist())


@settings(max_examples=80, deadline=None)
@given(problems())
def test_construct_and_repair_are_anti_affine_and_keep_every_item(problem):
    items, num_gpus = problem
    counts_max = int(torch.stack([torch.bincount(row.long()).max() for row in items[EXPERT]]).max())
    allow_shared = torch.full((items.shape[1],), counts_max > num_gpus)
    state = repair_conflicts(construct(items, num_gpus), allow_shared)
    slots = state.shape[1]
    for b in range(items.shape[1]):
        kept = state[:, :, b].reshape(2, -1)
        want = items[:, b]
        # the same multiset of (load, expert) items
        assert sorted(zip(kept[0].tolist(), kept[1].tolist(), strict=True)) == sorted(
            zip(want[0].tolist(), want[1].tolist(), strict=True)
        )
        if counts_max <= num_gpus:
            per_gpu = state[EXPERT, :, b].t()  # [P, S]
            assert all(len(set(g.tolist())) == slots for g in per_gpu)


def test_automatic_step_counts():
    default = PackingOptions()
    assert default.max_steps_for(32) == AUTO_MAX_STEPS
    assert default.pair_steps_for(32) == AUTO_PAIR_STEPS  # 16 heavy GPUs > 8 polish steps
    assert default.pair_steps_for(128) == 3 * AUTO_PAIR_STEPS
    assert default.pair_steps_for(16) == 0
    assert default.max_steps_for(8) == 4 and default.pair_steps_for(8) == 0  # node rows
    assert default.max_steps_for(2) == 4 and default.max_steps_for(1) == 4
    forced = PackingOptions(pair_steps=5, max_steps=1)
    assert forced.pair_steps_for(8) == 5 and forced.max_steps_for(1024) == 1
    with pytest.raises(ValueError, match="pair_steps"):
        PackingOptions(pair_steps=-1)
    with pytest.raises(ValueError, match="max_steps"):
        PackingOptions(max_steps=1.5)  # type: ignore[arg-type]


def log2phy_reference(phy2log: torch.Tensor, num_experts: int):
    rows = []
    counts = []
    for layer in phy2log.tolist():
        slots = [[s for s, e in enumerate(layer) if e == x] for x in range(num_experts)]
        rows.append(slots)
        counts.append([len(s) for s in slots])
    width = max(1, max(max(c) for c in counts))
    table = torch.full((len(rows), num_experts, width), -1, dtype=torch.int64)
    for i, slots in enumerate(rows):
        for x, s in enumerate(slots):
            table[i, x, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return table, torch.tensor(counts, dtype=torch.int64)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 9),
    st.integers(1, 40),
    st.integers(0, 2**31 - 1),
)
def test_log2phy_matches_a_plain_inversion(layers, experts, slots, seed):
    g = torch.Generator().manual_seed(seed)
    phy2log = torch.randint(-1, experts, (layers, slots), generator=g)
    log2phy, logcnt = build_log2phy(phy2log, experts)
    want_table, want_counts = log2phy_reference(phy2log, experts)
    assert torch.equal(logcnt, want_counts)
    assert torch.equal(log2phy, want_table)
    assert log2phy.dtype == logcnt.dtype == torch.int64
