"""The warm-start ladder of incremental planning: replica transfers toward Jefferson's
counts, then budgeted steps of the all-pairs swap search (:func:`warm_ladder`).

Rows are layers, or (layer, node) pairs under the hierarchical policy, of a placement
``phy2log [B, R]`` with loads ``weight [B, E]``, on the host: NumPy for the transfers'
short dependent loops, torch for the batched refinement.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from eplb.core.options import PackingOptions
from eplb.core.packing import refine_path, repair_assignment
from eplb.core.replication import cap_counts, replica_counts
from eplb.online.moves import counts_of, gpu_loads_of, id_type

#: replica transfers found one at a time (every row at once) before a row's list comes
#: from a whole Jefferson allocation instead. A steady rebalance needs at most about 10
#: per row (BENCHMARKS.md §3), and a row never moves more than its R − E extra replicas
#: (every expert keeps one): DeepSeek-V3's 32 cover even vLLM's initial map (9–29 per
#: row on the real loads; with a limit of 16 the first call paid 16 exchanges and then
#: the whole allocation for most rows, 2.7 ms against 1.6 ms now and 1.4 ms for the
#: whole allocation alone)
EXCHANGE_LIMIT = 32


def transfer_order(
    weight: np.ndarray, phy2log: np.ndarray, counts: np.ndarray, num_gpus: int,
    target: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The replica transfers that turn each row's replica counts into Jefferson's (none
    above one replica per GPU of the ``num_gpus``, as fresh plans count them), best
    first: ``(donor [B, T], receiver [B, T], count [B])`` with ``-1`` padding.

    Transfer ``t`` moves one replica from ``donor[:, t]`` to ``receiver[:, t]``: the
    expert whose replicas relieve the most (largest ``w / c``, below the cap) gains one
    from the expert that loses least by it (smallest ``w / (c − 1)``; an expert above the
    cap first), while the first exceeds the second (D'Hondt's exchange, which ends at
    Jefferson's allocation), so a prefix of the list is the best partial reallocation of
    its length. ``counts [B, E]``: the replica counts of ``phy2log`` (:func:`counts_of`).

    The exchange runs on every row at once, one transfer per step, for at most
    :data:`EXCHANGE_LIMIT` steps; rows that need more (far from Jefferson's counts) take
    the whole allocation and sort its differences instead (:func:`_transfers_by_table`).
    The two lists agree but on exact ties, where the exchange moves nothing.

    ``target [B, E]``: other counts to reach instead of Jefferson's (e.g. counts that
    divide the GPUs, :func:`eplb.core.dispatch_plan.divisor_counts`), through the table
    path, in the same order of gains and losses.
    """
    if target is not None:
        return _transfers_by_table(weight, phy2log, counts, num_gpus, target)
    donor, receiver, count, unfinished = _exchange(weight, counts, num_gpus, EXCHANGE_LIMIT)
    if unfinished.any():
        rows = np.nonzero(unfinished)[0]
        far_donor, far_receiver, far_count = _transfers_by_table(
            weight[rows], phy2log[rows], counts[rows], num_gpus)
        width = max(donor.shape[1], far_donor.shape[1])
        donor, receiver = (np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-1)
                           for a in (donor, receiver))
        donor[rows] = receiver[rows] = -1
        donor[rows, :far_donor.shape[1]] = far_donor
        receiver[rows, :far_receiver.shape[1]] = far_receiver
        count[rows] = far_count
    return donor, receiver, count


