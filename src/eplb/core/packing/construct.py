"""Construction: a first packing of sorted items, exactly ``S`` per GPU.

Balanced largest differencing (BLDM, Karmarkar–Karp for equal cardinalities): items
sorted heaviest first form ``S`` rounds of ``P``; repeatedly the two partial solutions with
the largest spread are merged, heaviest subset of one with the lightest of the other.
Only replicas of an expert split over two rounds can meet on one GPU, so runs are first
moved into one round where possible and the few clashes left are settled by the nearest
legal swap in their round. This step is a chain of small dependent array operations and
runs in NumPy on the host for every device. ``"lpt"`` (round-based LPT, in torch) is the
cheaper alternative.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.device_path import bldm_gpus_torch, use_device_path
from eplb.core.packing.state import EXPERT, LOAD, deal


def _construct_lpt(items: torch.Tensor, num_gpus: int) -> torch.Tensor:
    _, rows, num_items = items.shape
    loads = items.new_zeros(rows, num_gpus)
    gpu = torch.empty(rows, num_items, dtype=torch.int64, device=items.device)
    for start in range(0, num_items, num_gpus):
        lightest_first = loads.argsort(dim=1)
        gpu[:, start : start + num_gpus] = lightest_first
        loads.scatter_add_(1, lightest_first, items[LOAD, :, start : start + num_gpus])
    return deal(items, gpu, num_gpus)


def _construct_bldm(
    items: torch.Tensor, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Balanced largest differencing over the ``S`` rounds; see :func:`_bldm_gpus`.

    The rounds are first rearranged so that an expert's replicas share one round where
    they can (:func:`_whole_runs`): only replicas split over two rounds can meet on one
    GPU, so this avoids most anti-affinity conflicts, and the few left are settled by a
    legal same-round swap (:func:`_settle_clashes`). Returns ``(state, rows still in
    conflict)``, usually none, for :func:`repair_conflicts`.
    """
    # large problems on an accelerator construct on the device (no anti-affinity pre-pass
    # there: every row goes through repair_conflicts)
    if use_device_path(items, items.shape[1] * items.shape[2]):
        return deal(items, bldm_gpus_torch(items[LOAD], num_gpus), num_gpus), None
    host = items.to(torch.float32).cpu().numpy()
    load, expert = host[LOAD], host[EXPERT].astype(np.int64)
    order = _whole_runs(expert, num_gpus)
    if order is not None:
        flat = (np.arange(len(order))[:, None] * order.shape[1] + order).ravel()
        load = load.ravel()[flat].reshape(order.shape)
        expert = expert.ravel()[flat].reshape(order.shape)
        items = items.gather(2, torch.from_numpy(order).to(items.device).expand(2, -1, -1))
    gpu = _bldm_gpus(load, num_gpus)
    suspects = _settle_clashes(expert, gpu, num_gpus)
    state = deal(items, torch.from_numpy(gpu).to(items.device), num_gpus)
    return state, torch.from_numpy(suspects).to(items.device)


