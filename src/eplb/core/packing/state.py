"""The packing state and the primitives every packing step shares.

A batch of packing problems (*rows*: a layer, a (layer, node) pair, or a randomised
candidate of either) is one tensor::

    state: [2, S, rows, P] — ``state[LOAD, k, b, g]`` is the load of the k-th replica on
    GPU g of row b and ``state[EXPERT, k, b, g]`` its logical expert id (exact in
    floating point up to 2**24).

Keeping load and expert id in one tensor halves the gathers on the hot path, and putting
the slot axis outermost makes every reduction over slots a vectorized elementwise loop.
GPUs are interchangeable while packing, so the searches permute GPUs freely.

*Items* are the replicas before packing: ``[2, rows, R]`` (loads normalised to a mean of
1 per row, and expert ids), heaviest first with an expert's replicas adjacent.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

LOAD, EXPERT = 0, 1


#: torch's CPU float32 sum over the slot axis of ``[S, n]`` adds each column's slots one
#: after another, in slot order, in blocks of this many columns; the last ``n mod 32``
#: columns go through a loop with four accumulators instead, which rounds differently
#: from five slots on. A GPU's load then depended on its place in the call (a layer
#: alone against the same layer among others): see :func:`slot_sum`
SUM_BLOCK = 32
#: the most slots torch's sum adds in slot order even in whole blocks: from 18 on it
#: adds them in another order (attacker pass, twenty-fifth session)
TORCH_ORDERED_SLOTS = 17


def slot_sum(load: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows, P]`` sum of ``load [S, rows, P]`` over its slots, each GPU's slots added
    one after another in slot order, whatever the GPU's place in the tensor and the
    tensor's memory layout (on a CPU; ``out``: where to write it).

    torch's own sum adds in that order for up to 4 slots, and for up to
    :data:`TORCH_ORDERED_SLOTS` but in the last ``rows·P mod`` :data:`SUM_BLOCK` columns.
    Other sums go to NumPy, whose reduction over a leading axis adds row after row,
    elementwise, in every column (as fast as torch's at these sizes; one column alone,
    which NumPy sums pairwise, is added in a loop). So a row's loads do not depend on the
    other rows of the call. ``tests/test_layer_independence.py`` checks both premises on
    the installed versions. (Non-CPU and non-float tensors keep torch's sum.)
    """
    if out is not None and not out.is_contiguous():  # torch sums into it in another order
        return out.copy_(slot_sum(load))
    slots, rows, num_gpus = load.shape
    width = rows * num_gpus
    if not load.is_contiguous() and load.is_cpu:
        # torch sums another layout in another order: a state whose rows were written
        # into a construction's transposed layout (rows skipped at their floor) summed
        # its GPUs differently from the same rows refined (attacker pass)
        load = load.contiguous()
    # (the checks cost about as much as the sum's own call here: the common case first)
    if (slots <= 4 or (slots <= TORCH_ORDERED_SLOTS and width % SUM_BLOCK == 0)
            or not load.is_cpu or load.dtype not in (torch.float32, torch.float64)):
        return load.sum(0) if out is None else torch.sum(load, 0, out=out)
    load = load.detach()
    if width == 1:
        total = load[0].clone()
        for k in range(1, slots):
            total += load[k]
        return total if out is None else out.copy_(total)
    if out is None:
        return torch.from_numpy(np.add.reduce(load.numpy(), 0))
    np.add.reduce(load.numpy(), 0, out=out.numpy())
    return out


def gpu_loads(state: torch.Tensor) -> torch.Tensor:
    """``[rows, P]`` load per GPU of a packing state (:func:`slot_sum`)."""
    return slot_sum(state[LOAD])


def max_load(state: torch.Tensor) -> torch.Tensor:
    """``[rows]`` largest GPU load per row."""
    return gpu_loads(state).amax(1)


def to_slots(state: torch.Tensor) -> torch.Tensor:
    """``[rows, P·S]`` logical expert per physical slot (GPU-major, slots of a GPU adjacent)."""
    _, slots, rows, num_gpus = state.shape
    return state[EXPERT].permute(1, 2, 0).reshape(rows, num_gpus * slots).long()


def deal(items: torch.Tensor, gpu: torch.Tensor, num_gpus: int) -> torch.Tensor:
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


