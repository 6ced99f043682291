"""Synthetic workloads vs real expert loads: the SKEW_STATS.md statistics side by side.

Real data is read from ``<repo>/../shared/data/real`` (never copied into the repository):
- SGLang DeepSeek-V3/R1 ``logical_count`` dumps (MoE rows 3..60): per-layer skew, EP32 imbalance,
  prefill-vs-decode rank correlation;
- ESFT DeepSeek-V2-Lite per-token top-6 ids: consecutive-window correlation and per-step skew.
Each real part is skipped, visibly, when its folder is absent.

Usage: ``.venv/bin/python benchmarks/bench_workloads.py [--steps 1000] [--repeats 3]``
Prints a markdown report (quoted in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from _harness import DEEPSEEK_DIR as SGLANG
from _harness import ESFT_FILE as ESFT
from _harness import start

from eplb.tools.generator import (
    TARGETS,
    generate_loads,
    generate_trace,
    rank_correlation,
    skew_stats,
)


def fmt(x: float | None, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def span(values: list[float], nd: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return fmt(lo, nd) if abs(hi - lo) < 10 ** (-nd) else f"{lo:.{nd}f}–{hi:.{nd}f}"


def target(name: str) -> str:
    lo, hi = TARGETS[name]
    return f"[{lo:g}, {hi:g}]"


def load_sglang() -> dict[str, torch.Tensor] | None:
    if not SGLANG.is_dir():
        return None
    out = {}
    for path in sorted(SGLANG.glob("*.json")):
        rows = json.loads(path.read_text())["logical_count"]
        out[path.stem] = torch.tensor(rows, dtype=torch.float64)[3:]  # MoE layers 3..60
    return out


def load_esft() -> dict[str, torch.Tensor] | None:
    if not ESFT.is_file():
        return None
    data = np.load(ESFT)
    out = {}
    for task in ("intent", "law", "summary", "translation"):
        ids = torch.from_numpy(data[f"{task}_topk_ids"].astype(np.int64))  # [T, 26, 6]
        counts = torch.zeros(ids.shape[0], ids.shape[1], 64, dtype=torch.float64)
        counts.scatter_add_(2, ids, torch.ones_like(ids, dtype=torch.float64))
        out[task] = counts  # one token per step
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(start("bench_workloads"))

    # ---------------------------------------------------------------- generated
    t_trace, trace = timed(lambda: generate_trace("deepseek-v3", args.steps, seed=args.seed),
                           args.repeats)
    t_loads, _ = timed(lambda: generate_loads("deepseek-v3", seed=args.seed), max(5, args.repeats))
    t_stats, gen = timed(lambda: skew_stats(trace), args.repeats)
    gen_w = {k: skew_stats(trace, window_steps=k)["window_corr_median"] for k in (10, 100)}
    gen_windows = [skew_stats(generate_loads("deepseek-v3", seed=s)) for s in range(10)]
    pd = generate_trace("deepseek-v3", 400, seed=args.seed, regime="prefill-decode",
                        regime_period=100)
    dom = generate_trace("deepseek-v3", 400, seed=args.seed, regime="domain-shift",
                         regime_period=100)
    gen_pd = skew_stats(pd)["regime_rank_corr"]
    gen_dom = skew_stats(dom)["regime_rank_corr"]
    # V2-Lite shape at 64 tokens/step for the ESFT comparison (W = 64 / 256 / 1024 tokens)
    lite = generate_trace("deepseek-v2-lite", 400, seed=args.seed, tokens_per_step=64)
    lite_w = {w: skew_stats(lite, window_tokens=w)["window_corr_median"] for w in (64, 256, 1024)}
    lite_stats = skew_stats(lite, gpus=8)

    # ---------------------------------------------------------------- real
    sg = load_sglang()
    esft = load_esft()
    lines: list[str] = []
    add = lines.append
    add(f"Generated: `generate_trace('deepseek-v3', {args.steps}, seed={args.seed})` (4096 tokens "
        f"per step, default config) unless noted; `generate_loads` rows are 10 seeds.\n")
    if sg is None:
        add(f"**SGLang DeepSeek-V3 data absent ({SGLANG}): real columns skipped.**\n")
    if esft is None:
        add(f"**ESFT per-token traces absent ({ESFT}): real window columns skipped.**\n")

    real_stats = {k: skew_stats(v) for k, v in (sg or {}).items()}
    dec = [s for k, s in real_stats.items() if k.startswith("decode")]
    pre = [s for k, s in real_stats.items() if k.startswith("prefill")]

    def real_col(key: str, group: list[dict]) -> str:
        return span([s[key] for s in group]) if group else "skipped"

    add("### Per-layer skew of an aggregate window (DeepSeek-V3, 58 x 256)\n")
    add("| statistic | real decode (4 files) | real prefill (8 files) | generated trace "
        "aggregate | `generate_loads` (10 seeds) | test target |")
    add("|---|---|---|---|---|---|")
    for key, name in [
        ("max_mean_median", "hottest/mean, median over layers"),
        ("max_mean_min", "hottest/mean, min layer"),
        ("max_mean_max", "hottest/mean, max layer"),
        ("sigma_median", "σ of log(load/mean), median"),
        ("sigma_min", "σ, min layer"),
        ("sigma_max", "σ, max layer"),
        ("gpu_max_mean_median", "EP32 per-GPU max/mean (contiguous), median"),
    ]:
        add(f"| {name} | {real_col(key, dec)} | {real_col(key, pre)} | {fmt(gen[key])} | "
            f"{span([s[key] for s in gen_windows])} | {target(key)} |")
    for key, name, nd in [("top8_share", "top-8 share of load", 3),
                          ("min_mean", "coldest/mean, median", 3)]:
        add(f"| {name} | {span([s[key] for s in dec], nd) if dec else 'skipped'} | "
            f"{span([s[key] for s in pre], nd) if pre else 'skipped'} | {fmt(gen[key], nd)} | "
            f"{span([s[key] for s in gen_windows], nd)} | – |")
    thirds = lambda ss: " / ".join(  # noqa: E731
        fmt(statistics.median(s["max_mean_thirds"][i] for s in ss), 1) for i in range(3))
    add(f"| hottest/mean by depth thirds (median) | {thirds(dec) if dec else 'skipped'} | "
        f"{thirds(pre) if pre else 'skipped'} | "
        f"{' / '.join(fmt(x, 1) for x in gen['max_mean_thirds'])} | {thirds(gen_windows)} | "
        f"last > first |")
    add("")

    add("### Per-step burstiness and temporal structure\n")
    add("| statistic | real | generated | test target |")
    add("|---|---|---|---|")
    add(f"| per-step expert max/mean, mean over steps x layers | 11.9 (TRT-LLM DeepSeek-R1, "
        f"published P2) | {fmt(gen['step_max_mean_mean'])} (p90 "
        f"{fmt(gen['step_max_mean_p90'])}) | {target('step_max_mean_mean')}, p90 "
        f"{target('step_max_mean_p90')} |")
    add(f"| per-step EP32 per-GPU max/mean | 2.56 (P1) | {fmt(gen['step_gpu_max_mean_mean'])} | "
        f"{target('step_gpu_max_mean_mean')} |")
    esft_rows = {}
    if esft is not None:
        for task, counts in esft.items():
            esft_rows[task] = {w: skew_stats(counts, window_steps=w)["window_corr_median"]
                               for w in (64, 256, 1024)}
            # 256-token "steps" (the tail that does not fill a step is dropped)
            steps = counts[: counts.shape[0] // 256 * 256].reshape(-1, 256, 26, 64).sum(1)
            esft_rows[task]["step256"] = skew_stats(steps, gpus=8)
    for w in (64, 256, 1024):
        real = span([r[w] for r in esft_rows.values()]) if esft_rows else "skipped"
        add(f"| window corr, W = {w} tokens | {real} (ESFT, 4 tasks) | {fmt(lite_w[w])} "
            f"(V2-Lite shape, 64 tok/step) | {'≥ 0.9' if w >= 1024 else '–'} |")
    add(f"| window corr, 1 step = 4096 tokens | – | {fmt(gen['window_corr_median'])} | "
        f"{target('window_corr_1k_median')} |")
    add(f"| window corr, 10 / 100 steps | – | {fmt(gen_w[10])} / {fmt(gen_w[100])} | ≥ 0.9 "
        f"(10 steps) |")
    if esft_rows:
        real_step = span([r["step256"]["step_max_mean_mean"] for r in esft_rows.values()])
        real_agg = span([r["step256"]["max_mean_median"] for r in esft_rows.values()])
    else:
        real_step = real_agg = "skipped"
    add(f"| V2-Lite: per-256-token step expert max/mean | {real_step} (ESFT) | "
        f"{fmt(skew_stats(lite.windows(4), gpus=8)['step_max_mean_mean'])} | – |")
    add(f"| V2-Lite: aggregate hottest/mean median | {real_agg} (ESFT) | "
        f"{fmt(lite_stats['max_mean_median'])} | – |")
    add("")

    add("### Regime switches (Spearman of per-expert load, median over layers)\n")
    add("| switch | real | generated (400 steps, 100-step segments) | test target |")
    add("|---|---|---|---|")
    if sg is not None:
        pd_real = float(rank_correlation(sg["prefill_in1024"], sg["decode_in1000out1000"]).median())
        pd_real_s = f"{pd_real:.2f} (prefill_in1024 vs decode_in1000out1000)"
    else:
        pd_real_s = "skipped"
    add(f"| prefill ↔ decode | {pd_real_s} | {fmt(gen_pd)} | "
        f"{target('prefill_decode_rank_corr')} |")
    if esft is not None:
        tasks = list(esft)
        cross = [float(rank_correlation(esft[a], esft[b]).median())
                 for i, a in enumerate(tasks) for b in tasks[i + 1:]]
        dom_real = f"{span(cross)} (ESFT task pairs)"
    else:
        dom_real = "skipped"
    add(f"| domain shift | {dom_real} | {fmt(gen_dom)} | {target('domain_rank_corr')} |")
    add("")

    add("### Speed (median of repeats, one thread)\n")
    add("| call | time |")
    add("|---|---|")
    add(f"| `generate_trace('deepseek-v3', {args.steps})` ([{args.steps}, 58, 256]) | "
        f"{t_trace:.2f} s |")
    add(f"| `generate_loads('deepseek-v3')` | {t_loads * 1e3:.1f} ms |")
    add(f"| `skew_stats` on that trace | {t_stats:.2f} s |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
