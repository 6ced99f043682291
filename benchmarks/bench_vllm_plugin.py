"""eplb through its vLLM plugin vs vLLM 0.33's own DefaultEplbPolicy, on real DeepSeek-V3 loads.

Both policies run from vLLM's released code path: the vllm==0.33.0 policy package
(``scripts/fetch_engines.py`` caches it), our class taken from vLLM's ``EPLB_POLICIES``
after vLLM's own plugin loader ran ``eplb.integrations.vllm:register`` with
``VLLM_EPLB_POLICY=eplb``. Each is called as vLLM calls it: int64 CPU loads
``[58 MoE layers, 256]``, ``(weight, 288, num_groups, num_nodes, 32, None)``.

Balancedness = Σ_layers mean GPU load / Σ_layers max GPU load, each expert's load split
evenly over its replicas (``eplb.Placement.balancedness``). Time: median of ``--repeats``
calls after ``--warmup`` calls, ``torch.set_num_threads(1)``.

    python benchmarks/bench_vllm_plugin.py                       # print the markdown
    python benchmarks/bench_vllm_plugin.py --out engines.md   (quoted in BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _harness import DEEPSEEK_DIR as REAL
from _harness import git_state

import eplb
from eplb import Placement, Topology
from eplb.core.policies import resolve_policy
from eplb.integrations import vllm as plugin
from eplb.integrations._engines import FETCH_HINT, engine_root, vllm_sources

MOE_ROWS = slice(3, 61)
REPLICAS, GPUS, EXPERTS = 288, 32, 256
TOPOLOGIES = {"hierarchical (G=8, N=4)": (8, 4), "global (G=1, N=1)": (1, 1)}


def load_files() -> dict[str, torch.Tensor]:
    files = sorted(REAL.glob("*.json"))
    if not files:
        sys.exit(f"real DeepSeek-V3 loads not found in {REAL}")
    return {
        f.stem: torch.tensor(json.loads(f.read_text())["logical_count"])[MOE_ROWS].long()
        for f in files
    }


def measure(policy, weight, groups, nodes, warmup, repeats) -> tuple[torch.Tensor, float]:
    """(phy2log, median seconds per call)."""
    for _ in range(warmup):
        phy2log = policy.rebalance_experts(weight, REPLICAS, groups, nodes, GPUS, None)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        phy2log = policy.rebalance_experts(weight, REPLICAS, groups, nodes, GPUS, None)
        times.append(time.perf_counter() - start)
    return phy2log, statistics.median(times)


class _FallbackCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count, self.first = 0, ""

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.first = self.first or record.getMessage()


def keeps_group_locality(phy2log: torch.Tensor, topo: Topology) -> bool:
    """True when every expert group's replicas stay inside one node (strict hierarchical)."""
    try:
        Placement.from_phy2log(phy2log, EXPERTS, topo, policy="hierarchical").validate(
            anti_affinity=False
        )
    except ValueError:
        return False
    return True


