"""eplb's model of SGLang's start-up file on one node: every rank draws its own fair
choice for the experts it holds no replica of (``eplb.core.rank_draws``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eplb
from eplb.core import plan_for_start_up_file, realised_gpu_loads
from eplb.core.rank_draws import choose_for_rank_draws, rank_draw_peaks


def _loads(layers: int, experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(layers, experts, generator=g) ** 4 * 1000).round() + 1


def test_nothing_is_drawn_where_every_rank_holds_every_expert() -> None:
    # every GPU holds every expert: each rank serves its own tokens, the expectation's
    # loads exactly
    w = _loads(3, 4, 0)
    phy2log = torch.arange(4).repeat(3, 4)  # 4 GPUs × 4 slots, each all experts
    peaks = rank_draw_peaks(w, phy2log, 4)
    want = realised_gpu_loads(w, phy2log, 4, 1).amax(1).numpy()
    assert np.allclose(peaks, want, rtol=1e-12)


def test_one_replica_each_draws_nothing_either() -> None:
    # one replica per expert: every rank without it sends its tokens there (one choice)
    w = _loads(2, 8, 1)
    phy2log = torch.arange(8).repeat(2, 1)
    assert np.allclose(rank_draw_peaks(w, phy2log, 4),
                       realised_gpu_loads(w, phy2log, 4, 1).amax(1).numpy(), rtol=1e-12)


def test_the_start_up_file_plan_reads_its_loads_as_eplb_plan_does() -> None:
    """``eplb.core.plan_for_start_up_file`` (public since the README imports it) read its
    loads unchecked: an array raised AttributeError ('detach'), one layer ``[E]``
    IndexError, loads of another shape NumPy's broadcast error, and NaN or negative loads
    gave a balancedness of 1.0000 (review pass)."""
    w = _loads(3, 16, 4)

    def start_up_file(loads: object, given: object) -> tuple:
        return plan_for_start_up_file(
            lambda fair: eplb.plan(loads, 24, 8, dispatch="nearest", fair=fair), given)

    placement, _, drawn = start_up_file(w, w)
    for same in (w.numpy(), w.tolist()):
        again, _, again_drawn = start_up_file(same, same)
        assert torch.equal(again.phy2log, placement.phy2log) and again_drawn == drawn
    assert start_up_file(w[0], w[0])[0].num_layers == 1
    with pytest.raises(ValueError, match=r"weight is \[2, 16\], but the plans place 3 "
                                         "layers of 16 experts"):
        start_up_file(w, w[:2])
    with pytest.raises(ValueError, match=r"weight\[0, 0\] \(layer 0, expert 0\) is nan"):
        start_up_file(w, w * float("nan"))


def test_draws_raise_the_peak_above_the_expectation_and_are_reproducible() -> None:
    w = _loads(4, 64, 2)
    plan = eplb.plan(w, 96, 16, dispatch="nearest")
    peaks = rank_draw_peaks(w, plan.phy2log, 16)
    expected = realised_gpu_loads(w, plan.phy2log, 16, 1).amax(1).numpy()
    assert (peaks >= expected * (1 - 1e-12)).all() and (peaks > expected).any()
    assert np.array_equal(peaks, rank_draw_peaks(w, plan.phy2log, 16))
    assert not np.array_equal(peaks, rank_draw_peaks(w, plan.phy2log, 16, seed=1))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 4))
def test_a_layers_figure_is_its_own(seed: int, layer: int) -> None:
    """A layer's peak does not depend on the other layers of the call nor on its row."""
    w = _loads(5, 16, seed)
    plan = eplb.plan(w, 32, 8, dispatch="nearest")
    whole = rank_draw_peaks(w, plan.phy2log, 8)
    alone = rank_draw_peaks(w[layer:layer + 1], plan.phy2log[layer:layer + 1], 8)
    assert alone[0] == whole[layer]


