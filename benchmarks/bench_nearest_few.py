"""Planning for SGLang's nearest dispatch where experts are few or one is very hot.

BENCHMARKS §14 measures the DeepSeek-V3 shape (256 experts on 32 GPUs). This script
takes the cases where the dispatch-aware plan's assumptions are weakest: few experts per
GPU (Mixtral's 8 experts on 16 GPUs in 2 nodes, OLMoE's 64 on 16) and a layer with one
expert far hotter than a replica per node can carry. Every plan is scored two ways, as
the balancedness (Σ mean / Σ max GPU load) of:

- eplb's model of the rule (:func:`eplb.core.dispatch.realised_gpu_loads`: fair choices
  at their expectation);
- SGLang 0.5.23's own static table on the runtime path (``path="eplb"``: one random
  stream, seed 42), built by its released code (``scripts/fetch_engines.py``).

Plans: eplb's even-split global plan; the dispatch-aware plan with ``fair="avoid"``
(the former behaviour of the default in these cases) and with the default ``"auto"``.

    python benchmarks/bench_nearest_few.py
"""

from __future__ import annotations

import argparse
import json

import torch
from _harness import REAL_DATA, REAL_DATA_HINT, markdown_table, start
from sglang_dispatch import sglang_dispatch_tables

import eplb
from eplb.core.dispatch import realised_gpu_loads, table_gpu_loads

COUNTS = REAL_DATA / "olmoe_mixtral_routing_counts" / "expert_counts.json"


def cases() -> list[tuple[str, torch.Tensor, int, int, int]]:
    """``(name, weight [L, E], R, P, N)``."""
    gen = torch.Generator().manual_seed(0)
    hot = torch.randint(0, 100, (8, 64), generator=gen)
    hot[:, 0] += 3000
    out = [("one-hot, 64 experts (synthetic)", hot, 128, 16, 2)]
    if COUNTS.is_file():
        doc = json.loads(COUNTS.read_text())
        for key in sorted(doc):  # "<model>/<expert_counts or expert_counts_top1>/<task>"
            model, kind, task = key.split("/")
            weight = torch.tensor(doc[key]["counts"]).long()
            replicas = 32 if weight.shape[1] <= 8 else 128  # 4 or 2 replicas per expert
            name = f"{model} {task}{' (top-1)' if kind.endswith('top1') else ''}"
            out.append((f"{name}, {weight.shape[1]} experts", weight, replicas, 16, 2))
    else:
        print(f"SKIPPED the real counts: {COUNTS} not found {REAL_DATA_HINT}")
    return out


def scores(weight: torch.Tensor, phy2log: torch.Tensor, gpus: int, nodes: int,
           replicas: int) -> tuple[float, float]:
    w = weight.to(torch.float64)
    model = realised_gpu_loads(w, phy2log, gpus, nodes)
    table = sglang_dispatch_tables(phy2log, weight.shape[1], gpus, nodes, path="eplb")
    served = table_gpu_loads(w, table, gpus, replicas)
    return (float(model.mean(1).sum() / model.amax(1).sum()),
            float(served.mean(1).sum() / served.amax(1).sum()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print(start("bench_nearest_few"))
    rows = []
    for name, weight, replicas, gpus, nodes in cases():
        plans = {
            "even-split": eplb.plan(weight, replicas, gpus, nodes, 1, policy="global"),
            "nearest, fair=avoid": eplb.plan(weight, replicas, gpus, nodes, 1, policy="global",
                                             dispatch="nearest", fair="avoid"),
            "nearest, default": eplb.plan(weight, replicas, gpus, nodes, 1, policy="global",
                                          dispatch="nearest"),
        }
        cells = [name, f"R={replicas} P={gpus} N={nodes}"]
        for plan in plans.values():
            model, served = scores(weight, plan.phy2log, gpus, nodes, replicas)
            cells.append(f"{model:.4f} / {served:.4f}")
        rows.append(cells)
    print("\nBalancedness under SGLang's nearest rule: eplb's model / SGLang's own table.\n")
    print(markdown_table(["loads", "cluster", "even-split plan", "nearest, fair=avoid",
                          "nearest, default (auto)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
