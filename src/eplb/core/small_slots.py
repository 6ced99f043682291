"""Planners for one or two slots per GPU (``S = R / P <= 2``), the decode configurations.

With so few slots, packing is no longer the hard part; the replica counts are.

- **S = 1**: every GPU holds one replica, so its load is that replica's load and the
  problem is pure replication: minimise ``max_e w_e / c_e``. Jefferson/D'Hondt (grant each
  extra replica to the largest current ``w / c``) is exactly optimal, and any one-per-GPU
  dealing is anti-affine. :func:`plan_one_slot` is therefore exact.
- **S = 2**: for fixed counts the pieces ``w_e / c_e`` (``c_e`` copies each), sorted
  heaviest first as ``x_1 >= ... >= x_2P``, are best paired largest with smallest: GPU
  ``k`` gets ``x_k`` and ``x_{2P+1-k}``, and ``F(c) = max_k x_k + x_{2P+1-k}`` is the
  optimum for those counts (exchange argument; it ignores anti-affinity, which only the
  expert whose run straddles the median can break, settled afterwards by the legal-swap
  repair). What remains is a search over counts. Jefferson's counts are often far from
  the best: on real DeepSeek-V3 loads the best counts keep warm experts whole (a piece
  just under the target) and split *cold* experts into tiny partners for them, which no
  divisor rule does. :func:`search_two_slot_counts` is a local search over single
  replica moves (one expert loses a replica, another gains one), evaluated exactly by
  ``F``; it is not proven optimal (the count problem has knapsack structure), see
  :func:`best_two_slot_max_load` for the benchmark's reference.

Everything runs on the host in NumPy (small arrays, dependent steps) and returns tensors
on the weight's device.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.count_fillers import filler_counts
from eplb.core.ordering import descending_order, top_indices
from eplb.core.packing.repair import repair_conflicts
from eplb.core.packing.state import to_slots
from eplb.core.replication import (
    cap_counts,
    replica_bound,
    replica_counts,
    replica_experts,
)

__all__ = [
    "DEFAULT_TWO_SLOT_DONORS",
    "DEFAULT_TWO_SLOT_ITERATIONS",
    "HALL_RECEIVER_FROM",
    "best_two_slot_max_load",
    "pair_max",
    "plan_one_slot",
    "plan_two_slots",
    "search_two_slot_counts",
    "two_slot_hall_receivers",
    "two_slot_iterations",
]

#: how far above its bound ``max(W / P, T_rep)`` a 2-slot row's best pairing must sit
#: before Jefferson's counts trimmed to at most P pieces above half a GPU's mean load are
#: tried: where two such pieces pair because the counts make too many (two hot experts
#: among idle ones: 1.88× the bound) the counts set the max; on the synthetic S = 2 shapes
#: of bench_shapes such rows sat 1.01–1.07× above it and the trimmed counts won in 2 of
#: 254, by little, at 0.5–2.5 ms a call
CROWDED_GAP = 0.25
#: count-search moves evaluated per row and iteration: donors × {top, bottom receiver}
DEFAULT_TWO_SLOT_DONORS = 4
#: count-search iterations (each applies at most one move per row; rows stop when stuck)
DEFAULT_TWO_SLOT_ITERATIONS = 12
#: extra replicas ``R − E`` from which the count search also grows the expert Hall's
#: condition points at (see :func:`_hall_receivers`), where they are also at least half
#: the slots (``R >= 2E``). It costs 15–57 % more time (more rows keep improving);
#: the engines' own planners loop once per extra replica, so only there is their time
#: far enough above eplb's to pay for it (BENCHMARKS §12, "Forty-eighth session": with it
#: 61×384 on 256 GPUs, R − E = 128 of 512 slots, took 1.15× `deepseek_vec`'s time)
HALL_RECEIVER_FROM = 64


def _uniform_zero_rows(weight: np.ndarray) -> np.ndarray:
    """All-zero rows (dense layers in a dump) are planned as uniform."""
    zero = weight.sum(1, keepdims=True) <= 0
    return np.where(zero, 1.0, weight)


def _scan(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``x [N, R]``: every row's pieces ``w / c`` (``c`` copies each) heaviest first.

    Only values, so a plain value sort serves: sorted values are the same whatever the
    algorithm, hence on every machine (:func:`_expert_at` and :func:`_pieces` name the
    experts). Sorting the ``R`` repeated pieces (ascending, read backwards) costs about
    half of an argsort of the ``E`` experts plus the gather it needs (measured: 1.3 vs
    2.4 ms for the 464 candidate rows of a DeepSeek-V3 search step, E = 256, R = 288).
    Returns a reversed view.
    """
    rows = w.shape[0]
    pieces = np.repeat((w / c).ravel(), c.ravel()).reshape(rows, -1)
    pieces.sort(axis=1)
    return pieces[:, ::-1]


