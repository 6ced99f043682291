"""A GPU live again, with only the forced moves: how close the refill comes to the best.

A GPU dead in the placement in force and live now is refilled by forced moves, whatever
the budget (``max_moves=0`` here, so the refill is all that changes). For random small
problems (1-4 slots on 2-8 GPUs, 2-12 experts, log-normal, integer and tied loads, one
GPU dead in the old plan, loads drifted by ×exp(0.3·N(0, 1))) every way to fill the
revived GPU's slots with distinct experts is tried, keeping the other GPUs as they are
and every expert covered; the table compares eplb's layer peak with the best of them.

    python benchmarks/bench_revived_fill.py              # 400 problems, seed 1
    python benchmarks/bench_revived_fill.py --cases 1000 --seed 2
"""

from __future__ import annotations

import argparse
import itertools
import warnings

import numpy as np
import torch
from _harness import markdown_table, start

import eplb
from eplb.online.moves import gpu_loads_of


def best_fill(weight: np.ndarray, base: np.ndarray, dead: int, num_experts: int) -> float | None:
    """The lowest peak over every fill of GPU ``dead``'s row of ``base [P, S]``."""
    best = None
    for combo in itertools.combinations(range(num_experts), base.shape[1]):
        trial = base.copy()
        trial[dead] = combo
        if (np.bincount(trial.ravel(), minlength=num_experts) == 0).any():
            continue  # an expert left without a replica
        peak = gpu_loads_of(weight[None], trial.reshape(1, -1), base.shape[0])[0].max()
        best = peak if best is None else min(best, peak)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(start("bench_revived_fill"))
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(args.seed)
    layers = above = 0
    ratios = []
    for _ in range(args.cases):
        slots, gpus = int(rng.integers(1, 5)), int(rng.choice([2, 3, 4, 8]))
        if slots * (gpus - 1) < 2:
            continue
        experts = int(rng.integers(2, min(12, slots * (gpus - 1)) + 1))
        num_layers = int(rng.integers(1, 4))
        kind = rng.choice(["lognormal", "integers", "ties"])
        if kind == "lognormal":
            w = np.exp(rng.normal(0, rng.uniform(0.2, 2.5), (num_layers, experts))) * 100
        elif kind == "integers":
            w = rng.integers(0, 30, (num_layers, experts)).astype(float)
        else:
            w = np.full((num_layers, experts), 4.0)
        dead = int(rng.integers(gpus))
        live = torch.ones(gpus, dtype=torch.bool)
        live[dead] = False
        weight = torch.from_numpy(w)
        try:
            old = eplb.plan(weight, slots * gpus, gpus, active_gpus=live, policy="global")
        except ValueError:  # too few live slots for the experts
            continue
        now = weight * torch.from_numpy(np.exp(rng.normal(0, 0.3, w.shape)))
        if kind == "integers":
            now = now.round()
        new = eplb.plan(now, slots * gpus, gpus, previous=old, max_moves=0)
        new.validate()
        loads = gpu_loads_of(now.numpy(), new.phy2log.numpy(), gpus)
        for layer in range(num_layers):
            if slots > experts:
                continue
            base = old.phy2log[layer].numpy().reshape(gpus, slots).copy()
            best = best_fill(now[layer].numpy(), base, dead, experts)
            if best is None:
                continue
            layers += 1
            ratios.append(best / loads[layer].max())
            above += int(loads[layer].max() > best * (1 + 1e-9))
    print(f"\n{args.cases} problems (seed {args.seed}), max_moves=0\n")
    print(markdown_table(
        ["layers", "peak above the best refill", "best / eplb, mean", "best / eplb, worst"],
        [[layers, above, f"{np.mean(ratios):.4f}", f"{np.min(ratios):.4f}"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
