"""eplb on vLLM's real call away from the headline protocol: where its next-window claim
holds, and where it does not.

``bench_vllm_call.py`` measures the issue's protocol: real DeepSeek-V3 loads, each expert
× exp(0.15·Z) per window, i.i.d. This script replays the same call (both planners start
from vLLM's initial map ``slot i → expert i % E`` and then plan from their own previous
map; int64 loads, as vLLM passes them; eplb through its vLLM plugin class with default
options, vLLM 0.33's ``DefaultEplbPolicy`` from the fetched wheel) under other
conditions, each a scenario:

- ``headline``: the issue's protocol (bench_vllm_call with ``--steps`` rebalances per
  workload; vLLM 0.33's policy, the same file as 0.34's);
- ``drift 0.05`` / ``drift 0.3``: weaker or stronger drift than eplb's default assumption
  (``IncrementalOptions.drift = 0.2``);
- ``group drift ρ``: a share ρ of each expert's log-change common to its group of 32
  consecutive ids (0.09 is the share measured between the real workloads, BENCHMARKS.md
  §3), on the one-node call naming one group (what vLLM passes for a model without expert
  groups) and naming DeepSeek-V3's 8 (what vLLM passes for it);
- ``alternating``: windows alternating between a prefill workload and the decode workload
  of the same request shape (4 such pairs), each × exp(0.15·Z);
- ``S=2`` / ``S=3``: 288 slots on 144 or 96 GPUs (2 or 3 slots per GPU); S = 2 also at
  drift 0.05 and 0.3, S = 3 at 0.05; ``S=4``: 288 slots on 72 GPUs (one GB200 NVL72
  rack); ``S=5``: 320 slots on 64 GPUs; ``S=6`` and ``S=8``: 288 slots on 48 and 36
  GPUs; ``S=17``: 272 slots
  on 16 GPUs, also at drift 0.3 (the move price follows the slots per GPU, so these
  shapes price a move otherwise than the headline's 9);
- ``qwen3`` / ``kimi``: synthetic loads of other models' shapes (eplb's generator), 94×128
  on R=160, P=32 and 61×384 on R=512, P=64.

Reported per scenario and topology, over the scored calls of all workloads (by default
every rebalance after the one from vLLM's initial map; ``--steady-from`` starts later):
eplb's next-window balancedness minus vLLM's (pooled mean, the worst workload's mean, the
worst single call), the same for eplb's fresh plan through the same plugin with
the map withheld, eplb's in-sample balancedness minus vLLM's, and eplb's slots moved over
vLLM's. "holds" marks the issue's two figures: next window ≥ vLLM's − 0.001 and slots
moved ≤ 0.2× vLLM's. Balancedness: Σ mean GPU load / Σ max GPU load, an expert's load
split evenly over its replicas (vLLM's dispatch). Quality only: no times.

``--options`` passes eplb options (the plugin's, as ``VLLM_EPLB_OPTIONS`` would) to every
eplb call, e.g. ``'{"drift": 0.05}'``.

    python benchmarks/bench_vllm_robustness.py [--files 12] [--steps 4] [--only S=2]
        [--steady-from 1]
        [--options '{"move_price": 0}']
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import numpy as np
import torch
from _harness import deepseek_loads, markdown_table, start
from bench_vllm_call import drift_chain, run
from engines import FETCH_HINT, engine_root, vllm_sources

from eplb.integrations import vllm as plugin
from eplb.tools.generator import generate_loads

#: (topology label, groups, nodes) of the DeepSeek-V3 scenarios
GLOBAL, HIER = ("global (G=1, N=1)", 1, 1), ("hierarchical (G=8, N=4)", 8, 4)


def alternating(first: torch.Tensor, second: torch.Tensor, windows: int,
                seed: int) -> list[torch.Tensor]:
    """``windows`` int32 windows: ``first``, ``second``, ``first``, ... each × exp(0.15·Z)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(windows):
        base = (first if k % 2 == 0 else second).to(torch.float64)
        noise = torch.randn(base.shape, generator=gen, dtype=torch.float64)
        out.append(torch.round(base * torch.exp(0.15 * noise)).to(torch.int32))
    return out


