"""A loads file's array of numbers (a tensor, an ndarray or nested JSON lists) as checked
``[T, L, E]`` float64 counts, every error naming the file.

Nested lists go through NumPy, which reads text (``"1e3"``) and booleans among numbers
as numbers; both are refused here. Booleans mixed with numbers survive NumPy's
conversion, so a JSON file whose text holds a ``true``/``false`` has its loads scanned
for one (``literals``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from eplb.core.inputs import as_counts, irregularity
from eplb.formats.errors import FormatError


def _first_bool(value: Any, at: tuple[int, ...] = ()) -> tuple[int, ...] | None:
    """The index of the first ``True``/``False`` in nested lists ``value`` (loads are at
    most 3-D: deeper nesting is left to the shape check), or ``None``."""
    if isinstance(value, bool):
        return at
    if isinstance(value, list) and len(at) < 3:
        for i, entry in enumerate(value):
            found = _first_bool(entry, (*at, i))
            if found is not None:
                return found
    return None


def unplain_kind(value: torch.Tensor) -> str | None:
    """``"quantized"``, ``"meta"`` or the layout of a tensor without plain strided data
    (which the readers' checks cannot read as numbers); ``None`` for a plain one."""
    return ("quantized" if value.is_quantized else "meta" if value.is_meta
            else None if value.layout == torch.strided else str(value.layout))


def to_tensor(value: Any, path: Path, what: str, literals: bool = False) -> torch.Tensor:
    """A number array (tensor, ndarray, nested list) as a tensor, or a FormatError.
    ``literals``: the JSON text held a ``true``/``false`` (scan ``value`` for one)."""
    if isinstance(value, torch.Tensor):
        kind = unplain_kind(value)
        if kind is not None:
            raise FormatError(path, f"{what} is a {kind} tensor; expected a plain tensor of "
                                    "numbers")
        value = value.detach().cpu()
        if value.dtype in (torch.uint16, torch.uint32, torch.uint64):
            # torch supports few operations on wide unsigned types ("max_all" not
            # implemented for UInt64; attacker pass): read as the NumPy array's are
            return to_tensor(value.numpy(), path, what)
        return value
    if isinstance(value, np.ndarray):
        if value.ndim == 0:  # (np.ascontiguousarray would make it [1])
            raise FormatError(path, "holds a single number; expected [experts] (one layer), "
                                    "[layers, experts] or [steps, layers, experts] loads")
        if value.dtype.kind not in "biuf":
            raise FormatError(path, f"{what} has dtype {value.dtype}; expected numbers")
        if value.dtype.byteorder == ">":  # big-endian files are fine: native order for torch
            value = value.astype(value.dtype.newbyteorder("="))
        if value.dtype.kind == "u" and value.dtype.itemsize > 1:
            # torch supports few operations on wide unsigned types: int64, or float64 (as
            # loads are read, and as a JSON file's such numbers are) where a value is 2**63
            # or more (refused here alone: a TensorRT-LLM rank file and eplb_rebalance read
            # them; attacker pass)
            wide = value.size and int(value.max()) >= 1 << 63
            value = value.astype(np.float64 if wide else np.int64)
        if value.dtype.kind == "f" and value.dtype.itemsize > 8:  # long double: no torch dtype
            with np.errstate(over="ignore"):  # beyond float64: inf, refused as a load
                value = value.astype(np.float64)
        return torch.from_numpy(np.ascontiguousarray(value))
    if literals:
        refuse_booleans(value, path, what)
    return torch.from_numpy(number_array(value, path, what))


def refuse_booleans(value: Any, path: Path, what: str) -> None:
    """FormatError naming the first JSON ``true``/``false`` in nested lists ``value``:
    NumPy reads one among numbers as 1 or 0 (a scan of every entry, so only for text
    that holds such a literal)."""
    where = _first_bool(value)
    if where is not None:
        index = "".join(f"[{i}]" for i in where)
        raise FormatError(path, f"{what}{index} is {str(_at(value, where)).lower()}, not a load")


def _at(value: Any, index: tuple[int, ...]) -> Any:
    for i in index:
        value = value[i]
    return value


def as_counts_of(value: Any, path: Path, what: str, literals: bool = False
                 ) -> torch.Tensor:
    """``[E]``, ``[L, E]`` or ``[T, L, E]`` numbers -> checked ``[T, L, E]`` float64, by the
    one load check (:func:`eplb.core.inputs.as_counts`), its errors naming the file."""
    tensor = to_tensor(value, path, what, literals)
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise FormatError(path, f"{what} has dtype {tensor.dtype}; expected real numbers")
    if tensor.dim() not in (1, 2, 3) or tensor.numel() == 0:
        raise FormatError(
            path,
            f"{what} has shape {tuple(tensor.shape)}; expected [experts] (one layer), "
            "[layers, experts] or [steps, layers, experts]",
        )
    while tensor.dim() < 3:
        tensor = tensor[None]
    try:
        return as_counts(tensor, what)
    except (TypeError, ValueError) as exc:
        raise FormatError(path, str(exc)) from None


def number_array(value: Any, path: Path, what: str) -> np.ndarray:
    """Nested lists of numbers as a float64 array; text, booleans, ragged rows, numbers
    beyond float64 and deep nesting are a FormatError naming ``what``."""
    try:
        array = np.asarray(value)
        # NumPy would read "1e3" as 1000.0 and true as 1: those are refused below
        numbers = None if array.dtype.kind in "USb" else array.astype(np.float64)
    except OverflowError:
        raise FormatError(
            path, f"{what} holds a number too large for a float64 load (over 1.8e308)"
        ) from None
    except RecursionError:
        raise FormatError(path, f"{what} is nested too deeply") from None
    except (TypeError, ValueError) as exc:  # ragged rows, None or objects among the numbers
        # where it goes wrong, in the file's terms (NumPy's text names its own internals:
        # "inhomogeneous shape after 1 dimensions", "float() argument ... not 'dict'")
        reason = irregularity(value) or str(exc)
        raise FormatError(path, f"{what} is not a rectangular array of numbers: {reason}"
                          ) from None
    if numbers is not None and array.dtype == object:
        # JSON null among the numbers: NumPy reads it as NaN, and the load check then
        # called it NaN, which the file does not hold (attacker pass)
        null = np.frompyfunc(lambda entry: entry is None, 1, 1)(array).astype(bool)
        if null.any():
            index = "".join(f"[{int(i)}]" for i in np.argwhere(null)[0])
            raise FormatError(path, f"{what}{index} is null, not a load")
    if numbers is None and array.dtype.kind == "b":  # JSON true/false: flags, not counts
        raise FormatError(path, f"{what} holds booleans where numbers belong; expected numbers")
    if numbers is None:
        raise FormatError(path, f"{what} holds text where numbers belong (a quoted number "
                                'such as "1" is text); expected numbers')
    return numbers
