"""The next-window score of incremental planning: every candidate placement's expected
max GPU load on the next window (:func:`expected_peak`), from its GPUs' load moments
(:func:`gpu_moments`) under fixed stratified normal draws (:func:`normal_draws`,
:func:`peak_of`), and the exact max GPU load on the window at hand (:func:`exact_peak`).

Everything here works on *rows* (layers, or (layer, node) pairs under the hierarchical
policy) of candidates ``[C, B, R]`` with loads ``weight [B, E]``, on the host.

Scores are exact: loads are turned into integers before they are summed (see
:func:`expected_peak`), so every rank, thread count and instruction set ranks the
candidates alike.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from functools import lru_cache
from statistics import NormalDist

import numpy as np
import torch

from eplb.core.ordering import sort_integers
from eplb.online.moves import slot_loads_of

#: fixed stratified normal draws per GPU behind every expected next-window peak
DRAWS = 16


def exact_peak(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[B]`` max GPU load of every row of ``phy2log [B, R]``, summed in one fixed order
    (each GPU's replica loads ascending, added left to right), so the same bits come out
    on every machine."""
    grid = np.sort(slot_loads_of(weight, phy2log).reshape(phy2log.shape[0], num_gpus, -1), 2)
    return np.cumsum(grid, 2)[..., -1].max(1)


def units_of(weight: np.ndarray) -> np.ndarray:
    """``[B, E]`` integer units of loads ``weight [B, E]``: 2**20 for each row's heaviest
    expert, the rest rounded. :func:`expected_peak` scores in these units; a replica's
    units are off its exact share by less than 1.5 (this rounding, then the floor of the
    split), a GPU's by less than 1.5 per slot."""
    return np.round(weight * (2.0**20 / np.maximum(weight.max(1, keepdims=True), 1e-300)))


