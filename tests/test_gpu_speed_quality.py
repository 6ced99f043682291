"""Plans for GPUs of different speeds: the load goes toward the fast GPUs.

Packing for equal GPUs first and then swapping toward ``load ∝ speed`` stalls where a GPU
holds few slots (the swaps start from every GPU near the mean load). These floors sit
between what that reached and what the speed-aware start reaches (a packing that puts
each replica, heaviest first, where it finishes earliest), both refined alike.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_contract

import eplb


def lognormal(layers: int, experts: int, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(layers, experts, generator=g, dtype=torch.float64) * sigma)


@pytest.mark.parametrize(
    ("experts", "gpus", "slots", "speed", "floor"),
    [
        # equal-load start then swaps: 0.798, 0.900, 0.868, 0.891; speed-aware start:
        # 0.844, 0.925, 0.931, 0.992
        (64, 32, 3, [1.0, 2.0] * 16, 0.82),
        (32, 8, 5, [1.0, 2.0] * 4, 0.915),
        (256, 96, 3, [1.0, 2.0] * 48, 0.90),
        (128, 32, 9, [1.0] * 31 + [0.5], 0.95),
    ],
)
def test_speeds_few_slots_reach_fast_gpus(experts, gpus, slots, speed, floor):
    w = lognormal(4, experts, 0.7 if experts != 256 else 1.0, seed=experts)
    speed = torch.tensor(speed, dtype=torch.float64)
    p = eplb.plan(w, slots * gpus, gpus, gpu_speed=speed)
    assert_contract(p)
    assert p.balancedness(w, gpu_speed=speed) > floor


def test_speeds_with_a_dead_gpu_and_a_stacked_expert():
    """The speed-aware start keeps the dead GPU empty and stacks only where it must."""
    w = torch.tensor([[100.0, 1.0, 1.0, 1.0]])  # 12 slots on 3 live GPUs: 4 each
    speed = torch.tensor([1.0, 2.0, 1.0, 2.0])
    live = torch.tensor([True, True, False, True])
    p = eplb.plan(w, 16, 4, gpu_speed=speed, active_gpus=live)
    assert_contract(p)
    assert (p.phy2log[0, 8:12] == -1).all()


def test_few_slots_with_speeds_keep_jeffersons_counts():
    # at 3 slots per GPU the count second looks (few slots, small nodes) choose for equal
    # GPUs; with speeds their fewer, larger hot replicas served 0.764 where Jefferson's
    # counts, refined for the speeds, serve 0.913 (attacker pass, twenty-second session)
    from eplb.core.dispatch import realised_gpu_loads

    g = torch.Generator().manual_seed(0)
    w = torch.exp(torch.randn(4, 64, generator=g, dtype=torch.float64) * 2) * 10
    speed = torch.ones(32, dtype=torch.float64)
    speed[:16] = 2.0
    p = eplb.plan(w, 96, 32, 4, gpu_speed=speed)
    p.validate()
    time = realised_gpu_loads(w, p.phy2log, 32, 4, "even") / speed
    assert float((w.sum(1) / speed.sum()).sum() / time.amax(1).sum()) >= 0.9


def test_equal_speeds_plan_as_equal_gpus():
    # equal speeds used to take the speed path, without the count search, and the
    # hierarchical policy refused them as "speeds differ" (attacker pass: 0.672 where no
    # speeds planned 0.990)
    w = [[1.8045, 951.539, 929.053, 5.136, 0.1456]]
    plain = eplb.plan(w, 6, 2)
    for speed in ([1.0, 1.0], [2.5, 2.5], torch.full((2,), 3.0)):
        same = eplb.plan(w, 6, 2, gpu_speed=speed)
        assert torch.equal(same.phy2log, plain.phy2log)
    g = torch.Generator().manual_seed(1)
    loads = torch.rand(2, 16, generator=g)
    kwargs = {"num_nodes": 2, "num_groups": 4, "policy": "hierarchical"}
    p = eplb.plan(loads, 24, 8, gpu_speed=[1.0] * 8, **kwargs)
    assert p.policy == "hierarchical"
    assert torch.equal(p.phy2log, eplb.plan(loads, 24, 8, **kwargs).phy2log)
    again = eplb.plan(loads, 24, 8, gpu_speed=[1.0] * 8, previous=p, **kwargs)
    assert_contract(again)


@pytest.mark.parametrize(("experts", "gpus"), [(16, 8), (32, 16)])
def test_close_speeds_plan_no_slower_than_equal_gpus(experts, gpus):
    # speeds 1 and 1.01: the equal-GPU plan's count search picks counts that serve best,
    # and the speed path used to leave them out (26 of 30 cases slower, by up to 7 %, at
    # 16 experts on 8 GPUs of 3 slots: attacker pass); it now offers them too
    speed = torch.tensor([1.0] * (gpus // 2) + [1.01] * (gpus // 2), dtype=torch.float64)
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(4, experts, generator=g, dtype=torch.float64) ** 3 * 1000
        fast = eplb.plan(w, 3 * gpus, gpus, gpu_speed=speed)
        assert_contract(fast)
        equal = eplb.plan(w, 3 * gpus, gpus)
        assert fast.balancedness(w, gpu_speed=speed) >= equal.balancedness(
            w, gpu_speed=speed) - 1e-9


@pytest.mark.parametrize("scale", [2.0**-1000, 1e-100, 1e-45, 1e45, 1e100, 1e300])
def test_only_the_ratios_of_the_speeds_matter(scale):
    # the swap search keeps the speeds in float32: beyond its range (1e45 became inf, 1e-45
    # a subnormal, 1e-100 zero) every GPU's time was inf or nan and the speeds were lost
    # (0.3 against 0.9 on the same ratios, attacker pass); speeds are planned relative to
    # the fastest live GPU's, scaled by a power of two, so within float32's range the plan
    # is the one of the speeds as given, bit for bit
    w = lognormal(3, 16, 1.0, seed=5)
    speed = torch.tensor([1.0, 2.0, 3.0, 0.5] * 2, dtype=torch.float64)
    live = torch.tensor([True] * 7 + [False])
    for active in (None, live):
        p = eplb.plan(w, 24, 8, gpu_speed=speed, active_gpus=active)
        q = eplb.plan(w, 24, 8, gpu_speed=speed * scale, active_gpus=active)
        assert_contract(q)
        assert torch.equal(q.phy2log, p.phy2log)
