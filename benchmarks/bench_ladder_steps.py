"""The warm-start ladder's steps at 4–8 slots per GPU, on eplb's generated traces.

``IncrementalOptions.steps_for`` gives the ladder ``ceil(45 / S) − 1`` steps between 4
and 8 slots per GPU under the even split (11 at 4, 8 at 5), where 4 steps were the rule
before. This script replays generated DeepSeek-V3 traffic (``eplb.tools.generate_trace``,
whose drift persists across windows, unlike the i.i.d. drift of
``bench_vllm_robustness.py``) at vLLM's cadence (plans on a 1000-step window every 3000
steps), from a good plan of the first 1000 steps, for:

- vLLM 0.33's released ``DefaultEplbPolicy`` on vLLM's call (from scratch every time);
- eplb incremental, no budget, with 4 ladder steps forced (``IncrementalOptions(steps=4)``);
- eplb incremental, no budget, default options (the automatic steps).

Reported per run: next-window balancedness (each plan scored on the traffic after it
took over), the share of slots moved per rebalance, the median plan time (one thread).

    python benchmarks/bench_ladder_steps.py [--shapes 288:72,320:64] [--seeds 0,1,2]
        [--steps 12000]
"""

from __future__ import annotations

import argparse

from _harness import markdown_table, start, vllm_planner
from engines import FETCH_HINT, engine_root, vllm_sources

import eplb
from eplb.tools import generate_trace
from eplb.tools.simulate import simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="288:72,320:64",
                        help="R:P pairs, comma-separated (default 288:72,320:64)")
    parser.add_argument("--seeds", default="0,1,2", help="trace seeds, comma-separated")
    parser.add_argument("--steps", type=int, default=12000, help="trace steps")
    args = parser.parse_args(argv)
    print(start("bench_ladder_steps"))
    root = engine_root("vllm")
    if root is None:
        print(f"SKIPPED: vLLM 0.33.0 {FETCH_HINT}")
        return 0
    four = eplb.PlanOptions(incremental=eplb.IncrementalOptions(steps=4))
    rows = []
    with vllm_sources(root) as vllm:
        for shape in args.shapes.split(","):
            replicas, gpus = (int(v) for v in shape.split(":"))
            steps = eplb.IncrementalOptions().steps_for(replicas // gpus)
            for seed in (int(s) for s in args.seeds.split(",")):
                trace = generate_trace("deepseek-v3", steps=args.steps, seed=seed)
                initial = eplb.plan(trace.counts[:1000].sum(0), replicas, gpus)
                runs = [
                    ("vLLM 0.33 default", dict(
                        planner=vllm_planner(vllm.DefaultEplbPolicy, replicas, gpus))),
                    ("eplb, 4 steps", dict(planner="eplb", incremental=True, options=four)),
                    (f"eplb, defaults ({steps} steps)", dict(planner="eplb", incremental=True)),
                ]
                for label, kwargs in runs:
                    summary = simulate(trace, num_replicas=replicas, num_gpus=gpus,
                                       cadence="vllm", oracle=False, initial=initial,
                                       **kwargs).summary()
                    rows.append([f"R={replicas} P={gpus} (S={replicas // gpus})", seed, label,
                                 f"{summary['window_balancedness']:.4f}",
                                 f"{100 * summary['moved_fraction']:.1f} %",
                                 f"{summary['plan_ms_median']:.0f}"])
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print(markdown_table(["shape", "seed", "planner", "next window", "slots moved",
                          "plan ms (median)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