def _expert_at(w: np.ndarray, c: np.ndarray, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``[N]`` expert of the piece at 0-based position ``pos [N]`` of ``x = _scan(w, c)``,
    equal pieces taken in expert order (the order :func:`_pieces` lays them out in)."""
    v = w / c
    value = x[np.arange(len(x)), pos][:, None]
    before = np.where(v > value, c, 0).sum(1)  # pieces heavier than the one at pos
    run = np.cumsum(np.where(v == value, c, 0), axis=1)  # the equal run, by expert id
    return np.argmax(run > (pos - before)[:, None], axis=1)


def _pieces(w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x, expert)``, both ``[N, R]``: pieces heaviest first (equal pieces by expert id:
    the same layout on every machine) and the expert of each."""
    rows, num_experts = w.shape
    v = w / c
    order = descending_order(v)
    flat = (order + np.arange(rows)[:, None] * num_experts).ravel()
    times = c.ravel()[flat]
    x = np.repeat(v.ravel()[flat], times).reshape(rows, -1)
    return x, np.repeat(order.ravel(), times).reshape(x.shape)


def _pair_max_x(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(F [N], k [N])`` of sorted pieces ``x [N, 2P]``: the largest pair load once the
    straddling run is unpaired (see :func:`_unpair_straddler`), and the top index of the
    largest plain pair (the pair the count search works on)."""
    half = x.shape[1] // 2
    pairs = x[:, :half] + x[:, ::-1][:, :half]
    k = pairs.argmax(1)
    return _straddle_adjusted(x, pairs), k


def _straddle_adjusted(x: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``[N]`` the pairing max after :func:`_unpair_straddler`'s exchange, from values only.

    Pieces equal to the median piece ``v`` form the run (two experts with exactly equal
    pieces count as one run: the estimate is then conservative). Its self-pairs
    ``[first_self, P)`` and the donor pairs ``[donors − n, donors)`` are replaced by the
    exchanged pairs, whose largest loads are ``x_{donors−n} + v`` and
    ``v + x_{2P−donors}``. Rows with too few donor pairs keep the plain max.
    """
    num = x.shape[1]
    half = num // 2
    plain = pairs.max(1)
    v = x[:, half - 1]
    straddle = x[:, half] == v
    if not straddle.any():
        return plain
    rows = np.nonzero(straddle)[0]
    xs, vs = x[rows], v[rows][:, None]
    start = (xs > vs).sum(1)
    end = (xs >= vs).sum(1) - 1
    first_self = np.maximum(start, num - 1 - end)
    n_self = half - first_self
    donors = np.minimum(start, num - 1 - end)
    ok = donors >= n_self
    k = np.arange(half)
    removed = (k >= first_self[:, None]) | (
        (k >= (donors - n_self)[:, None]) & (k < donors[:, None])
    )
    kept = np.where(removed, -np.inf, pairs[rows]).max(1)
    low = np.clip(donors - n_self, 0, num - 1)
    high = np.clip(num - donors, 0, num - 1)
    r = np.arange(len(rows))
    exchanged = np.maximum(xs[r, low], xs[r, high]) + vs[:, 0]
    out = plain.copy()
    out[rows] = np.where(ok, np.maximum(kept, exchanged), plain[rows])
    return out


def pair_max(w: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Largest-with-smallest pairing of the pieces of counts ``c [N, E]`` (``Σ c = 2P``).

    Returns ``(F [N], top [N], bottom [N])``: the largest pair load (the optimal max GPU
    load for these counts, anti-affinity aside) and the experts of the pair that sets it.
    The count search and the planner use the anti-affine value instead
    (:func:`_straddle_adjusted`).
    """
    x = _scan(w, c)
    half = x.shape[1] // 2
    pairs = x[:, :half] + x[:, ::-1][:, :half]
    k = pairs.argmax(1)
    F = pairs[np.arange(len(x)), k]
    return F, _expert_at(w, c, x, k), _expert_at(w, c, x, x.shape[1] - 1 - k)


def _partner_of(x: np.ndarray, row: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``[K]`` the piece a new piece of each value in ``values [K]`` would pair with in
    row ``row [K]`` of the pairing of pieces ``x [N, 2P]`` (heaviest first): the mirror
    of its rank."""
    rows, num = x.shape
    # one global searchsorted: rows shifted apart by more than their value range
    shift = np.arange(rows) * (2.0 * float(x.max()) + 2.0)
    keys = (shift[:, None] - x).ravel()  # ascending within a row, rows ascending
    queries = shift[row] - values
    # queries in ascending order search about twice as fast (each starts from the last
    # one's place); equal queries get equal ranks, so the sort's choice among ties is moot
    order = np.argsort(queries)
    rank = np.empty(len(queries), dtype=np.int64)
    rank[order] = np.searchsorted(keys, queries[order], side="left")
    # pieces strictly heavier than the value
    mirror = np.clip(num - 1 - (rank - row * num), 0, num - 1)
    return x[row, mirror]


def _receivers(w: np.ndarray, c: np.ndarray, x: np.ndarray, k: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(top [N], bottom [N])``: the experts the count search grows, from the pieces
    ``x = _scan(w, c)`` and the top index ``k [N]`` of the largest plain pair.

    Normally the two experts of that pair. Where it is a self-pair of the expert whose run
    straddles the median, both would be that one expert and the search would stall, while
    the max is set by the exchanged pairs (:func:`_straddle_adjusted`, ``x_low + v`` and
    ``v + x_high``): their partners, at ``low`` and ``high``, are grown instead (found by a
    brute force over tiny instances: ``w = [7, 0, 8]`` on 2 GPUs stopped at 11 where one
    move reaches the optimum 8)."""
    num = x.shape[1]
    top = _expert_at(w, c, x, k)
    bottom = _expert_at(w, c, x, num - 1 - k)
    rows = np.nonzero(top == bottom)[0]
    if len(rows):
        half = num // 2
        xs = x[rows]
        v = xs[:, half - 1][:, None]
        start = (xs > v).sum(1)
        end = (xs >= v).sum(1) - 1
        n_self = half - np.maximum(start, num - 1 - end)
        donors = np.minimum(start, num - 1 - end)
        low = np.clip(donors - n_self, 0, num - 1)
        high = np.clip(num - donors, 0, num - 1)
        top[rows] = _expert_at(w[rows], c[rows], xs, low)
        bottom[rows] = _expert_at(w[rows], c[rows], xs, high)
    return top, bottom


def _hall_receivers(w: np.ndarray, c: np.ndarray, x: np.ndarray, k: np.ndarray,
                    critical: np.ndarray, num_gpus: int, how_many: int) -> np.ndarray:
    """``[N, how_many]`` experts whose next replica adds the most pieces below the partner
    of the largest pair (``x [N, 2P]`` heaviest first, top index ``k [N]``), other than
    the ``critical [N, 2]`` receivers.

    By Hall's condition the largest pair ``x_k + a`` drops below its load only if the
    pieces lighter than ``a`` outnumber the pieces that need such a partner, so the
    useful new replica is often one far from that pair: an expert whose pieces sit just
    above ``a`` turns all ``c + 1`` of its pieces into partners lighter than ``a`` (one
    just below turns one more). Ranked by that gain, ties to the lighter expert (its new
    pieces are the lighter partners); experts at a replica per GPU are left out. The
    critical pair alone stalled on rows whose best move lies elsewhere: by brute force on
    synthetic S = 2 layers, 70–90 % of the improving moves grow an expert outside it.
    """
    rows = np.arange(len(x))
    a = x[rows, x.shape[1] - 1 - k][:, None]
    gain = np.where(w / (c + 1) < a, np.where(w / c >= a, c + 1, 1), 0).astype(np.float64)
    # w < P in a row scaled to mean GPU load 1, so w / (P + 1) < 1 never reorders gains
    gain -= w / (num_gpus + 1)
    gain[c >= num_gpus] = -np.inf
    gain[rows[:, None], critical] = -np.inf
    return top_indices(gain, how_many)


def search_two_slot_counts(
    w: np.ndarray,
    counts: np.ndarray,
    iterations: int = DEFAULT_TWO_SLOT_ITERATIONS,
    donors: int = DEFAULT_TWO_SLOT_DONORS,
    hall_receivers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Local search over replica counts for two slots per GPU.

    Args:
        w: ``[N, E]`` float64 loads (no all-zero rows).
        counts: ``[N, E]`` int64 starting counts, each row summing to ``R = 2P``.
        iterations: most moves per row.
        donors: donor experts tried per receiver and iteration.
        hall_receivers: further receivers per row, from :func:`_hall_receivers`.

    Each iteration and row: the receivers are the two experts of the pair that sets ``F``
    (splitting the top one shrinks the heavy piece, splitting the bottom one gives it a
    smaller partner), and ``hall_receivers`` experts whose next replica adds the most
    pieces lighter than that pair's partner; the donors are the experts with ``c >= 2``
    whose grown piece ``w / (c − 1)`` would sit in the lightest pair (estimated against
    the current pairing). Every receiver × donor move is evaluated exactly; the best is
    kept if it lowers ``F``, and a row without an improving move stops.

    ``F`` is the max GPU load of the plan :func:`plan_two_slots` makes of the counts: the
    pairing max with the straddling expert's self-pairs exchanged away
    (:func:`_straddle_adjusted`), so the search also steers clear of costly straddles.

    Returns:
        ``(counts [N, E], F [N])``, ``F`` that load for the returned counts.
    """
    counts = counts.copy()
    rows, num_experts = w.shape
    num_gpus = int(counts[0].sum()) // 2 if rows else 1
    x = _scan(w, counts)
    F, k = _pair_max_x(x)

    def receivers_of(w: np.ndarray, c: np.ndarray, x: np.ndarray, k: np.ndarray
                     ) -> np.ndarray:
        critical = np.stack(_receivers(w, c, x, k), 1)  # [N, 2]
        if not hall_receivers:
            return critical
        more = _hall_receivers(w, c, x, k, critical, num_gpus, hall_receivers)
        return np.concatenate([critical, more], 1)

    receiver_of = receivers_of(w, counts, x, k)  # [rows, 2 + hall_receivers]
    num_recv = receiver_of.shape[1]
    active = np.arange(rows)
    k_don = min(donors, num_experts)
    for _ in range(iterations):
        if not len(active):
            break
        wa, ca = w[active], counts[active]
        n = len(active)
        # the pair a donor's grown piece would join: its load estimates the move's cost
        # (only experts with a replica to give are looked up: a few of E at R ≈ E)
        cost = np.full(ca.shape, np.inf)
        row, expert = np.nonzero(ca >= 2)
        grown = wa[row, expert] / (ca[row, expert] - 1)
        cost[row, expert] = grown + _partner_of(x, row, grown)
        if k_don < num_experts:
            # the k cheapest, ties by expert id (argpartition's choice among ties
            # depends on NumPy's SIMD dispatch)
            pick = top_indices(-cost, k_don)
        else:
            pick = np.broadcast_to(np.arange(num_experts), (n, num_experts))
        receivers = receiver_of[active]  # [n, num_recv]
        # candidates [n, num_recv, k]: receiver r gains, donor d loses one replica
        donor = np.broadcast_to(pick[:, None, :], (n, num_recv, k_don))
        recv = np.broadcast_to(receivers[:, :, None], (n, num_recv, k_don))
        legal = (np.take_along_axis(ca, pick, 1)[:, None, :] >= 2) & (donor != recv)
        # a receiver already on every GPU would stack its next replica on one of them
        legal &= np.take_along_axis(ca, receivers, 1)[:, :, None] < num_gpus
        # an illegal move (donor with one replica, or donor = receiver) keeps the counts
        cand = np.broadcast_to(ca[:, None, None, :], (n, num_recv, k_don, num_experts)).copy()
        i_n = np.arange(n)[:, None, None]
        i_r = np.arange(num_recv)[None, :, None]
        i_k = np.arange(k_don)[None, None, :]
        cand[i_n, i_r, i_k, donor] -= legal
        cand[i_n, i_r, i_k, recv] += legal
        cand = cand.reshape(-1, num_experts)
        cand_w = np.broadcast_to(wa[:, None, None, :], (n, num_recv, k_don, num_experts))
        cand_w = cand_w.reshape(-1, num_experts)
        cx = _scan(cand_w, cand)
        f, fk = _pair_max_x(cx)
        f = np.where(legal.ravel(), f, np.inf).reshape(n, num_recv * k_don)
        best = f.argmin(1)
        better = f[np.arange(n), best] < F[active] * (1 - 1e-12)
        if not better.any():
            break
        chosen = np.arange(n)[better] * num_recv * k_don + best[better]
        rows_better = active[better]
        counts[rows_better] = cand[chosen]
        F[rows_better] = f[better, best[better]]
        x = cx[chosen]
        receiver_of[rows_better] = receivers_of(cand_w[chosen], cand[chosen], cx[chosen],
                                                fk[chosen])
        active = rows_better
    return counts, F


def _jefferson(w: np.ndarray, num_replicas: int) -> np.ndarray:
    return replica_counts(torch.from_numpy(w), num_replicas, (0.0,))[0].numpy()


def plan_one_slot(weight: torch.Tensor, num_replicas: int) -> torch.Tensor:
    """Exact plan for ``S = 1`` (``P = R``): ``weight [rows, E]`` → ``phy2log [rows, R]``.

    Jefferson's counts minimise the largest replica, which is the max GPU load here; one
    replica per GPU cannot break anti-affinity.
    """
    w = _uniform_zero_rows(weight.detach().to(torch.float64).cpu().numpy())
    # host arrays throughout; the experts in expand_replicas' order, without the loads
    expert = replica_experts(w, _jefferson(w, num_replicas))
    return torch.from_numpy(expert).to(weight.device)


def two_slot_iterations(num_experts: int, num_replicas: int) -> int:
    """Automatic count-search iterations for ``S = 2``: one per 24 extra replicas, 4–48.

    The moves a row needs grow with the extra replicas ``R − E`` (each move shifts one);
    so does the time of the engines' own planners (they loop over the extra replicas).
    Rows leave the search once an iteration finds no gain, so the count is a cap: the
    floor of 4 costs time only where rows still improve, i.e. where ``R − E`` is small.
    2026-12-04, ``bench_shapes.py --only "S=2"``, worst of 3 inputs against the best known
    counts (floor 1 → 4): 58×256 P=144 0.9882 → 0.9950 in 0.59–0.62× → 0.89× the time of
    SGLang's ``deepseek_vec``; 36×32 P=32 0.9894 → 0.9919 in 0.54× → 0.86×. A floor of 6
    reached 0.9963 at P=144 but in 0.97–1.00× ``deepseek_vec``'s time. The other S = 2
    shapes of the table already get 4 or more.
    """
    return min(48, max(4, (num_replicas - num_experts) // 24))


def two_slot_hall_receivers(num_experts: int, num_replicas: int) -> int:
    """Automatic Hall receivers for ``S = 2`` (see :data:`HALL_RECEIVER_FROM`): one where
    the extra replicas ``R − E`` number at least that many and at least half the slots,
    else none. The receiver costs 15–57 % more search time; the engines' planners loop
    once per extra replica, so only there is their time far enough above eplb's."""
    extra = num_replicas - num_experts
    return int(extra >= HALL_RECEIVER_FROM and extra >= num_experts)


def plan_two_slots(
    weight: torch.Tensor,
    num_replicas: int,
    iterations: int | None = None,
    donors: int = DEFAULT_TWO_SLOT_DONORS,
    rules: tuple[float | str, ...] = (0.0, -0.25, -0.5, -0.75, "hamilton"),
    hall_receivers: int | None = None,
) -> torch.Tensor:
    """Plan for ``S = 2``: ``weight [rows, E]`` → ``phy2log [rows, R]``.

    Counts: the allocation of ``rules`` (see :func:`eplb.core.replication.replica_counts`)
    with the smallest pairing max per row, improved by :func:`search_two_slot_counts`
    (``iterations``: default :func:`two_slot_iterations`; ``hall_receivers``: default
    :func:`two_slot_hall_receivers`). Pieces are
    paired largest with smallest, then the legal-swap repair settles the rare pair
    holding two replicas of the expert whose run straddles the median (rows where some
    expert has more replicas than GPUs are dealt round-robin instead, as everywhere in
    eplb).
    """
    num_gpus = num_replicas // 2
    w = _uniform_zero_rows(weight.detach().to(torch.float64).cpu().numpy())
    w = w / w.sum(1, keepdims=True) * num_gpus  # mean GPU load 1: scale-free tolerances
    rows, num_experts = w.shape
    if iterations is None:
        iterations = two_slot_iterations(num_experts, num_replicas)
    if hall_receivers is None:
        hall_receivers = two_slot_hall_receivers(num_experts, num_replicas)
    if num_replicas == num_experts:
        counts = np.ones_like(w, dtype=np.int64)
    else:
        host = torch.from_numpy(w)
        every = cap_counts(host, replica_counts(host, num_replicas, rules), num_gpus).numpy()
        # [rules, rows]: every allocation scanned in one batch (rows are independent; the
        # batch holds rules × rows × R pieces, five times one allocation's)
        scores = _pair_max_x(_scan(np.tile(w, (len(every), 1)),
                                   every.reshape(-1, num_experts)))[0].reshape(len(every), rows)
        counts = every[scores.argmin(0), np.arange(rows)]
        # more pieces above half a GPU's mean load (1 here) than GPUs pair two of them on
        # some GPU: two equally hot experts among idle ones got 17 + 17 replicas on 32
        # GPUs (0.531; 16 + 16 balance it), and the count search, one replica at a time,
        # sees no gain in its first step back (attacker pass, twenty-seventh session). In
        # the rows where two such pieces make the largest pair of Jefferson's counts and
        # the best pairing sits far above the bound (see CROWDED_GAP), those counts trimmed
        # to at most P such pieces are tried too, and taken where strictly better
        # (filler_counts trims Jefferson's counts: the rule delta = 0, wherever it is listed)
        jefferson = every[rules.index(0.0)] if 0.0 in rules else None
        crowded = np.zeros(0, np.int64) if jefferson is None else np.nonzero(
            ((w / np.maximum(jefferson, 1) > 0.5) * jefferson).sum(1) > num_gpus)[0]
        if len(crowded):
            x = _scan(w[crowded], jefferson[crowded])
            top = _pair_max_x(x)[1]  # the largest pair: pieces top and 2P − 1 − top
            crowded = crowded[x[np.arange(len(crowded)), x.shape[1] - 1 - top] > 0.5]
        if len(crowded):
            bound = replica_bound(host[crowded], num_replicas,
                                  torch.ones(len(crowded), dtype=torch.float64)).numpy()
            crowded = crowded[scores[:, crowded].min(0) > bound * (1 + CROWDED_GAP)]
        if len(crowded):
            trimmed = filler_counts(host[crowded], torch.from_numpy(jefferson[crowded]),
                                    num_gpus).numpy()
            better = _pair_max_x(_scan(w[crowded], trimmed))[0] < scores[:, crowded].min(0)
            counts[crowded[better]] = trimmed[better]
        # the search's value of the counts it returns (with 0 iterations: of the start)
        counts, believed = search_two_slot_counts(w, counts, iterations, donors,
                                                  hall_receivers)
    phy2log, peak = _pair_and_repair(w, counts, num_gpus)
    if num_replicas != num_experts:
        # the count search scores counts by piece values; where pieces of two experts tie
        # it can miss that anti-affinity forces a dearer pairing (hypothesis found
        # [0, 1, 15, 21, 60] on 4 GPUs: 36 instead of 27.5). In those rows the plan comes
        # out above the search's value: try the portfolio's allocations as planned, and
        # keep the best.
        worse = np.nonzero(peak > believed * (1 + 1e-9))[0]
        for alternative in every[:, worse] if len(worse) else ():
            other, other_peak = _pair_and_repair(w[worse], alternative, num_gpus)
            better = other_peak < peak[worse] * (1 - 1e-12)
            phy2log[worse[better]] = other[better]
            peak[worse[better]] = other_peak[better]
    return phy2log.to(weight.device)


def _pair_and_repair(
    w: np.ndarray, counts: np.ndarray, num_gpus: int
) -> tuple[torch.Tensor, np.ndarray]:
    """``(phy2log [N, R], peak [N])``: pieces of ``counts [N, E]`` paired largest with
    smallest (GPU ``k``: pieces ``k`` and ``2P−1−k``), the straddling expert's self-pairs
    exchanged away, anti-affinity repaired; ``peak`` the max GPU load in ``w``'s units."""
    rows = w.shape[0]
    x, expert = _pieces(w, counts)
    top, bottom = expert[:, :num_gpus], expert[:, ::-1][:, :num_gpus].copy()
    suspects = _unpair_straddler(x, expert, top, bottom, counts.max(1) <= num_gpus)
    state = torch.from_numpy(
        np.stack(
            [
                np.stack([x[:, :num_gpus], x[:, ::-1][:, :num_gpus]]),
                np.stack([top, bottom]),
            ]
        ).astype(np.float32)
    )
    # moved partners: rewrite the loads of the bottom slots from their (new) experts
    per = (w / counts)[np.arange(rows)[:, None], bottom]
    state[0, 1] = torch.from_numpy(per.astype(np.float32))
    allow_shared = torch.from_numpy(counts.max(1) > num_gpus)
    state = repair_conflicts(state, allow_shared, torch.from_numpy(suspects))
    phy2log = to_slots(state)
    slot_load = np.take_along_axis(w / counts, phy2log.numpy(), 1)
    peak = slot_load.reshape(rows, num_gpus, 2).sum(2).max(1)
    return phy2log, peak


def _unpair_straddler(
    x: np.ndarray, expert: np.ndarray, top: np.ndarray, bottom: np.ndarray, rows_ok: np.ndarray
) -> np.ndarray:
    """Separate the pairs that hold two replicas of one expert, in place on ``bottom``.

    Only the expert whose run of equal pieces straddles the median can pair with itself:
    positions ``k`` and ``2P−1−k`` both inside its run ``[s, e]``, for ``k`` from
    ``max(s, 2P−1−e)`` to ``P−1``. The ``t``-th such pair gives one of its pieces to the
    ``t``-th nearest pair lying wholly outside the run (top above it, partner below it:
    ``j = min(s, 2P−1−e) − 1 − t``) and takes that pair's partner: both pairs then hold
    two experts, and the dearer new pair costs ``x_j + v``. Rows where some expert has
    more replicas than GPUs are skipped (``rows_ok`` False; they are dealt round-robin).
    Returns the rows still holding such a pair (too few pairs outside the run; left to
    the generic repair).
    """
    num = x.shape[1]
    half = num // 2
    rows = np.nonzero((expert[:, half - 1] == expert[:, half]) & rows_ok)[0]
    if not len(rows):
        return rows
    run = expert[rows, half][:, None]
    inside = expert[rows] == run  # [n, 2P], one contiguous run per row
    start = inside.argmax(1)
    end = num - 1 - inside[:, ::-1].argmax(1)
    first_self = np.maximum(start, num - 1 - end)
    n_self = half - first_self
    # donor pairs: top above the run and partner below it, nearest first
    donors = np.minimum(start, num - 1 - end)
    stuck = n_self > donors  # fewer such pairs than pairs to separate
    for i in np.nonzero(~stuck)[0]:
        r = rows[i]
        for t in range(n_self[i]):
            k, j = first_self[i] + t, donors[i] - 1 - t
            bottom[r, k], bottom[r, j] = bottom[r, j], bottom[r, k]
    return rows[stuck]


def best_two_slot_max_load(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    iterations: int = 400,
    donors: int = 32,
) -> torch.Tensor:
    """``[rows]`` reference max GPU load for ``S <= 2`` (in the weight's units, float64).

    ``S = 1``: the exact optimum (Jefferson's largest replica). ``S = 2``: the smallest
    ``F`` of a long count search (``iterations``, ``donors``) from each divisor/Hamilton
    allocation of the default portfolio, run once with the critical pair's receivers
    only and once with two of :func:`_hall_receivers` too (each finds counts the other
    misses) — an upper bound on the optimum over counts, not a proof of it (the
    benchmark calls it "best known"; anti-affinity is ignored, so no valid placement of
    the same counts is better).
    """
    slots = num_replicas // num_gpus
    if slots not in (1, 2) or num_replicas % num_gpus:
        raise ValueError(f"expected 1 or 2 slots per GPU, got R={num_replicas}, P={num_gpus}")
    w = _uniform_zero_rows(weight.detach().to(torch.float64).cpu().numpy())
    if slots == 1:
        return torch.from_numpy((w / _jefferson(w, num_replicas)).max(1))
    total = w.sum(1, keepdims=True)
    scaled = w / total * num_gpus
    if num_replicas == w.shape[1]:
        best = pair_max(scaled, np.ones_like(scaled, dtype=np.int64))[0]
    else:
        rules = (0.0, -0.25, -0.5, -0.75, "hamilton")
        starts = replica_counts(torch.from_numpy(scaled), num_replicas, rules).numpy()
        best = np.min(
            [search_two_slot_counts(scaled, c, iterations, donors, hall)[1]
             for c in starts for hall in (0, 2)], axis=0
        )
    return torch.from_numpy(best * total[:, 0] / num_gpus)
