"""SGLang's runtime rebalancing on one node, scored by the table SGLang really builds.

With ``--enable-eplb`` and an all-to-all backend (DeepEP, ``--ep-dispatch-algorithm
static``) SGLang 0.5.23 re-plans every few thousand passes on every rank, and builds its
static dispatch table from the new map with one random stream: a rank holding a replica
of an expert serves its own tokens of it, the other ranks are dealt over the replicas as
evenly as they divide, the remainder at random (``_fair_choices``). This script replays
that loop on drifting real DeepSeek-V3 loads (MoE rows 3..60, R=288, one node of 8 or 32
GPUs) for three planners, each from its own previous map:

- **SGLang's own** algorithm (from the fetched wheel; a fresh plan each time): what its
  default ``--eplb-algorithm auto`` resolves to for DeepSeek-V3's 8 groups on one node
  (``compute_algorithm``: ``deepseek_hierarchical``), called as ``init_by_eplb`` calls it;
- **eplb, even split**: eplb's hook with the option ``dispatch: even`` (what it planned on
  one node before 2026-12-06: the even split, from the map in force);
- **eplb (default)**: eplb's hook as SGLang calls it (``dispatch: auto`` with SGLang's
  ``static`` dispatch: on one node planned for the runtime table, from the map in force).

Window 0 is the real load; window t+1 = round(window t × exp(drift·Z)) per expert. Call 0
plans window 0 with no map in force; call t ≥ 1 plans window t from the planner's map of
call t − 1. Every plan is scored by SGLang's own table (``tests/sglang_dispatch.py`` runs
SGLang's released ``expert_location.py``, path ``eplb``: the runtime table), tokens
arising evenly on the GPUs: balancedness on window t (in sample) and t+1 (next window),
the slots whose expert changed from the planner's previous map, and the wall time of the
planner's call (one thread; SGLang's algorithm as released, eplb through its hook).
eplb's model of the table (``eplb.core.rank_draws.split_draw_balancedness``) is printed
beside it.

With ``--budgets 0.05,0.2,1`` it adds eplb's hook with the option ``max_moves``: that
share of the slots (in total over the layers) on every call from a map in force; a share
of 1 is a budget above what pays, whose plan should move no layer more than the default's.

With ``--other-models`` it instead plans fresh on the other real models' counts
(gpt-oss-20b, OLMoE, Mixtral, Qwen3-30B-A3B, DeepSeek-V2-Lite: two windows each, at the
one-node shapes of ``bench_real_models.py``) and scores by SGLang's runtime table the
even split (``eplb.plan(w, R, P)``), ``dispatch="nearest"`` (``fair="auto"``: what the
hook plans) and ``fair="divide"``.

    python benchmarks/bench_sglang_runtime.py [--files 4] [--steps 3] [--drift 0.15]
        [--budgets 0.05,0.2,1]
    python benchmarks/bench_sglang_runtime.py --other-models
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import types

import torch
from _harness import deepseek_loads, markdown_table, start
from bench_vllm_call import drift_chain
from engines import engine_root, sglang_sources
from sglang_dispatch import sglang_dispatch_tables

import eplb
from eplb.core.dispatch import table_gpu_loads
from eplb.core.rank_draws import split_draw_balancedness
from eplb.integrations.sglang import eplb_rebalance

R, E = 288, 256
GPUS = (8, 32)


def sglang_algorithms(root) -> types.ModuleType:
    """SGLang 0.5.23's ``eplb_algorithms`` package from the wheel, imported once: the
    stubs and the import stay outside the timed calls (each call used to import it again
    inside ``sglang_sources``, which timed SGLang's module loading as its planning)."""
    settings = types.SimpleNamespace(exec=types.SimpleNamespace(moe=types.SimpleNamespace()),
                                     parallel=None, device=None)
    with sglang_sources(root, settings):
        return importlib.import_module("sglang.srt.eplb.eplb_algorithms")


def sglang_own(alg: types.ModuleType, weight: torch.Tensor, gpus: int) -> torch.Tensor:
    """SGLang's own plan as ``ExpertLocationMetadata.init_by_eplb`` makes it on one node:
    the algorithm its default ``--eplb-algorithm auto`` resolves to for DeepSeek-V3's 8
    groups (``deepseek_hierarchical`` with one node; the hook is asked the same)."""
    phy, _, _ = alg.rebalance_experts(
        tokens_per_expert=weight[None].float(), num_physical_experts=R,
        num_local_physical_experts=R // gpus, num_groups=8, num_nodes=1,
        algorithm=alg.compute_algorithm(raw_algorithm="auto", num_groups=8, num_nodes=1))
    return phy.long()


def eplb_hook(weight: torch.Tensor, gpus: int, old: torch.Tensor | None,
              options: dict) -> torch.Tensor:
    """eplb's answer to SGLang's call, as the hook makes it (SGLang asks the hierarchical
    algorithm for DeepSeek-V3's 8 groups, ``static`` dispatch)."""
    phy2log, _, _ = eplb_rebalance(weight[None], R, R // gpus, 8, 1, hierarchical=True,
                                   options=options, old_phy2log=old, sglang_dispatch="static")
    return phy2log


def balancedness(loads: torch.Tensor) -> float:
    return float(loads.mean(1).sum() / loads.amax(1).sum())


def other_models() -> int:
    """Fresh plans on the other real models' counts, one node, by SGLang's runtime table."""
    from bench_real_models import MODELS, SHAPES

    rows, gains = [], []
    for model, (path, read) in MODELS.items():
        if not path.exists():
            print(f"SKIPPED {model}: {path} not found")
            continue
        for replicas, gpus in SHAPES[model]:
            for name, weight in list(read().items())[:2]:
                experts = weight.shape[1]
                scores = {}
                for label, kwargs in (("even", {}), ("auto", {"dispatch": "nearest"}),
                                      ("divide", {"dispatch": "nearest", "fair": "divide"})):
                    plan = eplb.plan(weight, replicas, gpus, **kwargs).phy2log
                    table = sglang_dispatch_tables(plan, experts, gpus, 1, path="eplb")
                    scores[label] = balancedness(table_gpu_loads(weight, table, gpus,
                                                                 replicas))
                gains.append(scores["auto"] - scores["even"])
                rows.append([model, f"R={replicas} P={gpus}", name, f"{scores['even']:.4f}",
                             f"{scores['auto']:.4f}", f"{scores['divide']:.4f}",
                             f"{gains[-1]:+.4f}"])
    print(markdown_table(["model", "shape", "window", "even split", "nearest (auto)",
                          "fair divide", "auto − even"], rows))
    if gains:
        print(f"\nauto − even: {min(gains):+.4f} to {max(gains):+.4f}; below −0.001 in "
              f"{sum(g < -0.001 for g in gains)} of {len(gains)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4, help="real workloads (of 12)")
    parser.add_argument("--steps", type=int, default=3, help="rebalances after the first")
    parser.add_argument("--drift", type=float, default=0.15)
    parser.add_argument("--budgets", default="",
                        help="shares of the slots to add max_moves rows for, e.g. 0.05,0.2,1")
    parser.add_argument("--other-models", action="store_true",
                        help="fresh plans on the other real models' counts instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(start("bench_sglang_runtime"))
    root = engine_root("sglang")
    if root is None:
        sys.exit("SGLang 0.5.23 not fetched: run python scripts/fetch_engines.py")
    if args.other_models:
        return other_models()
    algorithms = sglang_algorithms(root)
    planners = {
        "SGLang deepseek (its own)": lambda w, g, old: sglang_own(algorithms, w, g),
        "eplb, even split (dispatch: even)": lambda w, g, old: eplb_hook(
            w, g, old, {"dispatch": "even"}),
        "eplb (default)": lambda w, g, old: eplb_hook(w, g, old, {}),
    }
    for share in (float(b) for b in args.budgets.split(",") if b):
        def budgeted(w: torch.Tensor, g: int, old: torch.Tensor | None,
                     share: float = share) -> torch.Tensor:
            # (the first call has no map in force: no budget to keep)
            total = round(share * w.shape[0] * R)
            return eplb_hook(w, g, old, {} if old is None else {"max_moves": total})
        planners[f"eplb, max_moves {share:g} of the slots"] = budgeted
    loads = list(deepseek_loads().items())[: args.files]
    if not loads:  # deepseek_loads has printed SKIPPED: no table of empty cells after it
        return 0
    records: dict[tuple[int, str, str], list[float]] = {}
    for k, (name, weight) in enumerate(loads):
        windows = drift_chain(weight, args.steps + 1, args.drift, k)
        for gpus in GPUS:
            for label, planner in planners.items():
                old = None
                for t in range(args.steps + 1):
                    began = time.perf_counter()
                    new = planner(windows[t], gpus, old)
                    took = time.perf_counter() - began
                    table = sglang_dispatch_tables(new, E, gpus, 1, path="eplb")
                    kind = "first" if t == 0 else "steady"
                    rows = {
                        "in sample": balancedness(table_gpu_loads(windows[t], table, gpus, R)),
                        "next window": balancedness(
                            table_gpu_loads(windows[t + 1], table, gpus, R)),
                        "model, next window": split_draw_balancedness(windows[t + 1], new,
                                                                      gpus),
                        "moved": (float((new != old).float().mean()) if old is not None
                                  else float("nan")),
                        "ms": took * 1e3,
                    }
                    for what, value in rows.items():
                        records.setdefault((gpus, kind, label, what), []).append(value)
                    old = new
            print(f"  {name} done", flush=True)
    table_rows = []
    for gpus in GPUS:
        for kind in ("first", "steady"):
            for label in planners:
                cell = {what: records.get((gpus, kind, label, what), [])
                        for what in ("in sample", "next window", "model, next window", "moved",
                                     "ms")}

                def fmt(values: list[float], digits: int = 4) -> str:
                    values = [v for v in values if v == v]
                    if not values:
                        return "–"
                    return (f"{statistics.mean(values):.{digits}f} "
                            f"({min(values):.{digits}f}–{max(values):.{digits}f})")

                table_rows.append([f"{gpus} GPUs", kind, label, fmt(cell["in sample"]),
                                   fmt(cell["next window"]), fmt(cell["model, next window"]),
                                   fmt(cell["moved"], 3),
                                   f"{statistics.median(cell['ms']):.0f}" if cell["ms"] else "–"])
    print()
    print(markdown_table(["cluster", "call", "planner",
                          "SGLang table, in sample: mean (min–max)",
                          "SGLang table, next window", "eplb's model, next window",
                          "share of slots moved", "ms per call (median)"], table_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
