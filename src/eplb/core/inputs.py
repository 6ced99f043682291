"""Checks on what users pass in: load tensors, per-step counts and per-GPU vectors.

This is the one place where loads are validated; every public entry point that takes
loads goes through :func:`as_weight` (``[L, E]``) or :func:`as_counts` (``[T, L, E]``).
Every problem raises ``TypeError`` or ``ValueError`` with a message that names it;
nothing here asserts.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import numpy as np
import torch

ACCEPTED_WEIGHT_TYPES = "torch.Tensor, numpy.ndarray or a nested list of numbers"

#: raw bytes, which Python and NumPy read as sequences of small ints: no numbers eplb
#: takes (``bytes`` was refused as loads while a ``bytearray`` was planned on as its byte
#: values). A ``memoryview`` is not one: it carries its element type, which NumPy reads.
_BYTE_STRINGS = (bytes, bytearray)


def refuse_byte_strings(value: object, name: str) -> None:
    """Raise ``TypeError`` when ``value`` is ``bytes``/``bytearray``, or a nested list
    holding one (as a row at any depth). Only the lists are visited, never the numbers
    in them: a row whose first entry is a number is a row of numbers (NumPy refuses a
    ragged one)."""
    found = type(value) if isinstance(value, _BYTE_STRINGS) else None
    stack = [value] if found is None and isinstance(value, (list, tuple)) else []
    while stack and found is None:
        seq = stack.pop()
        if not seq or not isinstance(seq[0], (*_BYTE_STRINGS, list, tuple)):
            continue
        for item in seq:
            if isinstance(item, _BYTE_STRINGS):
                found = type(item)
                break
            if isinstance(item, (list, tuple)):
                stack.append(item)
    if found is not None:
        where = "is" if isinstance(value, _BYTE_STRINGS) else "holds"
        raise TypeError(f"{name} {where} {found.__name__}: raw bytes, not numbers; pass a "
                        "tensor, array or list of numbers (numpy.frombuffer(data, dtype) "
                        "reads a binary buffer)")


class RepeatedKeyError(ValueError):
    """A JSON object gives one key twice (the key in ``key``)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} is given twice")
        self.key = key