def test_the_choice_takes_the_lower_peak_per_layer() -> None:
    w = _loads(6, 32, 3)
    even = eplb.plan(w, 48, 8, dispatch="nearest", fair="expect").phy2log
    avoid = eplb.plan(w, 48, 8, dispatch="nearest", fair="avoid").phy2log
    chosen = choose_for_rank_draws(w, [even, avoid], 8)
    peaks = np.stack([rank_draw_peaks(w, p, 8) for p in (even, avoid)])
    for layer in range(6):
        want = even if peaks[0, layer] <= peaks[1, layer] else avoid
        assert torch.equal(chosen[layer], want[layer])
    assert rank_draw_peaks(w, chosen, 8).sum() <= peaks.min(0).sum() * (1 + 1e-12)




def test_the_draws_of_many_layers_are_made_a_few_layers_at_a_time(monkeypatch) -> None:
    """Attacker pass: one call drew every layer at once, holding a dozen arrays of one
    entry per (layer, expert, rank): eplb plan's SGLang file for 200 layers × 1024
    experts on 1024 GPUs of one node peaked at 18.5 GB. The layers are now drawn a few
    at a time (CHUNK_CELLS), with the same numbers."""
    import tracemalloc

    import eplb.core.rank_draws as rank_draws

    layers, experts, gpus = 8, 512, 512
    w = _loads(layers, experts, 5)
    phy2log = (torch.arange(2 * experts) % experts).repeat(layers, 1)  # 2 replicas each
    whole = rank_draw_peaks(w, phy2log, gpus)
    monkeypatch.setattr(rank_draws, "CHUNK_CELLS", 1 << 16, raising=False)
    tracemalloc.start()
    try:
        chunked = rank_draw_peaks(w, phy2log, gpus)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(chunked, whole)  # (2.1 million cells: 150 MB at once before)
    assert peak < 40 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_a_load_that_shares_nothing_takes_no_draws_from_the_budget(monkeypatch) -> None:
    """The draws per call shrink with the cells drawn (MAX_DRAWN); the count of them
    taken before the draws counted a load whose rank share ``w / P`` rounds to 0 (5e-324
    on 4 GPUs), which draws nothing: the figure differed from the same loads with a 0
    there, where before the chunking it was the same (review pass)."""
    import eplb.core.rank_draws as rank_draws

    w = _loads(2, 8, 6).to(torch.float64)
    phy2log = torch.cat([torch.arange(8), torch.arange(8).roll(1)]).repeat(2, 1)
    # 2 replicas of each expert on 2 of 4 GPUs: 30 cells draw (32 with the tiny load
    # counted), so 3 draws (2 with it)
    monkeypatch.setattr(rank_draws, "MAX_DRAWN", 93)
    tiny, zero = w.clone(), w.clone()
    tiny[0, 0], zero[0, 0] = 5e-324, 0.0
    assert np.array_equal(rank_draw_peaks(tiny, phy2log, 4), rank_draw_peaks(zero, phy2log, 4))


def test_a_draws_numbers_are_made_once_per_expert_and_rank(monkeypatch) -> None:
    """A draw's numbers are a function of (seed, draw, expert, rank) alone, but were made
    for every (layer, expert, rank) cell: eplb plan's SGLang file for 200 layers × 1024
    experts on 1024 GPUs made each number 200 times over, a third of the draws' time
    (helper pass). Where a chunk's layers draw more cells than there are (expert, rank)
    pairs, each pair's number is now made once per draw, with the same figures."""
    import eplb.core.rank_draws as rank_draws

    layers, experts, gpus = 6, 32, 16
    w = _loads(layers, experts, 7)
    # 2 replicas of each expert on 2 GPUs: 14 of 16 ranks draw, 448 cells a layer
    phy2log = (torch.arange(2 * experts) % experts).repeat(layers, 1)
    alone = [rank_draw_peaks(w[layer:layer + 1], phy2log[layer:layer + 1], gpus)[0]
             for layer in range(layers)]
    made: list[int] = []
    real_uniform = rank_draws._uniform

    def counted(seed, draw, expert, rank, num_experts, num_gpus):
        made.append(np.broadcast(expert, rank).size)
        return real_uniform(seed, draw, expert, rank, num_experts, num_gpus)

    monkeypatch.setattr(rank_draws, "_uniform", counted)
    whole = rank_draw_peaks(w, phy2log, gpus)
    assert np.array_equal(whole, np.array(alone))
    assert made == [experts * gpus] * rank_draws.DRAWS  # (6 × 448 a draw before)
