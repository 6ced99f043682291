"""No spare slot: slots = experts, the shape vLLM runs without redundant experts.

vLLM's ``num_redundant_experts`` defaults to 0: every expert keeps one slot and EPLB only
rearranges them, so the packing is the whole plan. Per model of the real data (those of
``bench_real_models.py`` and the real DeepSeek-V3 dumps, never copied here; a model whose
files are absent is skipped, visibly) and per GPU count with at least 2 slots per GPU:
eplb's default plan against DeepSeek's greedy (vLLM's default policy,
``eplb.core.plan_greedy``), in sample, with the ceiling, the windows where eplb ends
below the greedy, and the median planning time on the first window.

Beside the real loads, synthetic extremes: one expert 50× or 1000× the others, 4
one-layer windows each. ``--before`` plans with the rules before the thirty-third
session (rows holding every expert once searched again only from 1 % above their bound,
as every row is, and no third search with steps scaled by the slots), for a side-by-side
run of the same code.

A second table: one spare slot a GPU (``R = E + P``) with three experts 20× the others
(synthetic, uniform in [1, 101) otherwise), where the hot experts take the spares and
every other expert packs whole. ``--before-few-spare`` plans it with the rule before the
thirty-fourth session (only rows with no spare slot held to the tight gap).

``--no-greedy-look`` plans without DeepSeek's greedy packing as a second opinion for
rows holding every expert once at 3-4 slots a GPU.

    python benchmarks/bench_no_spare.py [--before] [--before-few-spare] [--no-greedy-look]
        [--repeats N]
"""

from __future__ import annotations

import argparse
import importlib
import statistics

import torch
from _harness import REAL_DATA_HINT, deepseek_loads, markdown_table, median_ms, start
from bench_real_models import MODELS

import eplb
from eplb.core import plan_greedy
from eplb.core.bounds import balancedness_ceiling


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", action="store_true",
                        help="the rule before: every row searched again from 1 %% above its "
                             "bound")
    parser.add_argument("--before-few-spare", action="store_true",
                        help="the rule before: only rows with no spare slot held to the tight "
                             "gap")
    parser.add_argument("--no-greedy-look", action="store_true",
                        help="without the greedy's second opinion at 3-4 slots a GPU (the "
                             "rule before the thirty-fourth session's last change)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (default 5)")
    args = parser.parse_args(argv)
    flags = [f for f, on in (("--before", args.before),
                             ("--before-few-spare", args.before_few_spare),
                             ("--no-greedy-look", args.no_greedy_look)) if on]
    print(start("bench_no_spare") + (f" ({' '.join(flags)})" if flags else ""))
    packing = importlib.import_module("eplb.core.packing")
    if args.before:
        packing.RESCUE_GAP_WHOLE = packing.RESCUE_GAP
        packing.RESCUE_STUCK_GAP = float("inf")
    if args.before_few_spare:
        packing.RESCUE_FEW_SPARE_SLOTS = 2**62
    if args.no_greedy_look:
        importlib.import_module("eplb.core.packing.greedy").GREEDY_LOOK_SLOTS = ()
    models = {}
    for name, (path, read) in MODELS.items():
        if path.exists():
            models[name] = list(read().values())
        else:
            print(f"SKIPPED {name}: {path} not found {REAL_DATA_HINT}")
    # a synthetic extreme beside the real loads: one expert 50× the others (uniform in
    # [1, 101)), one layer per seed, on few GPUs of many slots (quality attacker pass)
    for experts in (256, 384):
        g = torch.Generator().manual_seed(experts)
        hot = torch.rand(4, experts, generator=g, dtype=torch.float64) * 100 + 1
        hot[:, 0] *= 50
        models[f"one expert 50× (synthetic, {experts})"] = list(hot[:, None])
    # ... and one 1000× the others (uniform in [0.01, 1.01)), where the bound is that
    # expert plus the S − 1 lightest (attacker pass, thirty-fourth session)
    for experts in (192, 768):
        g = torch.Generator().manual_seed(0)
        hot = torch.rand(4, experts, generator=g, dtype=torch.float64) + 0.01
        hot[:, 0] *= 1000
        models[f"one expert 1000× (synthetic, {experts})"] = list(hot[:, None])
    deepseek = list(deepseek_loads(torch.float64).values())
    if deepseek:
        models["DeepSeek-V3"] = deepseek[:4]
    else:
        print(f"SKIPPED DeepSeek-V3: the real dumps were not found {REAL_DATA_HINT}")
    rows = []
    for name, windows in models.items():
        windows = [w.to(torch.float64) for w in windows]
        experts = windows[0].shape[1]
        for gpus in (2, 4, 8, 16, 32, 64):
            if experts % gpus or experts // gpus < 2:
                continue
            rows.append([name, f"{windows[0].shape[0]}×{experts}", gpus, experts // gpus,
                         len(windows), *side_by_side(windows, experts, gpus, args.repeats)])
    print()
    print(markdown_table(
        ["model", "layers × experts", "P", "S", "windows", "eplb", "greedy",
         "eplb / ceiling: mean (worst)", "windows eplb < greedy", "eplb ms", "greedy ms"],
        rows))
    print()
    print(markdown_table(
        ["experts", "P", "S", "windows", "eplb", "greedy", "eplb / ceiling: mean (worst)",
         "windows eplb < greedy", "eplb ms", "greedy ms"], few_spare_rows(args.repeats)))
    return 0


def side_by_side(windows: list[torch.Tensor], slots: int, gpus: int,
                 repeats: int) -> list[object]:
    """eplb and the greedy on ``windows`` (each ``[L, E]``): mean balancedness of each,
    eplb over the ceiling (mean and worst), the windows where eplb is below the greedy,
    and the median ms of each on the first window."""
    ours, greedy, ratio, below = [], [], [], 0
    for w in windows:
        mine = eplb.plan(w, slots, gpus).balancedness(w)
        theirs = plan_greedy(w, slots, gpus).balancedness(w)
        ours.append(mine)
        greedy.append(theirs)
        ratio.append(mine / balancedness_ceiling(w, slots, gpus))
        below += mine < theirs - 1e-9
    first = windows[0]
    ms = median_ms(lambda: eplb.plan(first, slots, gpus), repeats)
    ms_greedy = median_ms(lambda: plan_greedy(first, slots, gpus), repeats)
    return [f"{statistics.mean(ours):.5f}", f"{statistics.mean(greedy):.5f}",
            f"{statistics.mean(ratio):.5f} ({min(ratio):.5f})", below, f"{ms:.1f}",
            f"{ms_greedy:.1f}"]


def few_spare_rows(repeats: int) -> list[list[object]]:
    """One spare slot a GPU, three experts 20× the others: 4 windows of 2 layers per shape."""
    rows = []
    for experts, gpus in ((64, 8), (128, 16), (256, 32), (128, 8), (256, 16), (256, 8),
                          (384, 8), (384, 6)):
        g = torch.Generator().manual_seed(experts + gpus)
        windows = []
        for _ in range(4):
            w = torch.rand(2, experts, generator=g, dtype=torch.float64) * 100 + 1
            w[:, :3] *= 20
            windows.append(w)
        rows.append([experts, gpus, (experts + gpus) // gpus, len(windows),
                     *side_by_side(windows, experts + gpus, gpus, repeats)])
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
