"""eplb vs the engines' own planners, side by side, over many deployment shapes.

Planners, all in this process, one thread, global policy (``G = N = 1``):

- **eplb**: ``eplb.rebalance_experts(w, R, 1, 1, P)`` with default options.
- **greedy**: vLLM 0.33 ``DefaultEplbPolicy.rebalance_experts(w, R, 1, 1, P, None)``
  (DeepSeek's greedy), imported from the released wheel (``scripts/fetch_engines.py``).
- **vec**: SGLang 0.5.23 ``eplb_algorithms/deepseek_vec.py`` ``rebalance_experts(
  w[None], R, R // P, None, 1, enable_hierarchical=False)``, the released file executed
  unchanged (it imports only torch).

Shapes: ``S = R / P`` slots per GPU in {1, 2, 3, 4, 5, 9, 17}, ``P`` in {8, ..., 256}
(plus the issue's 144 and 96), models DeepSeek-V3 (58×256), Kimi-K2-like (61×384),
Qwen3-235B-like (94×128) and gpt-oss-like (36×32). DeepSeek-V3 shapes use the real
SGLang dumps (``../shared/data/real/sglang_deepseek_ep_statistics``, MoE rows 3..60);
the others (and DeepSeek-V3 when the real files are absent) use
``eplb.tools.generator.generate_loads`` presets.

Columns: the ceiling (``eplb.core.balancedness_ceiling``); for ``S <= 2`` the reference
``eplb.core.small_slots.best_two_slot_max_load``: the exact optimum for ``S = 1``, and for
``S = 2`` the best known (a long count search from five starts: an upper bound on the
optimum, not a proof); each planner's balancedness (Σ mean / Σ max GPU load, loads split
evenly over replicas; the worst input of the shape); eplb's worst ratio to the reference
(``ref``: that column where ``S <= 2``, else the ceiling); and the median time per call on
the first input, planners taking turns (each timed call follows an untimed call of the
same planner, so none pays for another's memory use).

    python benchmarks/bench_shapes.py                 # every shape, markdown on stdout
    python benchmarks/bench_shapes.py --only 58x256   # shapes whose label contains this
    python benchmarks/bench_shapes.py --repeats 9 --inputs 3
    python benchmarks/bench_shapes.py --gap           # what the S=3 gap is made of
    python benchmarks/bench_shapes.py --steps-sweep   # S=3-4 polish steps, generated loads
    python benchmarks/bench_shapes.py --portfolio     # what the S>=5 replica portfolio buys
    python benchmarks/bench_shapes.py --hall-sweep    # S=2 count search's Hall receivers
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _harness import DEEPSEEK_DIR as REAL
from _harness import start as header
from engines import FETCH_HINT, engine_root, vllm_sources

import eplb
from eplb.core.bounds import balancedness_ceiling
from eplb.core.map_tables import slot_gpu_loads
from eplb.core.replication import replica_counts
from eplb.core.small_slots import (
    best_two_slot_max_load,
    plan_two_slots,
    two_slot_hall_receivers,
)
from eplb.tools.generator import generate_loads

REAL_FILES = ("prefill_in4096", "decode_in1000out1000", "prefill_in1024", "decode_in2000out100")


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    experts: int
    preset: str


MODELS = {
    "dsv3": Model("DeepSeek-V3", 58, 256, "deepseek-v3"),
    "kimi": Model("Kimi-K2-like", 61, 384, "kimi-k2"),
    "qwen": Model("Qwen3-235B-like", 94, 128, "qwen3-235b"),
    "gptoss": Model("gpt-oss-like", 36, 32, "gpt-oss-120b"),
}

# (model, S, P): R = S·P >= E; R = E (no redundancy) only where nothing else fits
SHAPES: list[tuple[str, int, int]] = [
    ("dsv3", 2, 144), ("dsv3", 2, 256), ("dsv3", 3, 96), ("dsv3", 3, 128),
    ("dsv3", 4, 128), ("dsv3", 5, 64), ("dsv3", 9, 32), ("dsv3", 9, 64),
    ("dsv3", 17, 16), ("dsv3", 17, 32),
    ("kimi", 2, 256), ("kimi", 3, 256), ("kimi", 4, 128), ("kimi", 5, 128),
    ("kimi", 9, 64), ("kimi", 17, 32),
    ("qwen", 1, 256), ("qwen", 2, 128), ("qwen", 3, 64), ("qwen", 4, 64),
    ("qwen", 5, 32), ("qwen", 9, 16), ("qwen", 9, 32), ("qwen", 17, 8), ("qwen", 17, 16),
    ("gptoss", 1, 64), ("gptoss", 2, 32), ("gptoss", 2, 64), ("gptoss", 3, 16),
    ("gptoss", 4, 16), ("gptoss", 5, 8), ("gptoss", 9, 8), ("gptoss", 17, 8),
]


def model_loads(key: str, count: int) -> tuple[list[torch.Tensor], str]:
    """``count`` float64 ``[L, E]`` inputs for a model, and where they come from."""
    model = MODELS[key]
    if key == "dsv3":
        files = [REAL / f"{name}.json" for name in REAL_FILES[:count]]
        if all(f.is_file() for f in files):
            loads = [
                torch.tensor(json.loads(f.read_text())["logical_count"], dtype=torch.float64)[3:]
                for f in files
            ]
            return loads, "real"
        print(f"(real DeepSeek-V3 loads not found under {REAL}; set EPLB_REAL_DATA to the "
              f"shared data/real folder: the dsv3 rows use synthetic loads)", flush=True)
    loads = [
        generate_loads(
            model.preset, seed=seed, num_layers=model.layers, num_experts=model.experts
        )
        for seed in range(count)
    ]
    return loads, "synthetic"


def load_sglang_vec():
    """SGLang 0.5.23's released ``deepseek_vec`` module (imports only torch)."""
    root = engine_root("sglang")
    if root is None:
        sys.exit(f"SGLang 0.5.23: {FETCH_HINT}")
    path = root / "sglang/srt/eplb/eplb_algorithms/deepseek_vec.py"
    spec = importlib.util.spec_from_file_location("_sglang_deepseek_vec", path)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def balancedness(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> float:
    loads = slot_gpu_loads(weight, phy2log.long(), num_gpus)
    return float(loads.mean(1).sum() / loads.amax(1).sum())


def exact_balancedness(weight: torch.Tensor, num_replicas: int, num_gpus: int) -> float:
    """Σ mean / Σ reference max GPU load for ``S <= 2``: the exact optimum for ``S = 1``,
    the best known (a long count search) for ``S = 2``."""
    best = best_two_slot_max_load(weight, num_replicas, num_gpus)
    return float(weight.sum() / num_gpus / best.sum())


def steps_sweep(repeats: int) -> None:
    """How many polish steps pay where a GPU has 3-4 slots: the S = 3-4 shapes on
    *generated* loads (seeds 10, 11 for every model, so not the table's inputs), the
    default against the earlier rule (16 polish steps at 32 GPUs and more), same pair
    steps. Ratio to the ceiling (worst input), median time on the first input."""
    print("| shape | polish steps: default | ratio | ms | 16 (earlier rule) | ratio | ms |")
    print("|---|---|---|---|---|---|---|")
    for key, slots, gpus in SHAPES:
        if slots not in (3, 4):
            continue
        model = MODELS[key]
        replicas = slots * gpus
        loads = [generate_loads(model.preset, seed=seed, num_layers=model.layers,
                                num_experts=model.experts) for seed in (10, 11)]
        auto = eplb.PackingOptions()
        rules = {
            "default": None,
            "16": eplb.PlanOptions(packing=eplb.PackingOptions(
                max_steps=16, pair_steps=auto.pair_steps_for(gpus, slots))),
        }
        cells = [f"{model.layers}×{model.experts} S={slots} P={gpus}",
                 str(auto.max_steps_for(gpus, slots))]
        times: dict[str, list[float]] = {name: [] for name in rules}
        for _ in range(repeats):
            for name, options in rules.items():
                begin = time.perf_counter()
                eplb.plan(loads[0], replicas, gpus, options=options)
                times[name].append(time.perf_counter() - begin)
        for name, options in rules.items():
            ratio = min(eplb.plan(w, replicas, gpus, options=options).balancedness(w)
                        / balancedness_ceiling(w, replicas, gpus) for w in loads)
            if name != "default":
                cells.append(name)
            cells += [f"{ratio:.4f}", f"{1e3 * statistics.median(times[name]):.1f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


def hall_sweep(repeats: int) -> None:
    """What the S = 2 count search's Hall receivers buy: every S = 2 shape on *generated*
    loads (seeds 10-13 of every model, so not the table's inputs), with none, one and two
    (``plan_two_slots(hall_receivers=...)``; the default takes one where R − E >= 64 and
    R >= 2E).
    Balancedness over the four inputs' layers, the layers whose max GPU load one receiver
    lowers / raises against none, median time on the first input."""
    variants = (0, 1, 2)
    print("| shape | R − E | default | " + " | ".join(f"{h}: balancedness | ms" for h in variants)
          + " | layers better / worse with 1 |")
    print("|---|---|---|" + "---|---|" * len(variants) + "---|")
    for key, slots, gpus in SHAPES:
        if slots != 2:
            continue
        model = MODELS[key]
        replicas = slots * gpus
        loads = [generate_loads(model.preset, seed=seed, num_layers=model.layers,
                                num_experts=model.experts) for seed in range(10, 14)]
        times: dict[int, list[float]] = {h: [] for h in variants}
        for _ in range(repeats):
            for h in variants:
                plan_two_slots(loads[0], replicas, hall_receivers=h)  # untimed, as the table
                begin = time.perf_counter()
                plan_two_slots(loads[0], replicas, hall_receivers=h)
                times[h].append(time.perf_counter() - begin)
        peaks: dict[int, torch.Tensor] = {}
        cells = [f"{model.layers}×{model.experts} S=2 P={gpus}", str(replicas - model.experts),
                 str(two_slot_hall_receivers(model.experts, replicas))]
        for h in variants:
            plans = [plan_two_slots(w, replicas, hall_receivers=h).long() for w in loads]
            gpu = torch.cat([slot_gpu_loads(w, p, gpus) for w, p in zip(loads, plans, strict=True)])
            peaks[h] = gpu.amax(1)
            ratio = float(gpu.mean(1).sum() / peaks[h].sum())
            cells += [f"{ratio:.4f}", f"{1e3 * statistics.median(times[h]):.1f}"]
        better = int((peaks[1] < peaks[0] * (1 - 1e-9)).sum())
        worse = int((peaks[1] > peaks[0] * (1 + 1e-9)).sum())
        cells.append(f"{better} / {worse} of {len(peaks[0])}")
        print("| " + " | ".join(cells) + " |", flush=True)


def candidates_sweep(repeats: int) -> None:
    """How many packing starts pay where a GPU has 3-17 slots: every S >= 3 shape on
    *generated* loads (seeds 10, 11, not the table's inputs) with 1, 2, 4 and 8 starts.
    Ratio to the ceiling (worst input), median time on the first input."""
    counts = (1, 2, 4, 8)
    print("| shape | " + " | ".join(f"{c} start{'s' * (c > 1)}: ratio | ms" for c in counts)
          + " |")
    print("|---|" + "---|---|" * len(counts))
    for key, slots, gpus in SHAPES:
        if slots < 3:
            continue
        model = MODELS[key]
        replicas = slots * gpus
        loads = [generate_loads(model.preset, seed=seed, num_layers=model.layers,
                                num_experts=model.experts) for seed in (10, 11)]
        times: dict[int, list[float]] = {c: [] for c in counts}
        for _ in range(repeats):
            for c in counts:
                begin = time.perf_counter()
                eplb.plan(loads[0], replicas, gpus, num_candidates=c)
                times[c].append(time.perf_counter() - begin)
        cells = [f"{model.layers}×{model.experts} S={slots} P={gpus}"]
        for c in counts:
            ratio = min(eplb.plan(w, replicas, gpus, num_candidates=c).balancedness(w)
                        / balancedness_ceiling(w, replicas, gpus) for w in loads)
            cells += [f"{ratio:.4f}", f"{1e3 * statistics.median(times[c]):.1f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


def gap_analysis(replicas: int = 288, gpus: int = 96) -> None:
    """What the gap to the ceiling is made of at ``S = R / P`` (default: the issue's
    58×256, R = 288, P = 96), per real load file: replication or packing search.

    For every file: the ceiling; the packing bound (:mod:`eplb.core.count_bounds`) of the
    allocation the default plan chose (no packing of those counts can beat it) and the
    smallest such bound over the portfolio's allocations; the default plan; the plan with
    ``num_candidates=64, refine_steps=64``; and whether both plans chose the same counts.
    """
    from eplb.core.count_bounds import packing_bound
    from eplb.core.replication import expand_replicas, replica_counts

    loads, source = model_loads("dsv3", len(REAL_FILES))
    print(f"\n## Gap analysis: 58×256, R={replicas}, P={gpus} ({source} loads)\n")
    print(
        "| input | ceiling | bound of default's counts | best bound over portfolio | "
        "default | 64 cand. × 64 steps | same counts |"
    )
    print("|---|---|---|---|---|---|---|")
    rules = (0.0, -0.25, -0.5, -0.75, "hamilton")
    for name, w in zip(REAL_FILES, loads, strict=False):
        mean = float(w.sum() / gpus)
        ceil = balancedness_ceiling(w, replicas, gpus)
        plain = eplb.plan(w, replicas, gpus)
        heavy = eplb.plan(w, replicas, gpus, num_candidates=64, refine_steps=64)

        def bound_of(counts: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
            load, _ = expand_replicas(w, counts)
            return torch.from_numpy(packing_bound(load.numpy(), gpus))

        chosen = bound_of(plain.logcnt)
        every = torch.stack([bound_of(c) for c in replica_counts(w, replicas, rules)])
        print(
            f"| {name} | {ceil:.4f} | {mean / float(chosen.sum()):.4f} | "
            f"{mean / float(every.amin(0).sum()):.4f} | {plain.balancedness(w):.4f} | "
            f"{heavy.balancedness(w):.4f} | "
            f"{int((plain.logcnt == heavy.logcnt).all(1).sum())}/{w.shape[0]} layers |",
            flush=True,
        )


def portfolio_sweep() -> None:
    """What the replica portfolio buys where a GPU has >= 5 slots (there all five
    allocations of a coarse layer are packed): per layer whose largest Jefferson replica
    is above 1/3 of the mean GPU load, the balancedness with the portfolio minus without,
    by that ratio, in sample and on the next window (16 drifted windows per layer, the
    same for both plans), on generated presets (seeds 30, 31) and lognormal loads
    (σ = 1-3);
    then the table's S >= 5 shapes planned with the portfolio above 1/3 of a GPU's mean
    load (the default before the eighteenth session) and with the default (above 1/2
    there), in sample and on the next window (each expert × exp(0.15·N(0, 1)), 8 draws;
    the 8 real DeepSeek-V3 files the table does not read, generated seeds 40-43: not
    the table's inputs; the 12 real files before, which held the table's 4)."""
    no_portfolio = eplb.PlanOptions(portfolio_threshold=1e9)
    third = eplb.PlanOptions(portfolio_threshold=1 / 3)
    gains: dict[tuple[int, str], list[float]] = {}
    gen = torch.Generator().manual_seed(3)

    drift = torch.Generator().manual_seed(11)

    def layer_balance(w: torch.Tensor, phy2log: torch.Tensor, gpus: int) -> torch.Tensor:
        loads = slot_gpu_loads(w, phy2log.long(), gpus)
        return loads.mean(1) / loads.amax(1)

    def layers(w: torch.Tensor, replicas: int, gpus: int) -> None:
        w = w.to(torch.float64)
        counts = replica_counts(w, replicas, (0.0,))[0]
        ratio = (w / counts).amax(1) / (w.sum(1) / gpus)
        with_it = eplb.plan(w, replicas, gpus, options=third).phy2log
        without = eplb.plan(w, replicas, gpus, options=no_portfolio).phy2log
        gain = layer_balance(w, with_it, gpus) - layer_balance(w, without, gpus)
        later = torch.zeros_like(gain)  # the same 16 drifted windows for both plans
        for _ in range(16):
            x = w * torch.exp(0.15 * torch.randn(w.shape, generator=drift, dtype=torch.float64))
            later += (layer_balance(x, with_it, gpus) - layer_balance(x, without, gpus)) / 16
        for r, a, b in zip(ratio.tolist(), gain.tolist(), later.tolist(), strict=True):
            if r > 1 / 3:
                band = "1/3-1/2" if r <= 0.5 else ("1/2-3/4" if r <= 0.75 else "> 3/4")
                gains.setdefault((replicas // gpus, band), []).append((a, b))

    for slots, gpus in ((5, 64), (6, 48), (9, 32), (9, 16), (17, 16), (5, 32)):
        for model in MODELS.values():
            if slots * gpus >= model.experts:
                for seed in (30, 31):
                    layers(generate_loads(model.preset, seed=seed, num_layers=model.layers,
                                          num_experts=model.experts), slots * gpus, gpus)
        if slots * gpus >= 256:
            for sigma in (1.0, 1.5, 2.0, 3.0):
                w = torch.exp(sigma * torch.randn(40, 256, generator=gen, dtype=torch.float64))
                layers(w, slots * gpus, gpus)
    print("| S | largest replica / mean GPU load | layers | mean gain | max gain | "
          "layers gaining > 1e-4 | next window: mean gain (16 drifts each) |")
    print("|---|---|---|---|---|---|---|")
    for (slots, band), pairs in sorted(gains.items()):
        values = [a for a, _ in pairs]
        share = sum(v > 1e-4 for v in values) / len(values)
        print(f"| {slots} | {band} | {len(values)} | {statistics.mean(values):.5f} | "
              f"{max(values):.5f} | {share:.2f} | {statistics.mean(b for _, b in pairs):+.5f} |")
    print("\n| shape | loads | inputs | in sample: 1/3 → default (mean) | next window: 1/3 → "
          "default (mean) | ms, 1/3 → default |")
    print("|---|---|---|---|---|---|")
    for key, slots, gpus in SHAPES:
        if slots < 5:
            continue
        model, replicas = MODELS[key], slots * gpus
        loads, source = _unseen_loads(key)
        drift = torch.Generator().manual_seed(7)
        scores: dict[str, list[tuple[float, float]]] = {"1/3": [], "default": []}
        for w in loads:
            windows = [w * torch.exp(0.15 * torch.randn(w.shape, generator=drift,
                                                        dtype=torch.float64))
                       for _ in range(8)]
            for name, opts in (("1/3", third), ("default", None)):
                phy2log = eplb.plan(w, replicas, gpus, options=opts).phy2log
                scores[name].append((balancedness(w, phy2log, gpus), statistics.mean(
                    balancedness(x, phy2log, gpus) for x in windows)))
        times: dict[str, list[float]] = {"1/3": [], "default": []}
        for _ in range(5):
            for name, opts in (("1/3", third), ("default", None)):
                begin = time.thread_time()
                eplb.plan(loads[0], replicas, gpus, options=opts)
                times[name].append(time.thread_time() - begin)
        mean = {name: [statistics.mean(v[k] for v in got) for k in (0, 1)]
                for name, got in scores.items()}
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(f"| {model.layers}x{model.experts} S={slots} P={gpus} | {source} | {len(loads)} | "
              f"{mean['1/3'][0]:.5f} → {mean['default'][0]:.5f} | {mean['1/3'][1]:.5f} → "
              f"{mean['default'][1]:.5f} | {ms['1/3']:.1f} → {ms['default']:.1f} |", flush=True)


def _unseen_loads(key: str) -> tuple[list[torch.Tensor], str]:
    """Inputs the shape table does not use: the real DeepSeek-V3 files (MoE rows) but the
    table's ``REAL_FILES`` (8 of the 12), or generated seeds 40-43."""
    model = MODELS[key]
    files = ([f for f in sorted(REAL.glob("*.json")) if f.stem not in REAL_FILES]
             if key == "dsv3" else [])
    if files:
        return [torch.tensor(json.loads(f.read_text())["logical_count"],
                             dtype=torch.float64)[3:] for f in files], "real"
    return [generate_loads(model.preset, seed=seed, num_layers=model.layers,
                           num_experts=model.experts) for seed in range(40, 44)], "synthetic"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per planner")
    parser.add_argument("--inputs", type=int, default=2, help="load inputs per shape")
    parser.add_argument("--only", action="append", help="keep shapes whose label has this")
    parser.add_argument("--no-greedy", action="store_true", help="skip vLLM's greedy")
    parser.add_argument("--fixed-order", action="store_true",
                        help="the earlier timing protocol: one call per planner and repeat, "
                             "always in the same order (eplb, vec, greedy)")
    parser.add_argument(
        "--gap", action="store_true", help="only the S=3 gap analysis (58×256, R=288, P=96)"
    )
    parser.add_argument(
        "--steps-sweep", action="store_true",
        help="only the S=3-4 polish-step comparison on generated loads",
    )
    parser.add_argument(
        "--candidates-sweep", action="store_true",
        help="only the packing-start comparison (S >= 3) on generated loads",
    )
    parser.add_argument(
        "--hall-sweep", action="store_true",
        help="only what the S=2 count search's Hall receivers buy, on generated loads",
    )
    parser.add_argument(
        "--portfolio", action="store_true",
        help="only what the replica portfolio buys at S >= 5, by the layer's coarseness",
    )
    args = parser.parse_args(argv)
    print(header("bench_shapes"))
    if args.portfolio:
        portfolio_sweep()
        return 0
    if args.candidates_sweep:
        candidates_sweep(args.repeats)
        return 0
    if args.hall_sweep:
        hall_sweep(args.repeats)
        return 0
    if args.gap:
        gap_analysis()
        return 0
    if args.steps_sweep:
        steps_sweep(args.repeats)
        return 0

    vec_module = load_sglang_vec()
    vllm_root = engine_root("vllm")
    if vllm_root is None and not args.no_greedy:
        sys.exit(f"vLLM 0.33.0: {FETCH_HINT}")

    def vec(w: torch.Tensor, r: int, p: int) -> torch.Tensor:
        return vec_module.rebalance_experts(w[None], r, r // p, None, 1, False)[0]

    def ours(w: torch.Tensor, r: int, p: int) -> torch.Tensor:
        return eplb.rebalance_experts(w, r, 1, 1, p)[0]

    protocol = ("in one fixed order" if args.fixed_order
                else "each after an untimed one of the same planner")
    load_avg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(
        f"# bench_shapes — {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, torch "
        f"{torch.__version__}, 1 thread, load average {load_avg}\n\n"
        f"Balancedness: worst of {args.inputs} inputs per shape; time: median of "
        f"{args.repeats} calls on the first input, {protocol}. ref = exact optimum for S = 1, "
        "best known (long count search) for S = 2, else the ceiling.\n"
    )
    print(
        "| model | L×E | S | P | R | loads | ceiling | S<=2 ref | eplb | greedy | vec | "
        "eplb/ref | eplb ms | greedy ms | vec ms | eplb / fastest peer |"
    )
    print("|" + "---|" * 16)
    with vllm_sources(vllm_root) if vllm_root else _null() as vllm:
        planners = {"eplb": ours, "vec": vec}
        if not args.no_greedy:
            greedy_cls = vllm.DefaultEplbPolicy

            def greedy(w: torch.Tensor, r: int, p: int) -> torch.Tensor:
                return greedy_cls.rebalance_experts(w, r, 1, 1, p, None)

            planners["greedy"] = greedy
        cache: dict[str, tuple[list[torch.Tensor], str]] = {}
        misses = []
        for key, slots, gpus in SHAPES:
            model = MODELS[key]
            replicas = slots * gpus
            label = f"{model.layers}x{model.experts} S={slots} P={gpus}"
            if args.only and not any(o in label or o == key for o in args.only):
                continue
            if key not in cache:
                cache[key] = model_loads(key, args.inputs)
            loads, source = cache[key]
            ceil = min(balancedness_ceiling(w, replicas, gpus) for w in loads)
            exact = None
            if slots <= 2:
                exact = [exact_balancedness(w, replicas, gpus) for w in loads]
            quality: dict[str, list[float]] = {name: [] for name in planners}
            ratio_ref: list[float] = []
            for k, w in enumerate(loads):
                ref = exact[k] if exact else balancedness_ceiling(w, replicas, gpus)
                for name, fn in planners.items():
                    b = balancedness(w, fn(w, replicas, gpus), gpus)
                    quality[name].append(b)
                    if name == "eplb":
                        ratio_ref.append(b / ref)
            times: dict[str, list[float]] = {name: [] for name in planners}
            w0 = loads[0]
            for fn in planners.values():  # warm-up
                fn(w0, replicas, gpus)
            order = list(planners.items())
            for repeat in range(args.repeats):
                # every timed call follows an untimed call of the same planner: a call
                # made right after another planner's pays for the other's memory habits
                # (SGLang's large temporaries go back to the system and fault in again),
                # which in a fixed interleaving favoured whichever planner went first
                for name, fn in order if repeat % 2 == 0 or args.fixed_order else order[::-1]:
                    if not args.fixed_order:
                        fn(w0, replicas, gpus)
                    start = time.perf_counter()
                    fn(w0, replicas, gpus)
                    times[name].append(time.perf_counter() - start)
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            fastest = min(v for n, v in ms.items() if n != "eplb")
            worst = min(ratio_ref)
            target = 0.999 if slots <= 2 else (0.99 if slots <= 4 else 0.995)
            speed = ms["eplb"] / fastest
            if worst < target or speed > 1.0:
                misses.append((label, worst, target, speed))
            greedy_b = f"{min(quality['greedy']):.4f}" if "greedy" in quality else "–"
            greedy_ms = f"{ms['greedy']:.1f}" if "greedy" in ms else "–"
            exact_s = f"{min(exact):.4f}" if exact else "–"
            print(
                f"| {model.name} | {model.layers}×{model.experts} | {slots} | {gpus} | "
                f"{replicas} | {source} | {ceil:.4f} | {exact_s} | {min(quality['eplb']):.4f} | "
                f"{greedy_b} | {min(quality['vec']):.4f} | {worst:.4f} | {ms['eplb']:.1f} | "
                f"{greedy_ms} | {ms['vec']:.1f} | {speed:.2f} |",
                flush=True,
            )
    print("\nMisses (balancedness below target × ref, or slower than the fastest peer):")
    for label, worst, target, speed in misses:
        print(f"- {label}: eplb/ref {worst:.4f} (target {target}), time {speed:.2f}× fastest")
    if not misses:
        print("- none")
    return 0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
