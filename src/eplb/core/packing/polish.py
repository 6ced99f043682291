"""The heaviest-GPU polish on the host: NumPy steps that make the same swaps as the torch
polish (:func:`eplb.core.packing.refine._refine_max`), bit for bit.

On a CPU, states whose search is masked for legality in every step (at most
:data:`MAX_MASKED_SEARCH` entries) are polished here: a step is a few dozen calls on
arrays of a few thousand entries, where torch's per-call cost (5–10 µs) dominates and
NumPy's is 1–3 µs. Larger states, and accelerators, keep the torch version.

Bit for bit because every float32 operation is one the torch version also makes:
elementwise ``+ − × |·|`` round alike in both libraries (torch's ``a − 1·b`` is exact
like ``a − b``), ``min``/``max`` are exact and both return the first index among ties,
and the one sum, the GPU loads over slots, is torch's own ``sum`` on the full state
(its order of addition depends on where an element sits in the flat array, so it is never
taken on a compacted copy). ``tests/test_polish.py`` compares the two on random states.

Rows only leave the search (a row whose heaviest GPU cannot improve, or whose budget is
spent, is done), so the search runs on the rows still open only: late steps cost a
fraction of the first ones (rows are independent, so this changes no result).
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.packing.state import EXPERT, LOAD, slot_sum

#: largest ``[S, S, rows, P]`` search (at the start of the polish) that is masked for
#: legality in every step; larger ones check the chosen swap and rescue the rows whose
#: best swap is illegal (torch polish only; the two polishes share this rule)
MAX_MASKED_SEARCH = 1 << 16
#: the same float32 factor the torch polish's ``load_u * (1 - 1e-7)`` multiplies by
_IMPROVES = np.float32(1 - 1e-7)


def host_polish_applies(state: torch.Tensor) -> bool:
    """Whether the polish of ``state [2, S, rows, P]`` runs here: a float32 CPU state whose
    search is masked (at most :data:`MAX_MASKED_SEARCH` entries). Larger states rescue
    illegal best swaps through torch's per-row search in most steps (measured: 140 of 160
    steps at 94×128 S = 5 P = 32) and their passes are long enough for torch's per-call
    cost not to matter: a host version of that path measured 1.1–1.7× slower at
    94×128 and 58×256 with S = 5–17, so they stay in torch."""
    _, slots, rows, num_gpus = state.shape
    return (
        state.device.type == "cpu" and state.dtype == torch.float32 and not state.requires_grad
        and slots * slots * rows * num_gpus <= MAX_MASKED_SEARCH
    )


def polish_host(
    state: torch.Tensor,
    steps: int,
    origin: torch.Tensor | None = None,
    budget: torch.Tensor | None = None,
) -> torch.Tensor:
    """The heaviest-GPU polish of ``state [2, S, rows, P]`` (float32, CPU, a search of at
    most :data:`MAX_MASKED_SEARCH` entries), in place on its contiguous version, which
    is returned.

    Per open row and step: one swap between the heaviest GPU ``u`` and the partner ``v``
    that lowers the pair's larger load the most, legal only (neither GPU may receive an
    expert it holds). With ``origin [S, rows, P]`` and ``budget [rows]`` a row stops once
    a swap might take its changed slots past the budget.
    """
    _, slots, rows, num_gpus = state.shape
    state = state.contiguous()
    if rows == 0 or steps == 0:
        return state
    host = state.numpy()  # shares memory with ``state``: swaps land in it
    load, expert = host[LOAD], host[EXPERT]  # [S, rows, P]
    flat = host.reshape(2, -1)  # [2, S·rows·P]: slot k of (row, GPU) c at k·rows·P + c
    expert_columns = expert.reshape(slots, rows * num_gpus)
    stride = rows * num_gpus
    budgeted = origin is not None and budget is not None
    origin_host = origin.numpy() if budgeted else None
    budget_host = budget.numpy() if budgeted else None
    # the GPU loads: torch's sum of the full state, written into a buffer NumPy reads
    loads_t = torch.empty((rows, num_gpus), dtype=state.dtype)
    loads_full = loads_t.numpy()
    load_t = state[LOAD]
    open_rows = row = np.arange(rows)
    first_column = open_rows * num_gpus
    buffer = np.empty((slots, slots, rows, num_gpus), np.float32)
    for _ in range(steps):
        slot_sum(load_t, out=loads_t)
        if budgeted:
            spent = (expert[:, open_rows] != origin_host[:, open_rows]).sum((0, 2))
            open_rows = open_rows[spent + 2 <= budget_host[open_rows]]
        n = len(open_rows)
        if n == 0:
            break
        whole = n == rows  # no gathers while every row is open
        loads = loads_full if whole else loads_full[open_rows]  # [n, P]
        if len(row) != n:  # rows only leave: rebuilt only when some did
            row = np.arange(n)
            first_column = open_rows * num_gpus  # flat (row, GPU) column of every GPU 0
        u = loads.argmax(1)  # the first of equal maxima, as torch's max
        load_u = loads[row, u]
        column_u = first_column + u
        # np.take, not ``[:, column_u]``: that indexing returns Fortran-ordered columns, and
        # every broadcast below then ran in a strided order, several times slower (the
        # same values: a gather rounds nothing)
        top_load = np.take(load.reshape(slots, stride), column_u, axis=1)  # [S, n]
        top_expert = np.take(expert_columns, column_u, axis=1)
        # after swapping δ = w_i − w_j the pair's larger load is (L_u + L_v)/2 + |δ − gap/2|
        mid = loads + load_u[:, None]
        mid *= 0.5  # [n, P]
        target = (top_load - load_u)[:, :, None] + mid  # w_i − gap/2: [S, n, P]
        their_load = load if whole else np.take(load, open_rows, axis=1)  # [S, n, P]
        their_expert = expert if whole else np.take(expert, open_rows, axis=1)
        # u's item i may not go to a GPU v holding its expert, nor v's item j come to u
        # (this also rules out v = u). Illegal pairs get an infinite distance through
        # their operands, target_i = +inf or w_j = −inf (never inf − inf: no NaN), so
        # the legal entries are the same float32 differences the torch search masks
        # same[i, j, b, v]: u's item i and v's item j hold one expert (one broadcast
        # compare; the reductions run over leading axes, which NumPy does elementwise)
        same = top_expert[:, None, :, None] == their_expert[None]  # [S_i, S_j, n, P]
        gives = same.any(1)  # [S, n, P]: i's expert is on v already
        takes = same.any(0)  # [S, n, P]: j's expert is on u already
        target = np.where(gives, np.float32(np.inf), target)
        their_load = np.where(takes, np.float32(-np.inf), their_load)
        off = np.subtract(target[:, None], their_load[None], out=buffer[:, :, :n])
        np.abs(off, out=off)  # [S_i, S_j, n, P]
        peak = off.min((0, 1))
        peak += mid  # [n, P]: each partner's best new pair peak
        v = peak.argmin(1)
        best = peak[row, v]
        pos = off[:, :, row, v].reshape(slots * slots, n).argmin(0)  # first over (i, j)
        i, j = np.divmod(pos, slots)
        ok = best < load_u * _IMPROVES
        if not ok.any():
            break
        # the swapped slots' flat positions, of every open row, then of the moving ones
        here = (column_u + i * stride)[ok]
        there = (first_column + v + j * stride)[ok]
        mine = flat[:, here]
        flat[:, here] = flat[:, there]
        flat[:, there] = mine
        open_rows = open_rows[ok]  # a row whose heaviest GPU cannot improve is done
    return state
