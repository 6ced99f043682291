"""Packing: replicas onto GPUs, exactly ``S = R / P`` slots per GPU, batched over rows.

A *row* is one independent packing problem: a layer, a (layer, node) pair, or a
randomised candidate of either. The packing state of a batch is one tensor

    state: [2, S, rows, P] — ``state[0, k, b, g]`` is the load of the k-th replica on GPU g
    of row b and ``state[1, k, b, g]`` its logical expert id (exact in floating point).

Keeping load and expert id in one tensor halves the gathers on the hot path, and putting
the slot axis outermost makes every reduction over slots a vectorized elementwise loop.
GPUs are interchangeable while packing, so the refinement permutes GPUs freely.

Steps:

1. :func:`construct` — balanced largest differencing (BLDM, Karmarkar–Karp for equal
   cardinalities): items sorted heaviest first form ``S`` rounds of ``P``; repeatedly the two
   partial solutions with the largest spread are merged, heaviest subset of one with the
   lightest of the other. Only replicas of an expert split over two rounds can meet on one
   GPU, so runs are first moved into one round where possible and the few clashes left are
   settled by the nearest legal swap in their round. This step is a chain of small
   dependent array operations and runs in NumPy on the host for every device.
   ``"lpt"`` (round-based LPT, in torch) is the cheaper alternative.
2. :func:`repair_conflicts` — anti-affinity: move a second replica of an expert off a GPU
   by the cheapest legal swap, on the rows the construction could not settle (none on the
   real loads) or on any row of a state the caller built.
3. :func:`refine` — the vectorized all-pairs swap search. GPUs are paired (k-th heaviest
   with a light partner); for every pair and every item pair ``(i in u, j in v)`` the
   change in Σ load² of a swap is ``2·δ·(L_v − L_u + δ)`` with ``δ = w_i − w_j``, so the
   best swap is the one whose ``δ`` is closest to half the gap (the same swap gives the
   pair's smallest new peak). The best swap of every pair is applied at once when it
   improves and is legal, up to ``P/2`` swaps per row per step. The pairing rotates across
   steps so heavy GPUs meet many light ones; memory is ``[S, S, rows, P/2]`` instead of the
   ``[rows, P, P, S, S]`` of the full search. The heaviest-GPU polish that follows uses the
   same criterion against every partner. Step counts are automatic per problem size
   (:class:`PackingOptions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "AUTO_MAX_STEPS",
    "AUTO_PAIR_STEPS",
    "PackingOptions",
    "Tracking",
    "construct",
    "gpu_loads",
    "make_items",
    "max_load",
    "pack",
    "refine",
    "repair_conflicts",
    "round_robin",
    "to_slots",
]

LOAD, EXPERT = 0, 1
#: steps of the default search, where they pay (see PackingOptions)
AUTO_PAIR_STEPS = 2
AUTO_MAX_STEPS = 8
_CONSTRUCTIONS = ("bldm", "lpt")


@dataclass(frozen=True)
class PackingOptions:
    """Knobs of the packing search.

    Attributes:
        num_candidates: randomised starts per row (the first is deterministic).
        pair_steps: steps of the all-pairs L2 swap search over paired GPUs (smooths
            every GPU, up to ``P/2`` swaps per row per step). ``None`` (default):
            :data:`AUTO_PAIR_STEPS` per doubling of the heavy half of the GPUs (``P/2``)
            over the polish steps (2 at P = 32, 6 at P = 128), and none where the polish
            reaches every heavy GPU by itself (measured: they change nothing there).
        max_steps: steps of the heaviest-GPU polish (one swap per row per step between
            the heaviest GPU and its best partner, aimed at the max load). ``None``
            (default): :data:`AUTO_MAX_STEPS`, or ``max(4, P/2)`` for fewer GPUs, about one
            step per GPU above the mean (measured on the DeepSeek-V3 8-GPU node rows:
            steps past the fourth close the hierarchical gap by 0.00004 at most).
        construction: ``"bldm"`` (balanced largest differencing) or ``"lpt"``.
        noise: relative perturbation of expert loads that orders randomised starts.

    Both searches stop early once no swap improves.
    """

    num_candidates: int = 1
    pair_steps: int | None = None
    max_steps: int | None = None
    construction: str = "bldm"
    noise: float = 0.05

    def __post_init__(self) -> None:
        for name, low in (("num_candidates", 1), ("pair_steps", 0), ("max_steps", 0)):
            value = getattr(self, name)
            if name != "num_candidates" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.construction not in _CONSTRUCTIONS:
            raise ValueError(
                f"construction must be one of {_CONSTRUCTIONS}, got {self.construction!r}"
            )
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise must be in [0, 1), got {self.noise!r}")

    def max_steps_for(self, num_gpus: int) -> int:
        """The polish steps used for rows of ``num_gpus`` GPUs."""
        if self.max_steps is not None:
            return self.max_steps
        return min(AUTO_MAX_STEPS, max(4, num_gpus // 2))

    def pair_steps_for(self, num_gpus: int) -> int:
        """The all-pairs steps used for rows of ``num_gpus`` GPUs."""
        if self.pair_steps is not None:
            return self.pair_steps
        heavy_per_polish_step = num_gpus / (2 * max(1, self.max_steps_for(num_gpus)))
        if heavy_per_polish_step <= 1:
            return 0
        # more GPUs than the polish can visit: 2 steps per doubling (2 at P = 32, 6 at 128)
        return AUTO_PAIR_STEPS * math.ceil(math.log2(heavy_per_polish_step))

    @classmethod
    def with_budget(cls, refine_steps: int, **kwargs: object) -> PackingOptions:
        """Split a total swap-step budget: about a third L2 pair steps, the rest polish."""
        if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
            raise ValueError(f"refine_steps must be an integer >= 0, got {refine_steps!r}")
        pair = (refine_steps + 2) // 3
        return cls(pair_steps=pair, max_steps=refine_steps - pair, **kwargs)  # type: ignore[arg-type]


def gpu_loads(state: torch.Tensor) -> torch.Tensor:
    """``[rows, P]`` load per GPU of a packing state."""
    return state[LOAD].sum(0)


def max_load(state: torch.Tensor) -> torch.Tensor:
    """``[rows]`` largest GPU load per row."""
    return gpu_loads(state).amax(1)


def to_slots(state: torch.Tensor) -> torch.Tensor:
    """``[rows, P·S]`` logical expert per physical slot (GPU-major, slots of a GPU adjacent)."""
    _, slots, rows, num_gpus = state.shape
    return state[EXPERT].permute(1, 2, 0).reshape(rows, num_gpus * slots).long()


def _deal(items: torch.Tensor, gpu: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[2, S, rows, P]`` state from ``items [2, rows, R]`` where item ``r·P + k`` goes to
    slot ``r`` of GPU ``gpu[row, r·P + k]``."""
    _, rows, num_items = items.shape
    slots = num_items // num_gpus
    by_round = items.view(2, rows, slots, num_gpus).transpose(1, 2)  # [2, S, rows, P]
    index = gpu.view(rows, slots, num_gpus).transpose(0, 1)  # [S, rows, P]
    return torch.empty_like(by_round).scatter_(3, index.expand(2, -1, -1, -1), by_round)