def make_items(
    item_load: torch.Tensor, item_expert: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[2, rows, R]`` packing items: loads normalised to a mean of 1 per row, and experts.

    Normalising makes swap tolerances scale free and keeps float32 exact enough; expert
    ids are exact in float32 up to 2**24.
    """
    scale = item_load.mean(1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # written straight into the result: the quotient is rounded to ``dtype`` once, as a
    # stack in the loads' dtype and a cast would round it, without the [2, rows, R]
    # temporary (expert ids are exact in either float type)
    items = torch.empty((2, *item_load.shape), dtype=dtype, device=item_load.device)
    torch.div(item_load, scale, out=items[LOAD])
    items[EXPERT].copy_(item_expert)
    return items


def scratch(
    buffers: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], like: torch.Tensor
) -> torch.Tensor:
    """A reusable scratch tensor ``buffers[name]`` of ``shape`` with ``like``'s dtype and
    device: fresh big temporaries cost page faults on every step."""
    buf = buffers.get(name)
    if buf is None or buf.shape != shape:
        buf = buffers[name] = like.new_empty(shape)
    return buf


def swap_from(
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
    top = state.gather(3, u[None, None, :, None].expand(2, slots, rows, 1))[..., 0]  # [2, S, rows]
    load_u = loads.gather(1, u[:, None])  # [rows, 1]
    # which of u's slots the search scores: all S, or only the first ``k`` of each row
    # in slot order where few may leave (the repair moves one conflicting replica per
    # pass): an immovable item's swaps all score inf, so leaving them out changes no
    # minimum and, the order kept, no first index among ties, while the [S, S, rows, P]
    # search cost S/k times as much (a layer of 65,536 slots on 64 GPUs spent 41 s in
    # 107 repair passes)
    picked = None
    if movable is not None and slots >= _PICK_FROM_SLOTS:
        k = max(1, int(movable.sum(0).max()))
        if 4 * k <= slots:
            picked = movable.to(torch.int8).argsort(dim=0, descending=True, stable=True)[:k]
    if picked is None:
        cand, movable_cand = top, movable
    else:
        cand = top.gather(1, picked.expand(2, -1, -1))  # [2, k, rows]
        movable_cand = movable.gather(0, picked)
    shape = (cand.shape[1], slots, rows, num_gpus)
    # sign(id differences) [S_u, S_v, rows, P]: an exact zero in a product marks an equal id
    ids_diff = torch.sub(
        cand[EXPERT][:, None, :, None],
        state[EXPERT][None],
        out=scratch(buffers, "ids", shape, state),
    ).clamp_(-1, 1)
    # blocked: u's item is already on v (this also blocks v = u), or v's item is on u
    blocked_top = ids_diff.prod(1) == 0
    if movable_cand is not None:
        blocked_top |= ~movable_cand[:, :, None]
    w_top = cand[LOAD][:, :, None].masked_fill(blocked_top, inf)
    on_u = ids_diff.prod(0) == 0 if picked is None else _held_by(top[EXPERT], state[EXPERT])
    w_other = state[LOAD].masked_fill(on_u, -inf)
    delta = torch.sub(w_top[:, None], w_other[None], out=scratch(buffers, "delta", shape, state))
    # the pair's new peak max(L_u − δ, L_v + δ), built in the two scratch buffers
    peak = torch.sub(load_u, delta, out=scratch(buffers, "peak", shape, state))
    peak = torch.maximum(peak, delta.add_(loads), out=peak)
    best, v = peak.amin((0, 1)).min(1)  # [rows]
    pos = peak.gather(3, v[None, None, :, None].expand(*shape[:3], 1)).view(-1, rows)
    pos = pos.min(0).indices
    i, j = pos // slots, pos % slots
    if picked is not None:
        i = picked.gather(0, i[None])[0]
    ok = todo & (torch.isfinite(best) if must_move else best < load_u[:, 0] * (1 - 1e-7))
    if not bool(ok.any()):
        return state, ok, i
    swap_items(state, i, u, j, v, ok)
    return state, ok, i


#: from this many slots per GPU the repair scores only the movable slots: below it the
#: picking's extra calls cost more than the smaller search saves (0.22 → 0.29 ms of
#: swap_from per incremental DeepSeek-V3 call at 9 slots, thread time)
_PICK_FROM_SLOTS = 32


def _held_by(top_expert: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """``[S, rows, P]`` True where ``expert [S, rows, P]`` is one of its row's
    ``top_expert [S, rows]``: a membership test by binary search, ``S·P·log S`` per row
    where the pairwise compare is ``S²·P`` (ids are whole numbers, so it is exact)."""
    slots, rows, num_gpus = expert.shape
    known = top_expert.t().sort(1).values.contiguous()  # [rows, S]
    asked = expert.permute(1, 0, 2).reshape(rows, slots * num_gpus)
    at = torch.searchsorted(known, asked).clamp_(max=slots - 1)
    held = known.gather(1, at) == asked
    return held.view(rows, slots, num_gpus).permute(1, 0, 2)


@lru_cache(maxsize=64)
def row_offsets(rows: int, num_gpus: int, device: torch.device) -> torch.Tensor:
    """``[rows]`` flat offset of every row's first GPU (cached: read-only)."""
    return torch.arange(rows, device=device) * num_gpus


def swap_items(
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
    row = row_offsets(rows, num_gpus, state.device)
    swap_columns(state, i, row + u, j, row + v, ok)


def swap_columns(
    state: torch.Tensor,
    i: torch.Tensor,
    column_u: torch.Tensor,
    j: torch.Tensor,
    column_v: torch.Tensor,
    ok: torch.Tensor,
) -> None:
    """:func:`swap_items` with the GPUs given as flat ``(row, GPU)`` columns
    (``row · P + GPU``, all ``[rows]``), for callers that already hold them."""
    _, _slots, rows, num_gpus = state.shape
    stride = rows * num_gpus  # between slots
    here = torch.add(column_u, i, alpha=stride)
    there = torch.where(ok, torch.add(column_v, j, alpha=stride), here)
    flat = state.view(2, -1)
    swap_slots(flat, here, there, flat.index_select(1, here), flat.index_select(1, there))


def swap_slots(
    flat: torch.Tensor,
    here: torch.Tensor,
    there: torch.Tensor,
    mine: torch.Tensor,
    theirs: torch.Tensor,
) -> None:
    """In place on ``flat [2, S·rows·P]`` (a contiguous state's view): the items at flat
    slot positions ``here`` and ``there [rows]`` trade places, given their (load, expert)
    ``mine`` and ``theirs [2, rows]`` as read before. A row with ``there = here`` keeps
    its item (written twice, ``mine`` last)."""
    flat.index_copy_(1, here, theirs)
    flat.index_copy_(1, there, mine)


# largest [S, S, rows, P] search worth masking for legality in every step: a few passes
# over it cost about one per-row rescue at this size (node rows: 43k; DeepSeek-V3 global
