"""How far eplb is from the optimum at two slots per GPU: the exact optimum and an LP
bound on sampled layers.

For ``S = 2`` the best max GPU load for given replica counts is the largest-with-smallest
pairing of the pieces ``w / c``; the optimum over counts is not known in closed form,
and ``bench_shapes.py``'s reference (``best_two_slot_max_load``, a long count search) is
only an upper bound on it.

**Hall's condition.** For a target max load ``T`` a piece ``p > T/2`` needs a partner of
at most ``T − p`` ("a debt of length ``p − T/2``"), a piece ``p <= T/2`` can partner any
piece up to ``T − p`` ("a credit of length ``T/2 − p``"). Pairing is feasible iff, at
every length ``L``, the pieces with debts of length ``>= L`` are no more than those with
credits of length ``>= L`` (Hall's condition on a threshold graph).

**The exact optimum** (:func:`exact_optimum`). Only the debt lengths matter as levels,
so a credit expert needs only the smallest count reaching each level, plus spare
replicas counted at the level it sits at (:func:`_count_options`): a small integer
program per target, solved by OR-Tools' CP-SAT (``pip install -e '.[bench]'``). Each
step asks for counts below the best pairing found so far, re-scores what it gets
exactly, and the last step proves nothing is below (to ``1e-9``; anti-affinity ignored,
as in the reference). Checked against brute force over every count vector on 540 tiny
random instances (3–6 experts, P ≤ 6, ties and zero loads among them): equal on all.
A step can run out of ``--time-limit``; that layer's optimum is then unknown.

**The LP bound** (:func:`lp_bound`). With one 0/1 variable per (expert, count), at most
``2P`` pieces and the dominance rows, the LP relaxation bisected on ``T`` (HiGHS through
SciPy) is a lower bound on the optimum for every layer, known or not; it costs seconds
per layer (about 1.5 s at ``P = 144``, 12 s at ``P = 256``).

**Wider neighbourhoods** (``--neighbourhood``, a diagnosis, not a planner): eplb's count
search moves one replica per step, from a few donors to one of the two experts of the pair
that sets the max. :func:`recount_search` runs steepest descent from the same start (the
portfolio allocation with the smallest pairing max) over a wider set of moves, each
scored exactly as eplb's search scores counts: ``critical-D`` (the critical pair's experts
gain up to ``D`` replicas from any other expert), ``critical-D-both`` (or give them), and
``all-D`` (any expert from any other). It tells what limits the search: the number of
steps, or the moves it may make.

Columns, per shape (layers sampled evenly, ``--layers`` per input, every input): the
layers whose optimum is known; against it, for eplb's default (and each
``--iterations`` variant of the S = 2 count search, and each ``--neighbourhood``) the
ratio of balancedness (mean of mean/max over those layers) and the worst layer; the
reference's balancedness ratio; and eplb over the LP bound on every sampled layer (worst,
mean).

    python benchmarks/bench_two_slot_bound.py [--layers 6] [--only 58x256] [--iterations 4]
        [--neighbourhood critical-3-both]
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
from eplb.core.map_tables import slot_gpu_loads
from eplb.core.replication import replica_counts
from eplb.core.small_slots import (
    _expert_at,
    _pair_max_x,
    _scan,
    best_two_slot_max_load,
    pair_max,
    plan_two_slots,
)

NEIGHBOURHOODS = ("critical-1", "critical-3", "critical-1-both", "critical-3-both", "all-1",
                  "all-2")


def _lp(w: np.ndarray, target: float, num_gpus: int) -> bool:
    """Whether the LP relaxation reaches ``target`` for one layer ``w [E]`` (mean GPU
    load 1; anti-affinity ignored)."""
    num_experts = len(w)
    slots = 2 * num_gpus
    top = min(num_gpus, slots - num_experts + 1)  # the most replicas an expert can have
    fewest = np.maximum(1, np.ceil(w / target - 1e-12)).astype(int)  # a piece above T fits nowhere
    if (fewest > top).any():
        return False
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
        return False
    if result.status != 0:
        raise RuntimeError(f"HiGHS did not settle the LP at T={target}: {result.message}")
    return True


def lp_bound(w: np.ndarray, num_gpus: int, upper: float, tol: float = 1e-5) -> float:
    """A lower bound on the optimum's max load for one layer ``w [E]`` scaled to mean GPU
    load 1: the largest target the LP was found not to reach, bisected to ``tol`` between
    the mean, 1, and ``upper``, a reachable max load (anti-affinity ignored)."""
    low = 1.0
    upper *= 1 + 1e-9  # a pairing that reaches `upper` exactly can test infeasible by rounding
    if not _lp(w, upper, num_gpus):
        return low
    while upper - low > tol * upper:
        middle = (low + upper) / 2
        if _lp(w, middle, num_gpus):
            upper = middle
        else:
            low = middle
    return low


class Undecided(RuntimeError):
    """The solver hit its time limit before settling a target."""


def _count_options(w: np.ndarray, target: float, num_gpus: int):
    """The counts worth considering for one layer ``w [E]`` at max load ``target``.

    Every count whose piece is above ``target/2`` (a debt; its length sets a *level*),
    and for the rest only the smallest count that reaches each level (a credit: a larger
    count at the same level adds credits only where a spare replica on any expert at that
    level would, which the dump variables of :func:`_reaches` model). Returns ``None``
    where some expert cannot fit at all, else ``(top, debt_expert, debt_count,
    debt_level, credit_expert, credit_count, credit_level, num_levels)``; a level index
    of ``num_levels`` means "no debt level" (a credit shorter than every debt).
    """
    slots = 2 * num_gpus
    top = min(num_gpus, slots - len(w) + 1)
    half = target / 2
    fewest = np.maximum(1, np.ceil(w / target - 1e-12)).astype(int)
    if (fewest > top).any():
        return None
    debt_expert, debt_count = [], []
    for e, weight in enumerate(w):
        for count in range(fewest[e], top + 1):
            if weight / count <= half:
                break
            debt_expert.append(e)
            debt_count.append(count)
    debt_expert, debt_count = np.array(debt_expert, int), np.array(debt_count, int)
    debt_length = w[debt_expert] / debt_count - half
    levels = np.unique(debt_length)[::-1]  # longest first
    debt_level = np.searchsorted(-levels, -debt_length, side="left")
    credit_expert, credit_count, credit_level = [], [], []
    reach = np.concatenate([levels, [0.0]])
    for e, weight in enumerate(w):
        first_level: dict[int, int] = {}
        for j, length in enumerate(reach):
            if length >= half:
                continue
            count = max(1, int(np.ceil(weight / (half - length) - 1e-12)))
            while count <= top and half - weight / count < length:
                count += 1  # the ceiling's rounding
            if count <= top:
                first_level.setdefault(count, j)  # levels run longest first
        for count, j in first_level.items():
            credit_expert.append(e)
            credit_count.append(count)
            credit_level.append(j)
    return (top, debt_expert, debt_count, debt_level, np.array(credit_expert, int),
            np.array(credit_count, int), np.array(credit_level, int), len(levels))


def _reaches(w: np.ndarray, target: float, num_gpus: int, time_limit: float
             ) -> np.ndarray | None:
    """Counts ``[E]`` (summing to ``2P``) whose pairing reaches ``target`` for one layer
    ``w [E]``, or ``None`` where none do (anti-affinity ignored): an integer program
    over :func:`_count_options` (one choice per expert, spare replicas per level, Hall's
    condition as running sums over the levels), solved by OR-Tools' CP-SAT (HiGHS took
    minutes where it takes seconds). Raises :class:`Undecided` at the time limit."""
    from ortools.sat.python import cp_model  # the benchmark extra; only this needs it

    options = _count_options(w, target, num_gpus)
    if options is None:
        return None
    top, d_exp, d_cnt, d_lev, c_exp, c_cnt, c_lev, k = options
    num_experts, slots = len(w), 2 * num_gpus
    model = cp_model.CpModel()
    chosen_debt = [model.new_bool_var(f"d{i}") for i in range(len(d_exp))]
    chosen_credit = [model.new_bool_var(f"c{i}") for i in range(len(c_exp))]
    spare = [model.new_int_var(0, slots, f"s{j}") for j in range(k)]
    per_expert: list[list] = [[] for _ in range(num_experts)]
    for e, var in zip(d_exp, chosen_debt, strict=True):
        per_expert[e].append(var)
    for e, var in zip(c_exp, chosen_credit, strict=True):
        per_expert[e].append(var)
    for choices in per_expert:
        model.add_exactly_one(choices)
    model.add(sum(int(c) * v for c, v in zip(d_cnt, chosen_debt, strict=True))
              + sum(int(c) * v for c, v in zip(c_cnt, chosen_credit, strict=True))
              + sum(spare) <= slots)
    enters: list[list] = [[] for _ in range(k)]  # ± pieces first reaching each level
    room: list[list] = [[] for _ in range(k)]  # how many spares a level's experts can take
    for level, c, var in zip(d_lev, d_cnt, chosen_debt, strict=True):
        if level < k:
            enters[level].append(-int(c) * var)
    for level, c, var in zip(c_lev, c_cnt, chosen_credit, strict=True):
        if level < k:
            enters[level].append(int(c) * var)
            room[level].append(int(top - c) * var)
    running = 0
    for j in range(k):
        balance = model.new_int_var(0, slots, f"b{j}")  # credits minus debts, >= 0
        model.add(balance == running + sum(enters[j]) + spare[j])
        model.add(spare[j] <= sum(room[j]))
        running = balance
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = 2
    status = solver.solve(model)
    if status == cp_model.INFEASIBLE:
        return None
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise Undecided(f"CP-SAT did not settle T={target}: {solver.status_name(status)}")
    counts = np.zeros(num_experts, int)
    for e, c, var in zip(d_exp, d_cnt, chosen_debt, strict=True):
        if solver.value(var):
            counts[e] = c
    left = [solver.value(var) for var in spare]  # a level's spares go to its experts
    for e, c, level, var in zip(c_exp, c_cnt, c_lev, chosen_credit, strict=True):
        if solver.value(var):
            given = min(left[level], top - c) if level < k else 0
            counts[e] = c + given
            if level < k:
                left[level] -= given
    # spare slots to the lightest experts: more, smaller pieces only add credit
    for e in np.argsort(w, kind="stable"):
        counts[e] += min(top - counts[e], slots - counts.sum())
    return counts


def exact_optimum(w: np.ndarray, num_gpus: int, upper: float, time_limit: float
                  ) -> float | None:
    """The optimum max load over counts for one layer ``w [E]`` (anti-affinity ignored),
    to a relative ``1e-9``, or ``None`` where CP-SAT runs out of ``time_limit`` seconds on
    a step. ``upper``: a reachable max load. Each step asks for counts below the best
    pairing found so far and re-scores what it gets exactly (:func:`pair_max`); the
    last step proves that nothing is below."""
    try:
        while (counts := _reaches(w, upper * (1 - 1e-9), num_gpus, time_limit)) is not None:
            found = float(pair_max(w[None], counts[None])[0][0])
            if found >= upper:  # rounding disagreed with the model: no claim either way
                return None
            upper = found
    except Undecided:
        return None
    return upper


def _scored(w: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(F [K], x [K, 2P], k [K])`` of count vectors ``counts [K, E]`` for one layer
    ``w [E]``: the value eplb's count search minimises (the pairing max with the
    straddling expert's self-pairs exchanged away), the sorted pieces, the critical pair."""
    x = _scan(np.broadcast_to(w, counts.shape), counts)
    value, k = _pair_max_x(x)
    return value, x, k