class _Fresh:
    """A policy planning from scratch: ``policy`` with the map in force withheld."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def rebalance_experts(self, weight, replicas, groups, nodes, ranks, old=None):
        return self.policy.rebalance_experts(weight, replicas, groups, nodes, ranks, None)


def replay(vllm_policy, eplb_policy, windows: list[torch.Tensor], replicas: int, gpus: int,
           groups: int, nodes: int, steady_from: int = 1) -> list[dict[str, float]]:
    """bench_vllm_call's protocol (its :func:`run`, untimed) for vLLM's policy, eplb's and
    eplb's fresh plans: one record per rebalance from ``steady_from`` on (1: every
    rebalance after the one from vLLM's initial map)."""
    runs = {name: run(policy, windows, groups, nodes, 1, replicas, gpus)
            for name, policy in (("vllm", vllm_policy), ("eplb", eplb_policy),
                                 ("fresh", _Fresh(eplb_policy)))}
    return [{f"{name} {key}": float(records[t][key]) for name, records in runs.items()
             for key in ("in", "next", "moved")} for t in range(steady_from, len(windows) - 1)]


def row(scenario: str, topology: str, chains: list[list[dict[str, float]]]) -> list[object]:
    """One table row: pooled over every steady call of every workload."""
    calls = [record for chain in chains for record in chain]

    def mean(key: str, records=calls) -> float:
        return float(np.mean([r[key] for r in records]))

    gap = mean("eplb next") - mean("vllm next")
    worst = min(mean("eplb next", c) - mean("vllm next", c) for c in chains)
    worst_call = min(r["eplb next"] - r["vllm next"] for r in calls)
    moved = mean("eplb moved") / max(mean("vllm moved"), 1e-9)
    holds = gap >= -0.001 and moved <= 0.2
    return [scenario, topology, f"{len(chains)} × {len(chains[0])}", f"{gap:+.4f}",
            f"{worst:+.4f}", f"{worst_call:+.4f}",
            f"{mean('fresh next') - mean('vllm next'):+.4f}",
            f"{mean('eplb in') - mean('vllm in'):+.4f}", f"{moved:.2f}",
            "yes" if holds else "**no**"]


