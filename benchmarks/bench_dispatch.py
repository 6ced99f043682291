"""Balance vs cross-node traffic under SGLang's nearest dispatch, on real loads (issue 13).

Part 1, the 12 real DeepSeek-V3 workloads (``sglang_deepseek_ep_statistics``, MoE rows
3..60), R=288, P=32, N=4, G=8, every plan scored under the nearest rule with tokens
arising evenly on the GPUs:

- expected-load balancedness (Σ mean / Σ max GPU load, :mod:`eplb.core.dispatch`);
- the same realised by SGLang 0.5.23's own static table (with an all-to-all backend such
  as DeepEP, the only case where SGLang builds one), on the start-up path of SGLang's own
  planning (one random stream for all ranks, seed 42); ``--mapping FILE`` adds the path
  of an ``--init-expert-location`` map (eplb's output: per-rank collapsed candidates, a
  per-rank stream) for one workload, ~40 s a plan;
- expected distinct remote nodes per token per MoE layer on tokens sampled with
  DeepSeek-V3's group-limited routing from the workload's loads
  (:func:`eplb.tools.routing.fit_router`): ``--plan-tokens`` tokens for plans that learn
  from a trace, a disjoint ``--score-tokens`` for scoring, the same for every plan, each
  with a random source GPU.

Plans: eplb hierarchical and global (even-split planner), the dispatch-aware global plan
(``fair="avoid"`` and ``"expect"``), the locality policy over its ``slack`` knob from
loads + groups alone and from the plan tokens, vLLM 0.33's DefaultEplbPolicy and SGLang's
``deepseek`` / ``deepseek_vec`` (hierarchical and global) from the fetched wheels.

Part 2, real per-token traces, out of sample (no groups: locality learns from the trace):
Qwen3-30B-A3B ShareGPT prefill (3 batches; plan on two, score on the third; R=144, P=16,
N=4) and ESFT DeepSeek-V2-Lite (4 tasks; plan on the first half of a task's tokens,
score on the second; R=72, P=8, N=2).

    python benchmarks/bench_dispatch.py --mapping prefill_in2048 --out dispatch.md --plot x.png
    python benchmarks/bench_dispatch.py --files prefill_in2048 --score-tokens 512  # quick
    python benchmarks/bench_dispatch.py --fit-latent   # the sampler's co-activation fit
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from _harness import (
    DEEPSEEK_DIR,
    REAL_DATA_HINT,
    add_output_options,
    refuse_existing_outputs,
    write_output,
)
from _harness import REAL_DATA as REAL
from engines import engine_root, sglang_sources, vllm_sources
from sglang_dispatch import sglang_dispatch_tables

import eplb
from eplb import PlanOptions, Topology
from eplb.core.dispatch import (
    balancedness,
    coactivation,
    realised_gpu_loads,
    remote_nodes_from_coactivation,
    remote_nodes_per_token,
    table_gpu_loads,
)
from eplb.core.dispatch_plan import plan_nearest_global
from eplb.core.locality import pair_stats, plan_locality
from eplb.tools.dispatch_plot import picture_format, plot_tradeoff
from eplb.tools.routing import LATENT_DIM, LATENT_SCALE, fit_router

R, P, N, G, E = 288, 32, 4, 8, 256
SLACKS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 1.0)
ROUTED_SLACKS = (0.0, 0.01, 0.03, 0.1, 1.0)


def engine_plans(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """vLLM's and SGLang's own plans from the fetched wheels (empty where not fetched)."""
    out: dict[str, torch.Tensor] = {}
    root = engine_root("vllm")
    if root is not None:
        with vllm_sources(root) as vllm:
            for label, (groups, nodes) in {"hier": (G, N), "global": (1, 1)}.items():
                out[f"vLLM default ({label})"] = vllm.DefaultEplbPolicy.rebalance_experts(
                    weight.long(), R, groups, nodes, P, None).long()
    root = engine_root("sglang")
    if root is not None:
        settings = types.SimpleNamespace(exec=types.SimpleNamespace(
            moe=types.SimpleNamespace()), parallel=None, device=None)
        with sglang_sources(root, settings):
            alg = importlib.import_module("sglang.srt.eplb.eplb_algorithms")
            for name in ("deepseek", "deepseek_vec"):
                for label, suffix in (("hier", "_hierarchical"), ("global", "")):
                    phy, _, _ = alg.rebalance_experts(
                        tokens_per_expert=weight[None].float(), num_physical_experts=R,
                        num_local_physical_experts=R // P, num_groups=G, num_nodes=N,
                        algorithm=alg.EplbAlgorithm[name + suffix])
                    out[f"SGLang {name} ({label})"] = phy.long()
    return out


def sglang_realised(weight: torch.Tensor, phy2log: torch.Tensor, path: str = "eplb") -> float:

    table = sglang_dispatch_tables(phy2log, E, P, N, path=path)
    return balancedness(table_gpu_loads(weight, table, P, R))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def score(weight, phy2log, ids, sources, nodes, gpus, experts) -> dict[str, float]:
    return {
        "bal": balancedness(realised_gpu_loads(weight, phy2log, gpus, nodes, "nearest")),
        "bal_even": balancedness(realised_gpu_loads(weight, phy2log, gpus, nodes, "even")),
        "remote": float(remote_nodes_per_token(phy2log, ids, experts, gpus, nodes,
                                               sources=sources).mean()),
    }


def deepseek_workload(name: str, weight: torch.Tensor, args) -> dict:
    topo = Topology(R, P, N, G)
    gen = torch.Generator().manual_seed(args.seed)
    router, fit_s = timed(lambda: fit_router(weight, generator=gen))
    ids = router.sample(args.plan_tokens + args.score_tokens, gen)
    plan_ids, score_ids = ids[: args.plan_tokens], ids[args.plan_tokens:]
    sources = torch.randint(0, P, (len(score_ids),), generator=gen)
    opts = PlanOptions()
    plans: dict[str, tuple[torch.Tensor, str, float]] = {}

    def add(label, fn, kind):
        phy, secs = timed(fn)
        plans[label] = (phy, kind, secs)

    add("eplb hierarchical", lambda: eplb.plan(weight, R, P, N, G).phy2log, "corner")
    add("eplb global (even-split)", lambda: eplb.plan(weight, R, P, N, G, policy="global"
                                                      ).phy2log, "plan")
    add("dispatch-aware global (avoid)",
        lambda: plan_nearest_global(weight, topo, opts, fair="avoid"), "corner")
    add("dispatch-aware global (expect)",
        lambda: plan_nearest_global(weight, topo, opts, fair="expect"), "plan")
    for slack in SLACKS:
        add(f"locality slack={slack}", lambda s=slack: plan_locality(weight, topo, slack=s),
            "curve")
    for slack in ROUTED_SLACKS:
        add(f"locality+trace slack={slack}",
            lambda s=slack: plan_locality(weight, topo, slack=s, routing=plan_ids), "curve2")
    for label, phy in engine_plans(weight).items():
        plans[label] = (phy, "engine", float("nan"))
    rows = {}
    for label, (phy, kind, secs) in plans.items():
        rows[label] = {"kind": kind, "seconds": secs,
                       **score(weight, phy, score_ids, sources, N, P, E)}
    if engine_root("sglang") is not None:
        for label in ("eplb hierarchical", "eplb global (even-split)",
                      "dispatch-aware global (avoid)", "dispatch-aware global (expect)",
                      f"locality slack={args.pick}"):
            rows[label]["bal_sglang"] = sglang_realised(weight, plans[label][0])
        if args.mapping and args.mapping in name:
            for label in ("dispatch-aware global (avoid)", "dispatch-aware global (expect)",
                          f"locality slack={args.pick}", "eplb global (even-split)",
                          "eplb hierarchical"):
                rows[label]["bal_sglang_mapping"] = sglang_realised(weight, plans[label][0],
                                                                    "mapping")
    # traffic from pair statistics alone vs the per-token formula (sources averaged)
    sub = score_ids[: args.estimate_tokens]
    pairs = coactivation(sub, E)
    for label in ("eplb hierarchical", "dispatch-aware global (avoid)",
                  f"locality slack={args.pick}"):
        phy = plans[label][0]
        exact = float(remote_nodes_per_token(phy, sub, E, P, N).mean())
        est = float(remote_nodes_from_coactivation(phy, pairs, len(sub), P, N).mean())
        rows[label]["remote_exact_avg"], rows[label]["remote_pairs"] = exact, est
    online = {} if args.no_online else online_workload(weight, args)
    return {"name": name, "fit_seconds": fit_s, "rows": rows, "online": online}


def online_workload(weight: torch.Tensor, args) -> dict:
    """Dead GPUs and incremental re-planning under the nearest rule, vs eplb's plans."""
    topo = Topology(R, P, N, G)
    out: dict[str, float] = {}
    for dead in ((5,), (0, 9, 17)):
        live = torch.ones(P, dtype=torch.bool)
        live[list(dead)] = False
        avoid = plan_nearest_global(weight, topo, PlanOptions(), active_gpus=live,
                                    fair="avoid")
        auto = plan_nearest_global(weight, topo, PlanOptions(), active_gpus=live)
        out[f"{len(dead)} dead: dispatch-aware auto, layers on expect"] = float(
            (auto != avoid).any(1).sum())
        theirs = eplb.plan(weight, R, P, N, G, policy="global", active_gpus=live).phy2log
        for label, phy in (("dispatch-aware avoid", avoid), ("dispatch-aware auto", auto),
                           ("eplb global", theirs)):
            out[f"{len(dead)} dead: {label}"] = balancedness(
                realised_gpu_loads(weight, phy, P, N, active_gpus=live), live)
    gen = torch.Generator().manual_seed(args.seed)
    drifted = weight * torch.exp(0.15 * torch.randn(weight.shape, generator=gen,
                                                    dtype=torch.float64))
    old = plan_nearest_global(weight, topo, PlanOptions(), fair="avoid")
    out["drift: old map"] = balancedness(realised_gpu_loads(drifted, old, P, N))
    for budget in (None, 60, 20):
        moves = None if budget is None else torch.full((weight.shape[0],), budget)
        new = eplb.plan(drifted, R, P, N, G, policy="global", dispatch="nearest",
                        previous=old, max_moves=moves).phy2log
        moved = (new != old).sum(1)
        base = eplb.plan(drifted, R, P, N, G, policy="global", previous=old, max_moves=moves)
        tag = "no budget" if budget is None else f"{budget}/layer"
        out[f"drift {tag}: dispatch-aware"] = balancedness(realised_gpu_loads(drifted, new, P, N))
        out[f"drift {tag}: dispatch-aware moved"] = float(moved.sum()) / old.numel()
        out[f"drift {tag}: eplb incremental"] = balancedness(
            realised_gpu_loads(drifted, base.phy2log, P, N))
        out[f"drift {tag}: eplb incremental moved"] = float(base.moved_slots(old).sum()
                                                            ) / old.numel()
    return out


