"""Two GPUs live again on the real DeepSeek-V3 loads: what planning from the map in force
moves, and what it buys on the next window.

For each real workload (58 MoE layers × 256 experts, 288 slots on 32 GPUs, global): a
chain of windows drifting ×exp(drift·N(0, 1)) per expert; a plan with GPUs 3 and 17 dead
on window 0, re-planned with them still dead on window 1; then, on window 2, with every
GPU live again, planned from that map by eplb's default, by the forced moves alone
(``max_moves=0``: only the refill of the revived GPUs), at a dearer move price, and fresh
(the map withheld). Each plan is scored on window 2 (in sample) and window 3 (next).

``--hierarchical``: 4 nodes of 8 GPUs, 8 expert groups, policy ``auto``. While GPUs are
dead the plans are global (``auto`` warns and plans globally), so the map in force
straddles nodes once every GPU is live: the hierarchical re-plan must move those layers
whatever the budget. A last row gives the floor: the fewest slots any plan that keeps
every group on one node must move from that map (the group→node assignment that leaves
the most slots in place, searched over all of them).

    python benchmarks/bench_revived_gpus.py             # 6 workloads, drift 0.15
    python benchmarks/bench_revived_gpus.py --files 12 --drift 0.05
    python benchmarks/bench_revived_gpus.py --hierarchical
"""

from __future__ import annotations

import argparse
import itertools
import warnings

import numpy as np
import torch
from _harness import deepseek_loads, markdown_table, start
from bench_vllm_call import drift_chain

import eplb

R, P, DEAD = 288, 32, (3, 17)
NODES, GROUPS = 4, 8


def locality_floor(old: torch.Tensor, num_experts: int) -> float:
    """The fraction of the slots of ``old [L, R]`` that every plan with each of the
    ``GROUPS`` expert groups on one of ``NODES`` nodes (``GROUPS / NODES`` each) must move:
    a slot may stay only where its expert's group is assigned to the slot's node."""
    ids = old.numpy()
    layers = ids.shape[0]
    node = np.arange(R) // (R // NODES)
    group = np.where(ids >= 0, ids // (num_experts // GROUPS), GROUPS)  # empty: GROUPS
    held = np.zeros((layers, GROUPS + 1, NODES))  # [L, group, node] slots
    np.add.at(held, (np.arange(layers)[:, None], group, node[None]), 1)
    per_node = GROUPS // NODES
    labels = [a for a in itertools.product(range(NODES), repeat=GROUPS)
              if all(a.count(n) == per_node for n in range(NODES))]
    kept = held[:, np.arange(GROUPS)[None], np.array(labels)].sum(2).max(1)  # [L]
    return 1.0 - float(kept.sum()) / ids.size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=6, help="real workloads (of 12)")
    parser.add_argument("--drift", type=float, default=0.15)
    parser.add_argument("--hierarchical", action="store_true",
                        help="4 nodes, 8 expert groups (the dead GPUs' plans are global)")
    args = parser.parse_args(argv)
    cluster = {"num_nodes": NODES, "num_groups": GROUPS} if args.hierarchical else {}
    torch.set_num_threads(1)
    print(start("bench_revived_gpus"))
    loads = list(deepseek_loads(torch.int64).items())[: args.files]
    if not loads:
        return 0
    planners = {
        "eplb default (from the map in force)": {},
        "forced moves only (max_moves=0)": {"max_moves": 0},
        "move_price=0.03": {"move_price": 0.03},
        "fresh (map withheld)": None,
    }
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in planners}
    floors: list[float] = []
    for k, (_, weight) in enumerate(loads):
        windows = drift_chain(weight, 3, args.drift, k)
        live = torch.ones(P, dtype=torch.bool)
        live[list(DEAD)] = False
        with warnings.catch_warnings():  # hierarchical with dead GPUs: planned globally
            warnings.simplefilter("ignore")
            first = eplb.plan(windows[0], R, P, active_gpus=live, **cluster)
            old = eplb.plan(windows[1], R, P, active_gpus=live, previous=first, **cluster)
        if args.hierarchical:
            floors.append(locality_floor(old.phy2log, weight.shape[1]))
        for name, options in planners.items():
            new = (eplb.plan(windows[2], R, P, **cluster) if options is None
                   else eplb.plan(windows[2], R, P, previous=old, **cluster, **options))
            moved = float((new.phy2log != old.phy2log).float().mean())
            rows[name].append((moved, new.balancedness(windows[2].double()),
                               new.balancedness(windows[3].double())))
    table = []
    for name, values in rows.items():
        n = len(values)
        low, high = (100 * f(v[0] for v in values) for f in (min, max))
        table.append([name, f"{100 * sum(v[0] for v in values) / n:.1f} %",
                      f"{low:.1f}–{high:.1f} %",
                      f"{sum(v[1] for v in values) / n:.4f}",
                      f"{sum(v[2] for v in values) / n:.4f}"])
    print(markdown_table(["planner", "slots moved", "per workload", "in sample",
                          "next window"], table))
    if floors:
        print(f"\nLocality's floor (the fewest slots a plan keeping every group on one node "
              f"moves from the map in force): {100 * sum(floors) / len(floors):.1f} % "
              f"({100 * min(floors):.1f}–{100 * max(floors):.1f} % per workload)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
