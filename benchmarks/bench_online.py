"""Online rebalancing figures: incremental moves vs balancedness, and failed GPUs.

Sections (all by default):

- ``incremental``: a drifting trace from the generator's deepseek-v3 preset replayed at
  vLLM's cadence (window 1000, interval 3000; R=288, P=32). From-scratch re-planning vs
  incremental planning under a range of move budgets: slots moved per rebalance, the
  balancedness of the traffic that follows each plan, and the planner's own time. The
  rows form the Pareto curve of moves vs balancedness. The greedy runs as vLLM 0.33 ships
  it (``DefaultEplbPolicy``, the released wheel's code: ``scripts/fetch_engines.py``) on
  vLLM's call, which hands it the map in force (it keeps an expert that stays on its GPU
  in its slot); without the wheel its row is skipped, visibly.
- ``dead``: 1, 2 and 4 of 32 GPUs dead on the real DeepSeek-V3 loads: balancedness over
  the live GPUs against the ceiling for the live set; every expert still served. Which
  GPUs fail shifts the figure a little: ``--dead-draws`` random sets per workload (the
  worst is reported; with one GPU dead, at most every GPU once).
- ``same``: re-planning the very loads the map in force was planned from, on each real
  DeepSeek-V3 file as ``eplb plan d.json -r 288 -g 32 -o a.json`` and then the same with
  ``--previous a.json`` read it (all 61 rows, the 3 all-zero ones too): the slots the
  second plan moves, out of 61 × 288, and both plans' balancedness. Not part of the
  default run.

Usage: ``python benchmarks/bench_online.py [incremental dead same] [--steps N] [--seed S]
[--dead-draws K]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _harness import DEEPSEEK_DIR as REAL
from _harness import REAL_DATA_HINT, start, vllm_planner
from engines import FETCH_HINT, engine_root, vllm_sources

import eplb
from eplb.core.bounds import balancedness_ceiling
from eplb.online import trivial_placement
from eplb.tools.generator import generate_trace
from eplb.tools.simulate import simulate

R, P = 288, 32


def section_incremental(args: argparse.Namespace) -> None:
    steps, seed = args.steps, args.seed
    trace = generate_trace("deepseek-v3", steps=steps, seed=seed)
    slots_total = trace.num_layers * R
    print(
        f"\n## Incremental rebalancing: generated deepseek-v3 drift trace, {steps} steps "
        f"(seed {seed}), vLLM cadence (window 1000, interval 3000), R={R}, P={P}, from "
        + ("a plan of the first 1000 steps" if args.start == "plan"
           else "vLLM's initial map (slot i holds expert i % E)") + "\n"
    )
    print(
        "Balancedness is measured on the traffic after each plan took over (the next "
        "windows), averaged over the scored windows; moves are slots whose expert changed, "
        f"out of {slots_total} per rebalance.\n"
    )
    print(
        "| planner | move budget per rebalance | moved slots / rebalance | moved % | "
        "next-window balancedness | vs from scratch | plan ms (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    runs = [
        ("greedy (vLLM 0.33's code and call), from scratch", dict(planner="greedy")),
        ("eplb, from scratch", dict(planner="eplb")),
    ]
    root = engine_root("vllm")
    if root is None:
        print(f"SKIPPED the greedy's row: vLLM 0.33.0 {FETCH_HINT}\n")
        runs = runs[1:]
    for frac in (0.0, 0.02, 0.05, 0.10, 0.15, 0.25):
        budget = int(frac * slots_total)
        runs.append(
            (
                f"eplb incremental, {100 * frac:.0f}%",
                dict(planner="eplb", incremental=True, max_moves=budget),
            )
        )
    runs.append(("eplb incremental, no budget", dict(planner="eplb", incremental=True)))
    # every run starts from the same map: by default a good plan of the first 1000 steps,
    # as a deployment that has been rebalancing for a while would; --start vllm: the map
    # vLLM starts from (slot i holds expert i % E), as a fresh deployment would
    initial = (eplb.plan(trace.counts[:1000].sum(0), R, P) if args.start == "plan"
               else trivial_placement(trace.num_experts, trace.num_layers, eplb.Topology(R, P)))
    scratch = None
    with vllm_sources(root) if root else _no_engine() as vllm:
        for label, kwargs in runs:
            if kwargs["planner"] == "greedy":
                kwargs = dict(kwargs, planner=vllm_planner(vllm.DefaultEplbPolicy, R, P))
            result = simulate(
                trace,
                num_replicas=R,
                num_gpus=P,
                cadence="vllm",
                oracle=False,
                initial=initial,
                **kwargs,
            )
            s = result.summary()
            bal = s["window_balancedness"]
            if label == "eplb, from scratch":
                scratch = bal
            budget = kwargs.get("max_moves")
            rel = "" if scratch is None else f"{100 * (bal - scratch) / scratch:+.2f}%"
            print(
                f"| {label} | {'–' if budget is None else budget} | "
                f"{s['moved_slots_per_rebalance']:.0f} | {100 * s['moved_fraction']:.1f}% | "
                f"{bal:.4f} | {rel} | {s['plan_ms_median']:.0f} |"
            )




class _no_engine:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def section_dead(args: argparse.Namespace) -> None:
    if not REAL.is_dir():
        print(f"\nSKIPPED dead-GPU section: real data not found at {REAL} {REAL_DATA_HINT}")
        return
    print("\n## Failed GPUs on the real DeepSeek-V3 loads (R=288, P=32, global)\n")
    print(
        "| dead GPUs | workloads × sets | balancedness (live) min–max | live ceiling min | "
        "worst ratio to ceiling | all experts served | plan ms (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    files = sorted(REAL.glob("*.json"))
    gen = torch.Generator().manual_seed(0)
    note = ""
    for dead in (1, 2, 4):
        bals, ceils, ratios, times, served = [], [], [], [], True
        draws = min(args.dead_draws, P) if dead == 1 else args.dead_draws
        sets = 0
        for path, draw in ((path, draw) for path in files for draw in range(draws)):
            w = torch.tensor(json.loads(path.read_text())["logical_count"], dtype=torch.float64)[3:]
            live = torch.ones(P, dtype=torch.bool)
            if dead == 1 and draws == P:  # every GPU once
                live[draw] = False
            else:
                live[torch.randperm(P, generator=gen)[:dead]] = False
            sets += 1
            if (P - dead) * (R // P) >= w.shape[1]:
                start = time.perf_counter()
                placement = eplb.plan(w, R, P, active_gpus=live)
                times.append(time.perf_counter() - start)  # the plan alone, not the ceiling
                ceil = balancedness_ceiling(w, R, P, active_gpus=live)
            else:
                # the survivors' 9 slots each cannot hold every expert (eplb.plan raises a
                # clear error); elastic re-plan: each survivor hosts ceil(E / live) slots
                try:
                    eplb.plan(w, R, P, active_gpus=live)
                    raise AssertionError("expected a ValueError for too few live slots")
                except ValueError as exc:
                    note = str(exc)
                slots = -(-w.shape[1] // (P - dead))
                start = time.perf_counter()
                placement = eplb.plan(w, slots * (P - dead), P - dead)
                times.append(time.perf_counter() - start)
                ceil = balancedness_ceiling(w, slots * (P - dead), P - dead)
            placement.validate()
            served &= bool((placement.logcnt >= 1).all())
            bal = placement.balancedness(w)
            bals.append(bal)
            ceils.append(ceil)
            ratios.append(bal / ceil)
        if (P - dead) * (R // P) < 256:
            print(
                f"| {dead} of {P}: 9 slots × {P - dead} live GPUs < 256 experts, so `eplb.plan` "
                f'raises: "{note}". Elastic re-plan on the {P - dead} survivors with '
                f"{-(-256 // (P - dead))} slots each: | | | | | | |"
            )
        print(
            f"| {dead} of {P} | {len(files)} × {sets // len(files)} | "
            f"{min(bals):.5f}–{max(bals):.5f} | "
            f"{min(ceils):.5f} | {min(ratios):.5f} | {'yes' if served else 'NO'} | "
            f"{1000 * statistics.median(times):.1f} |"
        )


def section_same(args: argparse.Namespace) -> None:
    if not REAL.is_dir():
        print(f"\nSKIPPED same-loads section: real data not found at {REAL} {REAL_DATA_HINT}")
        return
    print(f"\n## Re-planning the loads the map in force was planned from (R={R}, P={P}, "
          "global)\n")
    print("| workload | slots moved | of | most in one layer | fresh | from the fresh plan |")
    print("|---|---|---|---|---|---|")
    for path in sorted(REAL.glob("*.json")):
        # every row, as `eplb plan d.json` reads the file (the dense rows are all zero)
        w = torch.tensor(json.loads(path.read_text())["logical_count"], dtype=torch.float64)
        fresh = eplb.plan(w, R, P)
        again = eplb.plan(w, R, P, previous=fresh)
        moved = again.moved_slots(fresh)  # [L]
        print(f"| {path.stem} | {int(moved.sum())} | {moved.numel() * R} | {int(moved.max())} "
              f"| {fresh.balancedness(w):.4f} | {again.balancedness(w):.4f} |")


SECTIONS = {"incremental": section_incremental, "dead": section_dead, "same": section_same}
DEFAULT_SECTIONS = ("incremental", "dead")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*",
                        help=f"some of {list(SECTIONS)} (default: {' '.join(DEFAULT_SECTIONS)})")
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", choices=("plan", "vllm"), default="plan",
                        help="incremental: the map every run starts from (default: eplb's "
                             "plan of the first 1000 steps; vllm: vLLM's initial map)")
    parser.add_argument("--dead-draws", type=int, default=1,
                        help="sets of dead GPUs per workload (default 1; with one GPU dead, "
                             "32 or more try every GPU)")
    args = parser.parse_args()
    print(start("bench_online"))
    for name in args.sections or DEFAULT_SECTIONS:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