def trace_folds(args) -> list[dict]:
    """Qwen3 and ESFT, out of sample: (name, plan ids, score ids, E, k, topology)."""
    folds = []
    qwen = REAL / "qwen3_30b_a3b_sharegpt_prefill_vllm/qwen3_30b_sharegpt_prefill_topk_ids.npz"
    if qwen.is_file():
        z = np.load(qwen)
        keys = [k for k in z.files if k.endswith("_topk_ids")]
        batches = {k: torch.from_numpy(z[k].astype(np.int64)) for k in keys}
        for held in keys:
            plan_ids = torch.cat([batches[k] for k in keys if k != held])
            folds.append({"name": f"Qwen3 score on {held.removesuffix('_topk_ids')}",
                          "plan": plan_ids, "score": batches[held], "experts": 128,
                          "topo": Topology(144, 16, 4, 1)})
    esft = REAL / "esft_deepseek_v2_lite_routing/esft_topk_ids.npz"
    if esft.is_file():
        z = np.load(esft)
        for task in ("intent", "law", "summary", "translation"):
            ids = torch.from_numpy(z[f"{task}_topk_ids"].astype(np.int64))
            half = len(ids) // 2
            folds.append({"name": f"ESFT {task} (2nd half)", "plan": ids[:half],
                          "score": ids[half:], "experts": 64, "topo": Topology(72, 8, 2, 1)})
    return folds


