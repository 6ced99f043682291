"""Row-wise stable orderings, fast on CPU.

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
        # non-negative float32 bit patterns order like the values (+ 0.0 turns −0.0 into 0.0)
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
