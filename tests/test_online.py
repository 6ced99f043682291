"""Rebalancer: cadence, ring-buffer history and planner wiring.

What it refuses: ``test_online_checks.py``; planning against the placement in force,
callable planners and multi-window estimates: ``test_online_placements.py``. Both import
the shared problem and helpers here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import Placement, Topology, plan
from eplb.online import Rebalancer, make_planner, plan_estimate, trivial_placement

L, E, R, P = 2, 8, 12, 4
_DEAD = [True, False, True, True]


class RecordingPlanner:
    """A cheap deterministic planner that remembers what it was given.

    Slot ``i`` holds expert ``i % E`` rotated so the hottest expert of layer 0 comes first.
    """

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.calls: list[tuple[torch.Tensor, Placement | None]] = []

    def __call__(self, weight: torch.Tensor, previous: Placement | None) -> Placement:
        self.calls.append((weight.clone(), previous))
        base = trivial_placement(weight.shape[1], weight.shape[0], self.topo)
        shift = int(weight[0].argmax())
        return Placement.from_phy2log((base.phy2log + shift) % weight.shape[1],
                                      weight.shape[1], self.topo)


def _steps(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (n, L, E), generator=g).to(torch.float64)


def test_rebalances_every_interval_on_the_last_window() -> None:
    planner = RecordingPlanner(Topology(R, P))
    reb = Rebalancer(R, P, window=3, interval=5, planner=planner)
    data = _steps(12)
    results = [reb.record(data[t]) for t in range(12)]
    assert [t + 1 for t, r in enumerate(results) if r is not None] == [5, 10]
    assert [e.step for e in reb.events] == [5, 10]
    assert torch.equal(planner.calls[0][0], data[2:5].sum(0))
    assert torch.equal(planner.calls[1][0], data[7:10].sum(0))
    assert planner.calls[0][1] is None  # from scratch: no previous passed
    assert isinstance(reb.placement, Placement)
    reb.placement.validate()


def test_a_chunk_crossing_rebalance_points_plans_at_each() -> None:
    planner = RecordingPlanner(Topology(R, P))
    reb = Rebalancer(R, P, window=4, interval=10, planner=planner)
    data = _steps(25)
    out = reb.record(data)
    assert [e.step for e in reb.events] == [10, 20]
    assert torch.equal(planner.calls[0][0], data[6:10].sum(0))
    assert torch.equal(planner.calls[1][0], data[16:20].sum(0))
    assert out is reb.placement
    assert reb.steps == 25
    assert torch.equal(reb.history, data[21:25].float())


def test_history_is_a_bounded_ring_buffer_oldest_first() -> None:
    reb = Rebalancer(R, P, window=5, interval=1000, planner="none")
    data = _steps(13)
    reb.record(data[:2])
    assert torch.equal(reb.history, data[:2].float())
    for t in range(2, 13):
        reb.record(data[t])
    assert reb.history.shape == (5, L, E)
    assert torch.equal(reb.history, data[8:13].float())
    reb.record(data)  # a chunk longer than the buffer keeps only its tail
    assert torch.equal(reb.history, data[8:13].float())
    assert reb.steps == 26


def test_multi_estimator_keeps_a_longer_history() -> None:
    reb = Rebalancer(R, P, window=4, interval=100, estimator="multi:2:3", planner="none")
    reb.record(_steps(20))
    assert reb.capacity == 12 and reb.history.shape[0] == 12


def test_moved_slots_and_initial_placement() -> None:
    topo = Topology(R, P)
    initial = trivial_placement(E, L, topo)
    reb = Rebalancer(R, P, window=5, interval=5, planner="eplb", initial=initial)
    assert reb.placement is initial
    new = reb.record(_steps(5))
    assert new is not None
    event = reb.events[0]
    assert torch.equal(event.moved_slots, new.moved_slots(initial))
    assert event.changed == bool(event.moved_slots.any())


def test_unchanged_plan_returns_none() -> None:
    reb = Rebalancer(R, P, window=5, interval=5, planner="none")
    assert reb.record(_steps(5)) is not None  # first plan: nothing was in force before
    assert reb.record(_steps(5, seed=1)) is None  # the static plan never changes
    assert int(reb.events[1].moved_slots.sum()) == 0 and not reb.events[1].changed


def test_rebalance_now_uses_history_so_far() -> None:
    planner = RecordingPlanner(Topology(R, P))
    reb = Rebalancer(R, P, window=10, interval=100, planner=planner)
    data = _steps(3)
    reb.record(data)
    assert reb.rebalance_now() is not None
    assert torch.equal(planner.calls[0][0], data.sum(0))
    assert reb.events[0].step == 3


def test_incremental_passes_previous_and_limits_to_plan(monkeypatch) -> None:
    import eplb.online.planners as planners

    seen: list[dict] = []
    real_fresh, real_incremental = planners.plan_fresh, planners.plan_incremental

    def fresh(request):
        seen.append({"seed": request.seed})
        return real_fresh(request)

    def incremental(request, previous, **kwargs):
        seen.append({"seed": request.seed, "previous": previous, **kwargs})
        return real_incremental(request, previous, **kwargs)

    monkeypatch.setattr(planners, "plan_fresh", fresh)
    monkeypatch.setattr(planners, "plan_incremental", incremental)
    reb = Rebalancer(R, P, window=4, interval=4, planner="eplb", incremental=True,
                     max_moves=3, skip_threshold=0.01, seed=7)
    reb.record(_steps(4))
    first = reb.placement
    reb.record(_steps(4, seed=2))
    assert "previous" not in seen[0]  # nothing in force yet: plan from scratch
    assert seen[1]["previous"] is first
    assert seen[1]["max_moves"] == 3 and seen[1]["skip_threshold"] == 0.01
    assert all(call["seed"] == 7 for call in seen)


def test_plan_estimate_with_scenarios_keeps_valid_layers() -> None:
    from eplb.online.estimate import make_estimator

    topo = Topology(R, P)
    planner = make_planner("eplb", topo)
    est = make_estimator("multi:3").estimate(_steps(9), 9)
    keep = trivial_placement(E, L, topo)
    placement = plan_estimate(est, planner, keep=keep)
    placement.validate()
    assert placement.phy2log.shape == (L, R)


def test_trivial_placement_layout_and_dead_gpus() -> None:
    topo = Topology(R, P)
    p = trivial_placement(E, L, topo).validate()
    assert p.phy2log[0].tolist() == [i % E for i in range(R)]
    dead = trivial_placement(E, L, topo, active_gpus=[True, True, True, False]).validate()
    assert dead.phy2log[0, -3:].tolist() == [-1, -1, -1]
    assert dead.phy2log[0, :9].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    with pytest.raises(ValueError, match="cannot hold"):
        trivial_placement(E, L, topo, active_gpus=[True, True, False, False])


@settings(max_examples=30, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=8),
    window=st.integers(1, 6),
    interval=st.integers(1, 7),
)
def test_any_chunking_gives_the_same_cadence_and_history(chunks: list[int], window: int,
                                                         interval: int) -> None:
    total = sum(chunks)
    data = _steps(total, seed=total)
    planner = RecordingPlanner(Topology(R, P))
    reb = Rebalancer(R, P, window=window, interval=interval, planner=planner)
    start = 0
    for size in chunks:
        reb.record(data[start:start + size])
        start += size
    due = list(range(interval, total + 1, interval))
    assert [e.step for e in reb.events] == due
    for (weight, _), step in zip(planner.calls, due, strict=True):
        assert torch.equal(weight, data[max(step - window, 0):step].sum(0))
    assert torch.equal(reb.history, data[-window:].float())


def test_ema_half_life_extends_the_history() -> None:
    reb = Rebalancer(R, P, window=4, interval=100, estimator="ema:3", planner="none")
    assert reb.capacity == 15
    assert Rebalancer(R, P, window=40, interval=100, estimator="ema:3").capacity == 40


def test_options_the_caller_changes_in_place_later_do_not_reach_the_rebalances() -> None:
    """The option values are the ones checked at construction: a live mask marked dead in
    place later failed every rebalance under policy="hierarchical" (the construction's
    check had passed), a zero speed written into gpu_speed failed them too, and a
    per-layer budget changed in place changed the plans (review pass)."""
    weight = torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    live = torch.ones(8, dtype=torch.bool)
    reb = Rebalancer(32, 8, 2, 2, window=1, interval=1, policy="hierarchical", active_gpus=live)
    first = reb.record(weight)
    live[3] = False
    assert reb.record(weight * 2) is None  # the same plan: every GPU still live
    assert reb.placement.active_gpus is None and torch.equal(reb.placement.phy2log, first.phy2log)

    speed = torch.ones(8)
    reb = Rebalancer(32, 8, window=1, interval=1, gpu_speed=speed)
    speed[0] = 0.0
    assert torch.equal(reb.record(weight).phy2log, plan(weight, 32, 8).phy2log)

    budget = torch.tensor([4, 4])
    reb = Rebalancer(32, 8, window=1, interval=1, incremental=True, max_moves=budget)
    listed = Rebalancer(32, 8, window=1, interval=1, incremental=True, max_moves=[4, 4])
    budget[:] = 0
    for rebalancer in (reb, listed):
        rebalancer.record(weight)
        rebalancer.record(weight.roll(3, dims=1))
    assert reb.events[1].moved_slots.tolist() == listed.events[1].moved_slots.tolist() != [0, 0]


def test_a_window_given_as_a_tensor_sizes_the_ring_as_its_int() -> None:
    """The window and interval are read as ints (0-d tensors and NumPy ints too), but the
    ring's size was taken from the raw argument: a 0-d tensor window became the capacity
    and the write position, so the caller changing it in place broke the next record
    with an IndexError (review pass)."""
    window = torch.tensor(3)
    reb = Rebalancer(32, 8, window=window, interval=2)
    assert type(reb.capacity) is int and reb.capacity == 3
    reb.record(torch.ones(2, 2, 16))
    window.fill_(5)
    reb.record(torch.ones(3, 2, 16))
    assert reb.history.shape == (3, 2, 16) and reb.steps == 5
