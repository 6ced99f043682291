"""Every public planning path on CUDA tensors: outputs stay on the weight's device and
satisfy the contract. Skipped (visibly) on machines without a CUDA device."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_contract

import eplb
from eplb import Topology
from eplb.core.baselines import plan_greedy, rebalance_experts_greedy
from eplb.online import Rebalancer, trivial_placement

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TOPOLOGIES = [pytest.param(1, 1, id="global"), pytest.param(2, 4, id="hierarchical")]


def loads(layers: int = 6, experts: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(layers, experts, generator=g, dtype=torch.float64) * 0.9)
    w[0] = 0  # a dense layer in a real dump
    return w.cuda()


@pytest.mark.parametrize(("nodes", "groups"), TOPOLOGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_plan_dtypes(nodes, groups, dtype):
    w = (loads() * 100).to(dtype)
    p = eplb.plan(w, 40, 8, nodes, groups)
    assert_contract(p, device="cuda")
    assert p.balancedness(w) >= plan_greedy(w, 40, 8, nodes, groups).balancedness(w) - 1e-9


@pytest.mark.parametrize(("nodes", "groups"), TOPOLOGIES)
def test_cuda_matches_cpu_quality(nodes, groups):
    w = loads(8, 64)
    gpu = eplb.plan(w, 72, 8, nodes, groups)
    cpu = eplb.plan(w.cpu(), 72, 8, nodes, groups)
    assert_contract(gpu, device="cuda")
    assert abs(gpu.balancedness(w) - cpu.balancedness(w.cpu())) < 2e-3


@pytest.mark.parametrize(("nodes", "groups"), TOPOLOGIES)
def test_incremental_on_cuda(nodes, groups):
    w0, w1 = loads(seed=1), loads(seed=2)
    old = eplb.plan(w0, 40, 8, nodes, groups)
    new = eplb.plan(w1, 40, 8, nodes, groups, previous=old, max_moves=6)
    assert_contract(new, device="cuda")
    assert int(new.moved_slots(old).max()) <= 6
    phy2log, log2phy, logcnt = eplb.rebalance_experts(
        w1, 40, groups, nodes, 8, old_phy2log=old.phy2log
    )
    assert phy2log.is_cuda and log2phy.is_cuda and logcnt.is_cuda


@pytest.mark.parametrize("budget", [None, 12, [2, 2, 2, 2, 2, 2]])
def test_nearest_incremental_on_cuda(budget):
    # SGLang's runtime call made through the API with CUDA tensors: the candidates are
    # built on the host, the placement comes back on the weight's device
    w0, w1 = loads(seed=1), loads(seed=2)
    old = eplb.plan(w0, 48, 8, 2, policy="global", dispatch="nearest")
    new = eplb.plan(w1, 48, 8, 2, policy="global", dispatch="nearest", previous=old,
                    max_moves=budget)
    assert_contract(new, device="cuda")
    if isinstance(budget, int):
        assert int(new.moved_slots(old).sum()) <= budget


def test_dead_gpus_and_speed_on_cuda():
    w = loads()
    active = torch.ones(8, dtype=torch.bool, device="cuda")
    active[5] = False
    speed = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.5, 1.0, 1.0, 1.0], device="cuda")
    p = eplb.plan(w, 48, 8, active_gpus=active, gpu_speed=speed)
    assert_contract(p, device="cuda")
    assert bool((p.phy2log.view(6, 8, 6)[:, 5] == -1).all())


def test_greedy_baseline_on_cuda():
    w = loads()
    phy2log, log2phy, logcnt = rebalance_experts_greedy(w, 40, 4, 2, 8)
    assert phy2log.is_cuda and log2phy.is_cuda and logcnt.is_cuda
    assert_contract(plan_greedy(w, 40, 8, 2, 4), device="cuda", anti_affinity=False)


def test_rebalancer_on_cuda():
    g = torch.Generator().manual_seed(3)
    steps = torch.poisson(torch.rand(12, 4, 16, generator=g) * 50).cuda()
    reb = Rebalancer(24, 8, window=4, interval=4)
    placements = [p for p in (reb.record(c) for c in steps) if p is not None]
    assert placements
    for p in placements:
        assert_contract(p, device="cuda")


def test_rebalancer_cuda_counts_with_cpu_initial_placement():
    g = torch.Generator().manual_seed(4)
    steps = torch.poisson(torch.rand(8, 4, 16, generator=g) * 50)
    initial = trivial_placement(16, 4, Topology(24, 8))  # on CPU, counts on CUDA
    reb = Rebalancer(
        24,
        8,
        window=4,
        interval=4,
        estimator="multi:2",
        initial=initial,
        incremental=True,
        max_moves=4,
    )
    for counts in steps.cuda():
        reb.record(counts)
    assert reb.placement is not None
    assert_contract(reb.placement, device="cuda")


def test_trivial_placement_on_device():
    p = trivial_placement(16, 2, Topology(24, 8), device="cuda")
    assert_contract(p, device="cuda", anti_affinity=False)


@pytest.mark.parametrize(("nodes", "groups"), TOPOLOGIES)
def test_cuda_input_gives_the_cpu_plan(nodes, groups):
    # issue 10 part 2: the same plan from CPU and CUDA input, fresh and from vLLM's
    # initial map with int32 loads (SGLang hands its rebalance GPU tensors)
    w = (loads(8, 64, seed=5) * 1000).round().to(torch.int32)
    fresh_cpu = eplb.plan(w.cpu(), 72, 8, nodes, groups)
    fresh_gpu = eplb.plan(w, 72, 8, nodes, groups)
    assert torch.equal(fresh_cpu.phy2log, fresh_gpu.phy2log.cpu())
    initial = (torch.arange(72) % 64).expand(8, -1).contiguous()
    cpu = eplb.rebalance_experts(w.cpu(), 72, groups, nodes, 8, old_phy2log=initial)
    gpu = eplb.rebalance_experts(w, 72, groups, nodes, 8, old_phy2log=initial.cuda())
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a, b.cpu())


def test_cuda_input_gives_the_cpu_plan_at_a_large_shape():
    # 100 × 2048 items: the size at which the device path would run (opt-in, FORCE)
    g = torch.Generator().manual_seed(6)
    w = torch.exp(torch.randn(100, 1024, generator=g, dtype=torch.float64))
    cpu = eplb.plan(w, 2048, 256)
    gpu = eplb.plan(w.cuda(), 2048, 256)
    assert gpu.phy2log.is_cuda and torch.equal(cpu.phy2log, gpu.phy2log.cpu())
