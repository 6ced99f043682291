"""eplb's model of SGLang's nearest dispatch against the table SGLang really builds.

With an all-to-all backend (DeepEP) SGLang 0.5.23 dispatches statically: a token arising
on GPU r goes to its expert's replica on r, else to one on r's node, else to a replica
SGLang picks for r by a "fair" random draw (``_fair_choices``: the ranks left over split
as evenly as the replicas allow, the remainder by ``random.Random(42)``). eplb scores and
plans for the *expectation* of that draw (``eplb.core.realised_gpu_loads``, and the CLI's
``--dispatch nearest``); SGLang realises one fixed draw. This script measures the gap on
real DeepSeek-V3 loads (MoE rows 3..60, R=288): each plan scored by eplb's model and by
SGLang's own table (``tests/sglang_dispatch.py`` runs SGLang's released
``expert_location.py``) on its two start-up paths, ``mapping`` (the
``--init-expert-location`` file eplb writes: every rank collapses the candidates, then
draws from its own point of the stream) and ``eplb`` (SGLang's runtime rebalancing with
eplb's hook: one table from one stream). Tokens arise evenly on the GPUs.

Shapes: 8 and 32 GPUs on one node (every replica is on the token's node: SGLang draws
for every rank without a replica), and 32 GPUs on 4 nodes. Plans: eplb's
``dispatch="nearest"`` plan (global policy; on one node, since the forty-fifth session,
planned for SGLang's runtime table: per layer the even split or counts that divide the
GPUs, so its "runtime" column reads about 1.0 where the even split read 0.980-0.991), on one node
also with ``fair="avoid"`` (the hot experts on every GPU) and per layer whichever of the
two the ranks' own draws serve better (``eplb.core.rank_draws``, the CLI's plan for an
``--init-expert-location`` file on one node; that model's figure is a column of its
own), and on 4 nodes eplb's even-split global plan and its hierarchical one (8 groups,
what vLLM's policy and SGLang's ``deepseek`` algorithm would give there). On one node
the even-split plan is scored too, and every one-node plan by eplb's model of SGLang's
runtime table as well (``eplb.core.rank_draws.split_draw_balancedness``: the ranks
without a replica dealt over the replicas, the remainder drawn; what ``fair="auto"``
chooses by), against the runtime table itself. Quality only; SGLang's table takes
seconds per plan.

    python benchmarks/bench_sglang_table.py [--files 2] [--clusters 8x1,32x1,32x4]
"""

from __future__ import annotations

import argparse
import sys

import torch
from _harness import deepseek_loads, markdown_table, start
from engines import engine_root
from sglang_dispatch import sglang_dispatch_tables

import eplb
from eplb.core import realised_gpu_loads
from eplb.core.dispatch import table_gpu_loads
from eplb.core.rank_draws import (
    plan_for_start_up_file,
    rank_draw_balancedness,
    split_draw_balancedness,
)

R, E = 288, 256
SHAPES = ((8, 1), (32, 1), (32, 4))  # (GPUs, nodes)


def balancedness(loads: torch.Tensor) -> float:
    return float(loads.mean(1).sum() / loads.amax(1).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2, help="real workloads (of 12)")
    parser.add_argument("--clusters", default=",".join(f"{g}x{n}" for g, n in SHAPES),
                        metavar="GxN[,GxN...]",
                        help="the clusters to score, GPUs x nodes (default: all three)")
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(int(part) for part in item.split("x"))
                  for item in args.clusters.split(",") if item]
    except ValueError:
        shapes = []
    if not shapes or any(shape not in SHAPES for shape in shapes):
        parser.error(f"--clusters takes some of {','.join(f'{g}x{n}' for g, n in SHAPES)}; "
                     f"got {args.clusters!r}")
    print(start("bench_sglang_table"))
    if engine_root("sglang") is None:
        sys.exit("SGLang 0.5.23 not fetched: run python scripts/fetch_engines.py")
    loads = dict(list(deepseek_loads().items())[: args.files])
    if not loads:
        return 0
    rows = []
    for name, weight in loads.items():
        for gpus, nodes in shapes:
            plans = {"eplb, dispatch nearest": eplb.plan(weight, R, gpus, nodes, 8,
                                                         policy="global", dispatch="nearest"),
                     "eplb, even split": eplb.plan(weight, R, gpus, nodes, 8, policy="global")}
            if nodes > 1:  # the plan the engines' own hierarchical policies aim at
                plans["eplb, hierarchical"] = eplb.plan(weight, R, gpus, nodes, 8,
                                                        policy="hierarchical")
            else:  # the hot experts on every GPU: no token of theirs draws
                plans["eplb, dispatch nearest, fair avoid"] = eplb.plan(
                    weight, R, gpus, nodes, 8, policy="global", dispatch="nearest", fair="avoid")
                # per layer, whichever the ranks' own draws serve better (the CLI's plan
                # for an --init-expert-location file on one node)
                plans["eplb, per layer for the file (CLI)"] = plan_for_start_up_file(
                    lambda fair, w=weight, g=gpus: eplb.plan(w, R, g, 1, 8, policy="global",
                                                             dispatch="nearest", fair=fair),
                    weight)[0]  # (the placement; then the line and the figure)
            for label, plan in plans.items():
                model = balancedness(realised_gpu_loads(weight, plan.phy2log, gpus, nodes))
                drawn = ("–" if nodes > 1
                         else f"{rank_draw_balancedness(weight, plan.phy2log, gpus):.4f}")
                runtime_model = (None if nodes > 1
                                 else split_draw_balancedness(weight, plan.phy2log, gpus))
                real = {path: balancedness(table_gpu_loads(
                            weight, sglang_dispatch_tables(plan.phy2log, E, gpus, nodes,
                                                           path=path), gpus, R))
                        for path in ("mapping", "eplb")}
                rows.append([name, f"{gpus} GPUs, {nodes} node{'s' * (nodes > 1)}", label,
                             f"{model:.4f}", drawn, f"{real['mapping']:.4f}",
                             f"{real['eplb']:.4f}", f"{real['mapping'] - model:+.4f}",
                             "–" if runtime_model is None else f"{runtime_model:.4f}",
                             "–" if runtime_model is None
                             else f"{real['eplb'] - runtime_model:+.4f}"])
                print(f"  {name} {gpus}/{nodes} {label}: done", flush=True)
    print()
    print(markdown_table(["workload", "cluster", "plan", "eplb's model (expected)",
                          "eplb's model of each rank's draw (one node)",
                          "SGLang table: init file", "SGLang table: runtime",
                          "init file − model",
                          "eplb's model of the runtime table (one node)",
                          "runtime − its model"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
