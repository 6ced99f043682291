"""Incremental-planning settings side by side: time, next-window balance, slots moved.

How the :class:`eplb.IncrementalOptions` defaults were chosen, reproducible. The protocol
is bench_vllm_call's (drifting windows, each rebalance from the planner's previous map,
the first from vLLM's initial map ``slot i → expert i % E``; steady state = rebalances
2..T), with ``eplb.plan`` called directly so that any option can vary. By default it
runs on *synthetic* DeepSeek-V3 loads (``generate_loads``, seeds 100, 101, ...; drift
seeds from 1000), not the real files the other benchmarks report: settings are chosen
here and checked there.

The first rebalance (from vLLM's initial map) is reported apart, in the last two
columns (its moves are counted against that map; the fresh plan's against the first
row's). Times are medians over every steady call of a setting, the settings interleaved call by
call so that machine noise falls on all of them alike; one thread. The last row of each
topology is a fresh plan of the same windows, timed alongside: the yardstick for
"incremental planning in no more time than a fresh plan".

    python benchmarks/bench_incremental_settings.py [--files 12] [--topology global]
        [--variants '{"steps": 6, "quota": 0.03125}; {"steps": 4, "quota": 0.046875}']
        [--real]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from _harness import deepseek_loads, markdown_table, start
from bench_vllm_call import E, P, R, add_drift_options, balancedness, drift_chain, topologies

import eplb
from eplb.core.options import IncrementalOptions, PlanOptions
from eplb.tools.generator import generate_loads

DEFAULT_VARIANTS = '{"steps": 6, "quota": 0.03125}; {}'
FRESH = "fresh plan (no previous map; moves against the first row's map)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3, help="rebalances per workload")
    parser.add_argument("--drift", type=float, default=0.15)
    parser.add_argument("--topology", choices=["all", "global", "hierarchical"], default="all")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="IncrementalOptions fields as JSON objects separated by ';' "
                             "({} = the defaults)")
    add_drift_options(parser)
    parser.add_argument("--gpus", type=int, default=P,
                        help=f"GPUs for the {R} slots (default {P}; 144 and 96 give 2 and 3 "
                             "slots per GPU)")
    parser.add_argument("--real", action="store_true",
                        help="the real DeepSeek-V3 files instead of synthetic loads")
    args = parser.parse_args(argv)
    if args.steps < 2:  # rebalance 1 is reported apart; the steady medians need one more
        parser.error(f"--steps must be at least 2 (got {args.steps}): rebalance 1, from "
                     "vLLM's initial map, is reported apart from the steady state 2..T")
    print(start("bench_incremental_settings"))
    variants = [json.loads(text) for text in args.variants.split(";") if text.strip()]
    options = [PlanOptions(incremental=IncrementalOptions(**v)) for v in variants]
    names = [json.dumps(v) if v else "defaults" for v in variants]
    if args.real:
        loads = list(deepseek_loads(torch.int64).values())[: args.files]
        if not loads:  # deepseek_loads has printed SKIPPED
            return 0
        seed = 0
    else:
        loads = [generate_loads("deepseek-v3", seed=100 + k).round().to(torch.int64)
                 for k in range(args.files)]
        seed = 1000
    rows = []
    for topo_name, groups, nodes in topologies(args.topology, args.global_groups):
        gpus = args.gpus
        topo = eplb.Topology(R, gpus, nodes, groups)
        times = {name: [] for name in [*names, FRESH]}
        scores = {name: [] for name in [*names, FRESH]}
        first = {name: [] for name in [*names, FRESH]}  # rebalance 1, from vLLM's initial map
        for i, weight in enumerate(loads):
            windows = drift_chain(weight, args.steps, args.drift, seed + i, args.group_drift)
            old = {name: torch.arange(R).remainder(E).repeat(weight.shape[0], 1)
                   for name in names}
            for t in range(args.steps):
                for name, option in zip(names, options, strict=True):
                    begin = time.perf_counter()
                    new = eplb.plan(windows[t], R, gpus, nodes, groups, previous=old[name],
                                    options=option).phy2log
                    elapsed = time.perf_counter() - begin
                    score = (balancedness(new, windows[t + 1], topo),
                             float((new != old[name]).float().mean()))
                    if t > 0:
                        times[name].append(elapsed)
                        scores[name].append(score)
                    else:
                        first[name].append(score)
                    old[name] = new
                # the yardstick: a fresh plan of the same window (no previous map)
                begin = time.perf_counter()
                fresh = eplb.plan(windows[t], R, gpus, nodes, groups).phy2log
                elapsed = time.perf_counter() - begin
                score = (balancedness(fresh, windows[t + 1], topo),
                         float((fresh != old[names[0]]).float().mean()))
                if t > 0:
                    times[FRESH].append(elapsed)
                    scores[FRESH].append(score)
                else:
                    first[FRESH].append(score)
        base = statistics.median(times[names[0]])
        for name in [*names, FRESH]:
            ms = statistics.median(times[name])
            next_window, moved = np.mean(scores[name], 0)
            first_next, first_moved = np.mean(first[name], 0)
            rows.append([topo_name, name, f"{1e3 * ms:.1f}", f"{ms / base:.2f}",
                         f"{next_window:.5f}", f"{100 * moved:.1f} %", f"{first_next:.5f}",
                         f"{100 * first_moved:.1f} %"])
    print(f"\n{'real' if args.real else 'synthetic'} loads, {len(loads)} workloads × "
          f"{args.steps} rebalances (steady state: 2..{args.steps}), R={R} on P={args.gpus}, "
          f"drift {args.drift}, "
          f"group share of the drift {args.group_drift}\n")
    print(markdown_table(["topology", "incremental options", "ms", "× first row",
                          "next window", "slots moved", "first call: next window",
                          "first call: moved"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
