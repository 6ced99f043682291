"""The all-pairs swap search on the host: NumPy steps that make the same swaps as the torch
search (:func:`eplb.core.packing.refine.refine`, ``mode="pairs"``, no tracking), bit for
bit, and leave the GPUs in the same order.

Small CPU states (the polish's size rule, :func:`.polish.host_polish_applies`) are
searched here: a step is about thirty calls on arrays of a few hundred entries, where
torch's per-call cost (5–10 µs) dominates and NumPy's is 1–3 µs. Tiny problems pack
several times per plan (candidate counts, rescue searches), each pack up to four pairs
searches of 8 steps, so these steps were most of a plan's time there (3 layers × 8
experts, R = 24 on 4 GPUs).

Bit for bit as the host polish is (:mod:`.polish`): the elementwise float32 ``− × |·|``
round alike in both libraries, ``min`` takes the first index among ties in both, and the
two calls whose result depends on torch's own rules stay torch calls on views of the
NumPy arrays: the GPU loads (:func:`.state.slot_sum`) and the order of the GPUs by load
(torch's argsort is not stable: equal loads, common where an expert's replicas are
equal, keep torch's order). ``tests/test_polish.py`` compares the two on random states.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.ordering import argsort_rows
from eplb.core.packing.state import EXPERT, LOAD


def pairs_host(
    state: torch.Tensor,
    steps: int,
    pairings: tuple[torch.Tensor, ...],
    tol: float,
    torch_sort: bool,
) -> torch.Tensor:
    """The all-pairs search of ``state [2, S, rows, P]`` (float32, CPU, ``P >= 2``) for
    ``steps`` steps: a new state (``state`` is not written), GPUs permuted as the torch
    search permutes them.

    ``pairings``: the search's column orders (``refine._pairings``), one per step of the
    cycle; ``tol``: the least Σ load² gain that counts; ``torch_sort``: GPUs are ordered
    by torch's argsort (else by :func:`eplb.core.ordering.argsort_rows`), as the torch
    search orders them at this ``P``.
    """
    _, slots, rows, num_gpus = state.shape
    half = num_gpus // 2
    cycle = [p.cpu().numpy() for p in pairings]
    host = state.detach().contiguous().numpy()
    identity = np.arange(num_gpus)
    row_offset = (np.arange(rows) * num_gpus)[:, None]
    threshold = np.float32(tol)
    rows_index = np.arange(rows)[:, None]
    pairs_index = np.arange(half)[None, :]
    search = np.empty((slots, slots, rows, half), np.float32)
    idle = None  # as in the torch search: see refine()
    done = going = None
    count = 0
    for step in range(steps):
        # the GPU loads, each GPU's slots added in slot order: slot_sum's sum (NumPy's
        # reduction over the leading axis of a C-ordered array, elementwise; torch's own,
        # where slot_sum takes it, adds in the same order)
        loads = np.add.reduce(host[LOAD], 0)  # [rows, P]
        loads_t = torch.from_numpy(loads)
        order = (loads_t.argsort(dim=1) if torch_sort else argsort_rows(loads_t)).numpy()
        perm = order[:, cycle[step % len(cycle)]]
        if done is not None:
            perm = np.where(done[:, None], identity, perm)
        # a new array every step: the caller's state is not written. np.take, not
        # ``[:, flat]``: that indexing returns the columns in Fortran order, where the next
        # step's reduction over slots adds pairwise (other loads from nine slots on)
        flat = (perm + row_offset).ravel()
        host = np.take(host.reshape(2 * slots, -1), flat, axis=1).reshape(
            2, slots, rows, num_gpus)
        pressure = loads.ravel()[flat].reshape(rows, num_gpus)
        half_gap = pressure[:, :half] - pressure[:, half : 2 * half]  # [rows, H]
        half_gap *= np.float32(0.5)
        heavy, light = host[..., :half], host[..., half : 2 * half]  # [2, S, rows, H]
        # C order named: NumPy's default follows the operands' strides, and a reduction
        # over the middle axis of the search in the order it picks here cost 10× more
        target = np.subtract(heavy[LOAD], half_gap, order="C")  # [S, rows, H]
        off = np.subtract(target[:, None], light[LOAD][None], out=search)  # [S_i, S_j, rows, H]
        np.abs(off, out=off)
        nearest = off.min(1)  # [S_i, rows, H]
        i = nearest.argmin(0)  # [rows, H]: the first among ties, as torch's min
        best = nearest[i, rows_index, pairs_index]
        # the best partner of the chosen item: the first j among ties of its row of the
        # search (the torch search recomputes that row: the same float32 values)
        j = off[i, :, rows_index, pairs_index].argmin(-1)  # [rows, H]
        apply = best * best < half_gap * half_gap - threshold
        if going is not None:
            apply &= going[:, None]
        take_i = heavy[:, i, rows_index, pairs_index]  # [2, rows, H] the chosen items
        take_j = light[:, j, rows_index, pairs_index]
        apply &= ~((light[EXPERT] == take_i[EXPERT]) | (heavy[EXPERT] == take_j[EXPERT])).any(0)
        swapped = apply.any(1)
        moving = int(swapped.sum())
        if moving < rows:
            if idle is None:
                idle = np.zeros(rows, dtype=np.int64)
            idle += 1
            idle[swapped] = 0
            finished = idle >= len(cycle)
            count = int(finished.sum())
            if count:
                done, going = finished, ~finished
        else:
            idle = None
        if not moving:
            if count == rows:
                break
            continue
        heavy[:, i, rows_index, pairs_index] = np.where(apply, take_j, take_i)
        light[:, j, rows_index, pairs_index] = np.where(apply, take_i, take_j)
    return torch.from_numpy(host)