def scenarios(files: int, steps: int) -> list[tuple[str, int, int, list, Callable]]:
    """``(name, R, P, topologies, chains)``: ``chains()`` returns the workloads' windows."""
    loads = deepseek_loads(torch.int64)
    real = list(loads.values())[:files]
    # each decode workload with the prefill workload of the same request shape
    pairs = [(loads["prefill" + name[len("decode"):]], w) for name, w in loads.items()
             if name.startswith("decode") and "prefill" + name[len("decode"):] in loads]

    def drifting(drift: float, share: float = 0.0) -> Callable:
        return lambda: [drift_chain(w, steps, drift, seed, share) for seed, w in enumerate(real)]

    def synthetic(preset: str, seed: int, **shape) -> Callable:
        return lambda: [drift_chain(generate_loads(preset, seed=seed + k, **shape).round(),
                                    steps, 0.15, k) for k in range(files)]

    both = [GLOBAL, HIER]
    return [
        ("headline (drift 0.15)", 288, 32, both, drifting(0.15)),
        ("drift 0.05", 288, 32, both, drifting(0.05)),
        ("drift 0.3", 288, 32, both, drifting(0.3)),
        ("group drift 0.09", 288, 32, [GLOBAL, ("global (G=8, N=1)", 8, 1), HIER],
         drifting(0.15, 0.09)),
        ("group drift 0.5", 288, 32, [GLOBAL, ("global (G=8, N=1)", 8, 1), HIER],
         drifting(0.15, 0.5)),
        ("alternating prefill/decode", 288, 32, both,
         lambda: [alternating(a, b, steps + 1, k) for k, (a, b) in enumerate(pairs[:files])]),
        ("S=2 (P=144)", 288, 144, both, drifting(0.15)),
        ("S=2 (P=144), drift 0.05", 288, 144, both, drifting(0.05)),
        ("S=2 (P=144), drift 0.3", 288, 144, both, drifting(0.3)),
        ("S=3 (P=96)", 288, 96, both, drifting(0.15)),
        ("S=3 (P=96), drift 0.05", 288, 96, both, drifting(0.05)),
        ("S=4 (P=72)", 288, 72, both, drifting(0.15)),
        ("S=5 (P=64)", 320, 64, both, drifting(0.15)),
        ("S=6 (P=48)", 288, 48, both, drifting(0.15)),
        ("S=8 (P=36)", 288, 36, both, drifting(0.15)),
        ("S=17 (P=16)", 272, 16, both, drifting(0.15)),
        ("S=17 (P=16), drift 0.3", 272, 16, both, drifting(0.3)),
        ("qwen3-like 94×128 (synthetic)", 160, 32, [GLOBAL], synthetic("qwen3-235b", 200)),
        ("kimi-like 61×384 (synthetic)", 512, 64, [GLOBAL],
         synthetic("kimi-k2", 400, num_layers=61)),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=12,
                        help="workloads per scenario (real files, or synthetic seeds)")
    parser.add_argument("--steps", type=int, default=4, help="rebalances per workload")
    parser.add_argument("--steady-from", type=int, default=1, metavar="T",
                        help="score rebalances T, T+1, ... (default 1: all but the one from "
                             "vLLM's initial map; a larger T leaves out the calls whose map "
                             "still carries that map's layout)")
    parser.add_argument("--only", action="append", default=[],
                        help="run the scenarios whose name contains this (repeatable)")
    parser.add_argument("--options", default="{}",
                        help="eplb plugin options as a JSON object (default: none)")
    args = parser.parse_args(argv)
    if args.files < 1 or not 1 <= args.steady_from < args.steps:
        parser.error("--files must be at least 1, and --steady-from at least 1 and below "
                     "--steps (a scored call)")
    print(start("bench_vllm_robustness"))
    if not deepseek_loads(torch.int64):
        return 0
    root = engine_root("vllm")
    if root is None:
        sys.exit(f"vLLM: {FETCH_HINT}")
    os.environ[plugin.ENV_VAR] = "eplb"
    rows = []
    with vllm_sources(root) as vllm:
        vllm.plugins.load_general_plugins()  # vLLM's own loader runs eplb's entry point
        ours = vllm.EPLB_POLICIES["default"]
        if not issubclass(ours, plugin.EplbPolicy):
            sys.exit("the eplb plugin did not register through vLLM's plugin loader")
        options = json.loads(args.options)
        if options:  # the plugin class with these options, as its registration makes it
            ours = plugin.vllm_policy_class(options)
        for name, replicas, gpus, topologies, chains in scenarios(args.files, args.steps):
            if args.only and not any(o in name for o in args.only):
                continue
            windows = chains()
            for label, groups, nodes in topologies:
                runs = [replay(vllm.DefaultEplbPolicy, ours, [w.to(torch.int64) for w in chain],
                               replicas, gpus, groups, nodes, args.steady_from)
                        for chain in windows]
                rows.append(row(name, label, runs))
                print(f"  {name}, {label}: done", file=sys.stderr, flush=True)
    print(f"\n{args.files} workloads × {args.steps} rebalances per scenario, scored from "
          f"rebalance {args.steady_from} (0: the one from vLLM's initial map); vLLM 0.33's "
          f"DefaultEplbPolicy; eplb's plugin, options {args.options}\n")
    print(markdown_table(
        ["scenario", "topology", "workloads × steady calls", "eplb next − vLLM",
         "worst workload", "worst call", "eplb fresh next − vLLM", "eplb in-sample − vLLM",
         "slots moved × vLLM", "holds (≥ −0.001, ≤ 0.2×)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
