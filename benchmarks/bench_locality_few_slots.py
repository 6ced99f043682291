"""The locality policy with few slots per GPU and mild skew: its search alone, the plan
``policy="locality"`` returns (which falls back to the global plan for the rule in a
layer that gives up far more balance than ``slack`` allows), and that global plan.

4 layers of 64 experts, integer loads uniform in [0, 1000) (``torch.randint``, seeds
``0 .. --seeds - 1``), 64 GPUs in 8 nodes, 8 groups, slack 0.03, 2-4 slots per GPU.
Balancedness as SGLang's nearest rule realises it in expectation
(``eplb.core.realised_gpu_loads``): Σ mean GPU load / Σ max GPU load over the layers.
The search alone is ``eplb.core.locality.plan_locality`` (the policy's first step, not
public API), with the group-limited surrogate the policy uses (4 of 8 groups).

    python benchmarks/bench_locality_few_slots.py [--seeds 5]
"""

from __future__ import annotations

import argparse

import torch
from _harness import markdown_table, start

import eplb
from eplb.core import realised_gpu_loads
from eplb.core.locality import plan_locality
from eplb.core.topology import Topology

LAYERS, EXPERTS, GPUS, NODES, GROUPS, SLACK = 4, 64, 64, 8, 8, 0.03


def nearest_balancedness(weight: torch.Tensor, phy2log: torch.Tensor) -> float:
    """Σ mean / Σ max of the ``[L, P]`` GPU loads the nearest rule realises."""
    loads = realised_gpu_loads(weight, phy2log, GPUS, NODES)
    return float(loads.mean(1).sum() / loads.amax(1).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    print(start("bench_locality_few_slots"))
    rows = []
    for slots in (2, 3, 4):
        replicas = GPUS * slots
        alone, policy, other = [], [], []
        for seed in range(args.seeds):
            weight = torch.randint(0, 1000, (LAYERS, EXPERTS),
                                   generator=torch.Generator().manual_seed(seed)).double()
            search = plan_locality(weight, Topology(replicas, GPUS, NODES, GROUPS),
                                   slack=SLACK, topk_groups=GROUPS // 2,
                                   generator=torch.Generator().manual_seed(0))
            alone.append(nearest_balancedness(weight, search))
            plan = eplb.plan(weight, replicas, GPUS, NODES, GROUPS, policy="locality",
                             dispatch="nearest", slack=SLACK)
            policy.append(nearest_balancedness(weight, plan.phy2log))
            glob = eplb.plan(weight, replicas, GPUS, NODES, GROUPS, policy="global",
                             dispatch="nearest")
            other.append(nearest_balancedness(weight, glob.phy2log))
        rows.append([slots] + [f"{min(v):.4f}–{max(v):.4f}" for v in (alone, policy, other)])
    print(f"\n{LAYERS} layers of {EXPERTS} experts (uniform integer loads, seeds 0–"
          f"{args.seeds - 1}), {GPUS} GPUs in {NODES} nodes, {GROUPS} groups, slack {SLACK}; "
          "balancedness under the nearest rule, min–max over the seeds\n")
    print(markdown_table(["slots per GPU", "locality search alone", 'policy="locality"',
                          'policy="global", dispatch="nearest"'], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
