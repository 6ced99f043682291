"""The forced moves' scoring of where a filled slot leaves the layer's busiest GPU
(``online.moves._busiest_other``) against its definition (it once built a table of every
expert and GPU per filled slot; the time is in BENCHMARKS.md §4), and revived GPUs
filled through the public API."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb.online import moves


def definition(weight, out, loads, counts, gpu, live_gpu):
    """Every (expert, GPU): the GPU's load, less the expert's drop where it holds it."""
    rows, num_experts = counts.shape
    num_gpus = loads.shape[1]
    other = live_gpu[None] & (np.arange(num_gpus)[None] != gpu[:, None])
    base = np.where(other, loads, -np.inf)
    drop = np.where(counts > 0, weight / np.maximum(counts, 1) - weight / (counts + 1), 0.0)
    grid = out.reshape(rows, num_gpus, -1)
    holds = np.zeros((rows, num_experts, num_gpus), bool)
    for b in range(rows):
        for g in range(num_gpus):
            for e in grid[b, g]:
                if e >= 0:
                    holds[b, e, g] = True
    return (base[:, None, :] - drop[:, :, None] * holds).max(2)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), rows=st.integers(1, 3), num_experts=st.integers(1, 7),
       num_gpus=st.integers(1, 6), slots=st.integers(1, 4), walk=st.sampled_from([1, 2, 8]))
def test_busiest_other_matches_its_definition(data, rows, num_experts, num_gpus, slots,
                                              walk):
    # any map: stacked replicas, empty slots, uncovered experts, dead GPUs
    out = np.array(data.draw(st.lists(st.integers(-1, num_experts - 1),
                                      min_size=rows * num_gpus * slots,
                                      max_size=rows * num_gpus * slots))).reshape(rows, -1)
    weight = np.array(data.draw(st.lists(
        st.sampled_from([0.0, 1.0, 2.0, 3.0]) | st.floats(0, 1e6),
        min_size=rows * num_experts, max_size=rows * num_experts))).reshape(rows, -1)
    live_gpu = np.array(data.draw(st.lists(st.booleans(), min_size=num_gpus,
                                           max_size=num_gpus)))
    gpu = np.array(data.draw(st.lists(st.integers(0, num_gpus - 1), min_size=rows,
                                      max_size=rows)))
    counts = moves.counts_of(out, num_experts)
    loads = moves.gpu_loads_of(weight, out, num_gpus, counts)
    walked = moves._WALK_RANKS
    moves._WALK_RANKS = walk  # the walk, and the lookup of experts on every GPU walked
    try:
        ids = np.where(out >= 0, out, num_experts)  # as fill_and_cover keeps them
        got = moves._busiest_other(weight, out, loads, counts, gpu, live_gpu, ids)
    finally:
        moves._WALK_RANKS = walked
    want = definition(weight, out, loads, counts, gpu, live_gpu)
    assert np.array_equal(got, want)


def test_revived_gpus_are_filled():
    # 16 of 128 GPUs come back: 144 empty slots a layer, each filled by the forced moves
    generator = torch.Generator().manual_seed(0)
    weight = torch.rand(58, 256, generator=generator, dtype=torch.float64) ** 4
    active = torch.ones(128, dtype=torch.bool)
    active[:16] = False
    old = eplb.plan(weight, 1152, 128, active_gpus=active)
    assert (old.phy2log.view(58, 128, 9)[:, :16] < 0).all()
    new = eplb.plan(weight, 1152, 128, previous=old)
    new.validate()
    assert (new.phy2log.view(58, 128, 9)[:, :16] >= 0).all()
    # the busiest GPU is lighter: balancedness is over the live GPUs' mean (112, then 128)
    assert 128 * new.balancedness(weight) > 112 * old.balancedness(weight)


def test_forced_moves_keep_counts_and_loads_exact(monkeypatch):
    # the fill keeps each pass's replica counts, GPU loads and slot ids up to date instead
    # of counting and summing every slot again: at every pass they must be those bits
    checked = []
    score = moves._busiest_other

    def recount(weight, out, loads, counts, gpu, live_gpu, ids):
        experts = weight.shape[1]
        fresh_counts = moves.counts_of(out, experts)
        fresh_loads = moves.gpu_loads_of(weight, out, loads.shape[1], fresh_counts)
        fresh_ids = np.where(out >= 0, out, experts)
        checked.append(np.array_equal(counts, fresh_counts)
                       and np.array_equal(loads, fresh_loads)
                       and np.array_equal(ids, fresh_ids))
        return score(weight, out, loads, counts, gpu, live_gpu, ids)

    monkeypatch.setattr(moves, "_busiest_other", recount)
    rng = np.random.default_rng(3)
    for _ in range(40):
        gpus, slots = int(rng.integers(2, 9)), int(rng.integers(1, 5))
        experts = int(rng.integers(2, gpus * slots + 1))
        weight = torch.tensor(rng.lognormal(0, 1.5, (2, experts)))
        # any map: empty slots, stacked and uncovered experts
        previous = torch.tensor(rng.integers(-1, experts, (2, gpus * slots)))
        eplb.plan(weight, gpus * slots, gpus, previous=previous).validate()
    assert checked and all(checked)


def _revived(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """3 layers × 64 experts on 32 GPUs of 9 slots, planned with GPUs 8-15 dead: back now,
    72 empty slots a layer."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.rand(3, 64, generator=generator, dtype=torch.float64) ** 3
    active = torch.ones(32, dtype=torch.bool)
    active[8:16] = False
    return weight, eplb.plan(weight, 288, 32, active_gpus=active).phy2log


