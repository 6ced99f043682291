"""Few slots per GPU (S = 3-4) under heavy skew: eplb's global plan against DeepSeek's greedy
and the balancedness ceiling, on random inputs where the replica counts decide.

Each case draws S ∈ {3, 4}, E ∈ {16, …, 256}, P ∈ {8, …, 128} (R = S·P ≥ E), 1-4 layers,
and one load family: log-normal (σ 1.5-3), Zipf (exponent 0.8-2, shuffled), many idle
experts (30-80 % at zero), or 1-4 dominant experts (0.2-3× the rest each); integer token
counts. Reported per family and S: cases where eplb is more than 0.01 below the greedy,
and eplb / ceiling (``eplb.core.bounds.balancedness_ceiling``, often 1.0 here and then not
reachable: with more than P replicas above half a GPU's mean load two share a GPU).

Usage: ``python benchmarks/bench_few_slots.py [--cases 200] [--seed 0]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _harness import markdown_table, start

import eplb
from eplb.core.baselines import plan_greedy
from eplb.core.bounds import balancedness_ceiling

FAMILIES = ("lognormal", "zipf", "zeros", "dominant")


def draw(rng: np.random.Generator) -> tuple[dict, torch.Tensor]:
    """One case: its shape and family, and ``[L, E]`` float64 integer-valued loads."""
    slots = int(rng.choice([3, 4]))
    while True:
        experts = int(rng.choice([16, 32, 48, 64, 96, 128, 160, 256]))
        gpus = int(rng.choice([8, 16, 24, 32, 48, 64, 96, 128]))
        if slots * gpus >= experts:
            break
    layers = int(rng.choice([1, 2, 4]))
    family = str(rng.choice(FAMILIES))
    if family == "lognormal":
        w = rng.lognormal(0, rng.uniform(1.5, 3), (layers, experts))
    elif family == "zipf":
        a = rng.uniform(0.8, 2.0)
        w = np.stack([rng.permutation(1.0 / np.arange(1, experts + 1) ** a)
                      for _ in range(layers)])
    elif family == "zeros":
        w = rng.lognormal(0, rng.uniform(0.5, 2), (layers, experts))
        w[rng.random((layers, experts)) < rng.uniform(0.3, 0.8)] = 0
    else:
        k = int(rng.integers(1, 5))
        w = rng.lognormal(0, 0.5, (layers, experts))
        for row in range(layers):
            w[row, rng.choice(experts, k, replace=False)] = w[row].sum() * rng.uniform(0.2, 3, k)
    w = np.round(w * 1000)
    w[:, 0] += w.sum(1) == 0  # no all-idle layer
    return {"S": slots, "E": experts, "P": gpus, "family": family}, torch.tensor(w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="first case's seed")
    args = parser.parse_args()
    print(start("bench_few_slots") + "\n")
    results = []
    eplb_seconds = 0.0
    for i in range(args.cases):
        meta, weight = draw(np.random.default_rng(args.seed + i))
        replicas, gpus = meta["S"] * meta["P"], meta["P"]
        begin = time.perf_counter()
        ours = eplb.plan(weight, replicas, gpus).balancedness(weight)
        eplb_seconds += time.perf_counter() - begin
        greedy = plan_greedy(weight, replicas, gpus).balancedness(weight)
        ceiling = balancedness_ceiling(weight, replicas, gpus, policy="global")
        results.append({**meta, "eplb": float(ours), "greedy": float(greedy),
                        "ceiling": float(ceiling)})
    rows = []
    for slots in (3, 4):
        for family in FAMILIES:
            sub = [r for r in results if r["S"] == slots and r["family"] == family]
            if not sub:
                continue
            ratio = [r["eplb"] / r["ceiling"] for r in sub]
            rows.append([slots, family, len(sub),
                         sum(r["eplb"] < r["greedy"] - 0.01 for r in sub),
                         f"{min(ratio):.4f}", f"{statistics.mean(ratio):.4f}",
                         f"{statistics.mean(r['greedy'] / r['ceiling'] for r in sub):.4f}"])
    print(markdown_table(["S", "family", "cases", "eplb < greedy − 0.01", "worst eplb/ceiling",
                          "mean eplb/ceiling", "mean greedy/ceiling"], rows))
    ratio = [r["eplb"] / r["ceiling"] for r in results]
    print(f"\nall {len(results)} cases: eplb < greedy − 0.01 in "
          f"{sum(r['eplb'] < r['greedy'] - 0.01 for r in results)}, eplb/ceiling worst "
          f"{min(ratio):.4f}, mean {statistics.mean(ratio):.4f}; eplb {eplb_seconds:.2f} s in all")


if __name__ == "__main__":
    main()
