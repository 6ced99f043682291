"""The slot moves of incremental planning: the forced repairs (fill empty or dead
slots, cover missing experts, spread stacked replicas) and the slot primitives every
online module counts with (replica counts, slot and GPU loads, stacked replicas).
The next-window score that ranks candidates is :mod:`eplb.online.score`; the replica
transfers and the warm-start ladder, :mod:`eplb.online.ladder`.

Everything here works on *rows* (layers, or (layer, node) pairs under the hierarchical
policy) of a placement ``phy2log [B, R]`` with loads ``weight [B, E]``, on the host
(NumPy for the short dependent loops, torch for the batched refinement).
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.packing import repair_assignment


def counts_of(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """``[B, E]`` replicas of every expert in ``phy2log [B, R]`` (``-1`` ignored)."""
    rows = phy2log.shape[0]
    flat = phy2log + num_experts * np.arange(rows)[:, None]
    if phy2log.size and phy2log.min() < 0:  # empty slots: left out (most calls have none)
        flat = flat[phy2log >= 0]
    return np.bincount(flat.ravel(), minlength=rows * num_experts).reshape(rows, num_experts)


def slot_loads_of(
    weight: np.ndarray, phy2log: np.ndarray, counts: np.ndarray | None = None
) -> np.ndarray:
    """``[B, R]`` load of every slot, each expert's load split evenly over its replicas
    (``-1`` slots carry nothing; ``counts [B, E]``: the replica counts of ``phy2log``,
    when the caller has them)."""
    counts = counts_of(phy2log, weight.shape[1]) if counts is None else counts
    per = weight / np.maximum(counts, 1)
    if phy2log.size and phy2log.min() < 0:
        return np.take_along_axis(per, np.maximum(phy2log, 0), 1) * (phy2log >= 0)
    # every slot filled (most calls): one flat gather, a third of take_along_axis's time
    # with its mask (22 against 67 µs at [58, 288]); the same values
    rows, num_experts = per.shape
    return per.reshape(-1)[phy2log + (np.arange(rows) * num_experts)[:, None]]


def gpu_loads_of(
    weight: np.ndarray, phy2log: np.ndarray, num_gpus: int, counts: np.ndarray | None = None
) -> np.ndarray:
    """``[B, P]`` GPU loads of :func:`slot_loads_of`."""
    return slot_loads_of(weight, phy2log, counts).reshape(phy2log.shape[0], num_gpus, -1).sum(2)


def fill_and_cover(
    weight: np.ndarray, phy2log: np.ndarray, live_slot: np.ndarray, num_gpus: int
) -> np.ndarray:
    """Forced moves: every live slot holds an expert and every expert has a replica.

    Empty live slots (a GPU that is live again) take, one at a time, an expert their GPU
    does not hold: an uncovered one first, else the one whose new replica load is
    closest to what brings the GPU to the mean load over its remaining empty slots,
    among those that give the layer its lowest peak once the replica is in (counting
    the lightest replica in each empty slot after it): a revived GPU takes load off the
    hot GPUs, and is neither idle nor a hot spot where a replica keeps it below. An
    uncovered expert with no empty slot left replaces a replica of the expert that loses
    least by it (``w / (c − 1)`` smallest). Slots of dead GPUs are emptied first.
    Returns the repaired ``[B, R]``.
    """
    out = np.where(live_slot[None], phy2log, -1)
    rows, num_slots = out.shape
    num_experts = weight.shape[1]
    slots = num_slots // num_gpus
    rowix = np.arange(rows)
    live_gpu = live_slot.reshape(num_gpus, slots).any(1)  # [P]
    # kept up to date per pass: the counts exactly, the loads of the GPUs a pass changes
    # summed again as gpu_loads_of sums them (the same bits as summing every GPU again)
    counts = counts_of(out, num_experts)
    if not ((out < 0) & live_slot[None]).any() and counts.all():
        return out  # nothing to fill or cover (a steady rebalance): no loads needed
    loads = gpu_loads_of(weight, out, num_gpus, counts)  # [B, P]
    # ... and the slots' experts as _busiest_other reads them (empty: E)
    ids = np.where(out >= 0, out, num_experts)  # [B, R]
    for _ in range(num_slots + num_experts):
        hole = (out < 0) & live_slot[None]
        has_hole = hole.any(1)
        uncovered = counts == 0
        need = has_hole | uncovered.any(1)
        if not need.any():
            return out
        # with a hole: the first empty slot; its GPU must not hold the receiver
        slot = np.argmax(hole, 1)
        gpu = slot // slots
        grid = out.reshape(rows, num_gpus, slots)[rowix, gpu]  # [B, S]
        on_gpu = np.zeros((rows, num_experts + 1), bool)
        on_gpu[rowix[:, None], np.where(grid >= 0, grid, num_experts)] = True
        live_gpus = max(1, int(live_slot.sum()) // slots)
        gpu_load = loads[rowix, gpu]  # [B]
        holes_left = (grid < 0).sum(1)
        want = (weight.sum(1) / live_gpus - gpu_load) / np.maximum(holes_left, 1)  # [B]
        new_load = weight / (counts + 1)  # [B, E] the receiver's replicas after it
        taken = on_gpu[:, :num_experts]
        # the layer's peak once the replica is in: the busiest other live GPU (those
        # holding the receiver lose a share to it) or this one, with room kept for the
        # lightest replica in each hole left. The lowest peak first, then the replica
        # nearest the aim: aiming every slot at the mean alone could leave the last one
        # only a hot expert (attacker pass: a revived GPU 11.6 % above the layer's peak
        # before), and keeping this GPU below the others could leave a hot one hot
        others = _busiest_other(weight, out, loads, counts, gpu, live_gpu, ids)  # [B, E]
        lightest = np.where(taken, np.inf, new_load).min(1)
        lightest = np.where(np.isfinite(lightest), lightest, 0.0)
        mine = gpu_load[:, None] + new_load + ((holes_left - 1) * lightest)[:, None]
        peak = np.where(taken, np.inf, np.maximum(others, mine))  # [B, E]
        lowest = peak.min(1, keepdims=True)
        miss = np.abs(new_load - want[:, None])
        miss = np.where(peak <= lowest * (1 + 1e-9), miss, np.inf)
        miss = np.where(uncovered & ~taken, -1.0, miss)  # uncovered experts first
        receiver = np.argmin(miss, 1)
        target, expert = slot, receiver
        if (need & ~has_hole).any():
            # without a hole: the heaviest uncovered expert takes a donor's slot
            missing = np.argmax(np.where(uncovered, weight, -1.0), 1)
            loss = np.where(counts >= 2, weight / np.maximum(counts - 1, 1), np.inf)
            donor = np.argmin(loss, 1)
            donor_slot = np.argmax(out == donor[:, None], 1)
            target = np.where(has_hole, slot, donor_slot)
            expert = np.where(has_hole, receiver, missing)
        row, target, expert = rowix[need], target[need], expert[need]
        before = out[row, target]  # -1 (a hole) or the donor
        out[row, target] = expert
        ids[row, target] = expert
        counts[row, expert] += 1  # (one slot per row: no repeated index)
        replaced = before >= 0
        counts[row[replaced], before[replaced]] -= 1
        # the GPUs holding an expert whose count changed (the target's GPU among them)
        # carry other replica loads now: their sums again
        written = out[row]  # [n, R] the rows this pass wrote
        touched = np.zeros((len(row), num_gpus), bool)
        for changed in (expert, np.where(replaced, before, -2)):
            at, where = np.nonzero(written == changed[:, None])
            touched[at, where // slots] = True
        at, gpus = np.nonzero(touched)
        held = written.reshape(len(row), num_gpus, slots)[at, gpus]  # [m, S]
        per = weight[row] / np.maximum(counts[row], 1)  # [n, E] as slot_loads_of splits
        loads[row[at], gpus] = (per[at[:, None], np.maximum(held, 0)] * (held >= 0)).sum(1)
    raise RuntimeError("eplb: could not fill the live slots (internal error)")


#: load ranks :func:`_busiest_other` walks for the experts the busiest GPU holds; those
#: on every GPU walked are looked up over all their GPUs at once
_WALK_RANKS = 8


def _busiest_other(
    weight: np.ndarray, out: np.ndarray, loads: np.ndarray, counts: np.ndarray,
    gpu: np.ndarray, live_gpu: np.ndarray, ids: np.ndarray,
) -> np.ndarray:
    """``[B, E]`` the busiest live GPU but ``gpu [B]`` once a replica of each expert
    joins ``gpu``: the GPUs holding that expert carry ``w / (c + 1)`` of it instead of
    ``w / c`` (``-inf`` where no other GPU is live). ``out [B, R]``, ``loads [B, P]`` and
    ``counts [B, E]`` describe the placement before; ``ids [B, R]`` its slots' experts
    with ``E`` for an empty slot (kept by the caller from pass to pass).

    That is the larger of two maxima: over the expert's holders, the busiest holder's
    load less the expert's drop (a subtraction rounds monotonically, so this is the max
    of every holder's difference, bit for bit), and over the other GPUs, the busiest of
    them. That is the busiest GPU of all for every expert it does not hold; only the S
    experts it holds look further down the load order, and at each rank only those the
    GPU there holds too. The forced moves call this once per slot they fill: a table of
    every (expert, GPU) made reviving 16 of 128 GPUs take 1.3 s (attacker pass)."""
    rows, num_experts = counts.shape
    num_gpus = loads.shape[1]
    slots = out.shape[1] // num_gpus
    other = live_gpu[None] & (np.arange(num_gpus)[None] != gpu[:, None])  # [B, P]
    base = np.where(other, loads, -np.inf)  # [B, P]
    drop = np.where(counts > 0, weight / np.maximum(counts, 1) - weight / (counts + 1), 0.0)
    flat = ids + (num_experts + 1) * np.arange(rows)[:, None]  # (row, expert)
    # over the holders: the busiest holder of every expert, less its drop
    holder = np.full(rows * (num_experts + 1), -np.inf)
    np.maximum.at(holder, flat.ravel(), np.repeat(base, slots, 1).ravel())
    result = holder.reshape(rows, num_experts + 1)[:, :num_experts] - drop
    # over the others: the busiest GPU, except for the experts it holds, which take the
    # next GPU in load order that does not hold them (ties in load give the same value
    # whichever GPU comes first)
    order = np.argsort(-base, 1)  # [B, P] busiest first (in any order among equals)
    ranked = np.take_along_axis(base, order, 1)
    grid = ids.reshape(rows, num_gpus, slots)
    other_max = np.repeat(ranked[:, :1], num_experts, 1)  # [B, E]
    row = np.repeat(np.arange(rows), slots)
    expert = grid[np.arange(rows), order[:, 0]].ravel()  # [B·S] held by the busiest
    keep = expert < num_experts
    row, expert = row[keep], expert[keep]
    for rank in range(1, min(num_gpus, _WALK_RANKS)):
        if not len(row):
            break
        there = grid[row, order[row, rank]]  # [n, S] the experts of the next GPU
        held = (there == expert[:, None]).any(1)
        other_max[row[~held], expert[~held]] = ranked[row[~held], rank]
        row, expert = row[held], expert[held]
    if len(row):
        # experts on every one of the busiest GPUs walked (a hot expert on nearly every
        # GPU): their first non-holder from all their GPUs at once, so a pass costs at
        # most a few walked ranks, not one per GPU
        holds = (grid[row] == expert[:, None, None]).any(2)  # [n, P]
        free = ~np.take_along_axis(holds, order[row], 1)  # in load order
        first = np.argmax(free, 1)
        other_max[row, expert] = np.where(free.any(1), ranked[row, first], -np.inf)
    return np.maximum(result, other_max)


def fill_and_spread(
    weight: np.ndarray, rows: np.ndarray, num_gpus: int, live: np.ndarray | None = None
) -> np.ndarray:
    """Forced moves of a batch of global problems ``rows [B, R]``: every live slot filled,
    every expert covered (:func:`fill_and_cover`), replicas stacked on one GPU spread over
    the live GPUs (``live [P]``, default all): by legal swaps, except the surplus copies
    of an expert on more replicas than GPUs (:func:`surplus_copies`), which are emptied
    and refilled."""
    live = np.ones(num_gpus, bool) if live is None else live
    live_slot = live.repeat(rows.shape[1] // num_gpus)
    out = fill_and_cover(weight, rows, live_slot, num_gpus)
    # the swap repair keeps counts and re-deals round-robin a row holding an expert on
    # more replicas than GPUs (a foreign map: vLLM's greedy on a small model); in a
    # stacked row such an expert's surplus copies are emptied and refilled instead.
    # Every pass takes every row still stacked (a row's moves never depend on the other
    # rows): "ceil", then "one" until it finds nothing (a refill may lift an expert
    # stacked elsewhere above G; refills never stack, so each pass leaves fewer pairs)
    keep = "ceil"
    bad = np.nonzero(stacked(np.where(live_slot[None], out, -1), num_gpus))[0]
    for _ in range(rows.shape[1] + 1):
        if not len(bad):
            return out
        shed = surplus_copies(np.where(live_slot[None], out[bad], -1), num_gpus, keep)
        if shed.any():
            out[bad] = fill_and_cover(weight[bad], np.where(shed, -1, out[bad]), live_slot,
                                      num_gpus)
            bad = np.nonzero(stacked(np.where(live_slot[None], out, -1), num_gpus))[0]
        elif keep == "one":
            break
        keep = "one"
    if len(bad):
        spread = repair_assignment(
            torch.from_numpy(weight[bad]), torch.from_numpy(out[bad]), torch.from_numpy(live)
        )
        out[bad] = spread.numpy()
    return out


def surplus_copies(phy2log: np.ndarray, num_gpus: int, keep: str = "ceil") -> np.ndarray:
    """``[B, R]`` True on the copies of an expert held on more replicas ``c`` than the
    ``G`` GPUs that hold any (``-1`` slots and their GPUs left out) beyond the first
    ``ceil(c / G)`` (``keep="ceil"``) or the first one (``keep="one"``) on their GPU, in
    rows whose experts can fill their slots without sharing a GPU (``G · E`` at least the
    filled slots). Emptied and refilled, they leave the expert on fewer replicas; the
    swap repair cannot do that (swaps keep counts)."""
    rows, num_slots = phy2log.shape
    grid = phy2log.reshape(rows, num_gpus, -1)
    filled = phy2log >= 0
    num_experts = int(phy2log.max(initial=-1)) + 1
    counts = counts_of(phy2log, num_experts)  # [B, E]
    live_gpus = np.maximum((grid >= 0).any(2).sum(1), 1)  # [B]
    if not (counts > live_gpus[:, None]).any():  # the common case: nothing to shed
        return np.zeros(phy2log.shape, bool)
    room = live_gpus * num_experts >= filled.sum(1)
    # the copy's rank among its expert's copies on its GPU (earlier slots first)
    same = (grid[..., :, None] == grid[..., None, :]) & (grid[..., None, :] >= 0)
    rank = np.tril(same, -1).sum(3).reshape(rows, num_slots)  # [B, R]
    mine = np.take_along_axis(counts, np.maximum(phy2log, 0), 1)  # c of each slot's expert
    allowed = -(-mine // live_gpus[:, None]) if keep == "ceil" else np.ones_like(mine)
    return filled & room[:, None] & (mine > live_gpus[:, None]) & (rank >= allowed)


def stacked(phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[B]`` True where some GPU holds more replicas of an expert than it must: more than
    ``ceil(c / G)`` of an expert with ``c`` replicas over the ``G`` GPUs that hold any
    (``-1`` slots and their GPUs are left out)."""
    rows, num_slots = phy2log.shape
    slots = num_slots // num_gpus
    if slots <= _PAIRWISE_SLOTS and not twice_on_a_gpu(phy2log, num_gpus):
        return np.zeros(rows, bool)  # the common answer, found at half the cost
    grid = np.sort(phy2log.reshape(rows, num_gpus, slots), 2)
    same = (grid[..., 1:] == grid[..., :-1]) & (grid[..., 1:] >= 0)
    if not same.any():
        return np.zeros(rows, bool)
    live_gpus = (grid >= 0).any(2).sum(1)  # [B]
    counts = counts_of(phy2log, int(phy2log.max()) + 1)
    # copies of each slot's expert on its GPU: run lengths of the sorted GPU rows
    slots = grid.shape[2]
    position = np.broadcast_to(np.arange(slots), grid.shape)
    starts = np.ones(grid.shape, bool)
    starts[..., 1:] = ~same
    run_start = np.maximum.accumulate(np.where(starts, position, 0), axis=2)
    copies = position - run_start + 1
    cap = -(-counts // np.maximum(live_gpus, 1)[:, None])  # [B, E]
    allowed = np.take_along_axis(cap, np.maximum(grid, 0).reshape(rows, -1), 1).reshape(grid.shape)
    return ((copies > allowed) & (grid >= 0)).any((1, 2))


#: at most this many slots per GPU, :func:`twice_on_a_gpu` compares every pair of them
_PAIRWISE_SLOTS = 16


def twice_on_a_gpu(phy2log: np.ndarray, num_gpus: int) -> bool:
    """Whether some GPU of ``phy2log [B, R]`` holds one expert in two slots (``-1`` slots
    aside): every pair of a GPU's slots compared at once, in a narrow type (about half
    the time of sorting every GPU's slots at 9 slots per GPU), where a GPU has at most
    :data:`_PAIRWISE_SLOTS` slots; more are sorted."""
    rows, num_slots = phy2log.shape
    grid = phy2log.reshape(rows, num_gpus, num_slots // num_gpus)
    if grid.shape[2] > _PAIRWISE_SLOTS:
        ids = np.sort(grid, 2)
        return bool(((ids[..., 1:] == ids[..., :-1]) & (ids[..., 1:] >= 0)).any())
    narrow = id_type(int(phy2log.max(initial=0)))
    by_slot = np.ascontiguousarray(grid.transpose(2, 0, 1), narrow)  # [S, B, P]
    first, second = np.triu_indices(by_slot.shape[0], 1)
    return bool(((by_slot[first] == by_slot[second]) & (by_slot[first] >= 0)).any())


def id_type(largest: int) -> type:
    """The narrowest of int16 and int64 that holds expert ids up to ``largest``: NumPy's
    compares and reductions over such arrays run several times faster in int16."""
    return np.int16 if largest <= np.iinfo(np.int16).max else np.int64

