"""The device path (eplb.core.device_path) matches the host path bit for bit on CPU
tensors, and plans made through it honour the contract. The CUDA case runs only where a
GPU is lent (scripts/device_check.sh); nothing here needs one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
import eplb.core.device_path as device_path
from eplb.core.device_path import bldm_gpus_torch, expand_replicas_torch
from eplb.core.packing.construct import _bldm_gpus
from eplb.core.packing.state import LOAD, make_items
from eplb.core.replication import expand_replicas, replica_counts
from eplb.tools.generator import generate_loads

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    gpus = draw(st.integers(1, 16))
    slots = draw(st.integers(1, 6))
    experts = draw(st.integers(1, gpus * slots))
    layers = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["lognormal", "ties", "zeros-and-hot"]))
    if kind == "lognormal":
        w = np.exp(rng.normal(0, 1.2, (layers, experts))) * 10
    elif kind == "ties":
        w = np.full((layers, experts), 3.0)
    else:
        w = np.zeros((layers, experts))
        w[:, 0] = 50.0
        w += 1e-3
    return torch.from_numpy(w), gpus * slots, gpus


@given(problems())
@SETTINGS
def test_expansion_and_construction_match_the_host_path(problem):
    weight, replicas, gpus = problem
    counts = replica_counts(weight, replicas, (0.0,))[0]
    host = expand_replicas(weight, counts)
    dev = expand_replicas_torch(weight, counts)
    assert torch.equal(host[0], dev[0]) and torch.equal(host[1], dev[1])
    load = make_items(*host)[LOAD].to(torch.float32)
    assert np.array_equal(_bldm_gpus(load.numpy(), gpus), bldm_gpus_torch(load, gpus).numpy())


@pytest.mark.parametrize("force", ["device", "host"])
def test_forced_paths_plan_valid_placements_of_equal_quality(force, monkeypatch):
    weight = generate_loads(seed=3, num_layers=12, num_experts=64)
    reference = eplb.plan(weight, 96, 16).balancedness(weight)
    monkeypatch.setattr(device_path, "FORCE", force)
    placement = eplb.plan(weight, 96, 16)
    placement.validate()
    # the device path skips the host anti-affinity pre-pass (the repair settles those
    # rows instead), so plans may differ slightly, never by much
    assert placement.balancedness(weight) == pytest.approx(reference, abs=2e-3)


def test_threshold_keeps_cpu_tensors_on_the_host():
    small = torch.zeros(2, 2)
    assert not device_path.use_device_path(small, 10**9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_device_path_matches_the_host_path_on_the_gpu(monkeypatch):
    weight = generate_loads(seed=0, num_layers=100, num_experts=1024).cuda()
    counts = replica_counts(weight, 2048, (0.0,))[0]
    monkeypatch.setattr(device_path, "FORCE", "host")
    host = expand_replicas(weight, counts)
    monkeypatch.setattr(device_path, "FORCE", "device")
    dev = expand_replicas(weight, counts)
    assert dev[0].is_cuda and torch.equal(host[0].cuda(), dev[0])
    load = make_items(*dev)[LOAD].to(torch.float32)
    gpu = bldm_gpus_torch(load, 256)
    assert gpu.is_cuda
    assert np.array_equal(gpu.cpu().numpy(), _bldm_gpus(load.cpu().numpy(), 256))
    placement = eplb.plan(weight, 2048, 256)
    placement.validate()
    assert placement.phy2log.is_cuda