def _exchange(
    weight: np.ndarray, counts: np.ndarray, num_gpus: int, limit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """D'Hondt's exchange from ``counts [B, E]`` for at most ``limit`` transfers per row:
    ``(donor [B, T], receiver [B, T], count [B], unfinished [B])`` (see
    :func:`transfer_order`), ``unfinished`` the rows with a gaining transfer left."""
    rows, num_experts = weight.shape
    c = counts.astype(np.float64)  # a copy, updated per transfer
    # as cap_counts: a row whose slots fit one replica per GPU caps every expert there
    cap = np.where(num_gpus * num_experts >= counts.sum(1), float(num_gpus), np.inf)
    # what an expert's next replica relieves (-inf at the cap; inf without a replica:
    # it takes first) and what losing one costs (inf: its only one; -inf above the cap:
    # it gives first)
    take = np.where(c < cap[:, None], weight / np.maximum(c, 1), -np.inf)
    take[c == 0] = np.inf
    give = np.where(c > cap[:, None], -np.inf,
                    np.where(c >= 2, weight / np.maximum(c - 1, 1), np.inf))
    donor = np.full((rows, limit), -1, np.int64)
    receiver = np.full((rows, limit), -1, np.int64)
    count = np.zeros(rows, np.int64)
    unfinished = np.zeros(rows, bool)
    # every row is searched at every step (a finished row finds nothing again: nothing of
    # it changes), through flat indices: cheaper than compacting the rows still going
    first = np.arange(rows) * num_experts
    flat_c, flat_w, flat_take, flat_give = (a.reshape(-1) for a in (c, weight, take, give))
    for t in range(limit + 1):
        at_d = first + give.argmin(1)  # the first among ties, as everywhere
        at_r = first + take.argmax(1)
        going = np.flatnonzero(flat_take[at_r] > flat_give[at_d])
        if not len(going):
            break
        if t == limit:
            unfinished[going] = True
            break
        at_d, at_r = at_d[going], at_r[going]
        donor[going, t], receiver[going, t] = at_d - first[going], at_r - first[going]
        count[going] += 1
        flat_c[at_d] -= 1
        flat_c[at_r] += 1
        c_d, c_r, top = flat_c[at_d], flat_c[at_r], cap[going]
        w_d, w_r = flat_w[at_d], flat_w[at_r]
        # the init's rules with their guards dropped: here c_d >= 1 and c_r >= 2
        flat_take[at_d] = np.where(c_d < top, w_d / c_d, -np.inf)
        flat_give[at_d] = np.where(c_d > top, -np.inf,
                                   np.where(c_d >= 2, w_d / np.maximum(c_d - 1, 1), np.inf))
        flat_take[at_r] = np.where(c_r < top, w_r / c_r, -np.inf)
        flat_give[at_r] = np.where(c_r > top, -np.inf, w_r / (c_r - 1))
    width = int(count.max(initial=0))
    return donor[:, :width], receiver[:, :width], count, unfinished


def _transfers_by_table(
    weight: np.ndarray, phy2log: np.ndarray, counts: np.ndarray, num_gpus: int,
    want: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`transfer_order` from a whole Jefferson allocation (capped as fresh plans
    cap it): receiver units ordered by the per-replica load they relieve (``w / c``
    before the new replica), donors by what losing one costs (``w / (c − 1)``).
    Vectorized over all rows: the units of every row are laid out flat and sorted once.
    ``want [B, E]``: the counts to reach, when not Jefferson's."""
    rows, num_slots = phy2log.shape
    if want is None:
        host = torch.from_numpy(weight)
        want = cap_counts(host, replica_counts(host, num_slots, (0.0,))[0], num_gpus).numpy()
    gain = want - counts
    count = np.maximum(gain, 0).sum(1)
    width = int(count.max(initial=0))
    donor = np.full((rows, width), -1, np.int64)
    receiver = np.full((rows, width), -1, np.int64)
    if width == 0:
        return donor, receiver, count

    def units(amount: np.ndarray, key_of: Callable[..., np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat ``(row, expert, rank in row)`` of ``amount [B, E]`` units, best first by
        ``key_of(row, expert, j)`` (``j``: the unit's index within its expert)."""
        row, expert = np.nonzero(amount > 0)
        reps = amount[row, expert]
        row, expert = np.repeat(row, reps), np.repeat(expert, reps)
        # j-th unit of its expert: position minus the expert's first position
        first = np.cumsum(reps) - reps
        j = np.arange(len(row)) - np.repeat(first, reps)
        order = np.lexsort((expert, key_of(row, expert, j), row))
        row, expert = row[order], expert[order]
        start = np.searchsorted(row, np.arange(rows))
        return row, expert, np.arange(len(row)) - start[row]

    r_row, r_exp, r_rank = units(
        gain, lambda b, e, j: -weight[b, e] / np.maximum(counts[b, e] + j, 1)
    )
    d_row, d_exp, d_rank = units(
        -gain, lambda b, e, j: weight[b, e] / np.maximum(counts[b, e] - j - 1, 1)
    )
    receiver[r_row, r_rank] = r_exp
    donor[d_row, d_rank] = d_exp
    return donor, receiver, count


def apply_transfers(
    weight: np.ndarray,
    phy2log: np.ndarray,
    donor: np.ndarray,
    receiver: np.ndarray,
    upto: np.ndarray,
    num_gpus: int,
    counts: np.ndarray,
    record: tuple[float, ...] = (),
    record_most: tuple[np.ndarray, ...] = (),
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """``phy2log [B, R]`` (replica counts ``counts [B, E]``) after the first ``upto [B]``
    transfers of each row, and the placements after the prefixes ``record`` (fractions
    of ``upto``; each at most ``record_most [B]`` transfers where given).

    Transfers go one at a time (all rows at once): each rewrites the donor's replica on
    the lightest GPU that does not hold the receiver yet (the receiver is the hotter
    expert), and that GPU's load is updated before the next transfer.

    Returns:
        ``(placement [B, R], snapshots, counts [B, E], stuck [B])``: a copy, the
        prefixes' placements, its replica counts, and the rows where a transfer found
        every donor replica on a GPU holding the receiver (the only rows the transfers
        may have left with two replicas of an expert on one GPU).
    """
    rows, num_slots = phy2log.shape
    num_experts = weight.shape[1]
    slots = num_slots // num_gpus
    # transfers past a row's list (-1 padding) are never made
    upto = np.minimum(upto, (donor >= 0).sum(1)) if donor.shape[1] else np.zeros_like(upto)
    # the rows by transfers to make, most first: the rows still transferring at step t are
    # a prefix, so every array below is a slice (a view) instead of a fancy-indexed copy
    order = np.argsort(-upto, kind="stable")
    upto = upto[order]  # in that order from here on
    active = np.searchsorted(-upto, -np.arange(int(upto.max(initial=0))))
    out = phy2log[order]  # a copy in that order; put back at the end
    loads = gpu_loads_of(weight, phy2log, num_gpus, counts)[order]  # [B, P], updated per transfer
    w = weight[order].ravel()
    counts = counts[order].astype(np.float64).ravel()  # a copy, updated per transfer
    receiver = receiver[order]
    narrow = id_type(num_experts)  # for the searches
    # each transfer's (donor, receiver), compared with every slot at once below
    pairs = np.stack([donor[order], receiver], 2).astype(narrow)  # [B, T, 2]
    flat_out = out.reshape(-1)  # a view: writes land in out
    # a copy [S, B, P] for the searches: NumPy reduces over a leading axis element-wise,
    # over a short last one row by row (several times slower at S = 9)
    ids = np.ascontiguousarray(out.reshape(rows, num_gpus, slots).transpose(2, 0, 1), narrow)
    flat_ids = ids.reshape(-1)  # slot k of (row, GPU) c at k·B·P + c
    flat_loads = loads.reshape(-1)  # (row, GPU) c at c
    marks = [np.ceil(f * upto).astype(np.int64) for f in record]  # per row
    for mark, most in zip(marks, record_most, strict=False):
        np.minimum(mark, most[order], out=mark)
    snapshots = [out.copy() for _ in record]
    stuck_rows = np.zeros(rows, bool)
    flat = np.arange(rows) * num_experts  # each row's offset into w and counts
    column = np.arange(rows) * num_gpus  # each row's first (row, GPU) column
    for t, n in enumerate(active):
        for mark, snap in zip(marks, snapshots, strict=True):
            at = mark == t  # rows whose prefix ends here
            snap[at] = out[at]
        r = receiver[:n, t]
        # the donor's replica on the lightest GPU that does not hold the receiver yet:
        # one compare of every slot with both experts, [S, n, 2, P]
        hit = ids[:, :n, None] == pairs[None, :n, t, :, None]
        holds = np.bitwise_or.reduce(hit, 0)  # [n, 2, P]: GPUs holding the donor, the receiver
        allowed = holds[:, 0] & ~holds[:, 1]
        gpu = np.argmin(np.where(allowed, loads[:n], np.inf), 1)
        # every donor replica on a GPU holding the receiver: the first donor GPU (the
        # anti-affinity repair spreads it next)
        cell = column[:n] + gpu  # flat (row, GPU) of the chosen GPU
        stuck = ~allowed.reshape(-1)[cell]  # (rows below n: the same flat index)
        if stuck.any():
            gpu = np.where(stuck, np.argmax(holds[:, 0], 1), gpu)
            cell = column[:n] + gpu
            stuck_rows[:n] |= stuck
        # the first slot of that GPU holding the donor: [S, n] compares, first along S
        slot = np.argmax(ids.reshape(slots, -1)[:, cell] == pairs[None, :n, t, 0], 0)
        at_d, at_r = flat[:n] + pairs[:n, t, 0], flat[:n] + r
        flat_loads[cell] += w[at_r] / (counts[at_r] + 1) - w[at_d] / counts[at_d]
        counts[at_d] -= 1
        counts[at_r] += 1
        flat_out[cell * slots + slot] = r
        flat_ids[slot * (rows * num_gpus) + cell] = r
    for mark, snap in zip(marks, snapshots, strict=True):
        late = mark >= upto  # prefixes as long as the whole list: the final placement
        snap[late] = out[late]
    back = np.argsort(order)
    counts = counts.reshape(rows, num_experts).astype(np.int64)
    stuck_out = np.empty(rows, bool)
    stuck_out[order] = stuck_rows
    return out[back], [snap[back] for snap in snapshots], counts[back], stuck_out


def warm_ladder(
    weight: np.ndarray,
    base: np.ndarray,
    num_gpus: int,
    quota: np.ndarray,
    steps: int,
    options: PackingOptions,
    transfers_only: bool = True,
    spread: bool = False,
    base_counts: np.ndarray | None = None,
    fine: bool | np.ndarray = False,
    target: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Warm-start candidates of every row, from few moves to many, ``[B]`` the replica
    transfers each row's counts are from Jefferson's, and ``[B, E]`` the replica counts
    of the last ``steps`` candidates (swaps keep them: the same in every step).

    Candidate 0 is the base placement. With ``transfers_only``, candidates 1–3 apply the
    first quarter, half and all of the replica transfers toward Jefferson's counts (best
    first; the first two at most one and two steps' ``quota``, in the rows ``fine`` marks
    (``[B]`` or one flag for all) one and two transfers) and nothing else: the cheapest
    moves, for small budgets. The last ``steps`` candidates apply all the transfers and
    ``k`` steps of the all-pairs swap search, each step allowed ``quota [B]`` more changed
    slots, heaviest GPU pairs first. (The heaviest-GPU polish is left out: its in-sample
    gains do not survive to the next window.) Rows with a zero quota keep the base.

    Args:
        weight: ``[B, E]`` row loads (no all-zero row), float64.
        base: ``[B, R]`` valid placements of the rows (every slot filled).
        num_gpus: the GPUs each row's ``R`` slots lie on (slot ``s`` on GPU
            ``s // (R / num_gpus)``): the live GPUs of a layer, or one node's GPUs for the
            node rows of hierarchical layers.
        quota: ``[B]`` slots each swap step may change in a row, beyond the step before
            it; a zero quota keeps the row at ``base`` (no transfers, no swaps).
        steps: how many swap steps: the last ``steps`` candidates.
        options: the packing knobs of the swap search (:func:`refine_path`).
        transfers_only: also return the three transfer-only candidates (1–3 above), which
            only a small move budget picks.
        spread: ``base`` holds no two replicas of an expert on one GPU where it need not
            (:func:`~eplb.online.moves.stacked` is False on every row): only rows whose
            transfers stacked replicas (or with an expert on more replicas than GPUs) are
            then scanned.
        base_counts: ``[B, E]`` :func:`counts_of` ``(base)``, when the caller has it.
        target: ``[B, E]`` counts the transfers go toward instead of Jefferson's
            (:func:`transfer_order`).
        fine: ``[B]`` bool, or one flag for every row: the rows of the fine ladder
            (:func:`~eplb.online.budget.fine_layers`), whose first two transfer-only
            candidates stop after one and two transfers rather than one and two steps'
            ``quota``.

    Returns:
        ``([steps + 4, B, R], [B], [B, E])``: the candidates (``[steps + 1, B, R]``
        without ``transfers_only``), the base first; the transfers; the swap steps'
        replica counts.
    """
    if base.shape[0] == 0:  # no row to search (e.g. no node can set its layer's time)
        return (np.repeat(base[None], steps + (4 if transfers_only else 1), 0),
                np.zeros(0, np.int64), np.zeros((0, weight.shape[1]), np.int64))
    counts = counts_of(base, weight.shape[1]) if base_counts is None else base_counts
    donor, receiver, count = transfer_order(weight, base, counts, num_gpus, target)
    count = np.where(quota > 0, count, 0)
    record = (0.25, 0.5) if transfers_only else ()
    # the prefixes are the candidates of small budgets: no longer than one and two
    # steps' quota (or transfers), so that a budget below a quarter of the transfers
    # still buys some
    most = (np.where(fine, 1, quota), np.where(fine, 2, 2 * quota))
    start, prefixes, start_counts, stuck = apply_transfers(
        weight, base, donor, receiver, count, num_gpus, counts, record=record,
        record_most=most)
    only = np.empty((0, *base.shape), base.dtype)
    # the rows that may hold two replicas of an expert on one GPU: those a transfer
    # stacked (in the whole list, so in any prefix of it too) and those with an expert on
    # more replicas than GPUs; with ``spread`` no other row does
    suspects = np.nonzero(stuck | (counts.max(1) > num_gpus))[0] if spread else None
    if transfers_only:  # cheap (one slot each); stacked replicas spread
        only = np.stack([*prefixes, start])  # [3, B, R]
        # the repair changes nothing in a row that stacks nothing: only the suspects are
        # repaired (a budgeted global call spent a fifth of its time repairing all rows)
        rows = np.arange(base.shape[0]) if suspects is None else suspects
        if len(rows):
            live = torch.ones(num_gpus, dtype=torch.bool)
            only[:, rows] = repair_assignment(
                torch.from_numpy(np.tile(weight[rows], (3, 1))),
                torch.from_numpy(only[:, rows].reshape(3 * len(rows), -1)), live,
            ).numpy().reshape(3, len(rows), -1)
    path = refine_path(
        torch.from_numpy(weight),
        torch.from_numpy(start),
        num_gpus,
        options,
        origin=torch.from_numpy(base),
        quota=torch.from_numpy(quota),
        steps=steps,
        counts=torch.from_numpy(start_counts),
        # (a start with more replicas of an expert than GPUs may stack them by right)
        suspects=None if suspects is None else torch.from_numpy(suspects),
    ).numpy()
    return np.concatenate([base[None], only, path]), count, start_counts