def recount_search(w: np.ndarray, counts: np.ndarray, num_gpus: int, name: str,
                   most: int = 500) -> float:
    """Steepest descent over replica counts for one layer ``w [E]`` from ``counts [E]``
    in the neighbourhood ``name`` (module docstring); returns the value it stops at."""
    parts = name.split("-")
    everyone, step, both = parts[0] == "all", int(parts[1]), parts[-1] == "both"
    num_experts = len(w)
    top = min(num_gpus, 2 * num_gpus - num_experts + 1)
    value, x, k = _scored(w, counts[None])
    for _ in range(most):
        if everyone:
            receivers = np.arange(num_experts)
        else:
            ends = np.stack([k, x.shape[1] - 1 - k])[:, 0]
            receivers = np.unique([_expert_at(w[None], counts[None], x, ends[i:i + 1])[0]
                                   for i in range(2)])
        signs = (1, -1) if both else (1,)
        moves = [(r, d, s * size) for r in receivers for d in range(num_experts) if d != r
                 for size in range(1, step + 1) for s in signs]
        receiver, donor, size = (np.array(column) for column in zip(*moves, strict=True))
        trial = np.repeat(counts[None], len(moves), 0)
        rows = np.arange(len(moves))
        trial[rows, receiver] += size
        trial[rows, donor] -= size
        legal = (trial.min(1) >= 1) & (trial.max(1) <= top)
        if not legal.any():
            break
        trial = trial[legal]
        values, xs, ks = _scored(w, trial)
        best = int(values.argmin())
        if not values[best] < value[0] * (1 - 1e-12):
            break
        keep = slice(best, best + 1)
        counts, value, x, k = trial[best], values[keep], xs[keep], ks[keep]
    return float(value[0])