def counts(ids: torch.Tensor, experts: int) -> torch.Tensor:
    num_layers = ids.shape[1]
    flat = (torch.arange(num_layers)[None, :, None] * experts + ids).flatten()
    return torch.bincount(flat, minlength=num_layers * experts).view(
        num_layers, experts).double()


def trace_fold(fold: dict, args) -> dict:
    topo, experts = fold["topo"], fold["experts"]
    plan_w, score_w = counts(fold["plan"], experts), counts(fold["score"], experts)
    gen = torch.Generator().manual_seed(args.seed)
    sources = torch.randint(0, topo.num_gpus, (len(fold["score"]),), generator=gen)
    top_k = fold["plan"].shape[2]
    plans = {
        "eplb global (even-split)": eplb.plan(plan_w, topo.num_replicas, topo.num_gpus,
                                              policy="global").phy2log,
        "dispatch-aware global (avoid)": plan_nearest_global(plan_w, topo, PlanOptions(),
                                                             fair="avoid"),
    }
    for slack in ROUTED_SLACKS:
        plans[f"locality+trace slack={slack}"] = plan_locality(
            plan_w, topo, slack=slack, routing=fold["plan"], top_k=top_k, topk_groups=None)
    rows = {label: score(score_w, phy, fold["score"], sources, topo.num_nodes, topo.num_gpus,
                         experts) for label, phy in plans.items()}
    return {"name": fold["name"], "rows": rows}


