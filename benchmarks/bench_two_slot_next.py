"""Two slots per GPU: does the count search's in-sample gain survive to the next window?

At ``S = 2`` eplb searches replica counts (``eplb.core.small_slots``) and gets closer to
the optimum on the window it plans on than the engines' planners (``bench_shapes.py``).
This script plans fresh on each window of a drifting chain (the real DeepSeek-V3 loads,
each expert × exp(drift·Z) per window, ``bench_vllm_call.drift_chain``) and scores every
plan on that window (in-sample) and the next one, for:

- eplb with default options;
- eplb without the count search (``PackingOptions(pair_steps=0, max_steps=0)``: the
  allocation of its portfolio with the smallest pairing max, crowded rows trimmed as
  usual, paired largest with smallest and repaired for anti-affinity);
- vLLM 0.33's ``DefaultEplbPolicy`` and SGLang 0.5.23's ``deepseek_vec`` (fetched wheels).

Balancedness: mean over every (workload, window) of Σ mean GPU load / Σ max GPU load,
an expert's load split evenly over its replicas. "Plans ahead of vLLM's": of those
(workload, window) plans, how many score above vLLM's on the next window (ties apart),
a spread for differences of a few 0.001.

    python benchmarks/bench_two_slot_next.py [--files 12] [--steps 3] [--drifts 0.02,0.05,0.15]
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np
import torch
from _harness import deepseek_loads, markdown_table, start
from bench_shapes import load_sglang_vec
from bench_vllm_call import drift_chain
from engines import FETCH_HINT, engine_root, vllm_sources

import eplb
from eplb import Placement, Topology

NO_SEARCH = eplb.PlanOptions(packing=eplb.PackingOptions(pair_steps=0, max_steps=0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=12, help="real workloads")
    parser.add_argument("--steps", type=int, default=3, help="planned windows per workload")
    parser.add_argument("--drifts", default="0.02,0.05,0.15")
    parser.add_argument("--gpus", default="144,256", help="GPUs (R = 2 per GPU)")
    args = parser.parse_args(argv)
    print(start("bench_two_slot_next"))
    loads = list(deepseek_loads(torch.int64).values())[: args.files]
    if not loads:
        return 0
    root = engine_root("vllm")
    if root is None:
        sys.exit(f"vLLM: {FETCH_HINT}")
    vec = load_sglang_vec()
    rows = []
    with vllm_sources(root) as vllm:
        for gpus in (int(g) for g in args.gpus.split(",")):
            replicas = 2 * gpus
            topo = Topology(replicas, gpus)
            planners = {
                "eplb": lambda w, r=replicas, p=gpus: eplb.plan(w, r, p).phy2log,
                "eplb, no count search": lambda w, r=replicas, p=gpus: eplb.plan(
                    w, r, p, options=NO_SEARCH).phy2log,
                "vLLM 0.33 default": lambda w, r=replicas, p=gpus: (
                    vllm.DefaultEplbPolicy.rebalance_experts(w, r, 1, 1, p, None)),
                "SGLang deepseek_vec": lambda w, r=replicas: vec.rebalance_experts(
                    w[None], r, 2, None, 1, False)[0],
            }
            for drift in (float(d) for d in args.drifts.split(",")):
                scores = {name: ([], []) for name in planners}
                for seed, weight in enumerate(loads):
                    chain = [w.to(torch.float64) for w in drift_chain(weight, args.steps,
                                                                       drift, seed)]
                    for now, after in itertools.pairwise(chain):
                        for name, plan in planners.items():
                            placement = Placement.from_phy2log(plan(now).long(),
                                                               weight.shape[1], topo)
                            scores[name][0].append(placement.balancedness(now))
                            scores[name][1].append(placement.balancedness(after))
                theirs = np.array(scores["vLLM 0.33 default"][1])
                for name, (inside, after) in scores.items():
                    after = np.array(after)
                    ahead = f"{int((after > theirs).sum())} of {len(after)}"
                    rows.append([f"58×256 S=2 P={gpus}", drift, name, f"{np.mean(inside):.4f}",
                                 f"{after.mean():.4f}", f"{after.mean() - theirs.mean():+.4f}",
                                 ahead])
    print(f"\n{len(loads)} real workloads × {args.steps} windows each, fresh plans\n")
    print(markdown_table(["shape", "drift", "planner", "in-sample", "next window",
                          "next − vLLM's", "plans ahead of vLLM's"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
