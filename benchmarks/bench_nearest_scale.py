"""How long a plan for SGLang's nearest dispatch takes as clusters grow (GPUs and slots).

The nearest planner's node relabelling searches swaps of GPU contents between nodes; its
cost grows about as P³ where the greedy start leaves conflicts, and with the slots per
GPU too (more replicas per expert, more conflicts). SGLang's scheduler waits while it
plans, so the SGLang hook plans for the rule under ``dispatch: auto`` only up to
:data:`eplb.integrations.sglang.AUTO_NEAREST_MAX_WORK` (``P·R²/E``, GPUs × all slots
× replicas per expert, :func:`eplb.core.dispatch_plan.nearest_work`).

Generated DeepSeek-V3 loads (``generate_trace("deepseek-v3", steps=200, seed=0)``, its
first ``--layers`` layers summed over the steps), 8 GPUs a node, 8 expert groups,
``eplb.plan(..., policy="global", dispatch="nearest")``, one thread, CPU time of one
call; the last column scales it to DeepSeek-V3's 58 MoE layers (layers are planned alike
and independently, so the time is about linear in them).

``--policy locality`` times the balance-vs-traffic policy instead (8 groups, so at most 8
nodes: ``--nodes 8``), and ``--real`` takes the real DeepSeek-V3 file
``decode_in1800out100`` (its first ``--layers`` MoE layers) instead of generated loads.
``--experts E`` generates DeepSeek-V3-like loads of ``E`` experts instead
(``generate_trace("deepseek-v3", steps=200, seed=0, num_experts=E,
num_layers=--layers)``), and ``--groups G`` names ``G`` expert groups instead of 8:
the locality policy's searches grow with the nodes and experts too.

    python benchmarks/bench_nearest_scale.py [--layers 8] [--shapes 64:9,128:9,...]
        [--policy global|locality] [--nodes N] [--real | --experts E] [--groups G]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from _harness import DEEPSEEK_DIR, markdown_table, start

import eplb
from eplb.core.dispatch_plan import nearest_work
from eplb.integrations.sglang import AUTO_NEAREST_MAX_WORK
from eplb.tools import generate_trace

DEFAULT_SHAPES = ("64:8,64:9,64:16,128:4,128:6,128:8,128:9,256:1,256:2,256:3,256:4,256:9,"
                  "512:2,1024:1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="GPUS:SLOTS pairs, comma-separated (8 GPUs a node)")
    parser.add_argument("--policy", choices=["global", "locality"], default="global")
    parser.add_argument("--nodes", type=int, default=None,
                        help="nodes (default: 8 GPUs a node)")
    parser.add_argument("--real", action="store_true",
                        help="the real decode_in1800out100 file instead of generated loads")
    parser.add_argument("--experts", type=int, default=None,
                        help="generated loads of this many experts (default: DeepSeek-V3's 256)")
    parser.add_argument("--groups", type=int, default=8, help="expert groups (default 8)")
    args = parser.parse_args(argv)
    if args.real and args.experts is not None:
        parser.error("--real and --experts exclude each other: the real file has 256 experts")
    torch.set_num_threads(1)
    print(start("bench_nearest_scale"))
    if args.real:
        path = DEEPSEEK_DIR / "decode_in1800out100.json"
        if not path.is_file():
            print(f"SKIPPED: real DeepSeek-V3 loads not found at {path} (set EPLB_REAL_DATA)")
            return 0
        loads = torch.tensor(json.loads(path.read_text())["logical_count"])[3:]
    elif args.experts is not None:
        loads = generate_trace("deepseek-v3", steps=200, seed=0, num_experts=args.experts,
                               num_layers=args.layers).counts.sum(0)
    else:
        loads = generate_trace("deepseek-v3", steps=200, seed=0).counts.sum(0)
    weight = loads[:args.layers].double()
    rows = []
    for text in args.shapes.split(","):
        gpus, slots = (int(part) for part in text.split(":"))
        replicas = gpus * slots
        work = nearest_work(gpus, slots, weight.shape[1])
        auto = "yes" if work <= AUTO_NEAREST_MAX_WORK else "no"
        shape = [f"{gpus} GPUs × {slots} slots (R={replicas})", work,
                 auto if args.policy == "global" else "–"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (no warning is expected; none is shown)
            begin = time.thread_time()
            try:
                eplb.plan(weight, replicas, gpus, args.nodes or gpus // 8, args.groups,
                          policy=args.policy, dispatch="nearest")
            except ValueError:  # beyond the size eplb plans for
                rows.append([*shape, "refused", "–"])
                continue
            seconds = time.thread_time() - begin
        rows.append([*shape, f"{seconds:.2f}", f"{seconds * 58 / args.layers:.1f}"])
    where = f"{args.nodes} nodes" if args.nodes else "8 GPUs a node"
    print(f"\n{args.policy.capitalize()} plans for the nearest dispatch of {args.layers} "
          f"{'real' if args.real else 'generated'} DeepSeek-V3 layers of {weight.shape[1]} "
          f"experts ({where}, {args.groups} groups)\n")
    print(markdown_table(["shape", "P·R²/E", "SGLang hook's auto plans for it",
                          f"s for {args.layers} layers", "s for 58 layers (scaled)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