def fit_latent() -> int:
    """Pair dispersion (chi-square per pair vs top-k independence) real vs sampled."""
    def dispersion(ids: torch.Tensor, experts: int) -> float:
        freq, pair = pair_stats(ids, experts)
        k = ids.shape[2]
        outer = (freq[:, :, None] * freq[:, None, :]).masked_fill(
            torch.eye(experts, dtype=torch.bool), 0)
        expect = outer * (k * (k - 1) / outer.sum((1, 2)))[:, None, None]
        chi = ((pair - expect) ** 2 / expect.clamp(min=1e-12)).masked_fill(
            torch.eye(experts, dtype=torch.bool), 0).sum((1, 2)) * ids.shape[0]
        return float((chi / (experts * (experts - 1))).mean())

    for fold in trace_folds(argparse.Namespace(seed=0))[::3]:
        ids, experts = fold["score"][:4000], fold["experts"]
        w = counts(ids, experts) + 0.5
        out = [f"{fold['name']}: real {dispersion(ids, experts):.2f}"]
        for scale in (0.0, LATENT_SCALE):
            router = fit_router(w, top_k=ids.shape[2], num_groups=1, topk_groups=1,
                                latent_scale=scale, generator=torch.Generator().manual_seed(0))
            syn = router.sample(len(ids), torch.Generator().manual_seed(1))
            out.append(f"latent {scale} (dim {LATENT_DIM}): {dispersion(syn, experts):.2f}")
        print("; ".join(out), flush=True)
    return 0


def summarise(values: list[float]) -> str:
    return f"{min(values):.4f} / {statistics.median(values):.4f} / {max(values):.4f}"