def _settle_clashes(
    expert: np.ndarray, gpu: np.ndarray, num_gpus: int, passes: int = 4
) -> np.ndarray:
    """Separate replicas that :func:`_split_clashes` finds on one GPU, in place: each pass
    swaps the GPU of one clashing replica per row with the nearest item of its round (the
    closest load) for which the swap is legal (neither GPU already holds the expert it
    receives, so no new clash appears). A row whose clash has no such swap is left as it
    is (rows are independent: the others go on). Returns the rows still clashing (rare),
    ascending."""
    num_items = expert.shape[1]
    slots = num_items // num_gpus
    # the nearest items of the round first: +1, −1, +2, −2, ... (a window: farther ones
    # would move more load, and what is left goes to the torch repair)
    step = np.arange(1, min(num_gpus, _SETTLE_REACH + 1))
    offsets = np.stack([step, -step], 1).ravel()
    row, item, single = _split_clashes(expert, gpu, num_gpus)
    stuck = np.zeros(expert.shape[0], bool)  # rows whose clash found no legal swap
    for _ in range(passes if num_gpus > 1 else 0):
        going = ~stuck[row]
        row, item = row[going], item[going]
        if not len(row):
            break
        n = np.arange(len(row))[:, None]
        # experts on every GPU of the clashing rows: [n, P, S] (one replica per round)
        grid = np.empty((len(row), num_gpus, slots), np.int64)
        grid[n, gpu[row], np.arange(num_items) // num_gpus] = expert[row]
        other = item[:, None] + offsets
        start = (item - item % num_gpus)[:, None]
        inside = (other >= start) & (other < start + num_gpus)
        other = np.clip(other, 0, num_items - 1)
        e_item, g_item = expert[row, item], gpu[row, item]
        e_other, g_other = expert[row[:, None], other], gpu[row[:, None], other]
        legal = (
            inside
            & (e_other != e_item[:, None])
            & ~(grid[n, g_item[:, None]] == e_other[:, :, None]).any(2)
            & ~(grid[n, g_other] == e_item[:, None, None]).any(2)
        )
        pick = legal.argmax(1)
        ok = legal[n[:, 0], pick]
        stuck[row[~ok]] = True
        row, item, other = row[ok], item[ok], other[ok, pick[ok]]
        gpu[row, item], gpu[row, other] = gpu[row, other], gpu[row, item]
        if single:  # a legal swap creates no clash: only the stuck rows are left
            return np.flatnonzero(stuck)
        row, item, single = _split_clashes(expert, gpu, num_gpus)
    # one entry per row (split_clashes lists rows ascending)
    return np.union1d(row, np.flatnonzero(stuck))


# how far (in items of the round) _settle_clashes looks for a swap partner
_SETTLE_REACH = 16


def _split_clashes(
    expert: np.ndarray, gpu: np.ndarray, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(rows, items, single)``: the rows where replicas of a run split by a round
    boundary share a GPU, in each the later replica of its first such pair, and whether
    that is the only clashing replica of every row.

    Within a round every item gets its own GPU, and a run of at most ``P`` replicas spans
    at most two rounds, so these are all the anti-affinity conflicts of a dealing (runs
    longer than ``P`` belong to rows that are spread round-robin anyway).
    """
    slots = expert.shape[1] // num_gpus
    boundary = np.arange(1, slots) * num_gpus
    row, cut = (expert[:, boundary - 1] == expert[:, boundary]).nonzero()
    none = np.zeros(0, np.int64)
    if not len(row):
        return none, none, True
    cut = boundary[cut][:, None]
    run = expert[row, cut[:, 0]][:, None]
    back = cut - 1 - np.arange(num_gpus)  # the round before the boundary, nearest first
    ahead = cut + np.arange(num_gpus)
    rows = row[:, None]
    in_back, in_ahead = expert[rows, back] == run, expert[rows, ahead] == run  # [K, P]
    # runs are contiguous: look only as far as the longest part reaches
    width = int(max(in_back.sum(1).max(), in_ahead.sum(1).max()))
    back, ahead = back[:, :width], ahead[:, :width]
    in_back, in_ahead = in_back[:, :width], in_ahead[:, :width]
    # a replica after the boundary clashes when its GPU holds one of the run before it:
    # membership of (split, GPU) codes, linear in memory (a pairwise [K, w, w] compare
    # took gigabytes where few experts have thousands of replicas each)
    # (the codes lie in [0, K·P): a flag table answers membership exactly, without the
    # sorts of np.isin)
    split = np.arange(len(row))[:, None] * num_gpus
    held = np.zeros(len(row) * num_gpus, bool)
    held[(split + gpu[rows, back])[in_back]] = True
    clash = in_ahead & held[split + gpu[rows, ahead]]  # [K, w]
    hit = clash.any(1)
    if not hit.any():
        return none, none, True
    row, ahead, clash = row[hit], ahead[hit], clash[hit]
    # splits are ordered by row: the first split of every row is where the row changes
    first = np.flatnonzero(np.concatenate(([True], row[1:] != row[:-1])))
    return row[first], ahead[first, clash[first].argmax(1)], int(clash.sum()) == len(first)


def _whole_runs(expert: np.ndarray, num_gpus: int) -> np.ndarray | None:
    """``[rows, R]`` item order that moves every run of one expert's replicas split by a
    round boundary into a single round, or ``None`` when no run is split.

    ``expert [rows, R]``: items heaviest first, an expert's replicas adjacent, rounds of
    ``P``. A run with ``a`` items before boundary ``bP`` and ``b`` after swaps places with
    the neighbouring whole runs of equal or lighter (pull, ``b <= a``: the ``b`` items
    before it) or heavier-or-equal (push: the ``a`` items after it) load, so every round
    stays sorted heaviest first. Runs longer than a round, and splits whose neighbours
    would be cut, are left to :func:`repair_conflicts`.
    """
    rows, num_items = expert.shape
    slots = num_items // num_gpus
    if slots < 2:
        return None
    boundary = np.arange(1, slots) * num_gpus  # [S − 1]
    row, cut = (expert[:, boundary - 1] == expert[:, boundary]).nonzero()
    if not len(row):
        return None
    cut = boundary[cut]  # [K] one entry per split run, ordered by (row, boundary)
    run = expert[row, cut]
    step = np.arange(num_gpus)
    # run lengths before (a) and after (b) the boundary, within one round each
    back = expert[row[:, None], cut[:, None] - 1 - step] != run[:, None]
    ahead = expert[row[:, None], cut[:, None] + step] != run[:, None]
    before = np.where(back.any(1), back.argmax(1), num_gpus)
    after = np.where(ahead.any(1), ahead.argmax(1), num_gpus)
    fits = before + after <= num_gpus
    # a move is possible only if the displaced neighbours are whole runs
    first = np.maximum(cut - before - after, 0)
    last = np.minimum(cut + after + before - 1, num_items - 1)
    can_pull = (first == 0) | (expert[row, first] != expert[row, np.maximum(first - 1, 0)])
    can_push = (last == num_items - 1) | (
        expert[row, last] != expert[row, np.minimum(last + 1, num_items - 1)]
    )
    pull = can_pull & ((after <= before) | ~can_push)  # move the shorter part if free to
    start = np.where(pull, cut - before - after, cut - before)
    length = np.where(pull, before + 2 * after, 2 * before + after)
    shift = np.where(pull, after, before + after)  # rotate the segment left by this
    active = fits & (can_pull | can_push)
    # segments around neighbouring boundaries may overlap when rounds are short
    active[1:] &= ~(
        active[:-1] & (row[1:] == row[:-1]) & (start[1:] < start[:-1] + length[:-1])
    )
    if not active.any():
        return None
    row, start, length, shift = row[active], start[active], length[active], shift[active]
    offset = np.arange(2 * num_gpus)
    inside = offset < length[:, None]
    target = (start[:, None] + offset)[inside]
    source = (start[:, None] + (offset + shift[:, None]) % length[:, None])[inside]
    order = np.broadcast_to(np.arange(num_items), (rows, num_items)).copy()
    order[np.broadcast_to(row[:, None], inside.shape)[inside], target] = source
    return order


def _bldm_gpus(load: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[rows, R]`` GPU of every item under balanced largest differencing.

    ``load [rows, R]`` (float32, each row heaviest first) forms ``S`` rounds of ``P``.
    Every partial solution is kept sorted ascending; a merge pairs the heaviest subset of
    one with the lightest of the other and re-sorts; the sort orders are replayed
    backwards at the end to tell which GPU every round's column ends on.

    It runs in NumPy on the host for every device: it is ``S − 1`` dependent steps on
    small arrays, where NumPy's per-call cost is a fraction of torch's (and of a kernel
    launch), and its SIMD sort of packed ``value << 16 | position`` keys is exact and stable.
    """
    rows, num_items = load.shape
    slots = num_items // num_gpus
    # rounds are sorted heaviest first; ascending position p is column P-1-p
    parts = np.ascontiguousarray(load.reshape(rows, slots, num_gpus)[:, :, ::-1])
    flat_parts = parts.reshape(rows * slots, num_gpus)  # a view: row-major (row, round)
    dead = np.zeros((rows, slots), np.float32)
    first_round = np.arange(rows) * slots  # flat index of every row's round 0
    position = np.arange(num_gpus, dtype=np.int64)
    merges = []
    part_bits = flat_parts.view(np.int32)  # the same memory, as float32 bit patterns
    for _ in range(slots - 1):
        spread = parts[:, :, -1] - parts[:, :, 0]
        spread -= dead  # dead parts: -inf
        heavy = first_round + spread.argmax(1)
        spread.ravel()[heavy] = -np.inf
        light = first_round + spread.argmax(1)
        merged = flat_parts[heavy][:, ::-1] + flat_parts[light]
        # non-negative float32 bit patterns order like the values (widened, then shifted,
        # in one call; in-place steps after it: fewer calls and temporaries per merge)
        packed = np.left_shift(merged.view(np.int32), 16, dtype=np.int64)
        packed |= position
        packed.sort(axis=1)
        part_bits[heavy] = packed >> 16  # the sorted sums' bit patterns, back in place
        dead.ravel()[light] = np.inf
        packed &= 0xFFFF
        merges.append((heavy, light, packed))
    # back-substitute: position p of the surviving part is GPU p; a merge put unsorted
    # index k = order[p] there, taken from position P-1-k of the heavy part and k of the light
    # (so the heavy part's labels are the light part's reversed: one scatter per merge)
    label = np.empty((rows * slots, num_gpus), np.int64)
    label[first_round + dead.argmin(1)] = position
    offset = np.arange(rows)[:, None] * num_gpus
    for heavy, light, order in reversed(merges):
        from_light = np.empty((len(heavy), num_gpus), np.int64)
        from_light.ravel()[offset + order] = label[heavy]
        label[heavy], label[light] = from_light[:, ::-1], from_light
    gpu_of_item = label.reshape(rows, slots, num_gpus)[:, :, ::-1].reshape(rows, num_items)
    return np.ascontiguousarray(gpu_of_item)


def construct(items: torch.Tensor, num_gpus: int, method: str = "bldm") -> torch.Tensor:
    """Initial packing of ``items [2, rows, R]`` (sorted heaviest first) → ``[2, S, rows, P]``."""
    return construct_with_suspects(items, num_gpus, method)[0]


def construct_with_suspects(
    items: torch.Tensor, num_gpus: int, method: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(state, suspects)``: ``suspects [n]`` rows that may break anti-affinity, or
    ``None`` when any row may."""
    if method == "lpt":
        return _construct_lpt(items, num_gpus), None
    return _construct_bldm(items, num_gpus)
