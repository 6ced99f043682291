"""Anti-affinity repair: no GPU keeps two replicas of one expert.

Each pass moves one conflicting replica per row by the legal swap with the smallest new
peak, on the rows the construction could not settle (none on the real loads) or on any
row of a state the caller built (an inherited placement).
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.packing.state import EXPERT, LOAD, gpu_loads, round_robin, slot_sum, swap_from

#: largest repair (``S·S·n·P`` entries of the torch search, ``n`` the rows in conflict)
#: that runs in NumPy on a CPU: 1 MiB entries, a few MiB per pass. Its passes are a few
#: dozen calls on small arrays, where torch's per-call cost dominates (36×32 on 8 GPUs ×
#: 17 slots: 33 of 36 rows in conflict, 8-11 passes of 0.6 ms each in torch)
MAX_HOST_REPAIR = 1 << 20
#: most entries of the host repair's table of replicas per (row, GPU, expert id): 32 MiB
#: of int64 (a row of many experts on many GPUs keeps the torch repair instead)
MAX_HOST_TABLE = 1 << 22


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
    if allow_shared is not None and bool(allow_shared.any()):
        shared = allow_shared.nonzero()[:, 0]
        state = state.index_copy(2, shared, _round_robin_state(state.index_select(2, shared)))
    # rows are taken by index_select and written back by index_copy: torch's advanced
    # indexing costs several times more per call at these sizes
    if suspects is None:
        conflict = _conflicts(state)
    elif len(suspects):
        conflict = _conflicts(state.index_select(2, suspects))
    else:
        return state
    bad = conflict.any(0).any(1)
    if allow_shared is not None:
        bad &= ~(allow_shared if suspects is None else allow_shared.index_select(0, suspects))
    if not bool(bad.any()):
        return state
    bad = bad.nonzero()[:, 0]
    rows = bad if suspects is None else suspects.index_select(0, bad)
    sub = state.index_select(2, rows)  # a copy: fix it, then write it back
    conflict = conflict.index_select(1, bad)  # [S, n, P]
    if host_repair_applies(sub):
        conflict = _repair_host(sub, conflict)
    else:
        conflict = _repair_torch(sub, conflict)
    stuck = conflict.any(0).any(1)
    if bool(stuck.any()):
        sub[:, :, stuck] = _round_robin_state(sub[:, :, stuck])
    return state.index_copy(2, rows, sub)


def _repair_torch(sub: torch.Tensor, conflict: torch.Tensor) -> torch.Tensor:
    """The repair passes on ``sub [2, S, n, P]`` (in place) with ``conflict [S, n, P]``
    its conflicting replicas; returns the conflicts left."""
    _, slots, _, num_gpus = sub.shape
    buffers: dict[str, torch.Tensor] = {}
    for _ in range(num_gpus * slots):
        on_gpu = conflict.any(0)  # [n, P]
        todo = on_gpu.any(1)
        if not bool(todo.any()):
            break
        u = on_gpu.to(torch.int8).max(1).indices
        movable = conflict.gather(2, u[None, :, None].expand(slots, -1, 1))[:, :, 0]  # [S, n]
        loads = gpu_loads(sub)
        sub, moved, _slot = swap_from(
            sub, u, loads, todo, movable=movable, must_move=True, buffers=buffers
        )
        if not bool(moved.any()):
            break
        # a legal swap clears the moved replica's conflict and creates none; the replica
        # it swapped with may have been stacked on its GPU, which clears (or moves) that
        # GPU's flag too: the flags anew (the same on u, which kept its first copies)
        conflict = _conflicts(sub)
    return conflict


def host_repair_applies(sub: torch.Tensor) -> bool:
    """Whether the repair of ``sub [2, S, n, P]`` runs in NumPy (:func:`_repair_host`): a
    float32 CPU state of at most :data:`MAX_HOST_REPAIR` search entries whose table of
    replicas per (row, GPU, expert id) holds at most :data:`MAX_HOST_TABLE` entries."""
    _, slots, rows, num_gpus = sub.shape
    if not (sub.device.type == "cpu" and sub.dtype == torch.float32 and not sub.requires_grad
            and 0 < slots * slots * rows * num_gpus <= MAX_HOST_REPAIR):
        return False
    low, high = sub[EXPERT].aminmax()
    return rows * num_gpus * (int(high) - int(low) + 1) <= MAX_HOST_TABLE


def _repair_host(sub: torch.Tensor, conflict: torch.Tensor) -> torch.Tensor:
    """:func:`_repair_torch` in NumPy, the same swaps bit for bit, on a float32 CPU
    ``sub [2, S, n, P]`` (contiguous, as ``index_select`` makes it; in place); returns the
    conflicts left ``[S, n, P]``.

    Each pass is :func:`~eplb.core.packing.state.swap_from` with ``must_move``: the same
    float32 operations (``peak = max(L_u − δ, L_v + δ)`` with ``δ = w_i − w_j``, +inf
    for an illegal or immovable ``i``, −inf for a ``j`` whose expert is on ``u``), the
    same first index among ties, and the GPU loads summed by torch on the whole state
    (its order of addition depends on an element's position, :mod:`.polish`). What is
    cheaper: only the movable replicas of ``u`` are scored (in slot order; the others
    score +inf, so neither a minimum nor a first index changes); which experts a GPU
    holds is a table of counts per (row, GPU, expert), kept up to date swap by swap,
    instead of an ``[S, S, n, P]`` compare; and only the rows that moved in the last
    pass are searched (a row without conflicts, or without a legal swap, never changes
    again: rows are independent)."""
    _, slots, rows, num_gpus = sub.shape
    host = sub.numpy()  # shares memory: the swaps land in ``sub``
    load = host[LOAD]  # [S, n, P]
    flat = host.reshape(2, -1)  # slot k of (row, GPU) column c at k·n·P + c
    stride = rows * num_gpus
    conf = conflict.numpy().copy()
    loads_t = torch.empty((rows, num_gpus), dtype=sub.dtype)
    loads_full = loads_t.numpy()
    load_t = sub[LOAD]
    # expert ids from 0 (swapped along with the state), and how many replicas of each
    # expert every (row, GPU) holds: held[(b·P + g)·width + e]
    ids = host[EXPERT].astype(np.int64)
    ids -= int(ids.min()) if ids.size else 0
    width = int(ids.max()) + 1 if ids.size else 1
    flat_ids = ids.reshape(-1)
    gpu = np.arange(num_gpus)
    held = np.bincount(
        ((np.arange(rows)[:, None] * num_gpus + gpu) * width + ids).ravel(),
        minlength=stride * width)
    inf = np.float32(np.inf)
    open_rows = np.arange(rows)
    for _ in range(num_gpus * slots):
        n = len(open_rows)
        whole = n == rows  # no gathers while every row is open
        conf_open = conf if whole else conf[:, open_rows]
        on_gpu = conf_open.any(0)  # [n, P]
        todo = on_gpu.any(1)
        if not todo.any():
            break
        row = np.arange(n)
        column = open_rows * num_gpus  # flat (row, GPU) column of every GPU 0
        u = on_gpu.argmax(1)  # the first GPU in conflict, as torch's max over int8
        movable = conf_open[:, row, u]  # [S, n]
        slot_sum(load_t, out=loads_t)
        loads = loads_full if whole else loads_full[open_rows]  # [n, P]
        their_load = load if whole else load[:, open_rows]  # [S, n, P]
        their_ids = ids if whole else ids[:, open_rows]
        cell = (column[:, None] + gpu) * width  # [n, P]
        top_ids = their_ids[:, row, u]  # [S, n]
        # u's movable replicas first, in slot order (stable), as many as a row has most
        k = max(1, int(movable.sum(0).max()))
        picked = np.argsort(~movable, axis=0, kind="stable")[:k]  # [k, n]
        cand_ids = top_ids[picked, row]
        # i's expert already on v (also v = u), or i not movable: +inf
        blocked = held[cell[None] + cand_ids[:, :, None]] > 0  # [k, n, P]
        blocked |= ~movable[picked, row][:, :, None]
        w_top = np.where(blocked, inf, their_load[:, row, u][picked, row][:, :, None])
        # j's expert on u: −inf
        on_u = held[(cell[row, u][:, None] + their_ids).ravel()].reshape(their_ids.shape) > 0
        w_other = np.where(on_u, -inf, their_load)
        delta = w_top[:, None] - w_other[None]  # [k, S, n, P]
        peak = loads[row, u][:, None] - delta
        delta += loads
        np.maximum(peak, delta, out=peak)
        per_gpu = peak.min((0, 1))  # [n, P]
        v = per_gpu.argmin(1)
        best = per_gpu[row, v]
        pos = peak[:, :, row, v].reshape(k * slots, n).argmin(0)  # first over (i, j)
        i, j = np.divmod(pos, slots)
        i = picked[i, row]
        ok = todo & np.isfinite(best)
        if not ok.any():
            break
        here = (i * stride + column + u)[ok]
        there = (j * stride + column + v)[ok]
        mine, theirs = flat[:, here], flat[:, there]
        flat[:, here] = theirs
        flat[:, there] = mine
        e_i, e_j = flat_ids[here], flat_ids[there]
        flat_ids[here], flat_ids[there] = e_j, e_i
        at_u, at_v = cell[row, u][ok], cell[row, v][ok]  # distinct GPUs: no repeated index
        held[at_u + e_i] -= 1
        held[at_v + e_i] += 1
        held[at_v + e_j] -= 1
        held[at_u + e_j] += 1
        # a legal swap clears the moved replica's conflict and creates none
        conf[i[ok], open_rows[ok], u[ok]] = False
        # the replica it swapped with may have been stacked on v: v's flags anew (a copy
        # after the first of its expert on v), as _repair_torch recomputes them
        rows_v, gpus_v = open_rows[ok], v[ok]
        col = ids[:, rows_v, gpus_v]  # [S, m]
        flags = np.zeros(col.shape, bool)
        for offset in range(1, slots):
            flags[offset:] |= col[offset:] == col[:-offset]
        conf[:, rows_v, gpus_v] = flags
        open_rows = open_rows[ok]
    return torch.from_numpy(conf)


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
