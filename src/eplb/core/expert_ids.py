"""Checks on inputs that hold expert ids: top-k routing traces and maps in force.

Loads, masks and speeds are checked in :mod:`eplb.core.inputs`; these take integer
expert ids instead (a routing trace ``[T, L, k]``, a placement in force ``[L, R]``), and
raise ``TypeError`` or ``ValueError`` naming what is wrong, as those do.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from eplb.core.inputs import (
    native_array,
    refuse_byte_strings,
    refuse_non_dense,
    without_values,
)


def as_routing(
    routing: object, num_layers: int | None, num_experts: int | None
) -> torch.Tensor:
    """``[T, L, k]`` int64 top-k expert ids of recorded tokens, each in ``[0, E)`` or
    padding (``< 0``, :func:`require_ids_below`; ``None``: the layer or expert count is
    not known yet and not checked)."""
    if isinstance(routing, torch.Tensor):
        tensor = routing
    else:
        refuse_byte_strings(routing, "routing")
        try:
            tensor = torch.as_tensor(native_array(np.asarray(routing)))
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise TypeError(f"routing must be integer top-k ids [T, L, k] (a tensor or "
                            f"array), got {type(routing).__name__}: {exc}") from None
    # (a nested or quantized one too, as previous= is: a nested trace raised torch's
    # "NestedTensorImpl doesn't support sizes" from the shape check below)
    kind = without_values(tensor) or ("nested" if tensor.is_nested else "quantized"
                                      if tensor.is_quantized else None)
    if kind or tensor.layout != torch.strided:
        raise TypeError(f"routing must be a dense tensor with data, got a "
                        f"{kind or tensor.layout} tensor")
    require_integer_ids(tensor, "routing")
    layers_ok = num_layers is None or (tensor.dim() == 3 and tensor.shape[1] == num_layers)
    if tensor.dim() != 3 or not layers_ok or 0 in tensor.shape:
        layers = "L" if num_layers is None else num_layers
        raise ValueError(
            f"routing must have shape [tokens, {layers} layers, top-k]; got "
            f"{tuple(tensor.shape)}"
        )
    tensor = tensor.detach().cpu().to(torch.int64)
    require_ids_below(tensor, num_experts, "routing")
    return tensor


def as_topk_ids(ids: object, num_layers: int, num_experts: int, name: str = "ids",
                any_tokens: bool = True) -> torch.Tensor:
    """``[T, L, k]`` int64 top-k ids ``ids`` (``name`` in the messages), checked: dense
    integer ids of ``num_layers`` layers, none at or above ``num_experts`` (below 0:
    padding, :func:`require_ids_below`), distinct in a row; with ``any_tokens``, some token
    with an expert (without: a replay step may hold no token, or padding only)."""
    if ids is None or not hasattr(ids, "__len__"):
        raise TypeError(f"{name} must be integer top-k ids [T, {num_layers}, k] (a tensor or "
                        f"array), got {type(ids).__name__}")
    refuse_non_dense(ids, name)
    try:
        ids = torch.as_tensor(ids)
    except (TypeError, RuntimeError, ValueError) as exc:  # e.g. ragged lists
        raise TypeError(f"{name} must be integer top-k ids [T, {num_layers}, k], got "
                        f"{type(ids).__name__} ({exc})") from None
    require_integer_ids(ids, name)
    if ids.dim() != 3 or ids.shape[1] != num_layers:
        raise ValueError(f"{name} must be integer top-k ids [T, {num_layers}, k], "
                         f"got {ids.dtype} {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    if ids.numel() == 0:
        if any_tokens:
            raise ValueError(f"{name} hold no tokens (shape {tuple(ids.shape)})")
        return ids
    if any_tokens or int(ids.max()) >= 0:
        require_ids_below(ids, num_experts, name)
    require_distinct_topk(ids, name)
    return ids


def require_ids_below(ids: torch.Tensor, num_experts: int | None, name: str) -> None:
    """``ValueError`` naming ``name`` unless the top-k ids ``ids [T, L, k]`` lie below
    ``num_experts`` (``None``: not known, not checked) and name at least one expert.

    Ids below 0 are padding, as the trace readers count them (:mod:`eplb.formats`): SGLang
    sets the ids of the padded tokens of a batch to -1. A padded entry is no expert, and a
    token whose row in a layer is all padding is no token of that layer.
    """
    hi = int(ids.max())
    if hi < 0:
        raise ValueError(f"{name} names no expert: every id is padding (< 0)")
    if num_experts is not None and hi >= num_experts:
        raise ValueError(f"{name} names expert {hi}, outside [0, {num_experts}) (ids below 0 "
                         "are padding)")


def padding_mask(ids: torch.Tensor) -> torch.Tensor | None:
    """``[T, L, k]`` bool, the real entries of top-k ids (not padding, ``< 0``); ``None``
    where every entry is real, so that callers keep their plain path there."""
    real = ids >= 0
    return None if bool(real.all()) else real


def require_distinct_topk(ids: torch.Tensor, name: str) -> None:
    """``ValueError`` naming the first token of ``ids [T, L, k]`` whose top-k row names
    an expert twice: a router's top-k never does, and the co-selection and traffic
    figures would count that expert twice."""
    if ids.shape[2] < 2:
        return
    ordered = ids.sort(2).values
    # padding (< 0) may repeat: SGLang pads a whole row with -1
    twice = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(2)  # [T, L]
    if bool(twice.any()):
        token, layer = (int(x) for x in twice.nonzero()[0])
        raise ValueError(f"{name}: token {token} names an expert twice in layer {layer} "
                         f"(top-k {ids[token, layer].tolist()}); a top-k row holds distinct "
                         "experts")


def require_integer_ids(tensor: torch.Tensor, name: str) -> None:
    """``TypeError`` naming ``name`` unless ``tensor`` (any shape) holds integer expert ids (not
    floating, complex or boolean values, which a cast would silently turn into ids)."""
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer expert ids, got {tensor.dtype}")


def as_old_map(value: object, shape: tuple[int, int], num_experts: int,
               shape_hint: str = "") -> torch.Tensor:
    """A placement in force given as a raw phy2log (a one-layer ``[R]`` read as ``[1, R]``),
    checked as ``eplb.plan(previous=)`` and ``Placement.moved_slots`` both need it: a dense
    ``shape`` of integer expert ids in ``[-1, num_experts)``; ``TypeError`` or
    ``ValueError`` naming what is wrong (``shape_hint`` ends the shape message). Returns it
    as a host int64 tensor."""
    old = value
    if isinstance(old, (str, os.PathLike)):
        # NumPy would read the name as a 0-d text array, and the message named its dtypes
        raise TypeError(f"previous must be a Placement or a phy2log tensor [L, R], got a "
                        f"{type(old).__name__} ({str(old)!r}); to plan from a placement "
                        "file, read it first: eplb.formats.read_placement(path) (an SGLang "
                        "file also needs num_gpus=)")
    if not isinstance(old, torch.Tensor):
        refuse_byte_strings(old, "previous")
        try:
            old = torch.as_tensor(native_array(np.asarray(old)))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"previous must be a Placement or a phy2log tensor [L, R]: {exc}"
            ) from None
    kind = without_values(old) or ("nested" if old.is_nested else "quantized"
                                    if old.is_quantized else None)
    if kind or old.layout != torch.strided:
        raise TypeError(f"previous must be a dense tensor with data, got a "
                        f"{kind or old.layout} tensor")
    given_shape = tuple(old.shape)  # as the caller passed it, for the message
    if old.dim() == 1:
        old = old[None]
    if tuple(old.shape) != tuple(shape):
        raise ValueError(f"previous placement has shape {given_shape}, expected [{shape[0]}, "
                         f"{shape[1]}] (layers, slots){shape_hint}")
    require_integer_ids(old, "previous phy2log")
    if not old.dtype.is_signed:  # unsigned ids: compare before int64 could wrap them to -1
        ids = old.detach().cpu().numpy()
        if ids.size and int(ids.max()) >= num_experts:
            raise ValueError(f"previous placement holds expert ids outside [-1, "
                             f"{num_experts})")
    old = old.detach().cpu().to(torch.int64)
    if bool(((old < -1) | (old >= num_experts)).any()):
        raise ValueError(f"previous placement holds expert ids outside [-1, {num_experts})")
    return old


def engine_old_map(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """An engine's placement in force ``ids [L, R]`` (integer, checked) as an int64 host
    map for ``previous=``: an entry outside ``[0, num_experts)`` (vLLM marks the slots of
    GPUs it is adding with -1) is an empty slot, -1, which the forced moves fill.

    Per entry, so a layer's plan does not depend on another layer's map: the engine
    plugins used to plan every layer from scratch when any entry of any layer was -1
    (attacker pass: layers 1 and 2 then moved 18 and 21 of 24 slots instead of 12 and 10
    for a -1 in layer 0)."""
    ids = ids.detach().to("cpu", torch.int64)
    return torch.where((ids >= 0) & (ids < num_experts), ids, -1)
