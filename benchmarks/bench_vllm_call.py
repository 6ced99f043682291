"""eplb on vLLM's real rebalance call vs vLLM's own DefaultEplbPolicy (0.33.0 or 0.34.0).

vLLM calls its policy on every EP rank with the current map and int64 loads (its int32
load window summed over steps, which torch promotes to int64)::

    rebalance_experts(load_window.cpu(), R, num_groups, num_nodes, P, phy2log.cpu())

The first rebalance passes vLLM's initial map (slot i → expert i % E). This script
replays that call on drifting real DeepSeek-V3 loads, for both planners in one process:
vLLM's default through vLLM's released code, eplb through its plugin class as vLLM's
plugin loader registers it (``VLLM_EPLB_POLICY=eplb``), with eplb's default options
(and, as more eplb rows, an explicit ``max_moves`` of 20 % of the slots, or the shares
``--budgets`` names, and a fresh plan
through the same plugin with the map in force withheld: what incremental planning costs
over planning from scratch). Newer vLLM
trees carry a layer-batched variant of the default (``BatchedEplbPolicy``), not in the
0.33 wheel; as a stand-in for its time, eplb's own layer-batched port of the same greedy
(``eplb.core.plan_greedy``, identical placements to DeepSeek's) runs alongside.

Protocol, per real workload (MoE rows 3..60, R=288, P=32 or ``--gpus``; global G=1, N=1 and
hierarchical G=8, N=4): window 0 is the real load; window t+1 = round(window t ×
exp(drift·Z)) per expert (Z standard normal, fixed seed). Rebalance t plans on window t
from the planner's own previous map (the initial map at t=0) and is scored in-sample
(window t) and next-window (t+1). Reported separately: the first call (from the
initial map) and the steady state (t ≥ 1).

- time: median per call, one thread (ratios in the same run are what to compare);
- balancedness: Σ mean GPU load / Σ max GPU load, even split over replicas (vLLM's rule);
- moved: slots whose expert changed (vLLM preserves slot positions inside a GPU, so
  this is what its weight shuffle transfers), and the bytes at 44 MB per DeepSeek-V3
  expert (3 × 7168 × 2048 FP8 parameters): in all, the mean share of a GPU, and what
  the busiest GPU receives, with its time at 50 GB/s (every GPU copies at once, so the
  busiest sets the stall).

    python benchmarks/bench_vllm_call.py [--files N] [--steps T] [--drift 0.15] [--gpus 32]
        [--move-prices 0.01,0.02] [--synthetic]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from _harness import deepseek_loads, markdown_table, start
from engines import ENGINES, FETCH_HINT, VLLM_RELEASES, engine_root, vllm_sources

from eplb import Placement, Topology
from eplb.core import plan_greedy
from eplb.integrations import vllm as plugin
from eplb.tools.generator import generate_loads

R, P, E = 288, 32, 256
EXPERT_BYTES = 3 * 7168 * 2048  # FP8 DeepSeek-V3 routed expert
LINK_BYTES_PER_S = 50e9
TOPOLOGIES = {"global (G=1, N=1)": (1, 1), "hierarchical (G=8, N=4)": (8, 4)}


def add_drift_options(parser: argparse.ArgumentParser) -> None:
    """``--group-drift`` and ``--global-groups``, shared with bench_incremental_settings."""
    parser.add_argument("--group-drift", type=float, default=0.0, metavar="RHO",
                        help="share of each expert's drift common to its group of 32 "
                             "(0, the default: i.i.d. per expert)")
    parser.add_argument("--global-groups", type=int, default=1, metavar="G",
                        help="groups the one-node call names (vLLM passes the model's "
                             "n_group, 8 for DeepSeek-V3)")


def topologies(which: str, global_groups: int) -> list[tuple[str, int, int]]:
    """``(name, groups, nodes)`` of the topologies ``--topology`` selects, the one-node
    call naming ``global_groups`` groups."""
    out = []
    for name, (groups, nodes) in TOPOLOGIES.items():
        if which != "all" and not name.startswith(which):
            continue
        if nodes == 1 and global_groups != groups:
            groups, name = global_groups, f"global (G={global_groups}, N=1)"
        out.append((name, groups, nodes))
    return out


def drift_chain(
    weight: torch.Tensor, steps: int, drift: float, seed: int, group_share: float = 0.0,
    groups: int = 8,
) -> list[torch.Tensor]:
    """``steps + 1`` int32 windows: the real one, then each times exp(drift·Z) per expert.

    With ``group_share`` ρ > 0, ``Z = sqrt(1 − ρ)·Z_expert + sqrt(ρ)·Z_group``: that share
    of each expert's log-change is common to its group of ``E / groups`` consecutive
    experts (DeepSeek-V3's 8 groups of 32). ρ = 0 draws exactly the i.i.d. chain."""
    gen = torch.Generator().manual_seed(seed)
    out = [weight.to(torch.int32)]
    current = weight.to(torch.float64)
    for _ in range(steps):
        noise = torch.randn(current.shape, generator=gen, dtype=torch.float64)
        if group_share > 0:
            common = torch.randn(current.shape[0], groups, generator=gen, dtype=torch.float64)
            noise = ((1 - group_share) ** 0.5 * noise
                     + group_share**0.5 * common.repeat_interleave(current.shape[1] // groups, 1))
        current = torch.round(current * torch.exp(drift * noise))
        out.append(current.to(torch.int32))
    return out


def packing_batched_over_layers(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, ...]:
    """DeepSeek's greedy packing (heaviest item to the lightest pack with room, first pack
    on ties) of every row of ``weight [X, n]`` at once, in NumPy: one step per item for
    all rows, the items in the order vLLM's ``DefaultEplbPolicy.balanced_packing`` sorts
    them. Returns ``(pack_index [X, n], rank_in_pack [X, n])``, as vLLM's does."""
    rows, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        index = np.tile(np.arange(items, dtype=np.int64), (rows, 1))
        return index, np.zeros_like(index)
    order = np.argsort(-weight, axis=-1)  # the sort vLLM's default runs per row
    row = np.arange(rows)
    load = np.zeros((rows, num_packs))
    count = np.zeros((rows, num_packs), np.int64)
    pack_index = np.empty((rows, items), np.int64)
    rank_in_pack = np.empty((rows, items), np.int64)
    for k in range(items):
        item = order[:, k]
        pack = np.where(count < per_pack, load, np.inf).argmin(1)
        pack_index[row, item] = pack
        rank_in_pack[row, item] = count[row, pack]
        load[row, pack] += weight[row, item]
        count[row, pack] += 1
    return pack_index, rank_in_pack


def balancedness(phy2log: torch.Tensor, weight: torch.Tensor, topo: Topology) -> float:
    return Placement.from_phy2log(phy2log, weight.shape[1], topo).balancedness(weight)


def run(policy, windows, groups, nodes, repeats, replicas: int = R,
        gpus: int = P) -> list[dict]:
    """Replay the rebalances of one workload; one record per rebalance (the shape is
    DeepSeek-V3's on 32 GPUs unless ``replicas``/``gpus`` say otherwise)."""
    topo = Topology(replicas, gpus, nodes, groups)
    experts = windows[0].shape[1]
    old = torch.arange(replicas).remainder(experts).repeat(windows[0].shape[0], 1)  # vLLM's
    records = []
    # the dtype vLLM passes: eplb_state sums its int32 window over steps (torch: int64)
    loads = [window.to(torch.int64) for window in windows]
    for t in range(len(windows) - 1):
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            new = policy.rebalance_experts(loads[t], replicas, groups, nodes, gpus,
                                           old.clone())
            times.append(time.perf_counter() - begin)
        changed = new != old
        moved = int(changed.sum())
        # every GPU copies at once: the one that receives the most sets the stall
        busiest = int(changed.view(changed.shape[0], gpus, -1).sum((0, 2)).amax())
        records.append({
            "t": t, "ms": 1e3 * statistics.median(times), "moved": moved, "busiest": busiest,
            "moved_frac": moved / new.numel(),
            "in": balancedness(new, windows[t], topo),
            "next": balancedness(new, windows[t + 1], topo),
        })
        old = new
    return records


def summarise(records: list[dict]) -> dict:
    return {
        "ms": statistics.median(r["ms"] for r in records),
        "in": float(np.mean([r["in"] for r in records])),
        "next": float(np.mean([r["next"] for r in records])),
        "moved_frac": float(np.mean([r["moved_frac"] for r in records])),
        "moved": float(np.mean([r["moved"] for r in records])),
        "busiest": float(np.mean([r["busiest"] for r in records])),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=12, help="how many real workloads")
    parser.add_argument("--steps", type=int, default=4, help="rebalances per workload")
    parser.add_argument("--drift", type=float, default=0.15)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per rebalance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpus", type=int, default=P,
                        help=f"GPUs sharing the {R} slots (default {P}, the issue's protocol; "
                             "144: two slots per GPU, 96: three)")
    parser.add_argument("--topology", choices=["all", "global", "hierarchical"], default="all")
    parser.add_argument("--synthetic", action="store_true",
                        help="synthetic DeepSeek-V3 loads (eplb's generator, seeds 100, 101, "
                             "...) instead of the real files: for choosing settings on data "
                             "the reported figures do not use")
    releases = {ENGINES[key].version: key for key in VLLM_RELEASES}
    parser.add_argument("--vllm", choices=sorted(releases), default=ENGINES["vllm"].version,
                        help="the vLLM release whose DefaultEplbPolicy and plugin loader run "
                             "(policy/default.py is the same file in 0.33.0 and 0.34.0)")
    add_drift_options(parser)
    parser.add_argument("--move-prices", default="", metavar="X[,X...]",
                        help="extra eplb rows with these move_price options (the trade-off "
                             "between slots moved and next-window balance; default 0.01)")
    parser.add_argument("--budgets", default="0.2", metavar="F[,F...]",
                        help="eplb rows with an explicit max_moves of these shares of all "
                             "slots (default 0.2; '' for none)")
    args = parser.parse_args(argv)
    try:
        budget_shares = [float(share) for share in args.budgets.split(",") if share]
    except ValueError:
        parser.error(f"--budgets takes shares of the slots, e.g. 0.1,0.2; got {args.budgets!r}")
    if any(not 0 <= share <= 1 for share in budget_shares):
        parser.error(f"--budgets shares must lie in [0, 1]; got {args.budgets!r}")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    if args.gpus < 1 or R % args.gpus:
        parser.error(f"--gpus must divide the {R} slots")
    if args.gpus % 4 and args.topology != "global":
        parser.error("--gpus must be a multiple of the hierarchical topology's 4 nodes "
                     "(or pass --topology global)")
    # the first call only with one rebalance per workload: no steady state to report
    phases = ("first", "steady") if args.steps > 1 else ("first",)
    print(start("bench_vllm_call"))
    root = engine_root(releases[args.vllm])
    if root is None:
        sys.exit(f"vLLM {args.vllm}: {FETCH_HINT}")
    if args.synthetic:
        loads = {f"synthetic seed {100 + k}": generate_loads("deepseek-v3", seed=100 + k)
                 .round().to(torch.int64) for k in range(args.files)}
    else:
        loads = dict(list(deepseek_loads(torch.int64).items())[: args.files])
    if not loads:
        return 0
    os.environ[plugin.ENV_VAR] = "eplb"
    with vllm_sources(root) as vllm:
        vllm.plugins.load_general_plugins()  # vLLM's own loader runs our entry point
        ours = vllm.EPLB_POLICIES["default"]
        if not issubclass(ours, plugin.EplbPolicy):
            sys.exit("the eplb plugin did not register through vLLM's plugin loader")

        class Fresh(ours):  # eplb through the same plugin, the map in force withheld
            @classmethod
            def rebalance_experts(cls, weight, replicas, groups, nodes, ranks, old=None):
                return super().rebalance_experts(weight, replicas, groups, nodes, ranks, None)

        class BatchedGreedy:  # DeepSeek's greedy vectorized over layers (no old map used)
            @staticmethod
            def rebalance_experts(weight, replicas, groups, nodes, ranks, old=None):
                return plan_greedy(weight, replicas, ranks, nodes, groups).phy2log

        class BatchedPacking(vllm.DefaultEplbPolicy):
            """vLLM's own DefaultEplbPolicy (its replication, hierarchy and slot-keeping)
            with only ``balanced_packing`` batched over layers, as the BatchedEplbPolicy of
            vLLM's main tree is (not in a released wheel); the batched packing is
            :func:`packing_batched_over_layers`, written here (the same packs)."""

            @classmethod
            def balanced_packing(cls, weight, num_packs):
                return packing_batched_over_layers(weight, num_packs)

        vllm_default = f"vLLM {args.vllm.rsplit('.', 1)[0]} default"  # "vLLM 0.33 default"
        planners = {vllm_default: vllm.DefaultEplbPolicy,
                    "DeepSeek greedy, layer-batched": BatchedGreedy,
                    f"{vllm_default}, packing batched": BatchedPacking,
                    "eplb (defaults)": ours}
        for share in budget_shares:  # eplb with an explicit budget: a share of all slots
            planners[f"eplb, max_moves {100 * share:g} %"] = type(
                f"Budget{share}", (ours,), {"options": {"max_moves": int(share * R * 58)}})
        planners["eplb, fresh plan (map withheld)"] = Fresh
        for price in filter(None, args.move_prices.split(",")):
            priced = type(f"Price{price}", (ours,), {"options": {"move_price": float(price)}})
            planners[f"eplb, move_price {price}"] = priced
        rows = []
        for topo_name, groups, nodes in topologies(args.topology, args.global_groups):
            results: dict[str, dict[str, list]] = {name: {"first": [], "steady": []}
                                                  for name in planners}
            for i, weight in enumerate(loads.values()):
                windows = drift_chain(weight, args.steps, args.drift, args.seed + i,
                                      args.group_drift)
                for name, policy in planners.items():
                    for record in run(policy, windows, groups, nodes, args.repeats,
                                      gpus=args.gpus):
                        results[name]["first" if record["t"] == 0 else "steady"].append(record)
            base = {phase: summarise(results[vllm_default][phase]) for phase in phases}
            for name in planners:
                for phase in phases:
                    s = summarise(results[name][phase])
                    gb = s["moved"] * EXPERT_BYTES / 1e9  # into the cluster, per rebalance
                    per_gpu = gb / args.gpus  # the mean share
                    busiest = s["busiest"] * EXPERT_BYTES / 1e9  # what sets the stall
                    rows.append([
                        topo_name, phase, name, f"{s['ms']:.1f}",
                        f"{s['ms'] / base[phase]['ms']:.2f}", f"{s['in']:.4f}",
                        f"{s['next']:.4f}", f"{s['next'] - base[phase]['next']:+.4f}",
                        f"{100 * s['moved_frac']:.1f} %",
                        f"{s['moved_frac'] / max(base[phase]['moved_frac'], 1e-12):.2f}",
                        f"{gb:.0f} GB ({per_gpu:.1f} GB per GPU, the busiest {busiest:.1f}: "
                        f"{busiest * 1e9 / LINK_BYTES_PER_S:.2f} s at 50 GB/s)",
                    ])
    print(f"\n{len(loads)} workloads × {args.steps} rebalances, R={R}, P={args.gpus}, "
          f"drift {args.drift} "
          f"(group share {args.group_drift}), {args.repeats} timed calls each\n")
    print(markdown_table(
        ["topology", "call", "planner", "ms", "× vLLM time", "in-sample", "next window",
         "next − vLLM", "slots moved", "× vLLM moves",
         "weights moved per rebalance (44 MB per expert)"],
        rows,
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