def test_forced_moves_alone_fill_only_the_empty_slots():
    # a budget of 0 leaves the forced moves alone: the empty GPUs filled, every other slot
    # as it was (a fill from a fresh plan's GPUs, tried for its speed, left layers at
    # 0.75 where this fill gave 0.91 here; BENCHMARKS.md §4)
    weight, old = _revived()
    new = eplb.plan(weight, 288, 32, previous=old, max_moves=0)
    new.validate()
    kept = old >= 0
    assert torch.equal(new.phy2log[kept], old[kept])
    assert (new.phy2log.view(3, 32, 9)[:, 8:16] >= 0).all()


def test_many_empty_gpus_through_the_vllm_plugin():
    # the same map as vLLM passes GPUs it adds (-1 in their slots), no budget: filled
    from eplb.integrations.vllm import EplbPolicy

    weight, old = _revived()
    EplbPolicy.options = {}
    counts = (weight * 1000).round().to(torch.int32)
    phy2log = EplbPolicy.rebalance_experts(counts, 288, 1, 1, 32, old)
    assert phy2log.shape == (3, 288) and (phy2log >= 0).all()


@pytest.mark.parametrize(("weight", "old"), [
    # expert 3 twice on GPU 1 (2 GPUs × 3 slots), a greedy's map (fuzz pass)
    ([97.0, 13.0, 51.0, 87.0, 34.0], [0, 4, 1, 3, 3, 2]),
    # expert 1 twice on GPU 1 (2 GPUs × 4 slots; attacker pass)
    ([4.682, 711.376, 0.996, 1.253, 589.689, 72.199, 0.453], [4, 5, 0, 3, 1, 1, 2, 6]),
])
def test_a_limit_keeps_the_repair_of_what_forced_moves_lost(weight, old) -> None:
    """Spreading the stacked replicas by a swap changes 2 slots and loses balance (0.9186,
    0.7291); the repair without a limit changes 1 slot of the map in force and keeps it
    (0.9758, 0.9676). Any budget, even 0, or skip threshold skipped the repair, or priced
    it against the swapped map and refused it: it is another way of making the forced
    moves, with fewer slots, and is taken whatever the limit."""
    w, old = torch.tensor([weight]), torch.tensor([old])
    slots, gpus = old.shape[1], 2
    free = eplb.plan(w, slots, gpus, previous=old)
    assert int(free.moved_slots(old).sum()) == 1
    for limit in ({"max_moves": 0}, {"max_moves": 1}, {"max_moves": 100}, {"max_moves": [0]},
                  {"skip_threshold": 0.0}, {"skip_threshold": 0.5},
                  {"max_moves": 6, "skip_threshold": 0.01}):
        got = eplb.plan(w, slots, gpus, previous=old, **limit)
        assert torch.equal(got.phy2log, free.phy2log), limit


def test_a_placement_of_other_nodes_or_groups_is_taken_with_a_warning() -> None:
    """Found by a fuzz pass: a record planned for 2 nodes was taken by a call for 4 without
    a word (its slots are the same; a layer whose groups then straddle nodes is re-planned
    as a forced move)."""
    w = torch.rand(2, 8, generator=torch.Generator().manual_seed(0)) * 100
    two_nodes = eplb.plan(w, 16, 4, 2, 4)
    with pytest.warns(UserWarning, match=r"planned for 2 node\(s\) and 4 group\(s\), this "
                                         r"call is for 4 and 4") as caught:
        eplb.plan(w, 16, 4, 4, 4, previous=two_nodes, max_moves=0).validate()
    assert caught[0].filename == __file__  # said at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same cluster, or a bare map: nothing to say
        eplb.plan(w, 16, 4, 2, 4, previous=two_nodes).validate()
        eplb.plan(w, 16, 4, 4, 4, previous=two_nodes.phy2log).validate()
