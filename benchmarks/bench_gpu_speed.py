"""Plans for GPUs of different speeds (``gpu_speed=``): balancedness in time.

A GPU of speed ``s`` finishes its load ``L`` in ``L / s``; a layer waits for its slowest
GPU, so the figure is Σ_layers (W / Σ s) / Σ_layers max_g (L_g / s_g)
(``Placement.balancedness(w, gpu_speed=...)``; 1.0 is every GPU finishing together). Per
real DeepSeek-V3 workload (MoE rows 3..60) and shape, with half the GPUs twice as fast
(the second half) and with one GPU at half speed, against the plan made for equal GPUs
scored on the same speeds, and the planning time (median of ``--repeats``).

A second table takes speeds that barely differ (half the GPUs 1.01×, 1.2×, 2× as fast) on
small synthetic shapes of 3 slots per GPU (30 seeded inputs of 4 layers each, loads
``1000·u³``): in how many is the plan made with the speeds slower than the plan made for
equal GPUs, scored on the same speeds, and by how much at worst.

    python benchmarks/bench_gpu_speed.py [--files N] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _harness import deepseek_loads, markdown_table, median_ms, start

import eplb

SHAPES = ((288, 32), (288, 96), (320, 64))
#: (experts, GPUs, slots per GPU) of the close-speeds table
SMALL_SHAPES = ((16, 8, 3), (32, 16, 3), (64, 32, 3))


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
    close_speeds()
    return 0


def close_speeds(inputs: int = 30) -> None:
    """The second table (module docstring)."""
    rows = []
    for experts, gpus, slots in SMALL_SHAPES:
        for fast in (1.01, 1.2, 2.0):
            speed = torch.tensor([1.0] * (gpus // 2) + [fast] * (gpus // 2),
                                 dtype=torch.float64)
            slower, worst = 0, 1.0
            for seed in range(inputs):
                g = torch.Generator().manual_seed(seed)
                weight = torch.rand(4, experts, generator=g, dtype=torch.float64) ** 3 * 1000
                equal = eplb.plan(weight, slots * gpus, gpus).balancedness(weight,
                                                                             gpu_speed=speed)
                aware = eplb.plan(weight, slots * gpus, gpus, gpu_speed=speed).balancedness(
                    weight, gpu_speed=speed)
                slower += aware < equal - 1e-4
                worst = min(worst, aware / equal)
            rows.append([f"{experts} on {gpus}", f"{fast:g}", f"{slower} of {inputs}",
                         f"{worst:.4f}"])
    slots = "/".join(sorted({str(shape[2]) for shape in SMALL_SHAPES}))
    print(f"\nclose speeds (half the GPUs faster), {slots} slots per GPU: inputs where the "
          "plan with gpu_speed is slower than the plan for equal GPUs (by more than 1e-4), "
          "and its worst ratio\n")
    print(markdown_table(["experts on GPUs", "fast GPUs' speed", "slower", "worst ratio"],
                         rows))


if __name__ == "__main__":
    raise SystemExit(main())
