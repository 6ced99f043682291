"""Two GPUs live again on the real DeepSeek-V3 loads: what planning from the map in force
moves, and what it buys on the next window.

For each real workload (58 MoE layers × 256 experts, 288 slots on 32 GPUs, global): a
chain of windows drifting ×exp(drift·N(0, 1)) per expert; a plan with GPUs 3 and 17 dead
on window 0, re-planned with them still dead on window 1; then, on window 2, with every
GPU live again, planned from that map by eplb's default, by the forced moves alone
(``max_moves=0``: only the refill of the revived GPUs), at a dearer move price, and fresh
(the map withheld). Each plan is scored on window 2 (in sample) and window 3 (next).

    python benchmarks/bench_revived_gpus.py             # 6 workloads, drift 0.15
    python benchmarks/bench_revived_gpus.py --files 12 --drift 0.05
"""

from __future__ import annotations

import argparse

import torch
from _harness import deepseek_loads, markdown_table, start
from bench_vllm_call import drift_chain

import eplb

R, P, DEAD = 288, 32, (3, 17)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=6, help="real workloads (of 12)")
    parser.add_argument("--drift", type=float, default=0.15)
    args = parser.parse_args(argv)
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
    for k, (_, weight) in enumerate(loads):
        windows = drift_chain(weight, 3, args.drift, k)
        live = torch.ones(P, dtype=torch.bool)
        live[list(DEAD)] = False
        first = eplb.plan(windows[0], R, P, active_gpus=live)
        old = eplb.plan(windows[1], R, P, active_gpus=live, previous=first)
        for name, options in planners.items():
            new = (eplb.plan(windows[2], R, P) if options is None
                   else eplb.plan(windows[2], R, P, previous=old, **options))
            moved = float((new.phy2log != old.phy2log).float().mean())
            rows[name].append((moved, new.balancedness(windows[2].double()),
                               new.balancedness(windows[3].double())))
    table = []
    for name, values in rows.items():
        n = len(values)
        table.append([name, f"{100 * sum(v[0] for v in values) / n:.1f} %",
                      f"{sum(v[1] for v in values) / n:.4f}",
                      f"{sum(v[2] for v in values) / n:.4f}"])
    print(markdown_table(["planner", "slots moved", "in sample", "next window"], table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
