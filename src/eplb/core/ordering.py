"""Row-wise orderings that are the same on every machine, fast on CPU.

Torch's CPU sort costs 20–40 ns per element on rows of a few hundred, unless the branch
predictor has already seen the same data (microbenchmarks that re-sort one tensor flatter
it 3×). NumPy's SIMD sort of int64 is 2–4× faster there.
On CPU every key is packed with its position into one unique int64
(``key << 16 | position``), so any sort algorithm returns the stable order, and the
positions are read back from the low bits. Other devices, and rows longer than 2**16,
use torch. Both give the same order. (For rows of a few dozen, the conversions cost more
than they save: there torch's own argsort is the faster one.)
"""

from __future__ import annotations

import numpy as np
import torch

_POSITION_BITS = 16
_POSITION_MASK = (1 << _POSITION_BITS) - 1


def _packed_bits(keys: torch.Tensor) -> np.ndarray:
    """int64 keys that order like ``keys`` (non-negative; floats compared in float32)."""
    if keys.is_floating_point():
        # non-negative float32 bit patterns order like the values (+ 0.0 turns −0.0 into 0.0);
        # the keys are on the CPU (see _use_numpy): NumPy's cast rounds like torch's, at a
        # fraction of the cost of the torch calls
        plain = not (keys.is_neg() or keys.requires_grad)
        if plain and keys.dtype in (torch.float32, torch.float64):
            with np.errstate(over="ignore"):  # beyond float32: inf, as torch casts it
                single = keys.numpy().astype(np.float32)
            single += np.float32(0.0)
            return single.view(np.int32).astype(np.int64)
        return (keys.to(torch.float32) + 0.0).view(torch.int32).numpy().astype(np.int64)
    return keys.numpy().astype(np.int64)


def _use_numpy(keys: torch.Tensor) -> bool:
    return keys.device.type == "cpu" and keys.shape[1] <= 1 << _POSITION_BITS


def argsort_rows(keys: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """``[rows, n]`` stable argsort of ``keys [rows, n]`` along dim 1 (int64 indices).

    ``keys`` are non-negative: integers below ``2**32`` or floats. Floats are compared in
    float32, so values closer than float32 resolution count as ties (kept in position
    order); the planner only needs a heaviest-first order, not a bit-exact one.
    """
    if not _use_numpy(keys):
        if keys.is_floating_point():
            keys = keys.to(torch.float32)
        return torch.sort(keys, dim=1, descending=descending, stable=True).indices
    bits = _packed_bits(keys)
    if descending:
        bits = 0xFFFFFFFF - bits
    packed = (bits << _POSITION_BITS) | np.arange(keys.shape[1], dtype=np.int64)
    packed.sort(axis=1)
    return torch.from_numpy(packed & _POSITION_MASK)


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """``[..., k]`` indices of the ``k`` largest entries along the last axis, ascending;
    ties at the k-th value go to the lowest indices.

    ``np.argpartition`` would be faster, but which of several tied entries it returns
    depends on NumPy's SIMD dispatch (measured: AVX2 and AVX-512 machines disagree), and
    every EP rank must plan alike. The k-th value itself is the same everywhere, so it is
    taken by ``np.partition`` and the tie is settled by position (:func:`top_mask`).
    """
    n = values.shape[-1]
    if k >= n:
        return np.broadcast_to(np.arange(n), values.shape).copy()
    # positions of the flat nonzeros, in the same (C) order: np.nonzero of an N-D array
    # builds every axis' indices and costs about 3× more (300 vs 85 µs at [1, 94, 512])
    return (np.flatnonzero(top_mask(values, k)) % n).reshape(*values.shape[:-1], k)


def top_mask(values: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask, shaped like ``values [..., n]``, of the entries :func:`top_indices`
    returns (``k`` per row along the last axis; ties at the k-th value to the lowest
    indices), for callers that only count or sum what was chosen."""
    n = values.shape[-1]
    if k >= n:
        return np.ones(values.shape, bool)
    kth = np.partition(values, n - k, axis=-1)[..., n - k : n - k + 1]
    above = values > kth
    tied = values == kth
    chosen = above | tied
    # rows with more entries at the k-th value than places left: the lowest positions
    surplus = np.nonzero(chosen.sum(-1) > k)
    if len(surplus[0]):
        tied_rows = tied[surplus]
        need = k - above[surplus].sum(-1, keepdims=True)
        chosen[surplus] = above[surplus] | (tied_rows & (np.cumsum(tied_rows, -1) <= need))
    return chosen


def descending_order(values: np.ndarray) -> np.ndarray:
    """``[rows, n]`` positions of ``values [rows, n]`` (floats, no NaN) heaviest first, equal
    values by ascending position: the same order on every machine.

    ``np.argsort``'s default sort leaves ties in an order that depends on NumPy's SIMD
    dispatch (measured: a NumPy held to its baseline code and one using AVX2/AVX-512
    disagree), and its stable sort is 2.5–6× slower at these sizes. So the fast sort
    serves the rows without equal values (their order is unique), and only the rows with
    some re-sort stably.
    """
    order = np.argsort(-values, axis=1)
    ranked = np.take_along_axis(values, order, 1)
    tied = np.nonzero((ranked[:, 1:] == ranked[:, :-1]).any(1))[0]
    if len(tied):
        order[tied] = np.argsort(-values[tied], axis=1, kind="stable")
    return order


#: integer keys below this pack with a 16-bit position into one non-negative int64
_MAX_PACKED_INTEGER = 1 << (63 - _POSITION_BITS)


def sort_integers(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted, order)`` of ``values [..., n]`` along the last axis, ascending, equal
    values in position order: ``torch.sort(values, dim=-1, stable=True)``'s result.

    Where ``values`` are non-negative integers below ``2**47`` on a CPU (e.g. the float64
    sums of integer loads the incremental score sorts), each is packed with its position
    into a unique int64, which NumPy sorts 2–4× faster than torch's stable sort at
    ``[8, 58, 32]`` and ``[8, 232, 8]``. Other values (fractions, e.g. the realised loads
    nearest dispatch scores), and other devices, go to torch's sort.
    """
    n = values.shape[-1]
    host = values.numpy() if values.device.type == "cpu" else None
    if (host is None or n > 1 << _POSITION_BITS or not host.size
            or not 0 <= host.min() <= host.max() < _MAX_PACKED_INTEGER):
        return torch.sort(values, dim=-1, stable=True)
    whole = host.astype(np.int64)
    if not np.array_equal(whole, host):  # a fraction would be cut to a false tie
        return torch.sort(values, dim=-1, stable=True)
    packed = (whole << _POSITION_BITS) | np.arange(n, dtype=np.int64)
    packed.sort(axis=-1)
    order = torch.from_numpy(packed & _POSITION_MASK)
    return values.gather(-1, order), order