def round_robin(items: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Item ``n`` → GPU ``n mod P``: anti-affine by construction when replicas are adjacent.

    ``items [2, rows, R]`` → state ``[2, S, rows, P]``.
    """
    _, rows, num_items = items.shape
    slots = num_items // num_gpus
    return items.view(2, rows, slots, num_gpus).transpose(1, 2).contiguous()


def _construct_lpt(items: torch.Tensor, num_gpus: int) -> torch.Tensor:
    _, rows, num_items = items.shape
    loads = items.new_zeros(rows, num_gpus)
    gpu = torch.empty(rows, num_items, dtype=torch.int64, device=items.device)
    for start in range(0, num_items, num_gpus):
        lightest_first = loads.argsort(dim=1)
        gpu[:, start : start + num_gpus] = lightest_first
        loads.scatter_add_(1, lightest_first, items[LOAD, :, start : start + num_gpus])
    return _deal(items, gpu, num_gpus)


def _construct_bldm(items: torch.Tensor, num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced largest differencing over the ``S`` rounds; see :func:`_bldm_gpus`.

    The rounds are first rearranged so that an expert's replicas share one round where
    they can (:func:`_whole_runs`): only replicas split over two rounds can meet on one
    GPU, so this avoids most anti-affinity conflicts, and the few left are settled by a
    legal same-round swap (:func:`_settle_clashes`). Returns ``(state, rows still in
    conflict)``, usually none, for :func:`repair_conflicts`.
    """
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
    state = _deal(items, torch.from_numpy(gpu).to(items.device), num_gpus)
    return state, torch.from_numpy(suspects).to(items.device)


def _settle_clashes(
    expert: np.ndarray, gpu: np.ndarray, num_gpus: int, passes: int = 4
) -> np.ndarray:
    """Separate replicas that :func:`_split_clashes` finds on one GPU, in place: each pass
    swaps the GPU of one clashing replica per row with the nearest item of its round (the
    closest load) for which the swap is legal (neither GPU already holds the expert it
    receives, so no new clash appears). Returns the rows still clashing (rare)."""
    num_items = expert.shape[1]
    slots = num_items // num_gpus
    # the nearest items of the round first: +1, −1, +2, −2, ... (a window: farther ones
    # would move more load, and what is left goes to the torch repair)
    step = np.arange(1, min(num_gpus, _SETTLE_REACH + 1))
    offsets = np.stack([step, -step], 1).ravel()
    row, item, single = _split_clashes(expert, gpu, num_gpus)
    for _ in range(passes if num_gpus > 1 else 0):
        if not len(row):
            return row
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
        row, item, other = row[ok], item[ok], other[ok, pick[ok]]
        gpu[row, item], gpu[row, other] = gpu[row, other], gpu[row, item]
        if ok.all() and single:  # a legal swap creates no clash: nothing is left
            return row[:0]
        stuck = not ok.all()
        row, item, single = _split_clashes(expert, gpu, num_gpus)
        if stuck:
            break
    return row  # one entry per row


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
    # runs are contiguous: compare only as far as the longest part reaches, [K, w, w]
    width = int(max(in_back.sum(1).max(), in_ahead.sum(1).max()))
    back, ahead = back[:, :width], ahead[:, :width]
    same = (
        in_back[:, :width, None]
        & in_ahead[:, None, :width]
        & (gpu[rows, back][:, :, None] == gpu[rows, ahead][:, None, :])
    )
    clash = same.any(1)  # [K, P] replicas after the boundary that meet one before it
    hit = clash.any(1)
    if not hit.any():
        return none, none, True
    row, ahead, clash = row[hit], ahead[hit], clash[hit]
    first = np.unique(row, return_index=True)[1]  # splits are ordered by row
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
    for _ in range(slots - 1):
        spread = parts[:, :, -1] - parts[:, :, 0] - dead  # dead parts: -inf
        widest = spread.argmax(1)
        spread.ravel()[first_round + widest] = -np.inf
        heavy, light = first_round + widest, first_round + spread.argmax(1)
        merged = flat_parts[heavy][:, ::-1] + flat_parts[light]
        # non-negative float32 bit patterns order like the values
        packed = (merged.view(np.int32).astype(np.int64) << 16) | position
        packed.sort(axis=1)
        flat_parts[heavy] = (packed >> 16).astype(np.int32).view(np.float32)
        dead.ravel()[light] = np.inf
        merges.append((heavy, light, packed & 0xFFFF))
    # back-substitute: position p of the surviving part is GPU p; a merge put unsorted
    # index k = order[p] there, taken from position P-1-k of the heavy part and k of the light
    label = np.empty((rows * slots, num_gpus), np.int64)
    label[first_round + dead.argmin(1)] = position
    offset = np.arange(rows)[:, None] * num_gpus
    for heavy, light, order in reversed(merges):
        gpu = label[heavy]
        from_light = np.empty_like(gpu)
        from_light.ravel()[offset + order] = gpu
        from_heavy = np.empty_like(gpu)
        from_heavy.ravel()[offset + (num_gpus - 1) - order] = gpu
        label[heavy], label[light] = from_heavy, from_light
    gpu_of_item = label.reshape(rows, slots, num_gpus)[:, :, ::-1].reshape(rows, num_items)
    return np.ascontiguousarray(gpu_of_item)


def construct(items: torch.Tensor, num_gpus: int, method: str = "bldm") -> torch.Tensor:
    """Initial packing of ``items [2, rows, R]`` (sorted heaviest first) → ``[2, S, rows, P]``."""
    return _construct(items, num_gpus, method)[0]


def _construct(
    items: torch.Tensor, num_gpus: int, method: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(state, suspects)``: ``suspects [n]`` rows that may break anti-affinity, or
    ``None`` when any row may."""
    if method == "lpt":
        return _construct_lpt(items, num_gpus), None
    return _construct_bldm(items, num_gpus)


def _conflicts(state: torch.Tensor) -> torch.Tensor:
    """``[S, rows, P]`` True for a replica whose expert appears in an earlier slot of its GPU."""
    ids = state[EXPERT]
    out = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    for offset in range(1, ids.shape[0]):  # S − 1 shifted compares: cheaper than [S, S, ...]
        out[offset:] |= ids[offset:] == ids[:-offset]
    return out


def repair_conflicts(
    state: torch.Tensor,
    allow_shared: torch.Tensor | None = None,
    suspects: torch.Tensor | None = None,
) -> torch.Tensor:
    """Remove anti-affinity conflicts: each pass moves one conflicting replica per row to
    the slot whose swap gives the smallest new peak, never creating a new conflict.

    Only rows in conflict are worked on (usually a minority). Rows still in conflict after
    ``P·S`` passes (none in practice) are re-dealt round-robin, which is always
    anti-affine. ``allow_shared [rows]`` marks rows holding an expert with more replicas
    than GPUs: they are spread round-robin instead. ``suspects [n]``, when given, are
    the only rows that may be in conflict (the others are not scanned).
    """
    _, slots, _rows, num_gpus = state.shape
    if allow_shared is not None and bool(allow_shared.any()):
        state = state.clone()
        state[:, :, allow_shared] = _round_robin_state(state[:, :, allow_shared])
    if suspects is None:
        suspects = torch.arange(state.shape[2], device=state.device)
        conflict = _conflicts(state)
    elif len(suspects):
        conflict = _conflicts(state[:, :, suspects])
    else:
        return state
    bad = conflict.any(0).any(1)
    if allow_shared is not None:
        bad &= ~allow_shared[suspects]
    if not bool(bad.any()):
        return state
    rows = suspects[bad]
    sub = state[:, :, rows]  # a copy: fix it, then write it back
    conflict = conflict[:, bad]  # [S, n, P]
    buffers: dict[str, torch.Tensor] = {}
    for _ in range(num_gpus * slots):
        on_gpu = conflict.any(0)  # [n, P]
        todo = on_gpu.any(1)
        if not bool(todo.any()):
            break
        u = on_gpu.to(torch.int8).max(1).indices
        movable = conflict.gather(2, u[None, :, None].expand(slots, -1, 1))[:, :, 0]  # [S, n]
        loads = sub[LOAD].sum(0)
        sub, moved, slot = _swap_from(
            sub, u, loads, todo, movable=movable, must_move=True, buffers=buffers
        )
        if not bool(moved.any()):
            break
        # a legal swap clears exactly the moved replica's conflict and creates none
        r = moved.nonzero()[:, 0]
        conflict[slot[r], r, u[r]] = False
    stuck = conflict.any(0).any(1)
    if bool(stuck.any()):
        sub[:, :, stuck] = _round_robin_state(sub[:, :, stuck])
    state = state.clone()
    state[:, :, rows] = sub
    return state


def _round_robin_state(state: torch.Tensor) -> torch.Tensor:
    """Re-deal a state's items round-robin, heaviest first, replicas of an expert adjacent."""
    _, _slots, rows, num_gpus = state.shape
    items = state.permute(0, 2, 1, 3).reshape(2, rows, -1)
    # sort by (load desc, expert) so replicas of one expert stay adjacent
    by_expert = items[EXPERT].argsort(dim=1, stable=True)
    items = items.gather(2, by_expert.expand(2, -1, -1))
    by_load = items[LOAD].argsort(dim=1, descending=True, stable=True)
    items = items.gather(2, by_load.expand(2, -1, -1))
    return round_robin(items, num_gpus)


@lru_cache(maxsize=64)
def _pairings(num_gpus: int, steps: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Column orders of a load-sorted state for each step: heavy half (heaviest first)
    followed by its light partners, then the middle GPU when ``P`` is odd.

    Odd steps rotate the light partners so that every heavy GPU meets many light ones.
    """
    half = num_gpus // 2
    heavy = torch.arange(num_gpus - 1, num_gpus - half - 1, -1)
    light = torch.arange(half)
    middle = torch.arange(half, num_gpus - half)
    out = []
    for step in range(steps):
        partners = light.roll((step // 2) % half + 1) if step % 2 else light
        out.append(torch.cat([heavy, partners, middle]).to(device))
    return tuple(out)  # cached: the same orders serve every call of that shape


@dataclass
class Tracking:
    """Extra state for refinements whose GPUs are not interchangeable.

    Attributes:
        gpu: ``[rows, P]`` float, the original index of every GPU (permuted along).
        speed: ``[rows, P]`` relative GPU speeds, or ``None`` for equal GPUs; the
            refinement then minimises Σ load² / speed.
        origin: ``[S, rows, P]`` expert each slot held before planning, or ``None``;
            with it every swap is charged the slots it changes.
        budget: ``[rows]`` slots each row may still change (needs ``origin``).
    """

    gpu: torch.Tensor
    speed: torch.Tensor | None = None
    origin: torch.Tensor | None = None
    budget: torch.Tensor | None = None


def _moves(ids: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    return (ids != origin).sum((0, 2))


def refine(
    state: torch.Tensor,
    steps: int,
    mode: str = "pairs",
    tol: float = 1e-6,
    track: Tracking | None = None,
) -> torch.Tensor:
    """Swap refinement (see the module docstring). Returns the refined state.

    The returned state's GPU order is arbitrary unless ``track`` is given, in which case
    ``track.gpu`` is permuted along (and updated in place of the object's field). A swap
    is legal only if neither GPU already holds a replica of the expert it receives, so an
    anti-affine state stays anti-affine. ``tol`` is the least Σ load² improvement that
    counts, relative to a mean replica load of 1.
    """
    if mode == "none" or steps == 0:
        return state
    if mode == "max":
        if track is not None and track.speed is not None:
            raise ValueError("refine='max' does not support GPU speeds")
        return _refine_max(state, steps, track)
    _, slots, rows, num_gpus = state.shape
    half = num_gpus // 2
    if half == 0:
        return state
    expand = (2, slots, rows, num_gpus)
    pairings = _pairings(num_gpus, min(steps, 2 * half), state.device)
    speed = None if track is None else track.speed
    origin = None if track is None else track.origin
    spent = None if origin is None else _moves(state[EXPERT], origin)
    buffers: dict[str, torch.Tensor] = {}
    big = (slots, slots, rows, half)
    row_offset = _row_offsets(rows, num_gpus, state.device)[:, None]
    idle = 0
    for step in range(steps):
        loads = state[LOAD].sum(0)  # [rows, P]
        pressure = loads if speed is None else loads / speed
        perm = pressure.argsort(dim=1).index_select(1, pairings[step % len(pairings)])
        # permute every row's GPUs: one flat index_select (cheaper than a 4-D gather)
        flat = (perm + row_offset).view(-1)
        state = state.reshape(2 * slots, -1).index_select(1, flat).view(expand)
        pressure = pressure.gather(1, perm)
        gap = pressure[:, :half] - pressure[:, half : 2 * half]  # [rows, H]
        if track is not None:
            track.gpu = track.gpu.gather(1, perm)
            if speed is not None:
                speed = speed.gather(1, perm)
                track.speed = speed
                # Σ L²/s: a swap of δ gains δ·(gap − δ·h) with h = (1/s_u + 1/s_v) / 2
                h = (1 / speed[:, :half] + 1 / speed[:, half : 2 * half]) / 2
                gap = gap / h
            if origin is not None:
                origin = origin.gather(2, perm[None].expand(slots, -1, -1))
        heavy, light = state[..., :half], state[..., half : 2 * half]  # [2, S, rows, H]
        # Σ load² falls by 2·δ·(gap − δ) = 2·((gap/2)² − (δ − gap/2)²): the best swap of a
        # pair has δ = w_i − w_j closest to gap/2; |δ − gap/2| = |target_i − w_j|
        half_gap = gap.mul_(0.5)
        target = heavy[LOAD] - half_gap  # [S, rows, H]
        off = torch.sub(
            target[:, None], light[LOAD][None], out=_scratch(buffers, "off", big, state)
        ).abs_()  # [S_i, S_j, rows, H]
        best, i = off.amin(1).min(0)  # [rows, H]; amin then min: far cheaper than argmin
        j = (target.gather(0, i[None]) - light[LOAD]).abs_().min(0).indices
        apply = best.square_() < half_gap.square() - tol
        i_idx = i[None, None].expand(2, 1, -1, -1)
        j_idx = j[None, None].expand(2, 1, -1, -1)
        take_i = heavy.gather(1, i_idx)  # [2, 1, rows, H] the chosen items
        take_j = light.gather(1, j_idx)
        # legality of the chosen swap only (conflicts are rare): the expert each GPU
        # receives must not be on it already
        apply &= ~(
            (light[EXPERT] == take_i[EXPERT]).any(0) | (heavy[EXPERT] == take_j[EXPERT]).any(0)
        )
        if origin is not None:
            apply, spent = _within_budget(apply, i, j, heavy, light, origin, spent, track.budget)
        if not bool(apply.any()):
            idle += 1
            if idle >= 2:  # also tried the rotated partners: converged
                break
            continue
        idle = 0
        heavy.scatter_(1, i_idx, torch.where(apply, take_j, take_i))
        light.scatter_(1, j_idx, torch.where(apply, take_i, take_j))
    if track is not None and origin is not None:
        track.origin = origin
    return state


def _within_budget(
    apply: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    heavy: torch.Tensor,
    light: torch.Tensor,
    origin: torch.Tensor,
    spent: torch.Tensor,
    budget: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the swaps a row can afford, heaviest pairs first; returns (apply, new spent).

    A swap changes 0–2 slots relative to ``origin [S, rows, P]`` (moving an expert back
    home refunds one): the charge is exact, ``after − before`` per swapped slot pair.
    """
    half = i.shape[1]
    e_i = heavy[EXPERT].gather(0, i[None])[0]
    e_j = light[EXPERT].gather(0, j[None])[0]
    o_i = origin[:, :, :half].gather(0, i[None])[0]
    o_j = origin[:, :, half : 2 * half].gather(0, j[None])[0]
    charge = (e_j != o_i).long() + (e_i != o_j).long() - (e_i != o_i).long() - (e_j != o_j).long()
    charge = charge * apply
    apply = apply & (spent[:, None] + charge.cumsum(1) <= budget[:, None])
    return apply, spent + (charge * apply).sum(1)


def _scratch(
    buffers: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor:
    """A reusable scratch tensor: fresh big temporaries cost page faults on every step."""
    buf = buffers.get(name)
    if buf is None or buf.shape != shape:
        buf = buffers[name] = like.new_empty(shape)
    return buf


def _swap_from(
    state: torch.Tensor,
    u: torch.Tensor,
    loads: torch.Tensor,
    todo: torch.Tensor,
    movable: torch.Tensor | None = None,
    must_move: bool = False,
    buffers: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One legal swap per row between GPU ``u [rows]`` and its best partner.

    ``loads [rows, P]`` are the GPU loads; ``movable [S, rows]`` marks the items of ``u``
    that may leave (all when ``None``). The best swap gives the smallest new peak
    ``max(L_u − δ, L_v + δ)``; it is applied where ``todo [rows]`` and either ``must_move``
    or the peak falls. Returns ``(state, moved [rows], slot [rows])`` with ``slot`` the
    slot of ``u`` whose replica left (meaningful where ``moved``).
    """
    _, slots, rows, num_gpus = state.shape
    inf = float("inf")
    buffers = {} if buffers is None else buffers
    shape = (slots, slots, rows, num_gpus)
    top = state.gather(3, u[None, None, :, None].expand(2, slots, rows, 1))[..., 0]  # [2, S, rows]
    load_u = loads.gather(1, u[:, None])  # [rows, 1]
    # sign(id differences) [S_u, S_v, rows, P]: an exact zero in a product marks an equal id
    ids_diff = torch.sub(
        top[EXPERT][:, None, :, None],
        state[EXPERT][None],
        out=_scratch(buffers, "ids", shape, state),
    ).clamp_(-1, 1)
    # blocked: u's item is already on v (this also blocks v = u), or v's item is on u
    blocked_top = ids_diff.prod(1) == 0
    if movable is not None:
        blocked_top |= ~movable[:, :, None]
    w_top = top[LOAD][:, :, None].masked_fill(blocked_top, inf)
    w_other = state[LOAD].masked_fill(ids_diff.prod(0) == 0, -inf)
    delta = torch.sub(w_top[:, None], w_other[None], out=_scratch(buffers, "delta", shape, state))
    # the pair's new peak max(L_u − δ, L_v + δ), built in the two scratch buffers
    peak = torch.sub(load_u, delta, out=_scratch(buffers, "peak", shape, state))
    peak = torch.maximum(peak, delta.add_(loads), out=peak)
    best, v = peak.amin((0, 1)).min(1)  # [rows]
    pos = peak.gather(3, v[None, None, :, None].expand(slots, slots, rows, 1)).view(-1, rows)
    pos = pos.min(0).indices
    i, j = pos // slots, pos % slots
    ok = todo & (torch.isfinite(best) if must_move else best < load_u[:, 0] * (1 - 1e-7))
    if not bool(ok.any()):
        return state, ok, i
    _swap_items(state, i, u, j, v, ok)
    return state, ok, i


@lru_cache(maxsize=64)
def _row_offsets(rows: int, num_gpus: int, device: torch.device) -> torch.Tensor:
    """``[rows]`` flat offset of every row's first GPU (cached: read-only)."""
    return torch.arange(rows, device=device) * num_gpus


def _swap_items(
    state: torch.Tensor,
    i: torch.Tensor,
    u: torch.Tensor,
    j: torch.Tensor,
    v: torch.Tensor,
    ok: torch.Tensor,
) -> None:
    """In place, per row where ``ok``: swap slot ``i`` of GPU ``u`` with slot ``j`` of GPU
    ``v`` (all ``[rows]``). Rows not ``ok`` swap an item with itself: two flat copies,
    no compaction. ``state`` must be contiguous (the polish makes it so; the rescue and
    repair work on indexed copies)."""
    _, _slots, rows, num_gpus = state.shape
    row = _row_offsets(rows, num_gpus, state.device)
    stride = rows * num_gpus  # between slots
    here = torch.add(row, i, alpha=stride).add_(u)
    there = torch.where(ok, torch.add(row, j, alpha=stride).add_(v), here)
    flat = state.view(2, -1)
    mine, theirs = flat.index_select(1, here), flat.index_select(1, there)
    flat.index_copy_(1, here, theirs)
    flat.index_copy_(1, there, mine)


# largest [S, S, rows, P] search worth masking for legality in every step: a few passes
# over it cost about one per-row rescue at this size (node rows: 43k; DeepSeek-V3 global
# rows: 150k, where illegal best swaps are rare)
_MAX_MASKED_SEARCH = 1 << 16


def _infinite_where(flag: torch.Tensor) -> torch.Tensor:
    """float32 ``inf`` where ``flag`` (uint8) is set, else 0: a penalty to add (adding a
    broadcast penalty is cheaper than masking with a broadcast boolean)."""
    return torch.zeros(flag.shape, device=flag.device).masked_fill_(flag.bool(), float("inf"))


def _refine_max(state: torch.Tensor, steps: int, track: Tracking | None = None) -> torch.Tensor:
    """Heaviest-GPU polish: per row and step, one swap between the heaviest GPU and the
    partner that lowers the pair's larger load the most. GPUs keep their positions, so
    ``track`` (origin and budget) needs no permuting; a row stops when a swap might
    overrun its budget."""
    _, slots, rows, num_gpus = state.shape
    device = state.device
    todo = torch.ones(rows, dtype=torch.bool, device=device)
    buffers: dict[str, torch.Tensor] = {}
    budgeted = track is not None and track.origin is not None and track.budget is not None
    big = (slots, slots, rows, num_gpus)
    # small states search legal swaps only from the start (illegal best swaps are
    # common there); large ones check the chosen swap and rescue the rare illegal rows
    masked = slots * slots * rows * num_gpus <= _MAX_MASKED_SEARCH
    # views made once (swaps write in place): GPU columns are fetched by flat index
    state = state.contiguous()
    columns = state.view(2 * slots, rows * num_gpus)
    load, expert = state[LOAD], state[EXPERT]
    row = _row_offsets(rows, num_gpus, device)
    off = _scratch(buffers, "off", big, state)
    off_columns = off.view(slots * slots, rows * num_gpus)
    for _ in range(steps):
        loads = load.sum(0)  # [rows, P]
        load_u, u = loads.max(1)
        if budgeted:
            todo &= _moves(expert, track.origin) + 2 <= track.budget
        top_load, top_expert = columns.index_select(1, row + u).view(2, slots, rows)
        # after swapping δ = w_i − w_j the pair's larger load is (L_u + L_v)/2 + |δ − gap/2|
        mid = torch.add(loads, load_u[:, None]).mul_(0.5)  # [rows, P]
        target = (top_load - load_u)[:, :, None] + mid  # w_i − gap/2: [S, rows, P]
        torch.sub(target[:, None], load[None], out=off).abs_()  # [S_i, S_j, rows, P]
        if masked:
            # same[i, j, b, v]: u's item i and v's item j hold one expert; i may not go
            # to a GPU holding its expert, nor j come to u (this also rules out v = u)
            same = torch.eq(top_expert[:, None, :, None], expert[None])
            same = same.view(torch.uint8)  # amax over a middle dim: far cheaper than any
            off.add_(_infinite_where(same.amax(1))[:, None]).add_(_infinite_where(same.amax(0)))
        best, v = off.amin((0, 1)).add_(mid).min(1)  # [rows]: the partner with the least peak
        column_v = row + v
        on_v_expert = columns.index_select(1, column_v).view(2, slots, rows)[EXPERT]
        pos = off_columns.index_select(1, column_v).min(0).indices  # [rows] over S·S
        i, j = pos // slots, pos % slots
        ok = todo & (best < load_u * (1 - 1e-7))
        if masked:  # every finite choice is legal
            if not bool(ok.any()):
                break
            _swap_items(state, i, u, j, v, ok)
            todo = ok
            continue
        # legality of the chosen swap only; rows whose best swap is illegal (rare on
        # large states) take the best legal one from a search of their own
        e_i = top_expert.gather(0, i[None])
        e_j = on_v_expert.gather(0, j[None])
        illegal = ok & ((on_v_expert == e_i).any(0) | (top_expert == e_j).any(0))
        ok &= ~illegal
        if bool(illegal.any()):
            # few rows: search them alone
            stuck = illegal.nonzero()[:, 0]
            sub, rescued, _ = _swap_from(
                state[:, :, stuck], u[stuck], loads[stuck], illegal[stuck]
            )
            state[:, :, stuck] = sub
            ok_or_rescued = ok.index_put((stuck,), rescued)
        else:
            ok_or_rescued = ok
        if not bool(ok_or_rescued.any()):
            break
        _swap_items(state, i, u, j, v, ok)
        todo = ok_or_rescued  # a row whose heaviest GPU cannot improve is done
    return state


def make_items(
    item_load: torch.Tensor, item_expert: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[2, rows, R]`` packing items: loads normalised to a mean of 1 per row, and experts.

    Normalising makes swap tolerances scale free and keeps float32 exact enough; expert
    ids are exact in float32 up to 2**24.
    """
    scale = item_load.mean(1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.stack([item_load / scale, item_expert.to(item_load.dtype)]).to(dtype)


def pack(
    items: torch.Tensor,
    num_gpus: int,
    options: PackingOptions,
    allow_shared: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    floor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pack the items of ``rows`` problems, keeping the best of several candidates.

    Args:
        items: ``[2, rows, R]`` from :func:`make_items`, heaviest first, replicas of an
            expert adjacent.
        num_gpus: ``P``; ``R`` must be a multiple of it.
        allow_shared: ``[rows]`` rows where some expert has more replicas than GPUs.
        generator: CPU generator for the randomised candidates.
        start: ``[2, S, rows, P]`` an already constructed state of the unperturbed items.
        floor: ``[rows]`` a max GPU load (in item units) that is good enough, e.g. a lower
            bound the row's layer cannot beat anyway: rows packed at or below it are not
            refined.

    Returns:
        ``state [2, S, rows, P]`` of the candidate with the smallest max GPU load per row.
    """
    _, rows, num_items = items.shape
    cands = options.num_candidates
    if cands > 1:
        # candidate 0 keeps the exact order; the others sort by perturbed loads, perturbed
        # per expert so that an expert's replicas stay adjacent
        noise = torch.rand(cands - 1, rows, num_items, generator=generator, dtype=items.dtype)
        first = _first_replica(items[EXPERT])
        noise = noise.to(items.device).gather(2, first.expand(cands - 1, -1, -1))
        key = items[LOAD] * (1 + options.noise * (2 * noise - 1))
        order = key.argsort(dim=2, descending=True, stable=True)  # [C-1, rows, R]
        shuffled = (
            items[:, None].expand(-1, cands - 1, -1, -1).gather(3, order.expand(2, -1, -1, -1))
        )
        items = torch.cat([items[:, None], shuffled], 1).view(2, cands * rows, num_items)
        if allow_shared is not None:
            allow_shared = allow_shared.repeat(cands)
        if floor is not None:
            floor = floor.repeat(cands)
    suspects = None  # the caller's start state: scan every row for conflicts
    if start is not None:
        rest = construct(items[:, rows:], num_gpus, options.construction) if cands > 1 else None
        # a copy: refinement writes in place, and start is the caller's
        state = start.clone() if rest is None else torch.cat([start, rest], 2)
    else:
        state, suspects = _construct(items, num_gpus, options.construction)
    state = repair_conflicts(state, allow_shared, suspects)
    open_rows = None
    if floor is not None:
        above = max_load(state) > floor * (1 + 1e-6)
        if not bool(above.all()):
            open_rows = above.nonzero()[:, 0]
    if open_rows is None:
        state = refine(state, options.pair_steps_for(num_gpus), "pairs")
        state = refine(state, options.max_steps_for(num_gpus), "max")
    elif len(open_rows):
        sub = refine(state[:, :, open_rows], options.pair_steps_for(num_gpus), "pairs")
        state[:, :, open_rows] = refine(sub, options.max_steps_for(num_gpus), "max")
    if cands > 1:
        _, slots, _, _ = state.shape
        peak = max_load(state).view(cands, rows)
        best = peak.min(0).indices
        state = state.view(2, slots, cands, rows, num_gpus)[
            :, :, best, torch.arange(rows, device=best.device)
        ]
    return state


def _first_replica(item_expert: torch.Tensor) -> torch.Tensor:
    """``[rows, R]`` index of the first item of the same expert (items of one expert adjacent)."""
    rows, num_items = item_expert.shape
    start = torch.ones(rows, num_items, dtype=torch.bool, device=item_expert.device)
    start[:, 1:] = item_expert[:, 1:] != item_expert[:, :-1]
    idx = torch.arange(num_items, device=item_expert.device).expand(rows, -1)
    return torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values
