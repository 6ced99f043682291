"""Balancedness and speed of eplb.core.baselines (DeepSeek's greedy EPLB) on the real
DeepSeek-V3 loads.

Usage:
    .venv/bin/python benchmarks/bench_baseline.py [--repeats 9] [--original DIR]

Reads ``../shared/data/real/sglang_deepseek_ep_statistics/*.json`` (MoE rows 3..60) relative
to the repository root and prints a markdown table: balancedness (Σ mean / Σ max GPU load)
for the global policy (R=288, P=32) and the hierarchical policy (G=8, N=4), and the median
wall time of one ``plan_greedy`` call over ``--repeats`` runs on one thread.

``--original DIR`` (optional) imports DeepSeek's own ``eplb.py`` from DIR to check that
logcnt and every GPU load agree with it and to time it; its code is never part of this repo.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from _harness import DEEPSEEK_DIR as DATA
from _harness import REAL_DATA_HINT, start

from eplb import Placement, Topology
from eplb.core.baselines import plan_greedy

R, P, G, N = 288, 32, 8, 4


def _stacked_gpus(placement) -> int:
    """GPUs (over all layers) holding two replicas of one expert."""
    grid = placement.phy2log.view(placement.phy2log.shape[0], P, -1).sort(2).values
    return int((grid[..., 1:] == grid[..., :-1]).any(2).sum())


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _load_original(directory: str):
    spec = importlib.util.spec_from_file_location("deepseek_eplb", Path(directory) / "eplb.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import eplb.py from {directory}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--original", help="directory holding DeepSeek's eplb.py (optional)")
    args = parser.parse_args()
    print(start("bench_baseline"))
    files = sorted(DATA.glob("*.json")) if DATA.is_dir() else []
    if not files:  # the data are never in the repository: skip visibly, as every script does
        print(f"SKIPPED: real DeepSeek-V3 loads not found at {DATA} {REAL_DATA_HINT}")
        return 0
    original = _load_original(args.original) if args.original else None

    header = ("| workload | global | hierarchical | global ms | hier ms | GPUs holding an "
              "expert twice (global, all layers) |")
    if original:
        header += " original global ms | original hier ms | same logcnt & GPU loads |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    all_g, all_h, t_g, t_h = [], [], [], []
    for path in files:
        w = torch.tensor(json.loads(path.read_text())["logical_count"], dtype=torch.float64)[3:]
        glob_p = plan_greedy(w, R, P, policy="global")
        hier_p = plan_greedy(w, R, P, N, G)
        g, h = glob_p.balancedness(w), hier_p.balancedness(w)
        ms_g = _median_ms(lambda w=w: plan_greedy(w, R, P, policy="global"), args.repeats)
        ms_h = _median_ms(lambda w=w: plan_greedy(w, R, P, N, G), args.repeats)
        all_g.append(g)
        all_h.append(h)
        t_g.append(ms_g)
        t_h.append(ms_h)
        row = (f"| {path.stem} | {g:.4f} | {h:.4f} | {ms_g:.1f} | {ms_h:.1f} | "
               f"{_stacked_gpus(glob_p)} of {P * w.shape[0]} |")
        if original:
            same = True
            for ours, (groups, nodes) in ((glob_p, (1, 1)), (hier_p, (G, N))):
                phy2log, _, logcnt = original.rebalance_experts(w, R, groups, nodes, P)
                theirs = Placement.from_phy2log(phy2log, w.shape[1], Topology(R, P, nodes, groups))
                same &= torch.equal(logcnt, ours.logcnt)
                same &= torch.equal(theirs.gpu_loads(w), ours.gpu_loads(w))
            # the original is slow: time it 3 times
            og = _median_ms(lambda w=w: original.rebalance_experts(w, R, 1, 1, P), 3)
            oh = _median_ms(lambda w=w: original.rebalance_experts(w, R, G, N, P), 3)
            row += f" {og:.0f} | {oh:.0f} | {'yes' if same else 'NO'} |"
        print(row)
    print(
        f"\nrange: global {min(all_g):.4f}–{max(all_g):.4f}, hierarchical "
        f"{min(all_h):.4f}–{max(all_h):.4f}; median time global {statistics.median(t_g):.1f} ms, "
        f"hierarchical {statistics.median(t_h):.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
