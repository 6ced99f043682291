"""Swap refinement: the vectorized all-pairs search and the heaviest-GPU polish.

**Pairs.** GPUs are paired (k-th heaviest with a light partner); for every pair and every
item pair ``(i in u, j in v)`` the change in Σ load² of a swap is ``2·δ·(L_v − L_u + δ)``
with ``δ = w_i − w_j``, so the best swap is the one whose ``δ`` is closest to half the gap
(the same swap gives the pair's smallest new peak). The best swap of every pair is
applied at once when it improves and is legal, up to ``P/2`` swaps per row per step. The
pairing rotates across steps so heavy GPUs meet many light ones; memory is
``[S, S, rows, P/2]`` instead of the ``[rows, P, P, S, S]`` of the full search.

**Polish.** Per row and step, one swap between the heaviest GPU and the partner that
lowers the pair's larger load the most (the same criterion against every partner).

A swap is legal only if neither GPU already holds a replica of the expert it receives,
so an anti-affine state stays anti-affine. :class:`Tracking` carries what makes GPUs not
interchangeable (their identity, speeds, a move budget against an old placement).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from eplb.core.ordering import argsort_rows
from eplb.core.packing.polish import MAX_MASKED_SEARCH, host_polish_applies, polish_host
from eplb.core.packing.state import (
    EXPERT,
    LOAD,
    gpu_loads,
    row_offsets,
    scratch,
    slot_sum,
    swap_columns,
    swap_slots,
)

#: up to this many GPUs the all-pairs search orders GPUs by load with torch's argsort
#: (faster on rows this short, and the order among equal loads that those shapes' plans,
#: DeepSeek-V3's 32 GPUs among them, were made with); above it with the packed-key sort
#: of core/ordering.py (the stable order, on every device): 27 against 178 µs at
#: [58, 96], 52 against 570 µs at [58, 256] (fresh data each call)
_TORCH_SORT_MAX_GPUS = 32


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
        budget: ``[rows]`` slots each row may change in total (needs ``origin``); the
            refinement reads it every step, so ``on_step`` may raise it.
        on_step: called with the state after every step of the pairs search (GPUs in
            ``gpu``'s order, ``origin`` permuted alike): e.g. to record snapshots.
    """

    gpu: torch.Tensor
    speed: torch.Tensor | None = None
    origin: torch.Tensor | None = None
    budget: torch.Tensor | None = None
    on_step: Callable[[torch.Tensor], None] | None = None


