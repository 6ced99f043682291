"""The companion bound at S >= 3 slots per GPU: a reference loop, checked by brute force and
against the library's vectorised version, and the ceiling it gives on real loads.

The ceiling (``eplb.core.bounds``) bounded every placement by ``max(W / P, T_rep)`` until
the fifty-third session, when the library took up this bound
(``eplb.core.companion_bound``, vectorised). At few slots per GPU the older bound can be
loose: the GPU holding the largest piece ``x_1`` (an expert's
load over its replica count) holds ``S − 1`` other pieces, at least the ``S − 1``
lightest of all. So for replica counts ``c`` every placement has max load ``>= x_1(c) +
σ_{S−1}(c)``, and a bound for every placement is the minimum over counts (the
*companion bound*; this file's loop is the reference the library's version is checked
against):

- ``x_1(c)`` is some ``w_e / k``: take it as the cap ``τ`` on every piece. The fewest
  replicas under that cap are ``b_e = ceil(w_e / τ)``; the ``R − Σ b`` left over can only
  shrink pieces, so ``σ`` is smallest with all of them spent on the lightest pieces.
- ``σ_2`` exactly: two pieces of one expert given every spare replica, or one piece of
  each of two experts with the spares split between them (the two lightest experts per
  split suffice). For ``S − 1 = m > 2``, ``σ_m >= (m / 2) σ_2`` (the ``m − 2`` further
  pieces each weigh at least the mean of the two lightest).
- Only caps from ``T_rep`` up to the first candidate's value can win.

``--check N`` compares the reference and the library's ceiling bound with the exact optimum
over every count vector and every packing (replicas of one expert may share a GPU) on
``N`` tiny random instances (``S`` = 3–4, ``P`` = 2–3); ``--real`` scores eplb's plans of
the real DeepSeek-V3 files at 288 slots on 96 and 72 GPUs against the older ceiling and
the library's, and checks that the library's bound is the reference's (a Python loop per
layer: about 2 s a file).

    python benchmarks/bench_companion_bound.py --check 400
    python benchmarks/bench_companion_bound.py --real
    python benchmarks/bench_companion_bound.py --time

``--time``: the median time of one ``balancedness_ceiling`` call (what ``eplb plan`` and
``eplb eval`` print) at eight shapes, one thread.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import numpy as np
import torch
from _harness import REAL_DATA_HINT, deepseek_loads, markdown_table, start

import eplb
from eplb.core.bounds import balancedness_ceiling, enumerated_node_bounds, layer_lower_bound
from eplb.core.replication import max_replica_load
from eplb.tools.generator import generate_loads


def _base_counts(w: np.ndarray, cap: float) -> np.ndarray:
    """``[E]`` the fewest replicas that keep every piece of ``w [E]`` at most ``cap``."""
    return np.maximum(1, np.ceil(w / cap * (1 - 1e-12))).astype(np.int64)


def _lightest_pair(w: np.ndarray, cap: float, num_replicas: int) -> float:
    """The smallest possible sum of the two lightest pieces of ``w [E]`` with every piece at
    most ``cap`` and ``num_replicas`` slots (``inf`` where the cap needs more)."""
    base = _base_counts(w, cap)
    spare = num_replicas - int(base.sum())
    if spare < 0:
        return np.inf
    with_spare = base + spare
    one_expert = np.where(with_spare >= 2, 2 * w / with_spare, np.inf).min()
    pieces = w[:, None] / (base[:, None] + np.arange(spare + 1)[None, :])  # [E, spare + 1]
    lightest = np.argsort(pieces, axis=0, kind="stable")[:2]  # the two lightest per split
    two_experts = np.inf
    for first in range(spare + 1):
        second = spare - first
        for a, b in ((lightest[0, first], lightest[0, second]),
                     (lightest[0, first], lightest[1, second]),
                     (lightest[1, first], lightest[0, second])):
            if a != b:
                two_experts = min(two_experts, pieces[a, first] + pieces[b, second])
    return float(min(one_expert, two_experts))


def companion_bound(w: np.ndarray, num_replicas: int, num_gpus: int) -> float:
    """Lower bound on the max GPU load of any placement of ``w [E]`` on ``num_gpus`` GPUs
    of ``S = num_replicas / num_gpus >= 3`` slots (module docstring), at least ``W / P``."""
    num_experts, slots = len(w), num_replicas // num_gpus
    mean = float(w.sum()) / num_gpus
    caps = np.unique((w[:, None] / np.arange(1, num_replicas - num_experts + 2)).ravel())
    caps = caps[caps > 0]
    fits = np.array([_base_counts(w, cap).sum() <= num_replicas for cap in caps])
    if not fits.any():
        return mean
    t_rep = float(caps[fits].min())
    scale = (slots - 1) / 2  # σ_m >= (m / 2) σ_2
    best = t_rep + scale * _lightest_pair(w, t_rep, num_replicas)
    for cap in caps[(caps > t_rep) & (caps < best)]:
        best = min(best, float(cap) + scale * _lightest_pair(w, float(cap), num_replicas))
    return max(best, mean)


def brute_force_optimum(w: np.ndarray, num_replicas: int, num_gpus: int) -> float:
    """The smallest max GPU load over every count vector and every packing of ``w [E]``."""
    num_experts, slots = len(w), num_replicas // num_gpus
    best = np.inf
    for extra in itertools.product(range(num_replicas - num_experts + 1), repeat=num_experts):
        if sum(extra) != num_replicas - num_experts:
            continue
        pieces = [w[e] / (1 + extra[e]) for e in range(num_experts) for _ in range(1 + extra[e])]

        best = min(best, _best_packing(pieces, slots, best))
    return best


def _best_packing(pieces: list[float], slots: int, known: float) -> float:
    """The smallest max load over every packing of ``pieces`` into groups of ``slots``
    (``known``, or less where a packing beats it: branches at or above it are cut)."""
    best = known

    def fill(rest: list[int], worst: float) -> None:
        nonlocal best
        if worst >= best:
            return
        if not rest:
            best = worst
            return
        for group in itertools.combinations(rest[1:], slots - 1):
            load = pieces[rest[0]] + sum(pieces[i] for i in group)
            fill([i for i in rest[1:] if i not in group], max(worst, load))

    fill(list(range(len(pieces))), 0.0)
    return best


def check(instances: int) -> None:
    rng = np.random.default_rng(0)
    rows, raised, worst_ratio = 0, 0, 0.0
    for _ in range(instances):
        gpus, slots = int(rng.integers(2, 4)), int(rng.integers(3, 5))
        replicas = gpus * slots
        experts = int(rng.integers(max(2, replicas - 4), replicas + 1))
        w = rng.lognormal(0, float(rng.uniform(0.3, 1.5)), experts) * 10
        if rng.random() < 0.3:
            w = np.round(w)  # ties
        bound, optimum = companion_bound(w, replicas, gpus), brute_force_optimum(w, replicas, gpus)
        library = float(layer_lower_bound(torch.from_numpy(w)[None], replicas, gpus)[0])
        if max(bound, library) > optimum * (1 + 1e-9):
            sys.exit(f"a bound exceeds the optimum: w={w.tolist()}, R={replicas}, "
                     f"P={gpus}: reference {bound}, library {library} > {optimum}")
        reference = max(bound, _older_bound(w[None], replicas, gpus)[0])
        if experts < replicas and abs(library - reference) > 1e-9 * optimum:  # R = E: packing bound
            sys.exit(f"the library's bound is not the reference's: w={w.tolist()}, "
                     f"R={replicas}, P={gpus}: {library} vs {bound}")
        old = float(_older_bound(w[None], replicas, gpus)[0])
        raised += bound > old * (1 + 1e-12)
        worst_ratio = max(worst_ratio, bound / optimum)
        rows += 1
    print(f"{rows} instances: never above the optimum (largest bound / optimum "
          f"{worst_ratio:.6f}), the library's bound equal to the reference's; above "
          f"max(W / P, T_rep) on {raised}")


def _older_bound(w: np.ndarray, num_replicas: int, num_gpus: int) -> np.ndarray:
    """``[L]`` the ceiling's bound before the fifty-third session, ``max(W / P, T_rep)``,
    of ``w [L, E]``."""
    t_rep = max_replica_load(torch.from_numpy(np.asarray(w, dtype=np.float64)), num_replicas)
    return np.maximum(np.asarray(w).sum(1) / num_gpus, t_rep.numpy())


def real() -> None:
    loads = deepseek_loads(torch.float64)
    if not loads:
        print(f"skipped: no real DeepSeek-V3 loads {REAL_DATA_HINT}")
        return
    rows = []
    for gpus in (96, 72):
        for name, w in loads.items():
            mean = w.sum(1).numpy() / gpus
            old = _older_bound(w.numpy(), 288, gpus)
            new = np.maximum(old, [companion_bound(row, 288, gpus) if row.sum() > 0 else 0.0
                                   for row in w.numpy()])
            library = layer_lower_bound(w, 288, gpus).numpy()
            if not np.allclose(library, new, rtol=1e-9, atol=0):
                sys.exit(f"{name} at P={gpus}: the library's bound is not the reference's")
            peak = eplb.plan(w, 288, gpus).gpu_loads(w).numpy().max(1)
            balance = mean.sum() / peak.sum()
            before, after = mean.sum() / old.sum(), mean.sum() / new.sum()
            rows.append([f"P={gpus} (S={288 // gpus})", name, f"{balance:.5f}",
                         f"{before:.5f}", f"{after:.5f}", f"{balance / before:.4f}",
                         f"{balance / after:.4f}", int((new > old * (1 + 1e-12)).sum())])
    print(markdown_table(["shape", "file", "eplb", "older ceiling", "with the companion bound",
                          "eplb / older ceiling", "eplb / ceiling", "layers raised"], rows))
    print("The library's bound equals the reference's on every layer (relative 1e-9).")
    hierarchical(loads)


def hierarchical(loads: dict[str, torch.Tensor]) -> None:
    """Worst file's eplb / ceiling for hierarchical plans (4 nodes, 8 groups), the ceiling
    with and without the companion bound in every node's bound (the library's own
    ``max(W_n / (P/N), T_rep(n))`` per node, as before the fifty-third session)."""
    rows = []
    for replicas, gpus in ((288, 32), (320, 64), (288, 96), (384, 128)):
        worst_before, worst_after, raised = (1.0, ""), (1.0, ""), 0
        for name, w in loads.items():
            mean = float(w.sum()) / gpus
            # 8 groups on 4 nodes: 105 assignments, always enumerated
            _, per_node = enumerated_node_bounds(w, replicas, gpus, 4, 8)
            older = np.maximum(_older_bound(w.numpy(), replicas, gpus),
                               per_node.amax(2).amin(1).numpy())
            new = layer_lower_bound(w, replicas, gpus, 4, 8, "hierarchical").numpy()
            balance = eplb.plan(w, replicas, gpus, 4, 8, policy="hierarchical").balancedness(w)
            before, after = balance / (mean / older.sum()), balance / (mean / new.sum())
            worst_before = min(worst_before, (before, name))
            worst_after = min(worst_after, (after, name))
            raised += int((new > older * (1 + 1e-12)).sum())
        rows.append([f"R={replicas} P={gpus} (S={replicas // gpus})",
                     f"{worst_before[0]:.4f} ({worst_before[1]})",
                     f"{worst_after[0]:.4f} ({worst_after[1]})", raised])
    print("\nHierarchical (4 nodes, 8 groups), worst of the 12 files:\n")
    print(markdown_table(["shape", "eplb / older ceiling", "eplb / ceiling",
                          "layers raised (all files)"], rows))


def timing(repeats: int = 7) -> None:
    loads = deepseek_loads(torch.float64)
    real = loads.get("prefill_in4096")
    kind = "real prefill_in4096" if real is not None else "generated"
    dsv3 = real if real is not None else generate_loads("deepseek-v3", seed=0, num_layers=58,
                                                                num_experts=256)
    cases = [
        (f"58×256 S=9 P=32 ({kind})", dsv3, 288, 32),
        (f"58×256 S=9 P=32 hierarchical N=4 G=8 ({kind})", dsv3, 288, 32, 4, 8),
        (f"58×256 S=3 P=96 hierarchical N=4 G=8 ({kind})", dsv3, 288, 96, 4, 8),
        (f"58×256 S=3 P=96 ({kind})", dsv3, 288, 96),
        (f"58×256 S=2 P=144 ({kind})", dsv3, 288, 144),
        ("61×384 S=3 P=256 (generated)",
         generate_loads("kimi-k2", seed=0, num_layers=61, num_experts=384), 768, 256),
        ("36×32 S=3 P=16 (generated)",
         generate_loads("gpt-oss-120b", seed=0, num_layers=36, num_experts=32), 48, 16),
        ("4×1024 S=4 P=1024 (generated)",
         generate_loads("kimi-k2", seed=0, num_layers=4, num_experts=1024), 4096, 1024),
    ]
    rows = []
    for name, w, *shape in cases:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            balancedness_ceiling(w, *shape)
            times.append(time.perf_counter() - started)
        rows.append([name, f"{statistics.median(times) * 1e3:.2f}"])
    print(markdown_table(["shape", "balancedness_ceiling ms (median)"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="brute-force check on N tiny random instances")
    parser.add_argument("--real", action="store_true",
                        help="the ceiling with and without it on the real DeepSeek-V3 files")
    parser.add_argument("--time", action="store_true",
                        help="the time of one balancedness_ceiling call at eight shapes")
    args = parser.parse_args(argv)
    if not args.check and not args.real and not args.time:
        parser.error("give --check N, --real and/or --time")
    print(start("bench_companion_bound"))
    if args.check:
        check(args.check)
    if args.real:
        real()
    if args.time:
        timing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
