"""Hierarchical plans on nodes of 2-4 GPUs: eplb against DeepSeek's hierarchical greedy.

Random inputs: 2-16 nodes of 2-4 GPUs, S = R/P from 2 to 9, groups a multiple of the
nodes with 2-16 experts each (E ≥ P), 1-6 layers of log-normal loads (σ 0.5-2), a quarter
with 1-3 dominant experts (5-40×) and a quarter with a dominant group (3-15×); integer
token counts. Reported: cases where eplb (``policy="hierarchical"``) is 0.01 or more below
the greedy, any loss to it, and eplb over the hierarchical ceiling.

Usage: ``python benchmarks/bench_small_nodes.py [--cases 1300] [--seed 0]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _harness import start

import eplb
from eplb.core.baselines import plan_greedy
from eplb.core.bounds import balancedness_ceiling


def draw(seed: int) -> tuple[tuple[int, int, int, int], torch.Tensor]:
    """``((R, P, N, G), [L, E] loads)`` of one case."""
    rng = np.random.default_rng(seed)
    per_node, nodes = int(rng.integers(2, 5)), int(rng.integers(2, 17))
    gpus = per_node * nodes
    replicas = int(rng.integers(2, 10)) * gpus
    while True:
        groups = nodes * int(rng.choice([1, 2, 3, 4]))
        per_group = int(rng.integers(2, 17))
        experts = groups * per_group
        if gpus <= experts <= replicas:
            break
    layers = int(rng.integers(1, 7))
    w = rng.lognormal(0.0, float(rng.uniform(0.5, 2.0)), size=(layers, experts))
    kind = rng.choice(["plain", "dominant_experts", "dominant_group"], p=[0.5, 0.25, 0.25])
    for layer in range(layers):
        if kind == "dominant_experts":
            k = int(rng.integers(1, 4))
            w[layer, rng.choice(experts, size=k, replace=False)] *= rng.uniform(5, 40, size=k)
        elif kind == "dominant_group":
            g = int(rng.integers(groups))
            w[layer, g * per_group:(g + 1) * per_group] *= rng.uniform(3, 15)
    return (replicas, gpus, nodes, groups), torch.tensor(np.round(w * 1000) + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1300)
    parser.add_argument("--seed", type=int, default=0, help="first case's seed")
    args = parser.parse_args()
    print(start("bench_small_nodes") + "\n")
    gaps, ratios, seconds = [], [], 0.0
    for seed in range(args.seed, args.seed + args.cases):
        shape, weight = draw(seed)
        begin = time.perf_counter()
        ours = eplb.plan(weight, *shape, policy="hierarchical").balancedness(weight)
        seconds += time.perf_counter() - begin
        greedy = plan_greedy(weight, *shape, policy="hierarchical").balancedness(weight)
        gaps.append(float(ours - greedy))
        ratios.append(float(ours / balancedness_ceiling(weight, *shape, policy="hierarchical")))
    gaps_np, ratios_np = np.array(gaps), np.array(ratios)
    print(f"{args.cases} cases: eplb 0.01 or more below the greedy in "
          f"{int((gaps_np <= -0.01).sum())}, below it at all in {int((gaps_np < -1e-9).sum())} "
          f"(worst {gaps_np.min():+.4f}); eplb / ceiling mean {ratios_np.mean():.4f}, worst "
          f"{ratios_np.min():.4f}; eplb {seconds:.1f} s in all")


if __name__ == "__main__":
    main()
