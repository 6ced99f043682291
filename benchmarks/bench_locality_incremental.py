"""Re-plans under the locality policy from the map in force: moves against balance and traffic.

Every rebalance of SGLang's runtime hook with ``policy: locality`` (or ``eplb plan
--policy locality --previous``) plans from the map in force. Before the fifty-fifth
session that was a fresh locality plan relabelled onto the old GPUs in every layer
("re-plan"); now each layer keeps the map in force, re-packs inside its nodes, or takes
the fresh plan, whichever pays (``eplb.online.locality``, "default"). Both run here on
the same chains, the re-plan by patching the choice out of the same code.

Real DeepSeek-V3 loads (the 12 SGLang dumps, MoE rows 3..60), 288 slots on 32 GPUs in 4
nodes, 8 groups, slack 0.03. Per file: window 0 is the real load, each later window the
one before × exp(drift·Z) per expert (``bench_vllm_call.drift_chain``); window 0 is
planned fresh, then each of ``--steps`` rebalances plans window k from the map of the
rebalance before, and is scored in sample (window k) and on the next window (k + 1):

- **bal**: Σ mean / Σ max GPU load over the layers, loads as SGLang's nearest rule
  realises them (``eplb.core.dispatch.realised_gpu_loads``);
- **remote**: expected distinct remote nodes per token (the co-selection model the
  policy plans with, from the loads and the groups:
  ``eplb.core.dispatch.remote_nodes_by_node``; a model estimate, not sampled tokens);
- **moved**: the share of slots whose expert changes; **across nodes**: the share of
  slots that receive an expert their node did not hold (weights over the network, the
  rest are copies inside a node);
- **ms**: CPU time of the call, median over the calls.

    python benchmarks/bench_locality_incremental.py [--files 12] [--steps 2]
        [--drifts 0.05,0.15] [--budget 0.1]

``--budget`` adds the default with a total ``max_moves`` of that share of all slots.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _harness import deepseek_loads, markdown_table, start
from bench_vllm_call import drift_chain

import eplb
import eplb.core.planner
import eplb.online.incremental as incremental
from eplb.core.dispatch import realised_gpu_loads, remote_nodes_by_node
from eplb.online.locality import co_selection

R, P, N, G = 288, 32, 4, 8
KW = {"policy": "locality", "dispatch": "nearest", "slack": 0.03}


def score(weight: torch.Tensor, phy2log: torch.Tensor) -> tuple[float, float]:
    """(balancedness under the nearest rule, remote nodes per token) of ``phy2log
    [L, R]`` on ``weight [L, E]``."""
    w = weight.to(torch.float64)
    loads = realised_gpu_loads(w, phy2log, P, N, "nearest", check=False)
    bal = float(loads.mean(1).sum() / loads.amax(1).sum())
    freq, pair_times = co_selection(eplb.core.planner.make_request(w, R, P, N, G, **KW))
    return bal, float(remote_nodes_by_node(phy2log, freq, pair_times, N).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--drifts", default="0.05,0.15")
    parser.add_argument("--budget", type=float, default=0.1,
                        help="also a total max_moves of this share of the slots (0: none)")
    args = parser.parse_args()
    print(start("bench_locality_incremental"))
    loads = deepseek_loads(torch.int64)
    if not loads:
        return
    names = sorted(loads)[: args.files]
    keep = incremental.plan_locality_incremental
    layers = next(iter(loads.values())).shape[0]  # 58 MoE rows
    budget = {"max_moves": round(args.budget * R * layers)} if args.budget else {}
    variants = {"re-plan (before)": (lambda request, old, out, *_: out, {}),
                "default": (keep, {})}
    if budget:
        variants[f"max_moves {args.budget:.0%} of the slots"] = (keep, budget)
    rows = []
    for drift in (float(d) for d in args.drifts.split(",")):
        for label, (choose, extra) in variants.items():
            incremental.plan_locality_incremental = choose
            cells: dict[str, list[float]] = {k: [] for k in (
                "moved", "across", "bal_in", "bal_next", "rem_in", "rem_next", "ms")}
            try:
                for name in names:
                    windows = drift_chain(loads[name], args.steps + 1, drift, 0)
                    phy = eplb.plan(windows[0].long(), R, P, N, G, **KW).phy2log
                    for k in range(1, args.steps + 1):
                        begin = time.process_time()
                        placed = eplb.plan(windows[k].long(), R, P, N, G, previous=phy.clone(),
                                           **KW, **extra)
                        new = placed.phy2log
                        cells["ms"].append(1e3 * (time.process_time() - begin))
                        cells["moved"].append(float((new != phy).float().mean()))
                        cells["across"].append(
                            float(placed.moved_slots(phy, across_nodes=True).sum()) / new.numel())
                        bal_in, rem_in = score(windows[k], new)
                        bal_next, rem_next = score(windows[k + 1], new)
                        for key, value in (("bal_in", bal_in), ("bal_next", bal_next),
                                           ("rem_in", rem_in), ("rem_next", rem_next)):
                            cells[key].append(value)
                        phy = new
            finally:
                incremental.plan_locality_incremental = keep
            mean = {key: statistics.fmean(values) for key, values in cells.items()}
            rows.append([drift, label, f"{mean['moved']:.3f}", f"{mean['across']:.3f}",
                         f"{mean['bal_in']:.4f}", f"{mean['bal_next']:.4f}",
                         f"{mean['rem_in']:.4f}", f"{mean['rem_next']:.4f}",
                         f"{statistics.median(cells['ms']):.0f}"])
            print(f"  drift {drift} {label}: done", flush=True)
    print(f"\n{len(names)} files × {args.steps} rebalances per drift; means over the "
          "rebalances (ms: median)\n")
    print(markdown_table(["drift", "rule", "moved", "across nodes", "bal in sample",
                          "bal next", "remote in sample", "remote next", "ms"], rows))


if __name__ == "__main__":
    main()
