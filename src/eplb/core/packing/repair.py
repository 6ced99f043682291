"""Anti-affinity repair: no GPU keeps two replicas of one expert.

Each pass moves one conflicting replica per row by the legal swap with the smallest new
peak, on the rows the construction could not settle (none on the real loads) or on any
row of a state the caller built (an inherited placement).
"""

from __future__ import annotations

import torch

from eplb.core.packing.state import EXPERT, LOAD, round_robin, swap_from


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
    buffers: dict[str, torch.Tensor] = {}
    for _ in range(num_gpus * slots):
        on_gpu = conflict.any(0)  # [n, P]
        todo = on_gpu.any(1)
        if not bool(todo.any()):
            break
        u = on_gpu.to(torch.int8).max(1).indices
        movable = conflict.gather(2, u[None, :, None].expand(slots, -1, 1))[:, :, 0]  # [S, n]
        loads = sub[LOAD].sum(0)
        sub, moved, slot = swap_from(
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
    return state.index_copy(2, rows, sub)


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
