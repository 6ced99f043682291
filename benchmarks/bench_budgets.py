"""Move budgets and forced moves of incremental planning, swept.

Two sections (both through the public API, so the same script measures an older tree
through ``PYTHONPATH``):

- ``budgets``: per case (an old plan of one window, the next window's loads; real
  DeepSeek-V3 dumps where present, else skipped visibly, and synthetic 6×32 layers), every
  total budget of a sweep: the slots moved (never above the budget beyond the forced
  moves), the budgets of 1-3 slots that moved nothing where a larger one improved (with
  every expert once the cheapest move is a swap of 2), and the
  pairs of budgets ``B1 < B2`` where the larger one ends worse: by the objective a total
  budget spends on (the next window's expected MoE time, each layer's load times its
  expected peak over the mean, plus the move price; :func:`eplb.online.score.expected_peak`
  scores it, as the planner does), split at the default ladder's reach a layer (below it
  every budget chooses among the same candidates), and by ``balancedness()`` on the loads
  given.
- ``greedy``: DeepSeek's greedy placement of the loads at hand (it stacks replicas of a
  hot expert on one GPU, which eplb's contract forbids) handed in as the map in force,
  without a budget: the layers that end below that map, and below both it and a fresh
  eplb plan, with the slots moved.
- ``time`` (only when named): one thread, the real cases' call with a budget against the
  same call without one, alternated, medians of ``--repeats`` (the ratio is the figure:
  this machine's speed drifts between runs).

    python benchmarks/bench_budgets.py [budgets] [greedy] [time] [--repeats K]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np
import torch
from _harness import deepseek_loads, markdown_table, start

import eplb
from eplb.core import plan_greedy
from eplb.core.options import IncrementalOptions
from eplb.online import score

BUDGETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 20, 25, 40, 64)
#: (R, P, nodes, groups) of the real-load cases and of the synthetic 6×32 ones
REAL_SHAPES = ((288, 32, 1, 1), (288, 32, 4, 8), (320, 64, 1, 1), (256, 64, 4, 8),
               (256, 64, 1, 1))
SYNTHETIC_SHAPES = ((40, 8, 1, 1), (40, 8, 2, 4), (64, 8, 1, 1), (72, 8, 1, 1), (48, 8, 2, 4))


def synthetic(seed: int, kind: str) -> torch.Tensor:
    """``[6, 32]`` float64 loads of one of four kinds."""
    g = torch.Generator().manual_seed(seed)
    if kind == "lognormal":
        return torch.exp(torch.randn(6, 32, generator=g, dtype=torch.float64) * 0.8)
    if kind == "pareto":
        return (1 - torch.rand(6, 32, generator=g, dtype=torch.float64)) ** (-1 / 1.2)
    if kind == "integer":
        return torch.randint(0, 20, (6, 32), generator=g).to(torch.float64)
    w = torch.rand(6, 32, generator=g, dtype=torch.float64)  # one expert 200× the rest
    w[:, 0] *= 200
    return w


def drifted(w: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return w * torch.exp(torch.randn(w.shape, generator=g, dtype=torch.float64) * 0.5)


def cases() -> list[tuple[str, int, int, int, int, torch.Tensor, torch.Tensor]]:
    out = []
    real = list(deepseek_loads(torch.float64).values())
    if len(real) >= 12:
        for shape in REAL_SHAPES:
            for a, b in ((0, 4), (5, 9), (11, 2), (3, 7)):
                out.append((f"real {a}→{b}", *shape, real[a], real[b]))
    else:
        print("SKIPPED the real DeepSeek-V3 cases: the dumps were not found (EPLB_REAL_DATA)")
    for shape in SYNTHETIC_SHAPES:
        for seed in range(3):
            for kind in ("lognormal", "pareto", "integer", "hot"):
                w0 = synthetic(seed, kind)
                out.append((f"{kind} {seed}", *shape, w0, drifted(w0, seed)))
    return out


def budgets_section() -> None:
    options = IncrementalOptions()
    rows = []
    totals = {"plans": 0, "over": 0, "nothing": 0, "below": [0, 0], "across": [0, 0],
              "balance": [0, 0], "worst": 0.0}
    for name, replicas, gpus, nodes, groups, w0, w1 in cases():
        old = eplb.plan(w0, replicas, gpus, nodes, groups)
        base = eplb.plan(w1, replicas, gpus, nodes, groups, previous=old, max_moves=0)
        forced = int(base.moved_slots(old).sum())
        weight = w1.numpy()
        share = weight.sum(1) / weight.sum(1).mean()
        # the default ladder's reach (its swap steps times its quota) a layer: below it a
        # fine ladder is searched too, whatever the budget (the steps follow the slots
        # per GPU, IncrementalOptions.steps_for, as the planner's)
        steps = options.steps_for(replicas // gpus)
        line = max(2, round(options.quota * replicas)) * steps * w1.shape[0]
        spent, balance, moved = {}, {}, {}
        for budget in BUDGETS:
            plan = eplb.plan(w1, replicas, gpus, nodes, groups, previous=old, max_moves=budget)
            both = np.stack([base.phy2log.numpy(), plan.phy2log.numpy()])
            peak = score.expected_peak(weight, both, gpus, options.drift, groups=groups,
                                       group_share=options.group_share)[0][1]
            cost = (both[1] != both[0]).sum(1)
            price = options.layer_price(replicas // gpus)  # the move price at this shape
            spent[budget] = float((share * peak + price * cost / replicas).sum())
            balance[budget] = plan.balancedness(w1)
            moved[budget] = int(plan.moved_slots(old).sum())
            totals["plans"] += 1
            totals["over"] += moved[budget] > budget + forced
        improved = balance[BUDGETS[-1]] > balance[0] + 1e-9
        # (with every expert once the cheapest move is a swap: two slots)
        cheapest = 2 if replicas == w1.shape[1] else 1
        nothing = [b for b in (1, 2, 3) if b >= cheapest and moved[b] == forced and improved]
        totals["nothing"] += len(nothing)
        worse_below = worse_across = worse_balance = 0
        for low, high in itertools.combinations(BUDGETS, 2):
            pairs = "below" if high < line else "across"
            totals[pairs][1] += 1
            if spent[high] > spent[low] + 1e-9:
                totals[pairs][0] += 1
                worse_below += pairs == "below"
                worse_across += pairs == "across"
            totals["balance"][1] += 1
            if balance[high] < balance[low] - 1e-6:
                totals["balance"][0] += 1
                worse_balance += 1
                totals["worst"] = max(totals["worst"], balance[low] - balance[high])
        rows.append([name, f"{replicas}/{gpus}/{nodes}/{groups}", line, forced,
                     " ".join(str(moved[b] - forced) for b in (1, 2, 4, 8)),
                     f"{balance[0]:.4f} → {balance[8]:.4f} → {balance[64]:.4f}",
                     worse_below, worse_across, worse_balance])
    print(markdown_table(
        ["case", "R/P/N/G", "the ladder's reach (slots)", "forced", "moved at 1 2 4 8",
         "balancedness at 0 → 8 → 64", "worse pairs by the objective, below the line",
         "across it", "worse pairs by balancedness()"], rows))
    below, across, bal = totals["below"], totals["across"], totals["balance"]
    print(f"\n{totals['plans']} plans: {totals['over']} above their budget (beyond the "
          f"forced moves); {totals['nothing']} budgets of 1-3 slots moved nothing where a "
          f"larger one improved (a budget of 1 with every expert once excepted: a swap "
          f"moves 2); a larger budget ended worse by its objective in "
          f"{below[0]} of {below[1]} pairs below the ladder's reach and {across[0]} of "
          f"{across[1]} across it; by balancedness() in {bal[0]} of {bal[1]} pairs "
          f"(worst drop {totals['worst']:.4f})")


def greedy_section() -> None:
    rows = []
    for name, replicas, gpus, nodes, groups, _, w1 in cases():
        greedy = plan_greedy(w1, replicas, gpus, nodes, groups)
        planned = eplb.plan(w1, replicas, gpus, nodes, groups, previous=greedy.phy2log)
        fresh = eplb.plan(w1, replicas, gpus, nodes, groups)
        ours, theirs = planned.layer_balancedness(w1), greedy.layer_balancedness(w1)
        floor = torch.minimum(theirs, fresh.layer_balancedness(w1))
        rows.append([name, f"{replicas}/{gpus}/{nodes}/{groups}", w1.shape[0],
                     int((ours < theirs - 1e-9).sum()), f"{float((ours - theirs).min()):+.4f}",
                     int((ours < floor - 1e-9).sum()),
                     int(planned.moved_slots(greedy.phy2log).sum()),
                     f"{greedy.balancedness(w1):.4f}", f"{planned.balancedness(w1):.4f}"])
    print(markdown_table(
        ["case", "R/P/N/G", "layers", "layers below the greedy's map", "worst difference",
         "below both it and a fresh plan", "slots moved", "greedy", "eplb from it"], rows))
    below = sum(r[3] for r in rows)
    print(f"\n{len(rows)} cases: {below} layers of {sum(r[2] for r in rows)} below the greedy's "
          f"map, in {sum(r[3] > 0 for r in rows)} cases; "
          f"{sum(r[5] for r in rows)} below both it and a fresh plan")


#: the timed budgets: small totals (below the ladder's reach: the fine ladder too), one
#: beside the reach, and one slot per layer
TIMED_BUDGETS = (8, 100, 800, "1 a layer")


def time_section(repeats: int) -> None:
    torch.set_num_threads(1)
    rows, ratios = [], []
    for name, replicas, gpus, nodes, groups, w0, w1 in cases():
        if not name.startswith("real") or (replicas, gpus) != (288, 32):
            continue
        old = eplb.plan(w0, replicas, gpus, nodes, groups)
        calls = {"none": None, **{str(b): ([1] * w1.shape[0] if b == "1 a layer" else b)
                                  for b in TIMED_BUDGETS}}
        seconds: dict[str, list[float]] = {key: [] for key in calls}
        for _ in range(repeats):
            for key, budget in calls.items():  # alternated: drift hits every call alike
                began = time.perf_counter()
                eplb.plan(w1, replicas, gpus, nodes, groups, previous=old, max_moves=budget)
                seconds[key].append(time.perf_counter() - began)
        median = {key: statistics.median(values) for key, values in seconds.items()}
        ratio = [median[str(b)] / median["none"] for b in TIMED_BUDGETS]
        ratios += ratio
        rows.append([name, f"{replicas}/{gpus}/{nodes}/{groups}", f"{median['none'] * 1e3:.1f}",
                     *(f"{r:.2f}" for r in ratio)])
    if not rows:
        print("SKIPPED: the timed cases are the real DeepSeek-V3 ones (EPLB_REAL_DATA)")
        return
    print(markdown_table(["case", "R/P/N/G", "no budget (ms)",
                          *(f"× at {b}" for b in TIMED_BUDGETS)], rows))
    print(f"\nA budgeted call took {min(ratios):.2f}-{max(ratios):.2f}× the same call without "
          f"a budget (median {statistics.median(ratios):.2f}×; medians of {repeats} calls)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*",
                        help="budgets, greedy, time (default: budgets and greedy)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per budget (time)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - {"budgets", "greedy", "time"})
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: choose budgets, greedy, time")
    print(start("bench_budgets"))
    chosen = args.sections or ["budgets", "greedy"]
    if "budgets" in chosen:
        print("\n## Budgets\n")
        budgets_section()
    if "greedy" in chosen:
        print("\n## A greedy map in force, no budget\n")
        greedy_section()
    if "time" in args.sections:
        print("\n## Time: a budgeted call against the same call without one\n")
        time_section(args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