def holds_anti_affinity(placement: Placement) -> bool:
    """True when no GPU holds two replicas of one expert (``validate()``'s extra check)."""
    try:
        placement.validate(anti_affinity=True)
    except ValueError:
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the markdown section here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    root = engine_root("vllm")
    if root is None:
        sys.exit(f"vLLM 0.33.0: {FETCH_HINT}")
    loads = load_files()
    os.environ[plugin.ENV_VAR] = "eplb"
    os.environ.pop("VLLM_PLUGINS", None)
    fallbacks = _FallbackCounter()
    plugin.logger.addHandler(fallbacks)  # a planner error would silently time vLLM's code
    rows, summary = [], []
    with vllm_sources(root) as vllm:
        vllm.plugins.load_general_plugins()  # vLLM's own loader runs our entry point
        ours = vllm.EPLB_POLICIES["default"]
        if not issubclass(ours, plugin.EplbPolicy):
            sys.exit("the eplb plugin did not register through vLLM's plugin loader")
        theirs = vllm.DefaultEplbPolicy
        for topo_name, (groups, nodes) in TOPOLOGIES.items():
            topo = Topology(REPLICAS, GPUS, nodes, groups)
            acc = {"eplb": ([], [], [], []), "vllm": ([], [], [], [])}
            for name, weight in loads.items():
                res = {}
                for label, policy in (("eplb", ours), ("vllm", theirs)):
                    phy2log, seconds = measure(
                        policy, weight, groups, nodes, args.warmup, args.repeats
                    )
                    if fallbacks.count:
                        sys.exit(f"eplb's planner failed ({fallbacks.first}); the plugin fell "
                                 "back to vLLM's policy, so there is nothing to measure")
                    # labelled with the policy both planners use for this topology, so
                    # anti-affinity counts only the GPUs an expert may live on
                    placement = Placement.from_phy2log(
                        phy2log, EXPERTS, topo, resolve_policy("auto", topo, EXPERTS)
                    )
                    placement.validate(anti_affinity=False)  # the output contract
                    bal = placement.balancedness(weight)
                    local = keeps_group_locality(phy2log, topo) if nodes > 1 else None
                    spread = holds_anti_affinity(placement)
                    acc[label][0].append(bal)
                    acc[label][1].append(seconds)
                    acc[label][2].append(local)
                    acc[label][3].append(spread)
                    res[label] = (bal, seconds, local)
                rows.append((topo_name, name, res))
                print(f"{topo_name:24s} {name:26s} eplb {res['eplb'][0]:.4f} "
                      f"{res['eplb'][1] * 1e3:7.1f} ms | vllm {res['vllm'][0]:.4f} "
                      f"{res['vllm'][1] * 1e3:7.1f} ms", file=sys.stderr)
            summary.append((topo_name, acc))

    md = render(rows, summary, args)
    print(md)
    if args.out:
        args.out.write_text(md)
    return 0


def render(rows, summary, args) -> str:
    date = datetime.date.today().isoformat()
    cmd = "python benchmarks/bench_vllm_plugin.py" + (
        f" --repeats {args.repeats}" if args.repeats != 9 else "") + (
        f" --out {args.out}" if args.out else "")
    lines = [
        "## eplb as vLLM's EPLB policy (plugin) vs vLLM 0.33 DefaultEplbPolicy",
        "",
        f"- Command: `{cmd}`",
        f"- Machine: 2-core x86-64 CPU, torch {torch.__version__.split('+')[0]} CPU, "
        f"Python {platform.python_version()}, `torch.set_num_threads(1)`; date {date}",
        f"- Code measured: eplb {eplb.__version__} at {git_state()}; vLLM 0.33.0 policy code from "
        "the released wheel (`scripts/fetch_engines.py`).",
        "- Data: the 12 real DeepSeek-V3 loads of `sglang_deepseek_ep_statistics` (MoE rows 3..60, "
        "int64 `[58, 256]`), R=288 slots on P=32 GPUs, called as vLLM calls the policy "
        "(`rebalance_experts(w, 288, G, N, 32, None)`, our class taken from vLLM's `EPLB_POLICIES` "
        f"after vLLM's plugin loader ran with `{plugin.ENV_VAR}=eplb`).",
        "- Balancedness = Σ_layers mean GPU load / Σ_layers max GPU load (replica load = expert "
        f"load / replicas). Time = median of {args.repeats} calls after {args.warmup} warm-up "
        "calls, "
        "per file; the summary gives the median over files.",
        "",
        "| topology | policy | balancedness min | mean | max | time (median over files) "
        "| groups stay in one node | no GPU holds 2 replicas of an expert |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for topo_name, acc in summary:
        for label, title in (("eplb", "eplb plugin"), ("vllm", "vLLM DefaultEplbPolicy")):
            bal, secs, local, spread = acc[label]
            kept = "n/a" if local[0] is None else f"{sum(local)}/{len(local)} files"
            lines.append(
                f"| {topo_name} | {title} | {min(bal):.4f} | {statistics.mean(bal):.4f} | "
                f"{max(bal):.4f} | {statistics.median(secs) * 1e3:.1f} ms | {kept} | "
                f"{sum(spread)}/{len(spread)} files |"
            )
    lines += ["", "Per file (balancedness, time per call):", "",
              "| topology | load file | eplb | vLLM default | eplb time | vLLM time |",
              "|---|---|---|---|---|---|"]
    for topo_name, name, res in rows:
        lines.append(
            f"| {topo_name} | {name} | {res['eplb'][0]:.4f} | {res['vllm'][0]:.4f} | "
            f"{res['eplb'][1] * 1e3:.1f} ms | {res['vllm'][1] * 1e3:.1f} ms |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