def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` for ``json.loads``: the object as a dict, or
    :class:`RepeatedKeyError` for a key given twice. Python's JSON keeps the last of equal
    keys silently, so ``{"counts": A, …, "counts": B}`` was read as B alone."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise RepeatedKeyError(key)
        out[key] = value
    return out


#: what a JSON value that is not a number or a list is called in a message
_NOT_NUMBERS = {dict: "an object", str: "text", bytes: "bytes", type(None): "null",
                bool: "a boolean", np.bool_: "a boolean"}


def native_array(value: object) -> object:
    """``value`` made readable by ``torch.as_tensor`` when it is a NumPy array: torch
    refuses arrays with negative strides (``a[::-1]``) or non-native byte order (``>i8``)
    with its own message, where every load input here takes them, and warns of a
    read-only one (a caller running with ``-W error`` failed: attacker pass), which is
    copied. Else ``value``."""
    if isinstance(value, np.ndarray) and not isinstance(value, np.ma.MaskedArray):
        array = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("="), copy=False))
        return array if array.flags.writeable else array.copy()
    return value


def irregularity(value: object, limit: int = 1 << 20) -> str | None:
    """Where nested sequences ``value`` (lists, tuples, arrays: JSON or a Python caller's)
    stop being a rectangular array of numbers, the first place found level by level
    (``"[1] has 2 entries where [0] has 3"``, ``"[0] is an object, not a number"``); ``None``
    when nothing is found within ``limit`` entries or an entry is of a kind it does not
    judge (the caller then says what NumPy said)."""
    level: list[tuple[tuple[int, ...], object]] = [((), value)]
    seen = 0
    while level:
        first_list = first_number = None
        length = 0
        below: list[tuple[tuple[int, ...], object]] = []
        for where, item in level:
            at = "".join(f"[{i}]" for i in where) or "the top level"
            if isinstance(item, list | tuple | np.ndarray):
                if first_number is not None:
                    return f"{at} is a list where {first_number} is a number"
                if first_list is None:
                    first_list, length = at, len(item)
                elif len(item) != length:
                    return f"{at} has {len(item)} entries where {first_list} has {length}"
                below.extend(((*where, i), x) for i, x in enumerate(item))
            elif isinstance(item, numbers.Real) and not isinstance(item, bool | np.bool_):
                if first_list is not None:
                    return f"{at} is a number where {first_list} is a list"
                first_number = first_number or at
            else:
                kind = next((name for cls, name in _NOT_NUMBERS.items()
                             if isinstance(item, cls)), None)
                return None if kind is None else f"{at} is {kind}, not a number"
        seen += len(below)
        if seen > limit:
            return None
        level = below
    return None


def without_values(tensor: torch.Tensor) -> str | None:
    """What kind of tensor ``tensor`` is if it has a shape but no values to plan on (a
    meta tensor, or a fake one from torch's ``FakeTensorMode``, as tracing makes), else
    ``None``."""
    if tensor.is_meta:
        return "meta"
    # FakeTensor (torch._subclasses) carries its mode; reading one raised a bare
    # "RuntimeError: .numpy() is not supported for tensor subclasses" deep in the planner
    if getattr(tensor, "fake_mode", None) is not None:
        return "fake"
    return None


def refuse_without_values(value: object, name: str) -> None:
    """``TypeError`` naming ``name`` when ``value`` is a tensor with no values to read (a
    meta or fake tensor, :func:`without_values`), before any conversion reads it (they
    raised torch's own errors from deep inside: ``Cannot copy out of meta tensor``,
    ``DataDependentOutputException``). A nested or quantized tensor (no id map, mask or
    speeds is one) too: a map in force of either raised torch's internal errors (review)."""
    kind = without_values(value) if isinstance(value, torch.Tensor) else None
    if kind:
        raise TypeError(f"{name} is a {kind} tensor: it has a shape but no values")
    if isinstance(value, torch.Tensor) and (value.is_nested or value.is_quantized):
        raise TypeError(f"{name} is a {'nested' if value.is_nested else 'quantized'} "
                        "tensor; expected a plain dense one")


def refuse_non_dense(value: object, name: str) -> None:
    """:func:`refuse_without_values`, and ``TypeError`` naming ``name`` for a sparse
    tensor too. Loads are densified (:func:`_real_tensor`), but a mask or per-GPU vector
    ``[P]`` or an id map ``[L, R]`` has no zeros to leave out, and torch's ops on a sparse
    one failed deep inside with its own text ("Could not run 'aten::all' with arguments
    from the 'SparseCPU' backend")."""
    refuse_without_values(value, name)
    if isinstance(value, torch.Tensor) and value.layout != torch.strided:
        raise TypeError(f"{name} is a {value.layout} tensor; expected a dense one "
                        "(.to_dense() gives it)")


def _real_tensor(value: object, name: str, what: str) -> torch.Tensor:
    """``value`` as a dense real (or integer) tensor on its own device; bools become int64."""
    if isinstance(value, torch.Tensor):
        tensor = value
        if tensor.is_nested:
            raise TypeError(f"{name} is a nested tensor; expected a dense [layers, experts] "
                            f"tensor (torch.nested.to_padded_tensor makes one)")
        if tensor.is_quantized:
            raise TypeError(f"{name} is a quantized tensor ({tensor.dtype}); expected real "
                            f"loads (tensor.dequantize() gives them)")
    elif isinstance(value, np.ndarray):
        if isinstance(value, np.ma.MaskedArray):
            raise TypeError(f"{name} is a masked array: its masked entries would be planned "
                            f"on; fill them (a.filled(0)) or drop them first")
        if value.dtype.kind not in "biuf":
            raise TypeError(
                f"{name} has numpy dtype {value.dtype}; expected a real or integer dtype"
            )
        if value.dtype.kind == "f" and value.dtype.itemsize > 8:
            raise TypeError(f"{name} has numpy dtype {value.dtype} (extended precision); "
                            f"convert it to float64")
        # torch reads native byte order only: a big-endian array is converted here
        tensor = torch.from_numpy(native_array(value))
    elif isinstance(value, Sequence) and not isinstance(value, str):
        refuse_byte_strings(value, name)
        what_list = f"{name} is a list that is not a rectangular array of numbers"
        try:
            raw = np.asarray(value)
            # NumPy would parse text ("1") as a number: only numbers are loads (ints too
            # large for int64 come as objects and convert to float64 below)
            text = raw.dtype.kind in "USV" or (raw.dtype.kind == "O" and any(
                isinstance(x, (str, bytes)) for x in raw.ravel()))
            if not text:
                tensor = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError, OverflowError) as exc:
            # where, in the caller's terms, when it can tell (NumPy's text names its own
            # internals: "inhomogeneous shape after 1 dimensions")
            raise TypeError(f"{what_list}: {irregularity(value) or exc}") from None
        if text:
            raise TypeError(f"{what_list}: it holds text ({raw.dtype})")
    else:
        # a file name is a likely slip (the CLI takes files): say which reader takes it
        hint = ("; a file is read with eplb.formats.read_loads(path), which returns a "
                "LoadTrace (its .total() is the [L, E] sum of its steps)"
                if isinstance(value, (str, os.PathLike)) else "")
        raise TypeError(f"{name} must be {what}; got {type(value).__name__}{hint}")
    refuse_without_values(tensor, name)
    if tensor.layout != torch.strided:
        # sparse loads are legal input; the planner works on dense [L, E] rows
        tensor = tensor.to_dense()
    if tensor.is_complex():
        raise TypeError(
            f"{name} has complex dtype {tensor.dtype}; expected a real or integer dtype"
        )
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.int64)
    elif tensor.dtype in (torch.uint16, torch.uint32):
        # torch has no max/min for these (NumPy arrays of them arrive so): int64 is exact
        tensor = tensor.to(torch.int64)
    elif tensor.dtype == torch.uint64:
        # beyond int64's range: as float64, the planner's own type for integer loads
        tensor = tensor.to(torch.float64)
    return tensor.detach()


def first_bad_load(loads: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first NaN, infinite or negative entry of ``loads`` (any shape), or
    ``None``.

    The common all-good case costs one min/max pass and one host sync, and no temporary
    (``torch.isfinite`` on a multi-GB float64 trace would copy it).
    """
    if loads.numel() == 0 or loads.dtype in (torch.uint16, torch.uint32, torch.uint64):
        return None  # (torch has no min/max for these; no entry is negative or NaN)
    if loads.is_floating_point() and loads.element_size() == 1:
        loads = loads.to(torch.float32)  # float8: exact, and min/max exist for it
    lo, hi = (float(x) for x in torch.aminmax(loads))  # NaN propagates through min/max
    if math.isfinite(lo) and math.isfinite(hi) and lo >= 0:
        return None
    bad = ~torch.isfinite(loads) | (loads < 0)
    return tuple(int(i) for i in bad.nonzero()[0])


#: what each index of a load tensor counts, by its number of dimensions
_LOAD_AXES = {1: ("expert",), 2: ("layer", "expert"), 3: ("step", "layer", "expert")}


def check_loads(tensor: torch.Tensor, name: str) -> None:
    """``ValueError`` naming the first NaN, infinite or negative entry of ``tensor`` (any
    shape; ``name[i, j]`` with its step, layer and expert where it has those axes), and
    ``TypeError`` for a complex tensor (a raw torch error before: attacker pass)."""
    if tensor.is_complex():
        raise TypeError(f"{name} has complex dtype {tensor.dtype}; expected a real or "
                        "integer dtype")
    bad = first_bad_load(tensor)
    if bad is not None:
        index = ", ".join(str(i) for i in bad)
        axes = _LOAD_AXES.get(len(bad))
        where = "" if axes is None else " (" + ", ".join(
            f"{axis} {i}" for axis, i in zip(axes, bad, strict=True)) + ")"
        value = float(tensor[bad])
        # a number beyond float64's range reads as inf (a 5,000-digit count, JSON's 1e400):
        # "is inf" alone named a value the file does not hold (attacker pass)
        beyond = (" (infinite, or a number too large for a 64-bit float in the input)"
                  if math.isinf(value) else "")
        raise ValueError(f"{name}[{index}]{where} is {value}{beyond}; loads must be "
                         "finite and >= 0")


def _float(tensor: torch.Tensor) -> torch.Tensor:
    """float64, into which every integer and float dtype converts exactly: the same loads
    give the same plans and bounds whatever dtype they come in (an engine hands int32, a
    dump float64, a user float32)."""
    return tensor.to(torch.float64)


def scale_free(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (any shape, float64) times one power of two when its largest load is beyond
    2**±900, so that sums of huge loads (1e305) stay finite and tiny ones do not vanish;
    else unchanged. Exact: ratios such as balancedness are unchanged."""
    weight = weight.to(torch.float64)
    peak = float(weight.max()) if weight.numel() else 0.0
    if peak > 2.0**900 or 0 < peak < 2.0**-900:
        shift = -math.frexp(peak)[1]
        # two factors: one power of two beyond ±1022 would overflow or be subnormal
        weight = weight * 2.0 ** (shift // 2) * 2.0 ** (shift - shift // 2)
    return weight


def _host_array(tensor: torch.Tensor) -> np.ndarray | None:
    """``tensor``'s memory as a NumPy array when it is a plain CPU tensor, else ``None``.

    Small planning problems pay per array call: a NumPy call costs a fraction of a torch
    call, so the checks and the row scaling read CPU loads through NumPy (same values,
    same decisions); other devices, and tensors NumPy cannot view (a lazily negated
    view, autograd's storage-less zero tensors), keep the torch path.
    """
    if (tensor.device.type != "cpu" or tensor.is_neg() or tensor.requires_grad
            or tensor._is_zerotensor()):
        return None
    return tensor.numpy()


def _lowest_and_total(tensor: torch.Tensor) -> tuple[float, float]:
    """``(min, sum)`` of a float tensor. They decide only whether to search for a bad
    entry, so a sum that overflows on one path and not the other changes no outcome (the
    search then finds no bad entry and returns)."""
    array = _host_array(tensor)
    if array is None:
        lowest, total = torch.stack([tensor.amin(), tensor.sum()]).tolist()
        return lowest, total
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are reported later
        return float(array.min()), float(array.sum())


def as_weight(weight: object, name: str = "weight") -> tuple[torch.Tensor, bool]:
    """Validate a load tensor and return ``(weight [L, E] float, was_one_layer)``.

    Accepts ``[L, E]`` or ``[E]`` (one layer), any real or integer dtype, dense or sparse,
    CPU or CUDA. The result is float64 (exact for every dtype), on the input's device.
    Raises on NaN, inf, negative loads, wrong rank, no data (meta tensors) or a
    non-tensor.
    """
    tensor = _real_tensor(weight, name, f"a {ACCEPTED_WEIGHT_TYPES}")
    one_layer = tensor.dim() == 1
    if one_layer:
        tensor = tensor[None]
    if tensor.dim() != 2:
        raise ValueError(
            f"{name} must have shape [layers, experts] or [experts]; got {tensor.dim()} "
            f"dimensions {tuple(tensor.shape)}"
            + ("; a [steps, layers, experts] trace is planned on its steps summed "
               "(.sum(0), or a LoadTrace's .total())" if tensor.dim() == 3 else "")
        )
    if tensor.shape[1] == 0:
        raise ValueError(f"{name} has no experts (shape {tuple(tensor.shape)})")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} has no layers (shape {tuple(tensor.shape)})")
    tensor = _float(tensor)
    # one reduction pair and one sync for valid input: NaN makes the minimum NaN, ±inf
    # makes it -inf or the sum inf; only then (or on a float overflow of the sum) search
    lowest, total = _lowest_and_total(tensor)
    if not (lowest >= 0 and math.isfinite(total)):
        check_loads(tensor, name)
    return tensor, one_layer


def as_counts(
    counts: object,
    name: str = "counts",
    *,
    compact: bool = False,
    what: str = "a tensor, array or nested list of counts [T, L, E]",
) -> torch.Tensor:
    """Validate per-step counts and return them as a float ``[T, L, E]`` tensor.

    Accepts a tensor, array or nested list ``[T, L, E]``, or ``[L, E]`` for one step.
    The result is float64, or with ``compact`` (long traces are large) float32 when that
    is exact: float32 input, and integer input whose every count is below 2**24; float64
    input is never narrowed. Raises on NaN/inf, negative counts, a wrong number of
    dimensions or an empty history; ``what`` describes the accepted types in the message.
    """
    tensor = _real_tensor(counts, name, what)
    if tensor.dim() == 2:
        tensor = tensor[None]
    if tensor.dim() != 3:
        raise ValueError(
            f"{name} must have shape [steps, layers, experts] (or [layers, experts] for one "
            f"step); got {tensor.dim()} dimensions {tuple(tensor.shape)}"
        )
    if 0 in tensor.shape:
        raise ValueError(f"{name} is empty: shape {tuple(tensor.shape)}")
    if not compact:
        tensor = tensor.to(torch.float64)
    elif not tensor.is_floating_point():
        exact = int(tensor.max()) < 2**24
        tensor = tensor.to(torch.float32 if exact else torch.float64)
    elif tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)
    check_loads(tensor, name)
    return tensor


def as_live_mask(active_gpus: object, num_gpus: int, device: torch.device) -> torch.Tensor:
    """``[P]`` bool live-GPU mask from a boolean mask of length ``num_gpus``.

    Only booleans are accepted: a list of integers is ambiguous (``[0, 1, 2, 3]`` could
    be GPU ids or a 0/1 mask), so it is refused with a message saying how to build a mask.
    """
    refuse_byte_strings(active_gpus, "active_gpus")  # as every other input: raw bytes
    refuse_non_dense(active_gpus, "active_gpus")
    try:
        tensor = torch.as_tensor(native_array(active_gpus), device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"active_gpus must be a boolean mask of {num_gpus} values: {exc}") from None
    if tensor.dtype != torch.bool:
        raise TypeError(
            f"active_gpus must be a boolean mask with one entry per GPU (True = live); got "
            f"dtype {tensor.dtype}. To mark GPUs dead by id, build the mask: "
            f"live = torch.ones({num_gpus}, dtype=torch.bool); live[dead_ids] = False"
        )
    if tensor.shape != (num_gpus,):
        raise ValueError(
            f"active_gpus must have shape [{num_gpus}] (one per GPU); got {tuple(tensor.shape)}"
        )
    if not bool(tensor.any()):
        raise ValueError("active_gpus marks every GPU dead; at least one must be live")
    return tensor.clone()  # a copy: the caller's mask, changed in place, changed the plan's


def as_gpu_speed(
    gpu_speed: object,
    num_gpus: int,
    device: torch.device,
    *,
    name: str = "gpu_speed",
    allow_zero: bool = False,
    per: str = "GPU",
) -> torch.Tensor:
    """``[P]`` float64 per-GPU values (speeds: each finite and > 0; with ``allow_zero``,
    e.g. token sources: >= 0 and not all zero); ``per``: what an entry is for, in the
    messages (e.g. ``"node"`` for ``[N]`` node shares)."""
    refuse_byte_strings(gpu_speed, name)
    refuse_non_dense(gpu_speed, name)
    try:
        if isinstance(gpu_speed, torch.Tensor):
            tensor = gpu_speed.to(device)
        else:
            # lists and arrays in float64 (torch would read a list as float32: 1e300 as
            # inf, 1e-50 as 0); bools and complex numbers are refused below
            array = np.asarray(gpu_speed)
            if array.dtype.kind in "iuf":
                array = array.astype(np.float64)
            tensor = torch.as_tensor(array, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a sequence of {num_gpus} numbers: {exc}") from None
    if tensor.shape != (num_gpus,):
        raise ValueError(
            f"{name} must have shape [{num_gpus}] (one per {per}); got {tuple(tensor.shape)}"
        )
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected real numbers")
    tensor = tensor.to(torch.float64)
    bad = ~torch.isfinite(tensor) | ((tensor < 0) if allow_zero else (tensor <= 0))
    if bool(bad.any()):
        gpu = int(bad.nonzero()[0])
        rule = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}[{gpu}] is {float(tensor[gpu])}; must be finite and {rule}")
    if allow_zero and not bool((tensor > 0).any()):
        raise ValueError(f"{name} is all zero")
    if not bool(torch.isfinite(tensor.sum())):  # e.g. 32 × 1e308: the mean speed is inf
        raise ValueError(f"{name} sums beyond float64's range (largest {float(tensor.max()):g}); "
                         "only the ratios matter: give relative values, e.g. 1 and 2")
    return tensor


def refuse_overflowed_sum(total: torch.Tensor, parts: torch.Tensor, what: str,
                          steps: int) -> torch.Tensor:
    """``total``, a sum of ``steps`` finite-checked ``parts``, or ``ValueError`` where finite
    parts summed to infinity: the loads check would then blame one entry, which the input
    does not hold, for what the sum did (attacker passes)."""
    if (total.is_floating_point() and not bool(torch.isfinite(total).all())
            and bool(torch.isfinite(parts).all())):
        raise ValueError(f"{what} summed over {steps} steps: the sum overflows "
                         f"{str(total.dtype).removeprefix('torch.')} (largest entry "
                         f"{float(parts.max()):.3g}); scale them down")
    return total


def uniform_where_empty(weight: torch.Tensor, empty: torch.Tensor | None = None) -> torch.Tensor:
    """``weight [rows, E]`` with every all-zero row (``empty [rows]``, computed when not
    given) replaced by ones.

    A row with no load (a dense layer in a real dump, or a node whose experts saw no
    tokens) has every placement equally balanced; planning it as uniform spreads its
    replicas evenly instead of leaving ties to chance.
    """
    if empty is None:
        empty = weight.sum(1) <= 0
    return torch.where(empty[:, None], torch.ones_like(weight), weight)


def scale_rows_to_unit(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [rows, E]`` with each row scaled by a power of two so its largest entry
    lies in ``[1, 2)`` (an all-zero row stays zero), and ``[rows]`` those powers
    (``shift``: the result is ``weight · 2**shift``).

    Multiplying by a power of two is exact in floating point, so every ratio, comparison
    and sum the planner forms changes by the same exact factor and no decision changes;
    but loads of 1e37 (float32) or 1e305 (float64) no longer overflow when summed.
    """
    _, exponent = torch.frexp(weight.amax(1, keepdim=True))
    return torch.ldexp(weight, 1 - exponent), (1 - exponent[:, 0]).to(torch.int64)


def planning_rows(weight: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(planning weight, idle, shift)``: ``weight [rows, E]`` (valid loads, as from
    :func:`as_weight`) with every all-zero row planned as uniform
    (:func:`uniform_where_empty`) and every row scaled by a power of two
    (:func:`scale_rows_to_unit`); ``idle [rows]`` bool marks the all-zero rows, ``None``
    when there is none; ``shift [rows]`` int64 the powers (the planning row is the load
    row times ``2**shift``), which say how loaded the layers are against each other.

    On the CPU the same steps run in NumPy (bit for bit: the all-zero test is exact for
    non-negative loads, ``frexp`` and ``ldexp`` are exact), a few times cheaper than the
    torch calls at small shapes. Loads with a row whose largest load is below ``2**-998``
    keep the torch path (that row's scale factor would not be a finite float64).
    """
    array = _host_array(weight)
    if array is not None:
        with np.errstate(over="ignore"):  # a sum of huge loads may overflow: still > 0
            idle = array.sum(1) <= 0
        any_idle = bool(idle.any())
        if any_idle:
            array = np.where(idle[:, None], array.dtype.type(1), array)
        _, exponent = np.frexp(array.max(1, keepdims=True))
        if int(exponent.min()) > -998:
            idle_rows = torch.from_numpy(idle) if any_idle else None
            shift = torch.from_numpy((1 - exponent[:, 0]).astype(np.int64))
            return torch.from_numpy(np.ldexp(array, 1 - exponent)), idle_rows, shift
    idle_t = weight.sum(1) <= 0
    planning, shift = scale_rows_to_unit(uniform_where_empty(weight, idle_t))
    return planning, idle_t if bool(idle_t.any()) else None, shift.cpu()


def as_seed(seed: object) -> int:
    """``seed`` as an int (Python or NumPy integers), else ``TypeError``; outside what
    torch's generator takes, ``ValueError``."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not -(2**63) <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [-2**63, 2**64), got {int(seed)}")
    return int(seed)
