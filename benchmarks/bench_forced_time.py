"""How long the forced moves take where many slots must be filled, against a fresh plan.

Planning from a map in force first makes the forced moves: every live slot filled, every
expert covered, stacked replicas spread (``eplb.online.moves.fill_and_spread``). The fill
goes one slot per pass (every layer at once), so its time grows with the empty slots.
Three cases, each timed against a fresh plan of the same loads, one thread, medians; then
the balancedness of ``eplb.plan`` from the map on the loads beside a fresh plan's, and
the share of slots it moved (the plugin's rows repeat them: its plans are of the loads
rounded to int32, the same plans for the real loads, which are counts):

- **revived:** ``k`` of ``P`` GPUs dead in the map in force (an eplb plan with
  ``active_gpus``) and live now: ``k · S`` empty slots per layer;
- **vLLM, GPUs added:** the same map through the vLLM plugin
  (``EplbPolicy.rebalance_experts`` with the old map, as vLLM passes it when GPUs join:
  ``-1`` in their slots), int32 loads;
- **stacked surplus:** one layer whose spare slots all hold one expert (every expert
  once, then ``R − E`` copies of expert 5): the surplus copies are emptied and refilled.

Loads: the real DeepSeek-V3 workloads where present (``EPLB_REAL_DATA``), else
log-normal ones (σ 1.2); the stacked case is uniform random.

    python benchmarks/bench_forced_time.py
    python benchmarks/bench_forced_time.py --repeats 3
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from _harness import deepseek_loads, markdown_table, median_ms, start

import eplb
from eplb.integrations.vllm import EplbPolicy


def layer_loads(seed: int) -> tuple[torch.Tensor, str]:
    """``[58, 256]`` float64 loads: a real workload where present, else log-normal."""
    real = deepseek_loads()
    if real:
        names = sorted(real)
        return real[names[seed % len(names)]], "real"
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.lognormal(0, 1.2, (58, 256))), "log-normal"


def revived_rows(gpus: int, dead: int, repeats: int) -> tuple[list[list[str]], str]:
    """The revived and vLLM-plugin rows for ``dead`` of ``gpus`` GPUs back or added."""
    replicas = 9 * gpus
    old_loads, source = layer_loads(0)
    loads, _ = layer_loads(1)
    active = torch.ones(gpus, dtype=torch.bool)
    active[gpus - dead:] = False
    old = eplb.plan(old_loads, replicas, gpus, active_gpus=active)
    counts = loads.round().to(torch.int32)
    EplbPolicy.options = {}
    rows = []
    for label, fresh_call, warm_call in (
        (f"revived: {dead} of {gpus} GPUs",
         lambda: eplb.plan(loads, replicas, gpus),
         lambda: eplb.plan(loads, replicas, gpus, previous=old)),
        (f"vLLM plugin: {dead} of {gpus} GPUs added",
         lambda: EplbPolicy.rebalance_experts(counts, replicas, 1, 1, gpus, None),
         lambda: EplbPolicy.rebalance_experts(counts, replicas, 1, 1, gpus, old.phy2log)),
    ):
        fresh, warm = median_ms(fresh_call, repeats), median_ms(warm_call, repeats)
        rows.append([label, f"{dead * 9}", f"{fresh:.0f}", f"{warm:.0f}",
                     f"{warm / fresh:.1f}", *quality(loads, old.phy2log, replicas, gpus)])
    return rows, source


def quality(loads: torch.Tensor, old: torch.Tensor, replicas: int,
            gpus: int) -> list[str]:
    """The plan from the map's balancedness on the loads, next to a fresh plan's, and the
    slots it moved (every empty one among them)."""
    fresh = eplb.plan(loads, replicas, gpus).balancedness(loads)
    warm = eplb.plan(loads, replicas, gpus, previous=old)
    moved = int((warm.phy2log != old).sum())
    return [f"{warm.balancedness(loads):.4f}", f"{fresh:.4f}",
            f"{moved / old.numel():.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure")
    args = parser.parse_args()
    print(start("bench_forced_time"))
    warnings.simplefilter("ignore")  # the plugin's one-line notice
    rows = []
    source = ""
    for gpus, dead in ((64, 8), (128, 16), (128, 64)):
        more, source = revived_rows(gpus, dead, args.repeats)
        rows += more
    gpus, experts = 256, 1024
    replicas = 17 * gpus
    weight = torch.rand(1, experts, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    stacked = torch.cat([torch.arange(experts), torch.full((replicas - experts,), 5)])[None]
    fresh = median_ms(lambda: eplb.plan(weight, replicas, gpus), args.repeats)
    warm = median_ms(lambda: eplb.plan(weight, replicas, gpus, previous=stacked), args.repeats)
    rows.append([f"stacked surplus: 1×{experts} on {gpus} GPUs of 17", f"{replicas - experts}",
                 f"{fresh:.0f}", f"{warm:.0f}", f"{warm / fresh:.0f}",
                 *quality(weight, stacked, replicas, gpus)])
    # a plan of two experts on two GPUs of thousands of slots each, re-planned from the
    # map: every GPU holds thousands of replicas of one expert, which the relabelling of
    # the fresh plan matches slot by slot (attacker pass: S³, 8 s at 4,096 slots per GPU)
    for slots in (1024, 4096):
        replicas = 2 * slots
        before = eplb.plan(torch.tensor([[1.0, 1.0]]), replicas, 2)
        weight = torch.tensor([[1.0, 3.0]])
        fresh = median_ms(lambda w=weight, r=replicas: eplb.plan(w, r, 2), args.repeats)
        warm = median_ms(lambda w=weight, r=replicas, b=before: eplb.plan(w, r, 2, previous=b),
                         args.repeats)
        rows.append([f"stacked by right: 1×2 on 2 GPUs of {slots}", "0", f"{fresh:.0f}",
                     f"{warm:.0f}", f"{warm / fresh:.0f}",
                     *quality(weight, before.phy2log, replicas, 2)])
    print(f"\nDeepSeek-V3-shaped layers (58 × 256, 9 slots per GPU), {source} loads; "
          f"median of {args.repeats} calls after one untimed\n")
    print(markdown_table(["case", "empty slots per layer", "fresh ms", "from the map ms",
                          "× fresh", "balancedness from the map", "fresh",
                          "share of slots moved"], rows))


if __name__ == "__main__":
    main()
