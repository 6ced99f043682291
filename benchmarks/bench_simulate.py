"""Replay a drifting DeepSeek-V3 trace under vLLM's cadence: balance and weights moved.

vLLM's defaults: record 1000 steps, rebalance every 3000 steps. The trace is
``eplb.tools.generator.generate_trace("deepseek-v3", steps, regime=...)`` (58 MoE layers x 256
experts, 4096 tokens x top-8 per step), at R=288 slots on P=32 GPUs on one node (global
placement); the call names DeepSeek-V3's 8 expert groups as vLLM's does (``--groups 1``:
none, the protocol before 2026-12-02). Planners: eplb from scratch, eplb incremental
(``previous=`` the plan in force), DeepSeek's greedy, and none (the static trivial
placement). Every rebalance's plan is scored on the following scoring window (3000
steps) against the oracle (the same planner on that window). Moved bytes use
DeepSeek-V3's fp8 expert size (44 MB).

Also times the replay itself (scoring every step) for the "none" planner: the median of
``--repeats`` runs.

Usage:
    .venv/bin/python benchmarks/bench_simulate.py [--steps 10000] [--regime config]
        [--repeats 3] [--groups 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _harness import add_output_options, refuse_existing_outputs, start, write_output

from eplb import Placement, Topology
from eplb.tools.generator import generate_trace
from eplb.tools.simulate import Cadence, simulate

TOPO = {"num_replicas": 288, "num_gpus": 32}
PLANNERS = {
    "none": {"planner": "none"},
    "greedy": {"planner": "greedy"},
    "eplb (scratch)": {"planner": "eplb"},
    "eplb (incremental)": {"planner": "eplb", "incremental": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--regime", default="config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--interval", type=int, default=3000)
    parser.add_argument("--groups", type=int, default=8,
                        help="expert groups the planner is told (vLLM passes the model's "
                             "n_group: 8 for DeepSeek-V3)")
    parser.add_argument("--json", type=Path)
    add_output_options(parser, "json")
    args = parser.parse_args()
    refuse_existing_outputs(args)
    topo = {**TOPO, "num_groups": args.groups}
    print(start("bench_simulate"))
    cadence = Cadence(args.window, args.interval)

    t0 = time.perf_counter()
    trace = generate_trace("deepseek-v3", steps=args.steps, seed=args.seed, regime=args.regime)
    counts = trace.counts.to(torch.float32)  # integer counts: exact in float32, half the memory
    del trace
    print(f"generated {tuple(counts.shape)} in {time.perf_counter() - t0:.0f} s", flush=True)

    replay = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        simulate(counts, "none", cadence=cadence, oracle=False, **topo)
        replay.append(time.perf_counter() - t)
    print(f"replay+scoring of {args.steps} steps (planner none): median "
          f"{statistics.median(replay):.2f} s over {args.repeats} runs", flush=True)

    out = {"steps": args.steps, "regime": args.regime, "replay_seconds": replay, "rows": {}}
    slots = counts.shape[1] * topo["num_replicas"]
    lines = [f"| planner | rebalance step | moved slots (of {slots}) | moved GB | plan ms | "
             "next-window balancedness | oracle |", "|---|---|---|---|---|---|---|"]
    summary = ["| planner | mean window balancedness (planned) | mean step balancedness | "
               "oracle | moved slots / rebalance | GB / rebalance |",
               "|---|---|---|---|---|---|"]
    for name, kwargs in PLANNERS.items():
        try:
            res = simulate(counts, cadence=cadence, **topo, **kwargs)
        except (ImportError, NotImplementedError) as exc:  # incremental planning not there yet
            print(f"SKIP {name}: {type(exc).__name__}: {exc}", flush=True)
            continue
        s = res.summary()
        out["rows"][name] = res.to_dict() | {"step_balancedness": None}
        starts = res.window_starts.tolist()
        for k, step in enumerate(res.rebalance_steps.tolist()):
            w = starts.index(step) if step in starts else None
            nxt = f"{res.window_balancedness[w]:.4f}" if w is not None else "-"
            orc = (f"{res.oracle_balancedness[w]:.4f}"
                   if w is not None and res.oracle_balancedness is not None else "-")
            moved = int(res.moved_slots[k].sum())
            lines.append(f"| {name} | {step} | {moved} | {moved * res.expert_bytes / 1e9:.1f} | "
                         f"{res.plan_seconds[k] * 1e3:.1f} | {nxt} | {orc} |")
        def cell(value: float | None, spec: str) -> str:
            return "–" if value is None else format(value, spec)

        summary.append(
            f"| {name} | {cell(s['window_balancedness'], '.4f')} | "
            f"{cell(s['step_balancedness'], '.4f')} | {cell(s['oracle_balancedness'], '.4f')} | "
            f"{cell(s['moved_slots_per_rebalance'], '.0f')} | "
            f"{cell(s['moved_gb_per_rebalance'], '.1f')} |")
        print(f"{name}: {s}", flush=True)
    # the trivial map (slot i -> expert i % E) on the steps before the first rebalance
    trivial = Placement.from_phy2log(
        torch.arange(topo["num_replicas"]).remainder(counts.shape[2]).repeat(counts.shape[1], 1),
        counts.shape[2], Topology(topo["num_replicas"], topo["num_gpus"],
                                  num_groups=topo["num_groups"]))
    first = trivial.balancedness(counts[: args.interval].sum(0).to(torch.float64))
    print(f"\ninitial trivial placement on steps 0-{args.interval}: window balancedness "
          f"{first:.4f}")
    print("\n" + "\n".join(lines) + "\n\n" + "\n".join(summary))
    if args.json:
        write_output(args.json, json.dumps(out, indent=1), args.force)


if __name__ == "__main__":
    main()
