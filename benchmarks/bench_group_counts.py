"""Hierarchical plans across expert-group and node counts: time, memory, balance.

The hierarchical policy picks each layer's group→node assignment by the bound of every
assignment where it can enumerate them (``eplb.core.bounds``): up to
``MAX_ENUMERATED_ASSIGNMENTS`` assignments and ``MAX_ENUMERATED_CONTENTS`` distinct node
contents, each bounded on every layer. Past either it assigns groups without enumerating.
Per (groups, nodes) on 58 layers × 256 experts, R = 288 (and 256) slots on 32 GPUs: eplb's
plan against DeepSeek's greedy, the median time, and the process's peak memory so far.
``--contents N`` sets the contents limit (e.g. ``--contents 100000`` for the rule before
the thirty-third session, which enumerated 16 groups on 2 nodes).

    python benchmarks/bench_group_counts.py [--contents N] [--repeats N]
"""

from __future__ import annotations

import argparse
import importlib
import resource

import torch
from _harness import REAL_DATA_HINT, deepseek_loads, markdown_table, median_ms, start

import eplb
from eplb.core import plan_greedy

#: (groups, nodes) that divide 256 experts and 32 GPUs: DeepSeek's 8 on 4 and 2, and 16 groups
SHAPES = ((4, 2), (8, 4), (8, 2), (16, 4), (16, 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contents", type=int, default=None,
                        help="MAX_ENUMERATED_CONTENTS for this run (default: the library's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (default 3)")
    args = parser.parse_args(argv)
    bounds = importlib.import_module("eplb.core.bounds")
    if args.contents is not None:
        bounds.MAX_ENUMERATED_CONTENTS = args.contents
    print(start("bench_group_counts")
          + f" (MAX_ENUMERATED_CONTENTS {bounds.MAX_ENUMERATED_CONTENTS})")
    inputs = {"random": torch.rand(58, 256, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float64) * 1000}
    real = list(deepseek_loads(torch.float64).values())
    if real:
        inputs["real DeepSeek-V3"] = real[0]
    else:
        print(f"SKIPPED the real input: the DeepSeek-V3 dumps were not found {REAL_DATA_HINT}")
    rows = []
    for name, weight in inputs.items():
        for groups, nodes in SHAPES:
            for replicas in (288, 256):
                ours = eplb.plan(weight, replicas, 32, nodes, groups).balancedness(weight)
                theirs = plan_greedy(weight, replicas, 32, nodes, groups).balancedness(weight)
                ms = median_ms(lambda w=weight, r=replicas, n=nodes, g=groups:
                               eplb.plan(w, r, 32, n, g), args.repeats)
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                enumerated = bounds.group_partitions(groups, nodes) is not None
                rows.append([name, groups, nodes, replicas, "yes" if enumerated else "no",
                             f"{ours:.5f}", f"{theirs:.5f}", f"{ms:.1f}", f"{peak:.0f}"])
    print()
    print(markdown_table(["loads", "groups", "nodes", "R", "enumerated", "eplb", "greedy",
                          "eplb ms", "peak MB so far"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
