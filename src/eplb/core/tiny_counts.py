"""Replica counts for rows of very few experts: every count vector one replica away from
Jefferson's in each expert, ranked by the greedy's packing of it.

With 8 experts (Mixtral) on 4 GPUs of 5–6 slots, a GPU's mean load is a few experts'
replicas, and whether a row packs near it depends on which experts get one replica more
or fewer: Jefferson's 3 per expert packed at 0.983 where 4/2 splits pack at 0.99997. The
divisor rules of the portfolio, the filler counts and the ladder's rungs all move one
expert's replicas at a time from Jefferson's; the vectors that balance move several at
once. Rows of at most :data:`TINY_EXPERTS` experts can afford them all: the ``±1`` moves
that keep the total (1,107 vectors at 8 experts, fewer near the caps), each packed the
greedy's way in one batched NumPy loop over the slots, and the :data:`TINY_PACKED` best of
each row packed by eplb's packing (:func:`eplb.core.policies.base.plan_rows`).
"""

from __future__ import annotations

import itertools
from functools import cache

import numpy as np

from eplb.core.count_bounds import packing_bound
from eplb.core.replication import replica_items

#: rows of at most this many experts get every ±1 count vector (3^E before the sum test)
TINY_EXPERTS = 8
#: count vectors per row packed by eplb's packing, the best by the greedy's peak
TINY_PACKED = 8
#: ... for rows packed this far above their bound over all counts: a row of a few experts
#: is cheap to search, and within 1 % of the bound (the other count looks' gap) the
#: greedy still beat eplb by up to 0.5 % on Mixtral's counts
TINY_GAP = 1e-4
#: the most :func:`tiny_look_work` a row may take: the greedy packs every vector slot by
#: slot over all GPUs, so a row costs vectors × R × P (8 experts on 4,096 GPUs of 3 slots:
#: 5.6e10, over 2 minutes for one layer; attacker pass). At this cap a row takes about
#: 0.1 s: with 8 experts 128 GPUs of 3 slots are looked at, of 5 not, which costs 6
#: random layers 0.99958 → 0.99888 (the look took 0.56 s there)
TINY_MAX_WORK = 1 << 26
#: count vectors ranked at once: rows are ranked a few at a time (each on its own), as
#: ranking every row at once held ~280 KB a row at 8 experts (200 layers on 128 nodes of
#: 8 experts each: 25,600 rows, over 7 GB; helper pass)
VECTORS_AT_ONCE = 1 << 18


@cache
def _moves(num_experts: int) -> np.ndarray:
    """``[k, E]`` every vector of -1, 0, +1 per expert that sums to 0, the zero vector
    first (the counts themselves)."""
    steps = np.array(list(itertools.product((0, -1, 1), repeat=num_experts)), np.int64)
    return steps[steps.sum(1) == 0]


def tiny_look_work(num_experts: int, num_replicas: int, num_gpus: int) -> int:
    """The greedy's work to rank one row's count vectors: vectors × ``R`` × ``P``."""
    return len(_moves(num_experts)) * num_replicas * num_gpus


def neighbour_counts(counts: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors [m, E], row_of [m])``: for every row of ``counts [n, E]`` (each at least
    1 and at most ``cap``), the count vectors with the same total that differ by at most
    one replica per expert and stay within ``[1, cap]``, the row's own first."""
    near = counts[:, None] + _moves(counts.shape[1])[None]  # [n, k, E]
    valid = ((near >= 1) & (near <= cap)).all(2)
    row, which = np.nonzero(valid)
    return near[row, which], row


def greedy_peaks(load: np.ndarray, expert: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[m]`` the busiest GPU of each row of replicas ``load [m, R]`` (heaviest first, of
    the experts ``expert [m, R]``, ids below 63) packed the greedy's way: each onto the
    lightest GPU with a free slot that does not hold its expert yet (``inf`` where none is
    left: such counts rank last)."""
    rows, num_slots = load.shape
    slots = num_slots // num_gpus
    gpu_load = np.zeros((rows, num_gpus))
    free = np.full((rows, num_gpus), slots, np.int64)
    held = np.zeros((rows, num_gpus), np.int64)  # bit e: the GPU holds expert e
    first_gpu = np.arange(rows) * num_gpus  # flat (row, GPU) of each row's GPU 0
    flat_load, flat_free, flat_held = gpu_load.ravel(), free.ravel(), held.ravel()  # views
    bit = np.left_shift(1, expert)
    for item in range(num_slots):
        blocked = (free == 0) | ((held & bit[:, item, None]) != 0)
        open_load = np.where(blocked, np.inf, gpu_load)
        cell = first_gpu + open_load.argmin(1)
        flat_load[cell] = open_load.ravel()[cell] + load[:, item]  # inf (no room) stays
        flat_free[cell] -= 1
        flat_held[cell] |= bit[:, item]
    return gpu_load.max(1)


def best_neighbours(weight: np.ndarray, counts: np.ndarray, num_gpus: int,
                    peak_now: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors [m, E], row_of [m])``: up to :data:`TINY_PACKED` count vectors per row of
    ``counts [n, E]`` (loads ``weight [n, E]``, float64) among :func:`neighbour_counts`
    (capped at ``num_gpus``: no expert above one replica per GPU), those with the lowest
    :func:`greedy_peaks`, ties in the order the moves are listed. A vector whose packing
    bound (:func:`eplb.core.count_bounds.packing_bound`) already reaches ``peak_now [n]``
    (the row's busiest GPU now, in ``weight``'s units) cannot pack lower: it is neither
    ranked nor packed. The rows are ranked :data:`VECTORS_AT_ONCE` vectors at a time,
    which changes no choice."""
    step = max(1, VECTORS_AT_ONCE // len(_moves(counts.shape[1])))
    if len(counts) <= step:
        return _best_of_rows(weight, counts, num_gpus, peak_now)
    parts = [_best_of_rows(weight[first:first + step], counts[first:first + step],
                           num_gpus, peak_now[first:first + step])
             for first in range(0, len(counts), step)]
    return (np.concatenate([vectors for vectors, _ in parts]),
            np.concatenate([row_of + first for (_, row_of), first
                            in zip(parts, range(0, len(counts), step), strict=True)]))


def _best_of_rows(weight: np.ndarray, counts: np.ndarray, num_gpus: int,
                  peak_now: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`best_neighbours` of the rows ``counts [n, E]`` all at once."""
    vectors, row_of = neighbour_counts(counts, num_gpus)
    load, expert = replica_items(weight[row_of], vectors)
    useful = packing_bound(load, num_gpus) < peak_now[row_of]
    vectors, row_of = vectors[useful], row_of[useful]
    if not len(row_of):
        return vectors, row_of
    peak = greedy_peaks(load[useful], expert[useful], num_gpus)
    order = np.lexsort((peak, row_of))  # by row, then peak (stable: the listed order)
    row_sorted = row_of[order]
    rank = np.arange(len(order)) - np.searchsorted(row_sorted, row_sorted)
    keep = order[rank < TINY_PACKED]
    return vectors[keep], row_of[keep]
