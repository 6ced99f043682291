"""Named arrays: choosing one by ``key=`` / ``--key`` in a flat container (``.npz``,
``.pt``, ``.safetensors``) or in nested JSON objects.

A JSON loads file may hold several arrays at any depth, e.g. one record per model and
dataset: ``{"olmoe": {"expert_counts": {"arxiv": {"layers": [...], "counts": [[...]]}}}}``.
An array is named by its path with ``/`` between keys (``olmoe/expert_counts/arxiv``); a
record with a ``counts`` array (and optionally ``layers`` or ``layer_ids``, the model
layer of each row) is read as one array with those layer ids.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import numpy as np

from eplb.core.trace import model_layer_ids
from eplb.formats.errors import FormatError, shown

SEPARATOR = "/"
#: deeper objects (JSON, or dicts in a .pt file) are not searched for arrays
MAX_ARRAY_DEPTH = 8
_SHOWN = 12  # names listed in an error message


#: the fields of a count record that hold its layer ids (the same thing)
ID_FIELDS = ("layers", "layer_ids")
_RECORD_FIELDS = {"counts", *ID_FIELDS}


#: what a parsed JSON array is: a list, or the float64 ``ndarray`` of a streamed array of
#: arrays (``formats._json``)
_ARRAYS = (list, np.ndarray)


def _is_record(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("counts"), _ARRAYS)


def array_names(obj: dict[str, Any]) -> list[str]:
    """Paths of the arrays (lists) and count records inside ``obj``, outermost first."""
    return [name for name, _ in _array_paths(obj)]


def _array_paths(obj: dict[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """``(name, keys)`` of every array and count record inside ``obj``, outermost first:
    its name (the keys joined by :data:`SEPARATOR`) and the keys that reach it."""
    found: list[tuple[str, tuple[str, ...]]] = []

    def walk(node: dict[str, Any], keys: tuple[str, ...], depth: int) -> None:
        for key, value in node.items():
            if isinstance(value, _ARRAYS) or _is_record(value):
                found.append((SEPARATOR.join((*keys, key)), (*keys, key)))
            elif isinstance(value, dict) and depth < MAX_ARRAY_DEPTH:
                walk(value, (*keys, key), depth + 1)

    walk(obj, (), 0)
    return found


def _close(key: str, names: list[str]) -> str:
    """`` did you mean 'x'?`` for a mistyped key, or nothing."""
    near = [n for n in names if n.startswith(key)][:3] or difflib.get_close_matches(
        key, names, n=3, cutoff=0.8)
    return f" did you mean {', '.join(map(repr, near))}?" if near else ""


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", … ({len(names)} in all)" if len(names) > _SHOWN else "")


def pick_array(
    obj: dict[str, Any], path: Path, key: str | None
) -> tuple[str, Any, list[Any] | None]:
    """``(name, array, layer ids or None)`` of the array ``key`` names in ``obj`` (the only
    one when ``key`` is ``None``). Raises :class:`FormatError` listing the names."""
    if _is_record(obj) and set(obj) <= _RECORD_FIELDS:
        # the whole file is one count record: {"counts": [...], "layers": [...]}
        if key not in (None, "counts"):
            raise FormatError(path, f"is one count record (counts and their layer ids), so "
                                    f"key {key!r} (--key) picks nothing; leave it out")
        return "counts", obj["counts"], obj.get("layer_ids", obj.get("layers"))
    paths = _array_paths(obj)
    names = [name for name, _ in paths]
    if key is None:
        if not names:
            raise FormatError(path, "holds no array of numbers (objects keyed by numbers, "
                                    "such as {\"1\": {\"0\": 0.01}}, are not arrays); "
                                    "expected one [L, E] or [T, L, E] array")
        if len(names) != 1:
            raise FormatError(
                path,
                f"holds {len(names)} arrays ({_listing(names)}); expected one [L, E] or "
                f"[T, L, E] array: choose one with key= (CLI: --key NAME, nested names "
                f"joined by '{SEPARATOR}'), or several of one shape to read them one after "
                f"another as steps (CLI: --key A,B)",
            )
        key = names[0]
    # the arrays are found by their keys, not by splitting the name: a key may hold the
    # separator itself ({"a/b": {"c": ...}} was unreadable, its suggested name failing),
    # and two arrays whose names read alike are refused, not one picked (attacker pass)
    reach = [keys for name, keys in paths if name == key]
    if len(reach) > 1:
        alike = " and ".join(" → ".join(map(repr, keys)) for keys in reach)
        raise FormatError(path, f"{len(reach)} arrays are named {key!r} (a key holding "
                                f"{SEPARATOR!r}: {alike}); rename one")
    value: Any = obj
    for part in reach[0] if reach else key.split(SEPARATOR) if key not in obj else [key]:
        if not isinstance(value, dict) or part not in value:
            raise FormatError(path, f"has no array {key!r} (key / --key);"
                                    f"{_close(key, names)} it holds {_listing(names)}")
        value = value[part]
    if _is_record(value):
        return key, value["counts"], value.get("layer_ids", value.get("layers"))
    if isinstance(value, dict):
        inner = [f"{key}{SEPARATOR}{name}" for name in array_names(value)]
        raise FormatError(path, f"{key!r} is an object, not an array; it holds "
                                f"{_listing(inner) or 'no arrays'}")
    return key, value, None


def record_layer_ids(ids: Any, rows: int, path: Path, name: str) -> list[int] | None:
    """The model layer ids of a JSON count record, checked against its ``rows`` (the one
    rule, :func:`eplb.core.trace.model_layer_ids`)."""
    if ids is None:
        return None
    if not isinstance(ids, list):
        raise FormatError(path, f"{name}: its layer ids must be a list, got {shown(ids)}")
    try:
        return model_layer_ids(ids, rows, name)
    except ValueError as exc:
        raise FormatError(path, str(exc)) from None


def check_keys(path: Path, keys: list[str] | None, names: list[str]) -> None:
    missing = [k for k in keys or () if k not in names]
    if missing:
        raise FormatError(path, f"has no array {missing[0]!r} (key / --key);"
                                f"{_close(missing[0], names)} it holds {names}")


def pick_flat(arrays: dict[str, Any], path: Path, key: str | None) -> tuple[str, Any]:
    if key is not None:
        if key not in arrays:
            raise FormatError(
                path, f"has no array {key!r} (key / --key);{_close(key, sorted(arrays))} "
                      f"it holds {sorted(arrays)}"
            )
        return key, arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.items()))
    raise FormatError(
        path,
        f"holds {len(arrays)} arrays {shown(sorted(arrays))}; expected one [L, E] or "
        "[T, L, E] array: choose one with key= (CLI: --key NAME), or several of one shape "
        "to read them one after another as steps (CLI: --key A,B)",
    )
