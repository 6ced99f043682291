"""The hierarchical policy on nodes of 2-4 GPUs, against DeepSeek's greedy.

There a GPU's mean load is a few experts' loads and the replica counts decide whether a
node's replicas can add up to it (``LADDER_MAX_GPUS`` in ``eplb.core.options``).
"""

from __future__ import annotations

import torch
from helpers import assert_contract

import eplb
from eplb.core.baselines import plan_greedy
from eplb.core.bounds import balancedness_ceiling


def lognormal_counts(layers: int, experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(layers, experts, generator=g, dtype=torch.float64)).mul(
        1000).round()


def test_two_gpu_nodes_are_not_below_the_greedy():
    # found by a quality pass: 4 nodes of 2 GPUs, 4 slots each, 4 groups of 6 experts.
    # Before the filler ladder 9 of these 40 seeded inputs planned 0.01 or more below the
    # greedy (seed 25: 0.660 against 0.681), the worst node's counts halving both hot
    # experts where halving one and giving a cold one a second replica fits
    for seed in range(40):
        w = lognormal_counts(4, 24, seed)
        planned = eplb.plan(w, 32, 8, 4, 4, policy="hierarchical")
        assert_contract(planned)
        greedy = plan_greedy(w, 32, 8, 4, 4, policy="hierarchical")
        assert planned.balancedness(w) >= greedy.balancedness(w) - 0.01, seed


def test_a_node_whose_counts_decide_the_fit_packs_near_its_mean():
    # one node of 2 GPUs with 4 slots each holds experts at 0.78, 0.55, 0.50, 0.11, 0.05
    # and 0.01 of a GPU's mean load: Jefferson's counts (both hot experts halved) pack at
    # 1.18 of the mean, one hot expert halved and the coldest one twice at 1.001
    node = torch.tensor([780.0, 553, 498, 107, 49, 13], dtype=torch.float64)
    w = torch.cat([node, node.flip(0)])[None]
    planned = eplb.plan(w, 16, 4, 2, 2, policy="hierarchical")
    ceiling = balancedness_ceiling(w, 16, 4, 2, 2, policy="hierarchical")
    assert planned.balancedness(w) >= 0.99 * ceiling
    assert planned.balancedness(w) >= plan_greedy(w, 16, 4, 2, 2).balancedness(w)
