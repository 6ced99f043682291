"""How long a plan for SGLang's nearest dispatch takes as clusters grow (GPUs and slots).

The nearest planner's node relabelling searches swaps of GPU contents between nodes; its
cost grows about as P³ where the greedy start leaves conflicts, and with the slots per
GPU too (more replicas per expert, more conflicts). SGLang's scheduler waits while it
plans, so the SGLang hook plans for the rule under ``dispatch: auto`` only up to
:data:`eplb.integrations.sglang.AUTO_NEAREST_MAX_WORK` (``P·R``, GPUs × all slots).

Generated DeepSeek-V3 loads (``generate_trace("deepseek-v3", steps=200, seed=0)``, its
first ``--layers`` layers summed over the steps), 8 GPUs a node, 8 expert groups,
``eplb.plan(..., policy="global", dispatch="nearest")``, one thread, CPU time of one
call; the last column scales it to DeepSeek-V3's 58 MoE layers (layers are planned alike
and independently, so the time is about linear in them).

    python benchmarks/bench_nearest_scale.py [--layers 8] [--shapes 64:9,128:9,...]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _harness import markdown_table, start

import eplb
from eplb.integrations.sglang import AUTO_NEAREST_MAX_WORK
from eplb.tools import generate_trace

DEFAULT_SHAPES = ("64:8,64:9,64:16,128:4,128:6,128:8,128:9,256:1,256:2,256:3,256:4,256:9,"
                  "512:2,1024:1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="GPUS:SLOTS pairs, comma-separated (8 GPUs a node)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(start("bench_nearest_scale"))
    loads = generate_trace("deepseek-v3", steps=200, seed=0).counts.sum(0)
    weight = loads[:args.layers].double()
    rows = []
    for text in args.shapes.split(","):
        gpus, slots = (int(part) for part in text.split(":"))
        replicas = gpus * slots
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (no warning is expected; none is shown)
            begin = time.thread_time()
            eplb.plan(weight, replicas, gpus, gpus // 8, 8, policy="global",
                      dispatch="nearest")
            seconds = time.thread_time() - begin
        work = gpus * replicas
        rows.append([f"{gpus} GPUs × {slots} slots (R={replicas})", work,
                     "yes" if work <= AUTO_NEAREST_MAX_WORK else "no",
                     f"{seconds:.2f}", f"{seconds * 58 / args.layers:.1f}"])
    print(f"\nNearest-dispatch plans of {args.layers} generated DeepSeek-V3 layers "
          f"(8 GPUs a node, 8 groups)\n")
    print(markdown_table(["shape", "P·R (GPUs × all slots)", "SGLang hook's auto plans for it",
                          f"s for {args.layers} layers", "s for 58 layers (scaled)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