def render(results: list[dict], folds: list[dict], args) -> str:
    date = datetime.date.today().isoformat()
    lines = [
        "## Balance vs cross-node traffic under SGLang's nearest dispatch (issue 13)", "",
        f"- Command: `python benchmarks/bench_dispatch.py {' '.join(args.argv)}`".rstrip(),
        f"- Machine: {platform.machine()} CPU (shared), torch {torch.__version__.split('+')[0]}, "
        f"Python {platform.python_version()}, `torch.set_num_threads(1)`; date {date}",
        f"- DeepSeek-V3 loads: {len(results)} workloads, R={R}, P={P}, N={N}, G={G}; tokens "
        f"sampled with group-limited routing (top-4 of 8 groups, top-8), latent "
        f"{LATENT_SCALE} (dim {LATENT_DIM}); {args.plan_tokens} plan tokens, "
        f"{args.score_tokens} score tokens per workload, random source GPU per token.",
        "- bal = expected-load balancedness under the nearest rule; SGLang table = the same "
        "from SGLang 0.5.23's own static table (all-to-all backend, start-up path of SGLang's "
        "own planning: one random stream, seed 42); remote = expected distinct remote nodes "
        "per token per MoE layer.", "",
        "| plan | bal min / median / max | bal (even split) median | remote min / median / max "
        "| SGLang table bal median | plan time median |",
        "|---|---|---|---|---|---|",
    ]
    labels = list(results[0]["rows"])
    for label in labels:
        rows = [r["rows"][label] for r in results]
        sg = [x["bal_sglang"] for x in rows if "bal_sglang" in x]
        secs = [x["seconds"] for x in rows if x["seconds"] == x["seconds"]]
        lines.append(
            f"| {label} | {summarise([x['bal'] for x in rows])} | "
            f"{statistics.median([x['bal_even'] for x in rows]):.4f} | "
            f"{summarise([x['remote'] for x in rows])} | "
            f"{statistics.median(sg):.4f} |" if sg else
            f"| {label} | {summarise([x['bal'] for x in rows])} | "
            f"{statistics.median([x['bal_even'] for x in rows]):.4f} | "
            f"{summarise([x['remote'] for x in rows])} | – |")
        lines[-1] += f" {statistics.median(secs):.2f} s |" if secs else " – |"
    # the target: a locality point with bal >= 0.97 and remote <= hierarchical's
    met = []
    for r in results:
        hier = r["rows"]["eplb hierarchical"]["remote"]
        ok = [(lab, x) for lab, x in r["rows"].items() if lab.startswith("locality slack")
              and x["bal"] >= 0.97 and x["remote"] <= hier]
        best = min(ok, key=lambda t: t[1]["remote"]) if ok else None
        met.append((r["name"], hier, best))
    lines += ["", "Target (a locality point, loads + groups only, with bal >= 0.97 and remote "
              "<= the hierarchical plan's on the same tokens), per workload: "
              f"met on {sum(b is not None for _, _, b in met)}/{len(met)}.", "",
              "| workload | hierarchical remote | best such point | its bal | its remote |",
              "|---|---|---|---|---|"]
    for name, hier, best in met:
        if best is None:
            lines.append(f"| {name} | {hier:.3f} | none | – | – |")
        else:
            lines.append(f"| {name} | {hier:.3f} | {best[0]} | {best[1]['bal']:.4f} | "
                         f"{best[1]['remote']:.3f} |")
    extra = [(r["name"], lab, x) for r in results for lab, x in r["rows"].items()
             if "bal_sglang_mapping" in x]
    if extra:
        lines += ["", "SGLang's `--init-expert-location` map path (how SGLang serves eplb's "
                  "output with DeepEP: per-rank collapsed candidates, per-rank random stream):",
                  "", "| workload | plan | bal (model) | SGLang table |", "|---|---|---|---|"]
        lines += [f"| {n} | {lab} | {x['bal']:.4f} | {x['bal_sglang_mapping']:.4f} |"
                  for n, lab, x in extra]
    if results[0].get("online"):
        keys = list(results[0]["online"])
        lines += ["", "Dead GPUs and incremental re-planning (balancedness under the nearest "
                  "rule; drift = loads × exp(0.15·N(0,1)) per expert, the old map the "
                  "dispatch-aware plan of the undrifted loads; 'moved' = share of slots "
                  "changed):", "", "| case | min / median / max over workloads |", "|---|---|"]
        lines += [f"| {k} | {summarise([r['online'][k] for r in results])} |" for k in keys]
    errs = [(x["remote_pairs"] - x["remote_exact_avg"]) / x["remote_exact_avg"]
            for r in results for x in r["rows"].values() if "remote_pairs" in x]
    if errs:
        lines += ["", f"Remote nodes from pair statistics alone vs the per-token formula "
                  f"({args.estimate_tokens} tokens, sources averaged): relative error "
                  f"{min(errs):+.3%} .. {max(errs):+.3%} over {len(errs)} plans."]
    if folds:
        lines += ["", "Real traces, out of sample: remote nodes per token of the locality point "
                  "with the fewest remote nodes among those at least as balanced as the global "
                  "plan (bal on the score part's loads):", "",
                  "| fold | global plan | its bal | its remote | locality point | its bal "
                  "| its remote | change |", "|---|---|---|---|---|---|---|---|"]
        for f in folds:
            for ref in ("eplb global (even-split)", "dispatch-aware global (avoid)"):
                g = f["rows"][ref]
                ok = [(lab, x) for lab, x in f["rows"].items()
                      if lab.startswith("locality") and x["bal"] >= g["bal"]]
                if not ok:
                    lines.append(f"| {f['name']} | {ref} | {g['bal']:.4f} | {g['remote']:.3f} "
                                 "| none as balanced | – | – | – |")
                    continue
                lab, x = min(ok, key=lambda t: t[1]["remote"])
                lines.append(f"| {f['name']} | {ref} | {g['bal']:.4f} | {g['remote']:.3f} | "
                             f"{lab} | {x['bal']:.4f} | {x['remote']:.3f} | "
                             f"{x['remote'] / g['remote'] - 1:+.1%} |")
        lines += ["", "All trace plans:", "",
                  "| fold | plan | bal | remote |", "|---|---|---|---|"]
        for f in folds:
            for lab, x in f["rows"].items():
                lines.append(f"| {f['name']} | {lab} | {x['bal']:.4f} | {x['remote']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, force: bool) -> None:

    def mean(label, key):
        return statistics.mean(r["rows"][label][key] for r in results)

    labels = list(results[0]["rows"])
    curves = {
        "locality (loads + groups)": [
            (mean(lab, "remote"), mean(lab, "bal"), lab.split("=")[1])
            for lab in labels if lab.startswith("locality slack")],
        "locality (+ plan-token trace)": [
            (mean(lab, "remote"), mean(lab, "bal"), lab.split("=")[1])
            for lab in labels if lab.startswith("locality+trace")],
    }
    points = [(lab, mean(lab, "remote"), mean(lab, "bal"), results[0]["rows"][lab]["kind"])
              for lab in labels if results[0]["rows"][lab]["kind"] in ("corner", "plan",
                                                                         "engine")]
    plot_tradeoff(curves, points, path, title=f"DeepSeek-V3, {len(results)} real workloads "
                  f"(means), R={R}, P={P}, N={N}: nearest dispatch", force=force)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="*", help="substrings of workload names to keep")
    parser.add_argument("--plan-tokens", type=int, default=1024)
    parser.add_argument("--score-tokens", type=int, default=2048)
    parser.add_argument("--estimate-tokens", type=int, default=256)
    parser.add_argument("--pick", type=float, default=0.03, help="slack of the checked point")
    parser.add_argument("--mapping", help="workload to also score on SGLang's "
                        "--init-expert-location map path")
    parser.add_argument("--no-traces", action="store_true", help="skip Qwen3 / ESFT")
    parser.add_argument("--no-online", action="store_true",
                        help="skip dead GPUs and incremental re-planning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    add_output_options(parser, "out", "json", "plot")
    parser.add_argument("--fit-latent", action="store_true")
    args = parser.parse_args(argv)
    refuse_existing_outputs(args)
    if args.plot:
        try:  # an unknown suffix or no matplotlib: now, not after the run
            picture_format(args.plot)
        except (ImportError, ValueError) as exc:
            sys.exit(f"--plot: {exc}")
    args.argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(1)
    if args.fit_latent:
        return fit_latent()
    files = sorted(DEEPSEEK_DIR.glob("*.json"))
    if not files:  # the data are never in the repository: skip visibly, as every script does
        print(f"SKIPPED: real DeepSeek-V3 loads not found at {DEEPSEEK_DIR} {REAL_DATA_HINT}")
        return 0
    if args.files:
        kept = [f for f in files if any(s in f.stem for s in args.files)]
        if not kept:
            sys.exit(f"--files {' '.join(args.files)} matches none of the workloads: "
                     f"{', '.join(f.stem for f in files)}")
        files = kept
    results = []
    for f in files:
        w = torch.tensor(json.loads(f.read_text())["logical_count"])[3:61].double()
        res = deepseek_workload(f.stem, w, args)
        rows = res["rows"]
        print(f"{f.stem:24s} hier {rows['eplb hierarchical']['bal']:.4f}/"
              f"{rows['eplb hierarchical']['remote']:.3f} avoid "
              f"{rows['dispatch-aware global (avoid)']['bal']:.4f}/"
              f"{rows['dispatch-aware global (avoid)']['remote']:.3f} loc{args.pick} "
              f"{rows[f'locality slack={args.pick}']['bal']:.4f}/"
              f"{rows[f'locality slack={args.pick}']['remote']:.3f}", file=sys.stderr,
              flush=True)
        results.append(res)
    folds = [] if args.no_traces else [trace_fold(f, args) for f in trace_folds(args)]
    md = render(results, folds, args)
    print(md)
    if args.out:
        write_output(args.out, md, args.force)
    if args.json:
        write_output(args.json, json.dumps({"deepseek": results, "traces": folds}, indent=1),
                     args.force)
    if args.plot:
        plot(results, args.plot, args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
