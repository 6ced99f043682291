"""Plans for GPUs of different speeds (``gpu_speed=``): balancedness in time.

A GPU of speed ``s`` finishes its load ``L`` in ``L / s``; a layer waits for its slowest
GPU, so the figure is Σ_layers (W / Σ s) / Σ_layers max_g (L_g / s_g)
(``Placement.balancedness(w, gpu_speed=...)``; 1.0 is every GPU finishing together). Per
real DeepSeek-V3 workload (MoE rows 3..60) and shape, with half the GPUs twice as fast
(the second half) and with one GPU at half speed, against the plan made for equal GPUs
scored on the same speeds, and the planning time (median of ``--repeats``).

    python benchmarks/bench_gpu_speed.py [--files N] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _harness import deepseek_loads, markdown_table, median_ms, start

import eplb

SHAPES = ((288, 32), (288, 96), (320, 64))


def speeds(kind: str, num_gpus: int) -> torch.Tensor:
    speed = torch.ones(num_gpus, dtype=torch.float64)
    if kind == "half 2x":
        speed[num_gpus // 2:] = 2.0
    else:  # one GPU at half speed
        speed[0] = 0.5
    return speed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3, help="real workloads (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (default 3)")
    args = parser.parse_args(argv)
    print(start("bench_gpu_speed"))
    loads = list(deepseek_loads().items())[: args.files]
    if not loads:
        return 0
    rows = []
    for replicas, gpus in SHAPES:
        for kind in ("half 2x", "one at 0.5"):
            speed = speeds(kind, gpus)
            aware, blind, times = [], [], []
            for _, weight in loads:
                plan = eplb.plan(weight, replicas, gpus, gpu_speed=speed)
                aware.append(plan.balancedness(weight, gpu_speed=speed))
                blind.append(eplb.plan(weight, replicas, gpus).balancedness(weight,
                                                                            gpu_speed=speed))
            times.append(median_ms(lambda w=loads[0][1], s=speed, r=replicas, p=gpus:
                                   eplb.plan(w, r, p, gpu_speed=s), args.repeats))
            rows.append([f"{replicas}/{gpus}", kind, f"{min(blind):.4f}–{max(blind):.4f}",
                         f"{min(aware):.4f}–{max(aware):.4f}",
                         f"{statistics.median(times):.1f}"])
    print(f"\n{len(loads)} real DeepSeek-V3 workloads; balancedness in time (min–max over "
          "workloads); ms: planning with speeds, first workload\n")
    print(markdown_table(["R/P", "speeds", "plan for equal GPUs", "plan with gpu_speed",
                          "ms"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
