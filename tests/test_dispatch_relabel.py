"""Incremental plans under SGLang's nearest dispatch with dead GPUs: the fresh plan is
relabelled onto the old GPUs inside each node only (found by the fourteenth attack pass:
relabelled across nodes, a plan serving 0.995 under the rule served 0.83)."""

from __future__ import annotations

import pytest
import torch

import eplb
from eplb.core import realised_gpu_loads
from eplb.core.dispatch import balancedness


@pytest.mark.parametrize(("dead", "seed"), [([3], 0), ([0, 9], 1), ([4, 5, 6, 7], 2)])
def test_a_replan_with_dead_gpus_serves_as_the_fresh_plan_does(dead, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(4, 64, generator=g, dtype=torch.float64) * 1.2) * 100
    live = torch.ones(16, dtype=torch.bool)
    live[dead] = False
    old = eplb.plan(w, 96, 16, 4, policy="global", dispatch="nearest")
    fresh = eplb.plan(w, 96, 16, 4, policy="global", dispatch="nearest", active_gpus=live)
    again = eplb.plan(w, 96, 16, 4, policy="global", dispatch="nearest", active_gpus=live,
                      previous=old)
    again.validate()

    def served(p: eplb.Placement) -> float:
        return balancedness(realised_gpu_loads(w, p.phy2log, 16, 4, active_gpus=live), live)

    assert served(again) == pytest.approx(served(fresh), abs=1e-9)
    # every expert keeps its replicas per node: only GPUs inside a node were relabelled
    node = torch.arange(96) // 24
    for layer in range(4):
        for n in range(4):
            a = fresh.phy2log[layer, node == n]
            b = again.phy2log[layer, node == n]
            assert torch.equal(a.sort().values, b.sort().values)
    # and it still keeps the old slots it can (it moves fewer than all live slots)
    kept = (again.phy2log == old.phy2log) & (again.phy2log >= 0)
    assert int(kept.sum()) > 0
