"""A long-running Rebalancer's memory stays flat, and its events read as before.

Every rebalance leaves a RebalanceEvent in ``rebalancer.events``. When an event held two
small torch tensors, they sat in the C heap between the plans' large temporaries, and a
process's resident memory grew by about 50 KB a rebalance at DeepSeek-V3's shape
(``benchmarks/bench_rebalancer_memory.py``: +52 MB over 1,000 rebalances of
``interval=1``; ``eplb simulate --interval 1`` on a long trace went into gigabytes).
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from eplb.online import RebalanceEvent, Rebalancer


def test_eight_hundred_rebalances_keep_the_memory_flat() -> None:
    # in its own process: the resident memory of this one depends on every test before
    code = textwrap.dedent("""
        import os
        import numpy as np, torch
        torch.set_num_threads(1)
        from eplb.online import Rebalancer

        def resident_mb():
            pages = int(open("/proc/self/statm").read().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

        rng = np.random.default_rng(0)
        loads = rng.lognormal(0, 1, (58, 256)) * 50
        steps = [torch.from_numpy(rng.poisson(loads)) for _ in range(20)]
        rebalancer = Rebalancer(288, 32, window=4, interval=1, incremental=True)
        seen = {}
        for step in range(801):
            rebalancer.record(steps[step % len(steps)])
            if step in (500, 800):  # (after the allocator's warm-up: see below)
                seen[step] = resident_mb()
        assert len(rebalancer.events) == 801
        print(seen[800] - seen[500])
    """)
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/statm")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    # measured over these 300 rebalances: +20 to +34 MB with tensors in the events, 0 to +3 MB
    # without. The resident memory still climbs by some 8 MB up to about rebalance 500
    # without them, so a window from 300 read +5 to +8.2 MB and failed now and then
    assert float(done.stdout) < 8, f"resident memory grew {float(done.stdout):.1f} MB"


def _event() -> RebalanceEvent:
    return RebalanceEvent(12, 0.5, torch.tensor([3, 0, 1]), True, torch.tensor([2, 2]))


def test_an_event_reads_its_counts_as_int64_tensors() -> None:
    event = _event()
    assert (event.step, event.plan_seconds, event.changed) == (12, 0.5, True)
    assert event.moved_slots.dtype == torch.int64 and event.moved_slots.tolist() == [3, 0, 1]
    assert event.moved_per_gpu.tolist() == [2, 2]
    # a read is a new tensor: changing it changes no event
    event.moved_slots[0] = 99
    assert event.moved_slots.tolist() == [3, 0, 1]
    assert RebalanceEvent(0, 0.0, [0, 0], False).moved_per_gpu is None
    assert RebalanceEvent(0, 0.0, np.array([4, 5]), False).moved_slots.tolist() == [4, 5]


def test_an_event_is_read_only_and_survives_copies() -> None:
    event = _event()
    with pytest.raises(dataclasses.FrozenInstanceError, match="read-only"):
        event.step = 3
    with pytest.raises(dataclasses.FrozenInstanceError, match="read-only"):
        del event.changed
    for twin in (pickle.loads(pickle.dumps(event)), copy.copy(event), copy.deepcopy(event)):
        assert repr(twin) == repr(event)
        assert torch.equal(twin.moved_slots, event.moved_slots)
    assert "moved_slots=[3, 0, 1]" in repr(event)


def test_a_pickled_rebalancer_keeps_its_events() -> None:
    rng = np.random.default_rng(1)
    rebalancer = Rebalancer(20, 4, window=2, interval=2)
    for _ in range(6):
        rebalancer.record(torch.from_numpy(rng.poisson(5.0, (2, 16))))
    twin = pickle.loads(pickle.dumps(rebalancer))
    assert [repr(e) for e in twin.events] == [repr(e) for e in rebalancer.events]
    assert len(twin.events) == 3


class _DataclassPickle:
    """Loads as a pickled RebalanceEvent dataclass did: a bare instance of the class, then
    its field dict as the state (pickle refuses copyreg.__newobj__ for another class)."""

    def __init__(self, **fields: object) -> None:
        self.fields = fields

    def __reduce_ex__(self, protocol: object) -> tuple:
        return (object.__new__, (RebalanceEvent,), self.fields)


def test_an_event_pickled_when_it_was_a_dataclass_loads() -> None:
    # a Rebalancer pickled by an eplb before the integer counts holds such events
    saved = pickle.dumps(_DataclassPickle(
        step=12, plan_seconds=0.5, moved_slots=torch.tensor([3, 0, 1]), changed=True,
        moved_per_gpu=torch.tensor([2, 2])))
    event = pickle.loads(saved)
    assert repr(event) == repr(_event())
    assert event.moved_per_gpu.tolist() == [2, 2]
    with pytest.raises(dataclasses.FrozenInstanceError, match="read-only"):
        event.step = 3


def test_an_event_keeps_integers_whatever_tensor_it_is_given() -> None:
    event = RebalanceEvent(1, 0.1, torch.tensor([1.0, 2.0]), True, torch.tensor([True, False]))
    assert "moved_slots=[1, 2]" in repr(event) and "moved_per_gpu=[1, 0]" in repr(event)
    assert event.moved_slots.tolist() == [1, 2] and event.moved_per_gpu.tolist() == [1, 0]


def test_events_read_host_tensors_under_a_meta_default_device() -> None:
    # the first event's zero counts were made on the caller's default device ("meta": no
    # numbers to keep, and reading them failed); the counts are host numbers
    rng = np.random.default_rng(2)
    rebalancer = Rebalancer(20, 4, window=2, interval=2)
    device = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        for _ in range(4):
            rebalancer.record(torch.from_numpy(rng.poisson(5.0, (2, 16))).to("cpu"))
        moved = [event.moved_slots for event in rebalancer.events]
    finally:
        torch.set_default_device(device)
    assert [m.device.type for m in moved] == ["cpu", "cpu"] and moved[0].tolist() == [0, 0]


def test_a_replay_of_known_length_keeps_no_longer_ring_than_it() -> None:
    """Attacker pass: ``eplb simulate --estimator multi:3:99999`` on a 60-step trace
    allocated a ring of 999,990 steps (6.6 GB, 22 s; under a memory limit an internal
    error); ``ema:10000`` on a 1,000-step DeepSeek-V3 trace 2.8 GiB. ``max_steps`` caps
    the ring, the simulator passes its trace's length, and the estimates are the same."""
    from eplb.tools import Cadence, simulate

    rng = np.random.default_rng(0)
    counts = torch.from_numpy(rng.poisson(20.0, (60, 4, 16))).double()
    rebalancer = Rebalancer(32, 8, window=10, interval=10, estimator="multi:3:99999",
                            max_steps=60)
    assert rebalancer.capacity == 60
    unbounded = Rebalancer(32, 8, window=10, interval=10, estimator="ema:20")
    bounded = Rebalancer(32, 8, window=10, interval=10, estimator="ema:20", max_steps=59)
    for a, b in ((0, 25), (25, 59)):
        unbounded.record(counts[a:b])
        bounded.record(counts[a:b])
    assert torch.equal(unbounded.estimate().weight, bounded.estimate().weight)
    assert torch.equal(unbounded.placement.phy2log, bounded.placement.phy2log)
    with pytest.raises(ValueError, match="max_steps=59"):
        bounded.record(counts[59])
    assert bounded.steps == 59
    with pytest.raises(ValueError, match="max_steps"):
        Rebalancer(32, 8, max_steps=0)
    restored = pickle.loads(pickle.dumps(bounded))
    assert restored.max_steps == 59 and restored.capacity == 59

    # the simulator's ring is its trace's length: a history that would have been 8 GiB
    # and more (refused, "beyond 8 GiB") now runs
    result = simulate(counts, "eplb", num_replicas=32, num_gpus=8, cadence=Cadence(10, 10),
                      estimator="ema:100000000")
    assert len(result.rebalance_steps) == 5