def expected_peak(
    weight: np.ndarray,
    candidates: np.ndarray,
    num_gpus: int,
    drift: float,
    draws: int = DRAWS,
    groups: int = 1,
    group_share: float = 0.0,
    units: np.ndarray | None = None,
    counts: np.ndarray | None = None,
    block: np.ndarray | None = None,
    nodes: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """``(expected [C, B], now [C, B])``: the expected next-window max GPU load of every
    candidate ``[C, B, R]`` (``-1`` slots carry nothing), and its max GPU load on the
    window at hand, both relative to the row's mean GPU load.

    Under a drift of log-std ``drift`` per expert, GPU ``g``'s next load has mean ``L_g``
    and standard deviation ``s_g = d · sqrt(Σ_i x_i²)`` over its replicas' loads ``x_i``
    (``d² = exp(drift²) − 1``). With ``groups > 1`` expert groups (ids ``[k·E/G,
    (k+1)·E/G)``), ``group_share`` of that variance is common to an expert's group:
    ``s_g² = d² · ((1 − ρ) Σ_i x_i² + ρ Σ_k (Σ_{i in group k} x_i)²)``, so a GPU that
    holds several experts of one group swings more. The expected max over GPUs, taken as
    independent normals,
    is averaged over ``draws`` fixed stratified draws per GPU (the same for every
    candidate, so candidates are compared on common numbers): it counts how many GPUs sit
    near the top, so balancing below the noise stops paying, as it does in reality. The
    draws go by rank, not by GPU id: draw column ``k`` goes to the ``k``-th lightest GPU
    (inside each of ``nodes`` equal blocks of GPUs, as the node rows
    of hierarchical layers are scored), so a plan with its GPUs relabelled scores as the
    plan itself, and nearly equal plans score nearly alike (with draws by GPU id a
    relabelling moved the score by 0.002–0.004: BENCHMARKS.md §3).

    Exact arithmetic: per-replica loads are rounded to integers (2**20 units for the
    row's largest expert) before they are summed, so every sum and square sum is of
    integers under 2**53 and independent of summation order; the rest is element-wise
    IEEE arithmetic (correctly rounded, hence identical on every machine) and a mean
    taken in a fixed order. ``units``: :func:`units_of` ``(weight)``, when the caller has it;
    ``counts`` and ``block``: the candidates' replica counts, when the caller knows them
    (:func:`gpu_moments`).
    """
    units = units_of(weight) if units is None else units  # [B, E] integers
    gpu, variance = gpu_moments(units, candidates, num_gpus, groups, group_share, counts,
                                block)
    return peak_of(gpu, variance, units.sum(1), drift, draws, nodes)


def gpu_moments(
    units: np.ndarray,
    candidates: np.ndarray,
    num_gpus: int,
    groups: int = 1,
    group_share: float = 0.0,
    counts: np.ndarray | None = None,
    block: np.ndarray | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """``(load [C, B, P], variance [C, B, P])`` of every GPU of the candidates
    ``[C, B, R]`` (``-1`` slots carry nothing) with integer expert loads ``units [B, E]``
    (:func:`units_of`): its load and its drift variance up to the factor ``d²``,
    ``(1 − ρ) Σ_i x_i² + ρ Σ_k (Σ_{i in group k} x_i)²`` (see :func:`expected_peak`).

    A GPU's moments depend on its own slots and the expert's replica count in the row
    only, so rows may be any split of layers whose experts live in one row each (the
    node rows of hierarchical layers): the moments come out the same, bit for bit
    (integer sums; the group squares are added in ascending group order, and other
    rows' groups only add zeros). ``counts [B, E]``: the replica counts every candidate
    of a row shares, when the caller knows them (a swap search's steps: see
    :func:`~eplb.online.ladder.warm_ladder`), or ``[K, B, E]`` of ``K`` sets of counts
    with ``block [C]`` the set of each candidate (e.g. the placement in force and a
    ladder's steps); else they are counted."""
    cands, rows, _ = candidates.shape
    num_experts = units.shape[1]
    # The large element-wise steps run in torch on the host (several times faster than
    # NumPy at these shapes), restricted to operations that are one correctly rounded
    # IEEE step whatever the instruction set: +, ×, ÷ of two tensors, floor, max.
    slots = torch.from_numpy(candidates)
    if counts is not None and counts.ndim == 2:  # shared: every candidate reads set 0
        counts, block = counts[None], np.zeros(cands, np.int64)
    # flat (candidate or count set, row, expert) index of every slot: one gather (and
    # one bincount when the counts are not given)
    blocks = torch.arange(cands) if block is None else torch.from_numpy(block)
    offset = ((blocks[:, None] * rows + torch.arange(rows)) * num_experts).view(cands, rows, 1)
    # NumPy's minimum settles "any empty slot?" ten times cheaper than torch's any()
    any_empty = bool(candidates.size) and int(candidates.min()) < 0
    empty = slots < 0 if any_empty else None
    index = (slots.clamp(min=0) if any_empty else slots) + offset  # [C, B, R]
    if counts is None:
        filled = index[~empty] if any_empty else index.flatten()
        counts = np.bincount(filled.numpy(), minlength=cands * rows * num_experts)
        counts = counts.reshape(cands, rows, num_experts)
    counts = torch.from_numpy(counts.astype(np.float64))  # [C or K, B, E]
    if any_empty:  # empty slots read expert 0's share (then zeroed): it must be finite
        counts = counts.clamp(min=1)
    # an expert a candidate does not hold has no replica: its share (x / 0) is never read
    per = torch.floor(torch.from_numpy(units) / counts)  # [C or K, B, E] integers
    load = per.reshape(-1).index_select(0, index.reshape(-1)).view(index.shape)
    if any_empty:
        load = load * ~empty
    grid = load.view(cands, rows, num_gpus, -1)
    # sums of integers below 2**53: exact, so the summation order does not matter, and
    # a product with a vector of ones (BLAS, every partial sum an integer) is about twice
    # as fast as a sum over the short slot axis
    ones = torch.ones(grid.shape[3], dtype=grid.dtype)
    gpu, square = grid @ ones, (grid * grid) @ ones  # [C, B, P]
    variance = square.numpy()
    if groups > 1 and group_share > 0 and num_experts % groups == 0:
        if block is not None:  # the groups' cells need each candidate's own index
            index = index - offset + (torch.arange(cands * rows) * num_experts).view(
                cands, rows, 1)
        together = _group_squares(load, index, num_experts, num_gpus, groups,
                                  exact=float(gpu.max()) < 2.0**26)
        variance = (1.0 - group_share) * variance + group_share * together
    return gpu, variance


def peak_of(
    gpu: torch.Tensor, variance: np.ndarray, total: np.ndarray, drift: float, draws: int = DRAWS,
    nodes: int = 1, live: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(expected [C, B], now [C, B])`` from GPU moments ``[C, B, P]``
    (:func:`gpu_moments`) of rows whose loads total ``total [B]`` units (see
    :func:`expected_peak`), over the mean load of the ``live`` GPUs that carry them
    (default: all ``P``; dead GPUs scored among them carry nothing)."""
    cands, rows, num_gpus = gpu.shape
    if nodes < 1 or num_gpus % nodes:
        raise ValueError(f"nodes ({nodes}) must divide the {num_gpus} GPUs scored")
    z = torch.from_numpy(normal_draws(draws, num_gpus))[:, None, None]  # [D, 1, 1, P]
    # [1, B]: what all spread
    mean = np.maximum(total[None] / (num_gpus if live is None else live), 1e-300)
    # draws go by rank inside each node, as the node rows of hierarchical layers take them
    shape = (cands, rows, nodes, num_gpus // nodes)
    maxima = draw_maxima(gpu.view(shape), variance.reshape(shape), drift,
                         z.view(draws, 1, 1, *shape[2:])).max(-1)
    return mean_of_draws(maxima) / mean, gpu.amax(2).numpy() / mean


def draw_maxima(
    gpu: torch.Tensor, variance: np.ndarray, drift: float, z: torch.Tensor
) -> np.ndarray:
    """``[D, C, B]`` every row's max GPU load under each of the ``D`` draws ``z`` (which
    broadcast against ``[D, C, B, P]``), from GPU moments ``[C, B, P]``
    (:func:`gpu_moments`). A max is exact, so the max over a layer's GPUs may be taken
    per node row first and then over the layer's node rows: the same numbers. Draw
    column ``k`` of the last axis goes to the ``k``-th lightest GPU of that axis, whatever
    its id (GPUs of exactly equal load keep their order by id)."""
    # square roots stay in NumPy: torch's vectorized sqrt is not correctly rounded
    spread = torch.from_numpy(_drift_factor(drift) * np.sqrt(variance))
    # by rank: one stable sort of exact integer loads, the same order on every machine
    # (a second sort, by spread for GPUs of equal load, moved no benchmark row by more
    # than 0.0002, for two more sorts and gathers per score)
    gpu, order = sort_integers(gpu)
    spread = spread.gather(-1, order)
    noisy = spread[None] * z  # [D, C, B, P]
    return noisy.add_(gpu[None]).amax(-1).numpy()


def far_from_bound(peak: np.ndarray, now: np.ndarray, bound: np.ndarray | float,
                    move_price: float) -> np.ndarray:
    """``[L]`` the layers whose candidate (expected peak ``peak [L]`` and in-sample peak
    ``now [L]``, over the mean) ends further above ``bound`` (``[L]``, or 1.0: perfect
    balance) in sample than the drift's own excess over it (below that the noise decides
    the next window), where a placement at the bound with the same excess would beat it on
    the next window by more than ``move_price``: an old packing the ladder cannot undo."""
    excess = np.maximum(peak - now, 0.0)  # the drift's
    with np.errstate(divide="ignore", invalid="ignore"):
        return (now - bound > excess) & (1.0 / (bound + excess) - 1.0 / peak > move_price)


def mean_of_draws(peaks: np.ndarray) -> np.ndarray:
    """``[...]`` the mean of :func:`draw_maxima` ``[D, ...]`` over the draws, added in a
    fixed order (the same bits on every machine)."""
    peak = peaks[0].copy()
    for d in range(1, peaks.shape[0]):
        peak += peaks[d]
    return peak / peaks.shape[0]


def _group_squares(
    load: torch.Tensor, index: torch.Tensor, num_experts: int, num_gpus: int, groups: int,
    exact: bool,
) -> np.ndarray:
    """``[C, B, P]`` Σ over expert groups of (the group's load on the GPU)², from integer
    slot loads ``load [C, B, R]`` and the slots' flat ``(candidate, row, expert)`` index
    ``index [C, B, R]`` (``(c·B + b)·E + expert``).

    Every group sum is an integer; so is every square and their sum while every GPU's
    whole load stays below 2**26 (``exact``; Σ_k t_k² ≤ (Σ_k t_k)² < 2**52), where any
    summation order gives the same sum. Beyond that the squares are added group by
    group, in a fixed order."""
    cands, rows, num_slots = load.shape
    # (c·B + b)·G + group, then the GPU: one bincount into [C, B, G, P] cells (NumPy:
    # its integer division and weighted bincount are several times faster than torch's)
    gpu_of_slot = np.arange(num_slots) // (num_slots // num_gpus)
    group_size = num_experts // groups
    flat_group = (index.numpy() >> (group_size.bit_length() - 1)  # a shift: several times
                  if group_size & (group_size - 1) == 0  # cheaper than NumPy's division
                  else index.numpy() // group_size)
    cell = (flat_group * num_gpus + gpu_of_slot).reshape(-1)
    weights = load.numpy().reshape(-1)
    cells = cands * rows * groups * num_gpus
    if cells > max(4 * cell.size, 1 << 22):
        # far more (group, GPU) cells than slots, and many (groups and GPUs in the
        # thousands): only the occupied cells, so memory follows the slots; each
        # (candidate, row, GPU) adds its cells' squares in their sorted order, the same
        # on every machine
        occupied, inverse = np.unique(cell, return_inverse=True)
        sums = np.bincount(inverse, weights=weights)
        owner = occupied // (groups * num_gpus) * num_gpus + occupied % num_gpus
        return np.bincount(owner, weights=sums * sums,
                           minlength=cands * rows * num_gpus).reshape(cands, rows, num_gpus)
    sums = np.bincount(cell, weights=weights, minlength=cells)
    squares = (sums * sums).reshape(cands, rows, groups, num_gpus)
    if exact:
        return squares.sum(2)
    total = squares[:, :, 0].copy()
    for k in range(1, groups):
        total += squares[:, :, k]
    return total


@lru_cache(maxsize=256)
def _drift_factor(drift: float) -> float:
    """``d = sqrt(exp(drift²) − 1)``, the same bits on every machine: ``exp`` in decimal
    arithmetic (correctly rounded at 40 digits), then one rounding to float and an IEEE
    square root. NumPy's ``expm1`` is not correctly rounded, and its SIMD versions differ
    in the last bit (``np.expm1(0.04)`` under AVX-512 and at NumPy's baseline), which
    changed plans for 81 of the drifts 0.001–2.000."""
    with localcontext() as ctx:
        ctx.prec = 40
        grown = Decimal(float(drift) * float(drift)).exp() - 1
    return math.sqrt(float(grown))


@lru_cache(maxsize=32)
def normal_draws(draws: int, num_gpus: int) -> np.ndarray:
    """``[D, P]`` standard normal draws, stratified per GPU (each column holds the ``D``
    quantiles ``(k + 1/2) / D`` in a fixed shuffled order) and rounded to 2**-20, so the
    numbers are the same on every machine."""
    quantiles = np.array([NormalDist().inv_cdf((k + 0.5) / draws) for k in range(draws)])
    rng = np.random.default_rng(0x5EED)
    z = np.stack([rng.permutation(quantiles) for _ in range(num_gpus)], 1)
    return np.round(z * 2.0**20) / 2.0**20
