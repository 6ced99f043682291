"""Replaying a drifting trace under SGLang's nearest dispatch: balance, traffic and moves
of each policy over time.

``eplb simulate --dispatch nearest`` on several nodes reports, beside the balancedness
of every scoring window, the remote nodes per token of the plans in force (the locality
policy's co-selection model, from the window's loads and the groups:
``eplb.tools.scoring.modelled_remote_nodes``; a model, not counted tokens). This script
runs that replay for every policy on one generated DeepSeek-V3 trace (the generator's
``deepseek-v3`` preset, its drift between windows as the online benchmarks use it),
288 slots on 32 GPUs in 4 nodes, 8 groups, at SGLang's cadence (plan on the last 1000
steps every 1000, ``--eplb-rebalance-num-iterations``' default), every plan from the map
in force (``incremental``) as SGLang's runtime hook plans:

- **window bal**: mean balancedness of the scoring windows after the first rebalance,
  as SGLang's nearest rule serves them;
- **remote/token**: the modelled remote nodes per token, mean over the same windows;
- **moved**: the share of slots whose expert changes per rebalance;
- **plan ms**: median wall time of a rebalance's plan.

    python benchmarks/bench_locality_replay.py [--steps 6000] [--seed 0] [--slack 0.03]
"""

from __future__ import annotations

import argparse

from _harness import markdown_table, start

from eplb.tools.generator import generate_trace
from eplb.tools.simulate import Cadence, simulate

R, P, N, G = 288, 32, 4, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slack", type=float, default=0.03)
    args = parser.parse_args()
    print(start("bench_locality_replay"))
    trace = generate_trace("deepseek-v3", steps=args.steps, seed=args.seed)
    cluster = {"num_replicas": R, "num_gpus": P, "num_nodes": N, "num_groups": G,
               "cadence": Cadence(1000, 1000), "oracle": False}
    runs = [
        ("no rebalancing (SGLang's trivial map)", "none", {"score_dispatch": "nearest"}),
        ("DeepSeek's greedy (hierarchical), re-planned", "greedy",
         {"score_dispatch": "nearest"}),
        ("eplb hierarchical, from the map", "eplb",
         {"policy": "hierarchical", "dispatch": "nearest", "incremental": True}),
        ("eplb global for nearest, from the map", "eplb",
         {"policy": "global", "dispatch": "nearest", "incremental": True}),
        (f"eplb locality (slack {args.slack}), from the map", "eplb",
         {"policy": "locality", "dispatch": "nearest", "slack": args.slack,
          "incremental": True}),
    ]
    rows = []
    for label, planner, options in runs:
        result = simulate(trace, planner, **cluster, **options)
        s = result.summary()
        moved = s["moved_fraction"]
        rows.append([label, f"{s['window_balancedness']:.4f}",
                     f"{s['remote_nodes_per_token']:.4f}",
                     "–" if moved is None else f"{moved:.3f}",
                     "–" if s["plan_ms_median"] is None else f"{s['plan_ms_median']:.0f}"])
        print(f"  {label}: done", flush=True)
    print(f"\ngenerated deepseek-v3 trace, {args.steps} steps (seed {args.seed}); R={R}, "
          f"P={P}, N={N}, G={G}; plan on 1000 steps every 1000; scored as SGLang's nearest "
          "dispatch serves the plans\n")
    print(markdown_table(["planner", "window bal", "remote/token (model)", "moved",
                          "plan ms"], rows))


if __name__ == "__main__":
    main()
