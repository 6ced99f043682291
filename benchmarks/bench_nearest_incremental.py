"""Incremental planning for SGLang's nearest dispatch: slots moved against balance, in
sample and on the next window, with and without the move price.

The runtime call of SGLang's static dispatch (an all-to-all backend such as DeepEP):
``eplb.plan(w, 288, 32, 4, 8, policy="global", dispatch="nearest", previous=old)``.
Per real DeepSeek-V3 workload (MoE rows 3..60): ``old`` is the nearest plan of the real
loads; window 1 = loads × exp(drift·Z) per expert, window 2 = window 1 × exp(drift·Z')
(fixed seeds). The re-plan is made on window 1 from ``old`` and scored under the nearest
rule (tokens arising evenly) on window 1 (in sample) and window 2 (next window). Rows:

- ``move_price 0.01`` (the default): a layer moves only where its realised balancedness
  gains more than 0.01 × the share of its slots that change;
- ``move_price 0``: any realised gain is taken (the rule before 2026-12-03, but for its
  1e-9 tie tolerance);
- ``unchanged loads``: re-planning window 0 itself from its own plan (drift 0).

With ``--budgets 100,1000,3340`` it adds, per total ``max_moves`` (slots over all
layers), the nearest planner's re-plan and the even-split planner's (``eplb.plan``
without ``dispatch``, as SGLang's plugin planned under a budget before 2026-12-03), both
scored under the nearest rule.

With ``--steps-rule`` it instead asks whether the warm-start ladder's automatic steps
(``IncrementalOptions.steps_for``: ``ceil(45 / S) − 1`` between 4 and 8 slots per GPU)
pay under nearest dispatch, against 4 steps: per shape ``R:P:N`` (global policy, every
GPU live), on each real workload and two drift seeds, the old map is the nearest plan
of the real loads, the re-plan is made on window 1 (drift 0.15) with 4 steps and with
the automatic ones (``steps`` set explicitly), and both are scored on window 2 by the
nearest rule (and on window 1, in sample); paired differences, their standard error, the
share of slots moved and the ratio of median times.

    python benchmarks/bench_nearest_incremental.py [--files 6] [--drifts 0.05,0.15]
        [--budgets 100,1000,3340]
    python benchmarks/bench_nearest_incremental.py --steps-rule [--files 12]
        [--shapes 288:72:9,320:64:8,288:48:6,288:36:4,288:72:1,320:64:1,288:48:1,288:36:1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _harness import deepseek_loads, markdown_table, start

import eplb
from eplb.core.dispatch import balancedness, realised_gpu_loads
from eplb.core.options import IncrementalOptions, PlanOptions

R, P, N, G = 288, 32, 4, 8


def score(weight: torch.Tensor, phy2log: torch.Tensor) -> float:
    return balancedness(realised_gpu_loads(weight, phy2log, P, N))


def replan(weight: torch.Tensor, old: torch.Tensor, price: float | None = None,
           dispatch: str = "nearest", **budget: int) -> torch.Tensor:
    extra = {} if price is None else {"move_price": price}
    return eplb.plan(weight, R, P, N, G, policy="global", dispatch=dispatch, previous=old,
                     **extra, **budget).phy2log


def steps_rule(loads: list[torch.Tensor], shapes: str, drift: float = 0.15) -> None:
    """The ``--steps-rule`` table (module docstring)."""
    rows = []
    for shape in shapes.split(","):
        replicas, gpus, nodes = (int(part) for part in shape.split(":"))
        slots = replicas // gpus
        auto = IncrementalOptions().steps_for(slots)
        next_gain, moved, times = [], {4: [], auto: []}, {4: [], auto: []}
        inside, after_window = {4: [], auto: []}, {4: [], auto: []}
        for index, weight in enumerate(loads):
            for seed in (101, 202):
                gen = torch.Generator().manual_seed(seed + index)
                old = eplb.plan(weight, replicas, gpus, nodes, policy="global",
                                dispatch="nearest").phy2log
                now = weight * torch.exp(drift * torch.randn(
                    weight.shape, generator=gen, dtype=torch.float64))
                after = now * torch.exp(drift * torch.randn(
                    weight.shape, generator=gen, dtype=torch.float64))
                nxt = {}
                for steps in (4, auto):
                    options = PlanOptions(incremental=IncrementalOptions(steps=steps))
                    began = time.perf_counter()
                    new = eplb.plan(now, replicas, gpus, nodes, policy="global",
                                    dispatch="nearest", previous=old, options=options).phy2log
                    times[steps].append(time.perf_counter() - began)
                    moved[steps].append(float((new != old).float().mean()))
                    nxt[steps] = balancedness(realised_gpu_loads(after, new, gpus, nodes))
                    inside[steps].append(balancedness(realised_gpu_loads(now, new, gpus,
                                                                         nodes)))
                    after_window[steps].append(nxt[steps])
                next_gain.append(nxt[auto] - nxt[4])
        error = statistics.stdev(next_gain) / len(next_gain) ** 0.5
        rows.append([f"{replicas}:{gpus}:{nodes}", slots, auto,
                     f"{statistics.mean(inside[4]):.4f} → {statistics.mean(inside[auto]):.4f}",
                     f"{statistics.mean(after_window[4]):.4f} → "
                     f"{statistics.mean(after_window[auto]):.4f}",
                     f"{statistics.mean(next_gain):+.4f} ± {error:.4f}",
                     f"{sum(gain > 0 for gain in next_gain)} / {len(next_gain)}",
                     f"{100 * statistics.mean(moved[4]):.1f} %",
                     f"{100 * statistics.mean(moved[auto]):.1f} %",
                     f"{statistics.median(times[auto]) / statistics.median(times[4]):.2f}"])
    print(f"\n{len(loads)} real workloads × 2 drift seeds (drift {drift}), global policy, "
          "nearest dispatch; automatic steps against 4\n")
    print(markdown_table(["R:P:N", "slots per GPU", "automatic steps",
                          "in sample: 4 steps → automatic", "next window: 4 steps → automatic",
                          "next window: automatic − 4 steps (± s.e.)", "better with automatic",
                          "slots moved, 4 steps", "slots moved, automatic",
                          "time: automatic ÷ 4 steps"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=6, help="how many real workloads")
    parser.add_argument("--drifts", default="0.05,0.15", help="log-std of one window's drift")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budgets", default="",
                        help="total max_moves values to add rows for, e.g. 100,1000,3340")
    parser.add_argument("--steps-rule", action="store_true",
                        help="only the automatic ladder steps against 4 (see the docstring)")
    parser.add_argument("--shapes", default="288:72:9,320:64:8,288:48:6,288:36:4,"
                        "288:72:1,320:64:1,288:48:1,288:36:1",
                        help="R:P:N shapes for --steps-rule, comma-separated")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(start("bench_nearest_incremental"))
    loads = list(deepseek_loads().values())[: args.files]
    if not loads:
        return 0
    if args.steps_rule:
        steps_rule(loads, args.shapes)
        return 0
    drifts = [float(d) for d in args.drifts.split(",") if d]
    budgets = [int(b) for b in args.budgets.split(",") if b]
    cases: dict[str, list[tuple[float, float, float]]] = {}
    for weight in loads:
        old = eplb.plan(weight, R, P, N, G, policy="global", dispatch="nearest").phy2log
        same = replan(weight, old, None)
        cases.setdefault("unchanged loads, move_price 0.01", []).append(
            (float((same != old).float().mean()), score(weight, same), score(weight, same)))
        for drift in drifts:
            gen = torch.Generator().manual_seed(args.seed)
            now = weight * torch.exp(drift * torch.randn(weight.shape, generator=gen,
                                                         dtype=torch.float64))
            after = now * torch.exp(drift * torch.randn(weight.shape, generator=gen,
                                                        dtype=torch.float64))
            cases.setdefault(f"drift {drift}: map in force", []).append(
                (0.0, score(now, old), score(after, old)))
            for label, price in (("move_price 0.01", None), ("move_price 0", 0.0)):
                new = replan(now, old, price)
                cases.setdefault(f"drift {drift}: {label}", []).append(
                    (float((new != old).float().mean()), score(now, new), score(after, new)))
            for budget in budgets:
                for label, dispatch in (("nearest planner", "nearest"),
                                        ("even-split planner", "even")):
                    new = replan(now, old, dispatch=dispatch, max_moves=budget)
                    cases.setdefault(f"drift {drift}: max_moves {budget}, {label}", []).append(
                        (float((new != old).float().mean()), score(now, new),
                         score(after, new)))
    rows = []
    for name, values in cases.items():
        moved, inside, nxt = zip(*values, strict=True)
        rows.append([name, f"{100 * statistics.mean(moved):.1f} %",
                     f"{statistics.mean(inside):.4f}", f"{statistics.mean(nxt):.4f}"])
    print(f"\n{len(loads)} real workloads, R={R}, P={P}, N={N}, G={G}; means over workloads\n")
    print(markdown_table(["case", "slots moved", "in sample", "next window"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
