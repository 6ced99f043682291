"""Checks on what users pass in: load tensors and topology arguments.

Every problem raises ``TypeError`` or ``ValueError`` with a message that names it;
nothing here asserts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["ACCEPTED_WEIGHT_TYPES", "as_weight", "check_gpu_vector"]

ACCEPTED_WEIGHT_TYPES = "torch.Tensor, numpy.ndarray or a nested list of numbers"


def as_weight(weight: object, name: str = "weight") -> tuple[torch.Tensor, bool]:
    """Validate a load tensor and return ``(weight [L, E] float, was_one_layer)``.

    Accepts ``[L, E]`` or ``[E]`` (one layer), any real or integer dtype, CPU or CUDA.
    The result is float64 for integer/float64 input and float32 otherwise, on the
    input's device. Raises on NaN, inf, negative loads, wrong rank or a non-tensor.
    """
    if isinstance(weight, torch.Tensor):
        tensor = weight
    elif isinstance(weight, np.ndarray):
        if weight.dtype.kind not in "biuf":
            raise TypeError(
                f"{name} has numpy dtype {weight.dtype}; expected a real or integer dtype"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(weight))
    elif isinstance(weight, Sequence) and not isinstance(weight, (str, bytes)):
        try:
            tensor = torch.as_tensor(np.asarray(weight, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name} is a list that is not a rectangular array of numbers: {exc}"
            ) from None
    else:
        raise TypeError(f"{name} must be a {ACCEPTED_WEIGHT_TYPES}; got {type(weight).__name__}")

    if tensor.is_complex():
        raise TypeError(
            f"{name} has complex dtype {tensor.dtype}; expected a real or integer dtype"
        )
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.int64)
    one_layer = tensor.dim() == 1
    if one_layer:
        tensor = tensor[None]
    if tensor.dim() != 2:
        raise ValueError(
            f"{name} must have shape [layers, experts] or [experts]; got {tensor.dim()} "
            f"dimensions {tuple(tensor.shape)}"
        )
    if tensor.shape[1] == 0:
        raise ValueError(f"{name} has no experts (shape {tuple(tensor.shape)})")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} has no layers (shape {tuple(tensor.shape)})")

    if tensor.is_floating_point():
        tensor = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    else:
        tensor = tensor.to(torch.float64)
    # one reduction pair and one sync for valid input: NaN makes the minimum NaN, ±inf
    # makes it -inf or the sum inf; only then (or on a float overflow of the sum) search
    lowest, total = torch.stack([tensor.amin(), tensor.sum()]).tolist()
    if not (lowest >= 0 and math.isfinite(total)):
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            layer, expert = (int(i) for i in (~finite).nonzero()[0])
            raise ValueError(
                f"{name}[{layer}, {expert}] is {float(tensor[layer, expert])}; loads must be finite"
            )
        negative = tensor < 0
        if bool(negative.any()):
            layer, expert = (int(i) for i in negative.nonzero()[0])
            raise ValueError(
                f"{name}[{layer}, {expert}] is {float(tensor[layer, expert])}; loads must be >= 0"
            )
    return tensor, one_layer


def check_gpu_vector(
    values: object, num_gpus: int, name: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Validate a per-GPU vector (``active_gpus`` or ``gpu_speed``) of length ``num_gpus``."""
    try:
        tensor = torch.as_tensor(values, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a sequence of {num_gpus} values: {exc}") from None
    if tensor.shape != (num_gpus,):
        raise ValueError(
            f"{name} must have shape [{num_gpus}] (one per GPU); got {tuple(tensor.shape)}"
        )
    tensor = tensor.to(dtype)
    if dtype.is_floating_point:
        bad = ~torch.isfinite(tensor) | (tensor <= 0)
        if bool(bad.any()):
            gpu = int(bad.nonzero()[0])
            raise ValueError(f"{name}[{gpu}] is {float(tensor[gpu])}; must be finite and > 0")
    return tensor
