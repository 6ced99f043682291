"""SGLang's nearest dispatch where experts need more replicas than there are nodes.

Under the nearest rule (``eplb.core.dispatch``) a node holding some but not all of an
expert's replicas sends its other GPUs' tokens to its *first* replica, so an expert with
more replicas than nodes splits evenly only when its replicas sit together: on one node,
or filling whole nodes. This benchmark measures eplb's global plan for the rule
(``policy="global", dispatch="nearest"``) against DeepSeek's greedy, scored as the rule
realises the loads (Σ mean / Σ max GPU load, tokens arising evenly), on two families:

- ``hot``: random shapes (E ∈ {48, 72, 128, 256}, P ∈ {16, 32, 64}, N ∈ {2, 4, 8} nodes,
  S ∈ {2, 3, 5, 9}), two layers of loads uniform in [0.8, 1.2] with one expert 5-50×;
- ``gpt-oss``: the generator's gpt-oss-120b preset, 32 experts on 2 nodes, S ∈ {1, 2, 3,
  5, 9}.

Usage: ``python benchmarks/bench_nearest_hot.py [--seeds 4] [--cases 60]``
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from _harness import markdown_table, start

import eplb
from eplb.core.baselines import plan_greedy
from eplb.core.dispatch import realised_gpu_loads
from eplb.tools.generator import generate_loads


def served(weight: torch.Tensor, phy2log: torch.Tensor, gpus: int, nodes: int) -> float:
    """Σ mean / Σ max of the GPU loads the nearest rule realises."""
    load = realised_gpu_loads(weight, phy2log, gpus, nodes, "nearest", check=False)
    return float(load.mean(1).sum() / load.amax(1).sum())


def hot_family(seed: int, cases: int) -> list[tuple]:
    """``(E, P, N, S, factor, eplb, greedy, eplb seconds)`` per random case."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options: list[int]) -> int:
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    out = []
    for _ in range(cases):
        experts, gpus, nodes = pick([48, 72, 128, 256]), pick([16, 32, 64]), pick([2, 4, 8])
        slots = max(pick([2, 3, 5, 9]), -(-experts // gpus))
        weight = torch.rand(2, experts, generator=gen, dtype=torch.float64) * 0.4 + 0.8
        factor = float(torch.rand(1, generator=gen)) * 45 + 5
        weight[:, 3] *= factor
        begin = time.perf_counter()
        plan = eplb.plan(weight, slots * gpus, gpus, nodes, policy="global", dispatch="nearest")
        seconds = time.perf_counter() - begin
        greedy = plan_greedy(weight, slots * gpus, gpus, nodes)
        out.append((experts, gpus, nodes, slots, factor, served(weight, plan.phy2log, gpus, nodes),
                    served(weight, greedy.phy2log, gpus, nodes), seconds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="random families (seeds 0..)")
    parser.add_argument("--cases", type=int, default=60, help="cases per seed")
    args = parser.parse_args()
    print(start("bench_nearest_hot") + "\n")
    warnings.simplefilter("ignore", RuntimeWarning)
    rows = []
    for seed in range(args.seeds):
        family = hot_family(seed, args.cases)
        rows.append([seed, len(family), f"{statistics.mean(r[5] for r in family):.4f}",
                     f"{statistics.mean(r[6] for r in family):.4f}",
                     sum(r[5] < r[6] - 0.01 for r in family),
                     f"{min(r[5] - r[6] for r in family):+.3f}",
                     f"{1e3 * statistics.median(r[7] for r in family):.1f}"])
    print("## One hot expert, random shapes\n")
    print(markdown_table(["seed", "cases", "eplb mean", "greedy mean",
                          "eplb < greedy − 0.01", "worst eplb − greedy", "eplb ms (median)"],
                         rows))
    weight = generate_loads("gpt-oss-120b", seed=0, num_layers=1, num_experts=32).round()
    rows = []
    for slots, gpus in ((1, 64), (2, 32), (3, 16), (5, 8), (9, 8)):
        plan = eplb.plan(weight, slots * gpus, gpus, 2, policy="global", dispatch="nearest")
        greedy = plan_greedy(weight, slots * gpus, gpus, 2)
        even = eplb.plan(weight, slots * gpus, gpus, 2, policy="global")
        rows.append([slots, gpus, f"{served(weight, plan.phy2log, gpus, 2):.4f}",
                     f"{served(weight, even.phy2log, gpus, 2):.4f}",
                     f"{served(weight, greedy.phy2log, gpus, 2):.4f}",
                     f"{float(even.balancedness(weight)):.4f}"])
    print("\n## gpt-oss-like, 32 experts on 2 nodes\n")
    print(markdown_table(["S", "P", "eplb nearest", "eplb even-split plan", "greedy",
                          "even-split plan under an even split"], rows))


if __name__ == "__main__":
    main()
