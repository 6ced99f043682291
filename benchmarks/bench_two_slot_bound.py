"""How far eplb is from the optimum at two slots per GPU: an LP bound on sampled layers.

For ``S = 2`` the best max GPU load for given replica counts is the largest-with-smallest
pairing of the pieces ``w / c``; the optimum over counts is not known in closed form,
and ``bench_shapes.py``'s reference (``best_two_slot_max_load``, a long count search) is
only an upper bound on it. This script brackets the optimum from below.

**The bound.** For a target max load ``T`` a piece ``p > T/2`` needs a partner of at most
``T − p`` ("a debt of length ``p − T/2``"), a piece ``p <= T/2`` can partner any piece up
to ``T − p`` ("a credit of length ``T/2 − p``"). Pairing is feasible iff, at every length
``L``, the pieces with debts of length ``>= L`` are no more than those with credits of
length ``>= L`` (Hall's condition on a threshold graph). With one 0/1 variable per
(expert, count), at most ``2P`` pieces and those dominance rows, "some counts reach
``T``" is an integer program; its LP relaxation, bisected on ``T``, gives a lower bound
on the optimum's max load (anti-affinity ignored, as in the reference). Where the LP's
solution just above the bound is integral, its counts realise that target: the optimum
is then known to the bisection's tolerance (1e-5), anti-affinity ignored.
HiGHS (through SciPy) solves each LP (the integer program itself took over ten minutes
per layer even at 36×32, so it is not used); all counts ``1..min(P, R − E + 1)`` of every
expert are variables, so the bound is valid but costs seconds per layer (about 1.5 s at
``P = 144``, 12 s at ``P = 256``): the script samples layers.

Columns, per shape (layers sampled evenly, ``--layers`` per input, every input):
eplb's default plan, the reference search and the bound as max GPU load over the mean
(mean over the sampled layers), eplb / bound and reference / bound (worst layer and
mean), and the layers where the LP's solution was integral (bound = exact optimum).

    python benchmarks/bench_two_slot_bound.py [--layers 6] [--only 58x256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
import torch
from _harness import start
from bench_shapes import MODELS, SHAPES, model_loads
from scipy.optimize import Bounds, LinearConstraint, milp

import eplb
from eplb.core.placement import slot_gpu_loads
from eplb.core.small_slots import best_two_slot_max_load, pair_max


def _lp(w: np.ndarray, target: float, num_gpus: int) -> tuple[bool, np.ndarray | None]:
    """Whether the LP relaxation reaches ``target`` for one layer ``w [E]`` (mean GPU
    load 1), and, where its solution is integral, counts that reach it (``[E]``, summing
    to ``2P``; anti-affinity ignored)."""
    num_experts = len(w)
    slots = 2 * num_gpus
    top = min(num_gpus, slots - num_experts + 1)  # the most replicas an expert can have
    fewest = np.maximum(1, np.ceil(w / target - 1e-12)).astype(int)  # a piece above T fits nowhere
    if (fewest > top).any():
        return False, None
    expert = np.concatenate([np.full(top - a + 1, i) for i, a in enumerate(fewest)])
    count = np.concatenate([np.arange(a, top + 1) for a in fewest])
    piece = w[expert] / count
    big = piece > target / 2
    length = np.where(big, piece - target / 2, target / 2 - piece)
    levels = np.unique(length[big])[::-1]  # debt lengths, longest first
    n, k = len(expert), len(levels)
    rows = [
        sp.csr_matrix((np.ones(n), (expert, np.arange(n))), shape=(num_experts, n + k)),
        sp.csr_matrix((count.astype(float), (np.zeros(n, int), np.arange(n))), shape=(1, n + k)),
    ]
    if k:
        # running sums y_j = y_{j-1} + Σ_{pieces first reaching level j} ±c·x, all y_j <= 0
        first = np.searchsorted(-levels, -length, side="left")  # first level it reaches
        reach = first < k
        signed = np.where(big, count, -count).astype(float)
        rows.append(sp.csr_matrix(
            (np.concatenate([-signed[reach], np.ones(k), -np.ones(k - 1)]),
             (np.concatenate([first[reach], np.arange(k), np.arange(1, k)]),
              np.concatenate([np.nonzero(reach)[0], n + np.arange(k), n + np.arange(k - 1)]))),
            shape=(k, n + k)))
    result = milp(
        np.zeros(n + k),  # feasibility only: the slot total is a constraint row
        constraints=LinearConstraint(
            sp.vstack(rows).tocsr(),
            np.concatenate([np.ones(num_experts), [0.0], np.zeros(k)]),
            np.concatenate([np.ones(num_experts), [float(slots)], np.zeros(k)])),
        integrality=np.zeros(n + k),
        bounds=Bounds(np.concatenate([np.zeros(n), np.full(k, -np.inf)]),
                      np.concatenate([np.ones(n), np.zeros(k)])),
    )
    if result.status == 2:
        return False, None
    if result.status != 0:
        raise RuntimeError(f"HiGHS did not settle the LP at T={target}: {result.message}")
    x = result.x[:n]
    if np.abs(x - np.round(x)).max() > 1e-6:
        return True, None
    counts = np.zeros(num_experts, int)
    chosen = x > 0.5
    counts[expert[chosen]] = count[chosen]
    # spare slots to the lightest experts (more small pieces only add credit), each
    # within the cap the LP had
    for e in np.argsort(w, kind="stable"):
        counts[e] += min(top - counts[e], slots - counts.sum())
    return True, counts if counts.sum() == slots else None


def lp_bound(w: np.ndarray, num_gpus: int, upper: float, tol: float = 1e-5
             ) -> tuple[float, bool]:
    """``(bound, exact)`` for one layer ``w [E]`` scaled to mean GPU load 1: a lower
    bound on the optimum's max load (the largest target the LP was found not to reach,
    bisected between the mean, 1, and ``upper``, a reachable max load), and whether
    integral counts within ``tol`` above it reach their target (the optimum is then
    known to ``tol``; anti-affinity ignored)."""
    low = 1.0
    feasible, counts = _lp(w, upper, num_gpus)
    if not feasible:
        return low, False
    while upper - low > tol * upper:
        middle = (low + upper) / 2
        feasible, found = _lp(w, middle, num_gpus)
        if feasible:
            upper, counts = middle, found
        else:
            low = middle
    exact = counts is not None and pair_max(w[None], counts[None])[0][0] <= upper * (1 + 1e-12)
    return low, bool(exact)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="sampled layers per input")
    parser.add_argument("--inputs", type=int, default=2, help="load inputs per shape")
    parser.add_argument("--only", action="append", help="keep shapes whose label has this")
    args = parser.parse_args(argv)
    print(start("bench_two_slot_bound"))
    print("\n| shape | loads | layers | eplb | reference | LP bound | eplb / bound: worst, "
          "mean | reference / bound: worst, mean | bound exact | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, slots, gpus in SHAPES:
        model = MODELS[key]
        label = f"{model.layers}x{model.experts} S={slots} P={gpus}"
        if slots != 2 or (args.only and not any(text in label for text in args.only)):
            continue
        begin = time.perf_counter()
        replicas = slots * gpus
        loads, source = model_loads(key, args.inputs)
        rows = []
        for weight in loads:
            plan = eplb.plan(weight, replicas, gpus)
            peak = slot_gpu_loads(weight, plan.phy2log, gpus).amax(-1)  # [L]
            reference = best_two_slot_max_load(weight, replicas, gpus)  # [L]
            for layer in np.linspace(0, weight.shape[0] - 1, args.layers).round().astype(int):
                w = weight[layer].to(torch.float64).numpy()
                if w.sum() <= 0:
                    continue
                mean = w.sum() / gpus
                bound, exact = lp_bound(w / mean, gpus, float(reference[layer]) / mean)
                rows.append((float(peak[layer]) / mean, float(reference[layer]) / mean,
                             bound, exact))
        ours, ref, bound, exact = (np.array(column) for column in zip(*rows, strict=True))
        print(f"| {label} | {source} | {len(rows)} | {ours.mean():.5f} | {ref.mean():.5f} | "
              f"{bound.mean():.5f} | {(bound / ours).min():.4f}, {(bound / ours).mean():.4f} | "
              f"{(bound / ref).min():.4f}, {(bound / ref).mean():.4f} | "
              f"{int(exact.sum())} of {len(rows)} | {time.perf_counter() - begin:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