def _portfolio_start(w: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[E]`` the count search's start for one layer ``w [E]``: the default portfolio's
    allocation with the smallest pairing max."""
    rules = (0.0, -0.25, -0.5, -0.75, "hamilton")
    every = replica_counts(torch.from_numpy(w[None]), 2 * num_gpus, rules).numpy()[:, 0]
    return every[int(np.argmin(_scored(w, every)[0]))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="sampled layers per input")
    parser.add_argument("--inputs", type=int, default=2, help="load inputs per shape")
    parser.add_argument("--only", action="append", help="keep shapes whose label has this")
    parser.add_argument("--time-limit", type=float, default=10.0,
                        help="seconds CP-SAT may spend on one step of the exact optimum")
    parser.add_argument("--no-lp", action="store_true", help="skip the LP bound")
    parser.add_argument("--iterations", type=int, action="append",
                        help="also plan with this many count-search iterations (repeatable)")
    parser.add_argument("--neighbourhood", action="append", choices=NEIGHBOURHOODS,
                        help="also run a steepest descent over these moves (repeatable; "
                             "see the module docstring)")
    args = parser.parse_args(argv)
    try:
        import ortools  # noqa: F401  (the exact optimum's solver)
    except ImportError:
        parser.error("the exact optimum needs OR-Tools: pip install -e '.[bench]'")
    print(start("bench_two_slot_bound"))
    variants = [None, *(args.iterations or [])]
    names = ["eplb" if it is None else f"{it} iterations" for it in variants]
    names += list(args.neighbourhood or [])
    print("\nMax GPU load over the mean, sampled layers. Against the optimum: the ratio of "
          "balancedness (mean of mean/max over the layers whose optimum is known), and the "
          "worst layer's optimum / max.\n")
    print("| shape | loads | layers | optimum known | "
          + " | ".join(f"{name} / optimum: balancedness, worst" for name in names)
          + " | reference / optimum | eplb / LP bound: worst, mean | s |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|---|---|")
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
            # the default through the public API; other iteration counts through the
            # S = 2 planner that API calls
            plans = [eplb.plan(weight, replicas, gpus).phy2log if it is None
                     else plan_two_slots(weight, replicas, iterations=it) for it in variants]
            peaks = [slot_gpu_loads(weight, plan, gpus).amax(-1) for plan in plans]  # [L]
            reference = best_two_slot_max_load(weight, replicas, gpus)  # [L]
            for layer in np.linspace(0, weight.shape[0] - 1, args.layers).round().astype(int):
                w = weight[layer].to(torch.float64).numpy()
                if w.sum() <= 0:
                    continue
                mean = w.sum() / gpus
                upper = float(reference[layer]) / mean
                found = [recount_search(w / mean, _portfolio_start(w / mean, gpus), gpus, name)
                         for name in args.neighbourhood or ()]
                reachable = min([upper, *found])  # the solver starts below the best known
                optimum = exact_optimum(w / mean, gpus, reachable, args.time_limit)
                bound = np.nan if args.no_lp else lp_bound(w / mean, gpus, reachable)
                rows.append(([float(peak[layer]) / mean for peak in peaks] + found, upper,
                             np.nan if optimum is None else optimum, bound))
        ours = np.array([row[0] for row in rows])  # [layers, variants]
        ref, optimum, bound = (np.array([row[i] for row in rows]) for i in (1, 2, 3))
        known = ~np.isnan(optimum)
        cells = []
        for v in range(len(names)):
            peak = ours[known, v]
            cells.append(f"{np.sum(1 / peak) / np.sum(1 / optimum[known]):.5f}, "
                         f"{(optimum[known] / peak).min():.4f}" if known.any() else "–")
        reference_cell = (f"{np.sum(1 / ref[known]) / np.sum(1 / optimum[known]):.5f}"
                          if known.any() else "–")
        lp_cell = ("–" if args.no_lp else
                   f"{(bound / ours[:, 0]).min():.4f}, {(bound / ours[:, 0]).mean():.4f}")
        print(f"| {label} | {source} | {len(rows)} | {int(known.sum())} of {len(rows)} | "
              + " | ".join(cells) + f" | {reference_cell} | {lp_cell} | "
              f"{time.perf_counter() - begin:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