def _moves(ids: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    return (ids != origin).sum((0, 2))


def refine(
    state: torch.Tensor,
    steps: int,
    mode: str = "pairs",
    tol: float = 1e-6,
    track: Tracking | None = None,
) -> torch.Tensor:
    """Swap refinement (see the module docstring) of ``state [2, S, rows, P]`` (loads and
    expert ids, :mod:`eplb.core.packing.state`). Returns the refined state.

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
    pairings = _pairings(num_gpus, min(steps, 2 * half), state.device)
    speed = None if track is None else track.speed
    origin = None if track is None else track.origin
    spent = None if origin is None else _moves(state[EXPERT], origin)
    if origin is not None:
        # the origin rides along as a third channel: one permutation moves it with the
        # slots, one gather reads it with the chosen items (swaps write channels 0–1 only)
        state = torch.cat([state, origin[None]])
    channels = state.shape[0]
    expand = (channels, slots, rows, num_gpus)
    buffers: dict[str, torch.Tensor] = {}
    big = (slots, slots, rows, half)
    row_offset = row_offsets(rows, num_gpus, state.device)[:, None]
    # per row: steps in a row without an improving legal swap. A row idle through every
    # pairing of the cycle is done (each partner rotation tried on its state), and its
    # GPUs keep their order from then on: rows stop on their own, so a row's result does
    # not depend on which other rows share the call. (The search used to stop when every
    # row had been idle for two steps, so a row got the later rotations only while other
    # rows were still swapping.)
    idle = None  # [rows] idle steps; None while every row had a swap to make last step
    done = going = None  # [rows] the rows done, and the others; None while none is done
    count = 0  # rows done
    for step in range(steps):
        loads = gpu_loads(state)  # [rows, P]
        pressure = loads if speed is None else loads / speed
        order = (argsort_rows(pressure) if num_gpus > _TORCH_SORT_MAX_GPUS
                 else pressure.argsort(dim=1))
        perm = order.index_select(1, pairings[step % len(pairings)])
        if done is not None:
            # (an identity row per done row; made only once some row is done)
            perm = torch.where(done[:, None], torch.arange(num_gpus, device=perm.device),
                               perm)
        # permute every row's GPUs: one flat index_select (cheaper than a 4-D gather)
        flat = (perm + row_offset).view(-1)
        state = state.reshape(channels * slots, -1).index_select(1, flat).view(expand)
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
        heavy, light = state[..., :half], state[..., half : 2 * half]  # [2, S, rows, H]
        # Σ load² falls by 2·δ·(gap − δ) = 2·((gap/2)² − (δ − gap/2)²): the best swap of a
        # pair has δ = w_i − w_j closest to gap/2; |δ − gap/2| = |target_i − w_j|
        half_gap = gap.mul_(0.5)
        target = heavy[LOAD] - half_gap  # [S, rows, H]
        off = torch.sub(
            target[:, None], light[LOAD][None], out=scratch(buffers, "off", big, state)
        ).abs_()  # [S_i, S_j, rows, H]
        best, i = off.amin(1).min(0)  # [rows, H]; amin then min: far cheaper than argmin
        # the best partner of the chosen item: its row of the search, recomputed (the
        # same float32 subtraction, so the same values; cheaper than gathering it back)
        j = (target.gather(0, i[None]) - light[LOAD]).abs_().min(0).indices
        apply = best.square_() < half_gap.square() - tol
        if going is not None:
            apply &= going[:, None]
        i_idx = i[None, None].expand(channels, 1, -1, -1)
        j_idx = j[None, None].expand(channels, 1, -1, -1)
        take_i = heavy.gather(1, i_idx)  # [2 or 3, 1, rows, H] the chosen items
        take_j = light.gather(1, j_idx)
        # legality of the chosen swap only (conflicts are rare): the expert each GPU
        # receives must not be on it already
        apply &= ~torch.eq(light[EXPERT], take_i[EXPERT]).logical_or_(
            torch.eq(heavy[EXPERT], take_j[EXPERT])).any(0)
        wanting = None  # rows with an improving legal swap
        if origin is not None:
            # a row held back by its budget is not done: the next step's budget is larger
            wanting = apply.any(1)
            apply, spent = _within_budget(apply, take_i, take_j, spent, track.budget)
        swapped = apply.any(1)
        moving = int(swapped.sum())
        if wanting is None:
            wanting, searching = swapped, moving
        else:
            searching = int(wanting.sum())
        if searching < rows:  # (a row done never searches: while all do, none is done)
            if idle is None:
                idle = torch.zeros(rows, dtype=torch.int64, device=state.device)
            idle = idle.add_(1).masked_fill_(wanting, 0)
            finished = idle >= len(pairings)
            count = int(finished.sum())
            if count:
                done, going = finished, ~finished
        else:
            idle = None
        if not moving:
            if track is not None and track.on_step is not None:
                track.on_step(state)
            if count == rows:  # every row tried the rotated partners: converged
                break
            continue
        if origin is not None:  # the slots keep their origin
            heavy, light, i_idx, j_idx = heavy[:2], light[:2], i_idx[:2], j_idx[:2]
            take_i, take_j = take_i[:2], take_j[:2]
        heavy.scatter_(1, i_idx, torch.where(apply, take_j, take_i))
        light.scatter_(1, j_idx, torch.where(apply, take_i, take_j))
        if track is not None and track.on_step is not None:
            track.on_step(state)
    if origin is not None:
        track.origin = state[2]  # permuted along with the state
        state = state[:2]
    return state


@lru_cache(maxsize=8)
def _charge_signs(device: torch.device) -> torch.Tensor:
    """``[2, 2, 1, 1]``: +1 where an item's expert meets its own slot's origin, −1 where it
    meets the other slot's (cached: read-only)."""
    return torch.tensor([[1, -1], [-1, 1]], device=device)[..., None, None]


def _within_budget(
    apply: torch.Tensor,
    take_i: torch.Tensor,
    take_j: torch.Tensor,
    spent: torch.Tensor,
    budget: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the swaps a row can afford, heaviest pairs first; returns (apply, new spent).

    Pair ``h`` swaps slot ``i`` of its heavy GPU with slot ``j`` of its light one:
    ``take_i``, ``take_j`` ``[3, 1, rows, H]`` are those slots' (load, expert, origin).
    A swap changes 0–2 slots relative to the origin (moving an expert back home refunds
    one): the charge is exact, ``after − before`` per swapped slot pair,
    ``[e_i = o_i] + [e_j = o_j] − [e_i = o_j] − [e_j = o_i]``.
    """
    experts, origins = torch.cat([take_i[EXPERT:], take_j[EXPERT:]], 1)  # [(i, j), rows, H]
    meets = experts[:, None] == origins[None]  # [2, 2, rows, H]: e of (i, j) = o of (i, j)
    charge = (meets * _charge_signs(apply.device)).sum((0, 1)).mul_(apply)  # [rows, H]
    apply = apply & (charge.cumsum(1) <= (budget - spent)[:, None])
    return apply, spent + (charge * apply).sum(1)


_MAX_JOINED_FILL = 1 << 14


def _infinite_where(flag: torch.Tensor) -> torch.Tensor:
    """float32 ``inf`` where ``flag`` (uint8) is set, else 0: a penalty to add (adding a
    broadcast penalty is cheaper than masking with a broadcast boolean)."""
    # float32 named: torch's default dtype is the process's (an engine may change it)
    return torch.zeros(flag.shape, dtype=torch.float32, device=flag.device).masked_fill_(
        flag.bool(), float("inf"))


def _best_partner(
    off: torch.Tensor, off_columns: torch.Tensor, row: torch.Tensor,
    load: torch.Tensor, expert: torch.Tensor, top_load: torch.Tensor,
    top_expert: torch.Tensor, load_u: torch.Tensor, mid: torch.Tensor,
    masked: bool, tiny: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The polish's search of one step: for every row, the partner GPU ``v`` and slots
    ``(i, j)`` whose swap with the heaviest GPU ``u`` gives the smallest pair peak.

    ``load, expert [S, rows, P]`` the state's channels; ``top_load, top_expert [S, rows]``
    the items of ``u``, ``load_u [rows]`` its load, ``mid [rows, P]`` the pairs' mean
    loads, ``row [rows]`` each row's first flat (row, GPU) column; ``off [S, S, rows, P]``
    the scratch the distances are written into (``off_columns``: its
    ``[S·S, rows·P]`` view). ``masked``: illegal swaps (an item going to a GPU that holds
    its expert) score inf; ``tiny``: by one joined fill rather than two penalties (the
    same values). Returns ``(best [rows], column_v [rows], pos [rows])``: the best pair
    peak, ``v``'s flat column and ``i·S + j``, each the first among ties.
    """
    target = (top_load - load_u)[:, :, None] + mid  # w_i − gap/2: [S, rows, P]
    torch.sub(target[:, None], load[None], out=off).abs_()  # [S_i, S_j, rows, P]
    if masked:
        # same[i, j, b, v]: u's item i and v's item j hold one expert; i may not go
        # to a GPU holding its expert, nor j come to u (this also rules out v = u)
        same = torch.eq(top_expert[:, None, :, None], expert[None])
        same = same.view(torch.uint8)  # amax over a middle dim: far cheaper than any
        if tiny:  # one fill by the joined flags: 5 calls where the penalties take 11
            illegal = torch.bitwise_or(same.amax(1)[:, None], same.amax(0))
            off.masked_fill_(illegal.view(torch.bool), float("inf"))
        else:
            off.add_(_infinite_where(same.amax(1))[:, None]).add_(
                _infinite_where(same.amax(0)))
    best, v = off.amin((0, 1)).add_(mid).min(1)  # [rows]: the partner with the least peak
    column_v = row + v
    pos = off_columns.index_select(1, column_v).min(0).indices  # [rows] over S·S
    return best, column_v, pos


def _rescue_masked(
    state: torch.Tensor,
    stuck: torch.Tensor,
    column_u: torch.Tensor,
    mid: torch.Tensor,
    load_u: torch.Tensor,
    top_load: torch.Tensor,
    top_expert: torch.Tensor,
) -> torch.Tensor:
    """The polish step of the rows ``stuck [n]`` whose best swap is illegal, in place:
    the best legal swap of each, where it lowers the pair's peak; returns ``[n]`` which
    swapped.

    It is :func:`_best_partner`'s masked search on those rows (``column_u, load_u
    [rows]``, ``mid [rows, P]``, ``top_load, top_expert [S, rows]`` of the step): the same
    operations on the same values, and exact minima with the same first-index rule, so a
    row swaps as the masked search would swap it, whichever search the size of the
    whole call picked.
    """
    _, slots, _, num_gpus = state.shape
    load = state[LOAD].index_select(1, stuck)  # [S, n, P]
    expert = state[EXPERT].index_select(1, stuck)
    mid = mid.index_select(0, stuck)
    load_u = load_u.index_select(0, stuck)
    off = load.new_empty((slots, slots, len(stuck), num_gpus))
    row = row_offsets(len(stuck), num_gpus, state.device)
    best, column_v, pos = _best_partner(
        off, off.view(slots * slots, -1), row, load, expert,
        top_load.index_select(1, stuck), top_expert.index_select(1, stuck), load_u, mid,
        masked=True, tiny=off.numel() <= _MAX_JOINED_FILL)
    ok = best < load_u * (1 - 1e-7)
    # the swap in the whole state's flat (row, GPU) columns: GPU v of u's row
    home = column_u.index_select(0, stuck)
    v = column_v - row
    swap_columns(state, pos // slots, home, pos % slots, home - home % num_gpus + v, ok)
    return ok


def _refine_max(
    state: torch.Tensor, steps: int, track: Tracking | None = None, host: bool | None = None
) -> torch.Tensor:
    """Heaviest-GPU polish: per row and step, one swap between the heaviest GPU and the
    partner that lowers the pair's larger load the most. GPUs keep their positions, so
    ``track`` (origin and budget) needs no permuting; a row stops when a swap might
    overrun its budget.

    A small CPU state (a masked search) is polished in NumPy (:mod:`.polish`: the same
    swaps at a fraction of the per-call cost); ``host`` forces one version or the other
    (the tests compare them)."""
    if state.shape[3] < 2:  # one GPU: no partner to swap with (and no [S, S] search)
        return state
    budgeted = track is not None and track.origin is not None and track.budget is not None
    if host is None:
        host = host_polish_applies(state)
    if host:
        return polish_host(state, steps, track.origin if budgeted else None,
                           track.budget if budgeted else None)
    _, slots, rows, num_gpus = state.shape
    device = state.device
    todo = torch.ones(rows, dtype=torch.bool, device=device)
    buffers: dict[str, torch.Tensor] = {}
    big = (slots, slots, rows, num_gpus)
    # small states search legal swaps only from the start (illegal best swaps are
    # common there); large ones check the chosen swap and rescue the rare illegal rows
    masked = slots * slots * rows * num_gpus <= MAX_MASKED_SEARCH
    # below this size a step is a few dozen calls on a few thousand entries: a full-size
    # boolean fill (same result as adding the two broadcast penalties: inf where either
    # is set, the value itself elsewhere) saves six calls; above it the fill costs more
    # than the broadcast adds (measured: 19.5 vs 27 µs at [3, 3, 36, 16], 172 vs 110 µs
    # at [4, 4, 128, 32])
    tiny = slots * slots * rows * num_gpus <= _MAX_JOINED_FILL
    # views made once (swaps write in place): GPU columns are fetched by flat index
    state = state.contiguous()
    columns = state.view(2 * slots, rows * num_gpus)
    flat, stride = state.view(2, -1), rows * num_gpus  # slot k of column c: k · stride + c
    load, expert = state[LOAD], state[EXPERT]
    row = row_offsets(rows, num_gpus, device)
    off = scratch(buffers, "off", big, state)
    off_columns = off.view(slots * slots, rows * num_gpus)
    for _ in range(steps):
        loads = slot_sum(load)  # [rows, P]
        load_u, u = loads.max(1)
        if budgeted:
            todo &= _moves(expert, track.origin) + 2 <= track.budget
        column_u = row + u
        top_load, top_expert = columns.index_select(1, column_u).view(2, slots, rows)
        # after swapping δ = w_i − w_j the pair's larger load is (L_u + L_v)/2 + |δ − gap/2|
        mid = torch.add(loads, load_u[:, None]).mul_(0.5)  # [rows, P]
        best, column_v, pos = _best_partner(off, off_columns, row, load, expert, top_load,
                                            top_expert, load_u, mid, masked, tiny)
        i, j = pos // slots, pos % slots
        ok = todo & (best < load_u * (1 - 1e-7))
        if masked:  # every finite choice is legal
            if not bool(ok.any()):
                break
            swap_columns(state, i, column_u, j, column_v, ok)
            todo = ok
            continue
        on_v_expert = columns.index_select(1, column_v).view(2, slots, rows)[EXPERT]
        # the chosen items' flat slot positions and (load, expert) [2, rows]: read once,
        # for the legality check and the swap
        here = torch.add(column_u, i, alpha=stride)
        there = torch.add(column_v, j, alpha=stride)
        mine, theirs = flat.index_select(1, here), flat.index_select(1, there)
        # legality of the chosen swap only; rows whose best swap is illegal (rare on
        # large states) take the best legal one from a search of their own
        clash = torch.eq(on_v_expert, mine[EXPERT]).logical_or_(
            torch.eq(top_expert, theirs[EXPERT])).any(0)
        illegal = ok & clash
        ok ^= illegal  # ok & ~clash
        # the legal swaps first: they touch none of the illegal rows' columns, which the
        # rescue below reads
        swap_slots(flat, here, torch.where(ok, there, here), mine, theirs)
        if bool(illegal.any()):
            # few rows: their best legal swap, from a masked search of their own
            # (index_select and index_copy: advanced indexing costs several times more)
            stuck = illegal.nonzero()[:, 0]
            rescued = _rescue_masked(state, stuck, column_u, mid, load_u, top_load,
                                     top_expert)
            ok = ok.index_copy(0, stuck, rescued)
        if not bool(ok.any()):
            break
        todo = ok  # a row whose heaviest GPU cannot improve is done
    return state
