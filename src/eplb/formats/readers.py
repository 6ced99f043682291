"""``read_loads``: every engine's load statistics into one :class:`LoadTrace`."""

from __future__ import annotations

import hashlib
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eplb.core.messages import integer_runs
from eplb.core.trace import LoadTrace, model_layer_ids
from eplb.formats._arrays import (
    MAX_ARRAY_DEPTH,
    check_keys,
    pick_array,
    pick_flat,
    record_layer_ids,
)
from eplb.formats._counts import as_counts_of, to_tensor
from eplb.formats._csv import read_csv_table
from eplb.formats._files import load_safetensors, require_regular_file
from eplb.formats._json import load_json_literals
from eplb.formats._kinds import FORMAT_FORCED, is_scalar, require_container
from eplb.formats._npy import load_npy, load_npz, npz_headers
from eplb.formats.detect import (
    FORMATS,
    TOPK_KEY_PATTERN,
    _load_pt,
    detect_format,
    ids_read_as_counts,
    recorder_dumps,
    refuse_same_files,
    sglang_json_dumps,
    sniff_container,
)
from eplb.formats.errors import FormatError, shown
from eplb.formats.history import BOTH_LOAD_KEYS, read_vllm_history
from eplb.formats.routing import topk_steps, topk_to_counts
from eplb.formats.sglang_per_pass import read_sglang_per_pass
from eplb.formats.trtllm_stats import read_trtllm_stats

_CONTAINERS = {
    "npy": ("npy",),
    "npz": ("npz",),
    "pt": ("pt-zip", "pt-pickle"),
    "safetensors": ("safetensors",),
    "json": ("json",),
    "csv": ("csv", "text", "unknown"),  # forced: the CSV reader says what is wrong
}


def read_loads(
    path: str | PathLike[str],
    format: str | None = None,
    progress: bool = False,
    *,
    key: str | Sequence[str] | None = None,
    tokens_per_step: int | None = None,
    num_experts: int | None = None,
    layer_ids: Sequence[int] | None = None,
) -> LoadTrace:
    """Read expert-load statistics of any supported engine into a :class:`LoadTrace`.

    The format is detected from the content (:func:`detect_format`); ``format=`` (one of
    :data:`FORMATS`) forces it. Supported:

    - ``"sglang"``: SGLang's recorder dump (``.pt`` dict with ``logical_count`` int
      ``[buffer, L, E]`` or ``[L, E]``) or ``--init-expert-location`` JSON
      ``{"logical_count": [L][E] or [T][L][E]}``. Rows are the model's layers (dense
      layers are all-zero rows); see :meth:`LoadTrace.drop_empty_layers`.
    - ``"sglang-per-pass"``: SGLang ``per_pass``/``per_token`` dump ``{"records": [...],
      "last_physical_to_logical_map": [L, R]}``: each record's ``global_physical_count``
      ``[L, R]`` is mapped to logical experts through the map; one step per
      ``forward_pass_id``. A folder of such dumps (one per rank) is summed over ranks.
    - ``"trtllm"``: TensorRT-LLM statistics folder (``meta_info.json`` +
      ``rank{r}.safetensors`` with ``"{iter}_{layer}"`` -> ``[E]`` counts), summed over
      ranks; one step per iteration, ``layer_ids`` = the layer indices found. A single
      ``rank{r}.safetensors`` file reads that rank alone.
    - ``"vllm-history"``: ``{"load_history": [{"logical_expert_load": [L][E]}, ...]}``,
      streamed (memory ~ the result; ``progress=True`` shows a bar on stderr).
    - ``"topk"``: per-token top-k ids ``[tokens, L, k]`` (npz/pt/safetensors/npy; arrays
      whose key matches ``topk``/``selected_experts``/... are auto-detected; a file with
      several such arrays, e.g. one per task or batch, needs ``key=`` to choose: one name,
      or a list read one after another, never a silent mix). By default each id array is
      one step (a whole batch); ``tokens_per_step=n`` cuts each array into windows of
      ``n`` tokens (the last one may be shorter). ``num_experts`` defaults to the largest
      id + 1; ids must be below 65536.
    - plain tensors ``[L, E]`` or ``[T, L, E]``: ``"pt"``, ``"npy"``, ``"npz"``,
      ``"safetensors"``, ``"json"`` (nested lists), ``"csv"`` (one row per layer, optional
      header; a first header cell ``layer`` makes the first column the layer ids).

    ``meta["model_layer_ids"]`` is ``True`` when the layer ids come from the file itself
    (SGLang dumps, whose rows are every model layer; TensorRT-LLM statistics; files
    written by :func:`write_loads`; CSV with a ``layer`` column) and so name the model's
    own layers, ``False`` when they are just row numbers ``0..L-1``.

    Args:
        key: which array of a multi-array container (npz, dict .pt, safetensors; in JSON a
            path such as ``olmoe/expert_counts/arxiv``) to read; also a list of arrays,
            read one after another as steps (plain arrays must agree on ``[layers,
            experts]`` and on the layers they name).
        layer_ids: override the layer ids of the rows (e.g. ``range(3, 61)``).

    Raises:
        FormatError: the file is malformed, of an unknown kind, or not load statistics;
            the message names the file, what was expected and what was found.
    """
    path = Path(path)
    require_regular_file(path, "loads file")
    try:
        keys = _keys(key)
    except ValueError as exc:  # the file the key was for, named (third attacker pass)
        raise ValueError(f"{path}: {exc}") from None
    if format is None:
        fmt = detect_format(path)
    elif format in FORMATS:
        fmt = format
        named_ids = keys is None or any(TOPK_KEY_PATTERN.search(k) for k in keys)
        if (fmt in ("npz", "pt", "safetensors", "json") and named_ids
                and detect_format(path) == "topk"):
            # forcing a plain format is how an integer counts array whose name looks like
            # ids is read, so this is allowed; but ids read as counts plan a different
            # model without a word (k experts, tokens as steps): say so
            warnings.warn(f"{path}: read as {fmt} counts, as the format asks, although its "
                          "arrays are named like top-k expert ids (topk, selected_experts, "
                          "...); for routing ids leave the format out (or use 'topk')",
                          stacklevel=2)
    else:
        raise ValueError(
            f"unknown load format {format!r} (format= / --format); expected one of "
            f"{', '.join(FORMATS)}"
        )
    if tokens_per_step is not None and fmt != "topk":
        raise ValueError(
            f"tokens_per_step (CLI: --tokens-per-step) cuts top-k routing traces into steps; "
            f"{path} is {fmt!r} load statistics, which are already counted per step"
        )
    if keys is not None and fmt not in ("topk", "npz", "pt", "safetensors", "json"):
        raise ValueError(
            f"key (CLI: --key) picks an array of a multi-array file; {path} is {fmt!r} load "
            "statistics, which hold one"
        )
    if num_experts is not None and fmt not in ("topk", "sglang-per-pass"):
        raise ValueError(
            f"num_experts (CLI: --num-experts) applies to top-k routing traces and SGLang "
            f"per-pass dumps; {path} is {fmt!r}, whose expert count is its width"
        )

    forced = FORMAT_FORCED.set(format is not None)  # how wrong_kind words its error
    try:  # a bad value from the file (e.g. its layer ids) is the file's fault, named so
        trace = _read_format(path, fmt, keys, progress, num_experts, tokens_per_step)
    except FormatError:
        raise
    except ValueError as exc:
        raise FormatError(path, str(exc)) from None
    finally:
        FORMAT_FORCED.reset(forced)
    looks_like_ids = None if format is not None or fmt not in _CONTAINERS else (
        ids_read_as_counts(trace.counts.numpy()))
    if looks_like_ids:
        warnings.warn(f"{path}: read as {trace.num_experts}-expert counts, but {looks_like_ids}; "
                      "for routing ids give the format 'topk' (--format topk)", stacklevel=2)
    if fmt in ("sglang", "sglang-per-pass", "trtllm"):
        trace.meta["model_layer_ids"] = True
    trace.meta.setdefault("model_layer_ids", False)

    if layer_ids is not None:
        ids = model_layer_ids(layer_ids, trace.num_layers, f"layer_ids for {path}")
        meta = {**trace.meta, "model_layer_ids": True}
        trace = LoadTrace(trace.counts, ids, trace.source, trace.format, meta)
    return trace


def _read_format(path: Path, fmt: str, keys: list[str] | None, progress: bool,
                 num_experts: int | None, tokens_per_step: int | None) -> LoadTrace:
    """The :class:`LoadTrace` of ``path`` read as ``fmt`` (see :func:`read_loads`)."""
    if fmt == "vllm-history":
        require_container(path, fmt, ("json",))
        counts_np, meta = read_vllm_history(path, progress)
        return LoadTrace(torch.from_numpy(counts_np), None, str(path), fmt, meta)
    if fmt in ("sglang", "sglang-per-pass", "trtllm"):
        return (_read_sglang(path) if fmt == "sglang" else read_trtllm_stats(path)
                if fmt == "trtllm" else read_sglang_per_pass(path, num_experts))
    if fmt == "topk":
        segments = _topk_segments(path, keys)  # (refuses a key naming no array)
        other = [k for k in keys or () if not TOPK_KEY_PATTERN.search(k)]
        if other and not FORMAT_FORCED.get():
            # a file detected as top-k ids by the names of some arrays: keys naming other
            # arrays were read as ids, count arrays silently planned as tokens of a model
            # with as many experts as the largest count (second attacker pass)
            raise FormatError(
                path, f"holds arrays named like top-k expert ids, but key (CLI: --key) names "
                f"{', '.join(map(repr, other))}, not named so: give the format, 'topk' to "
                f"read them as ids or the container's ('npz', 'pt', 'safetensors', 'json') "
                f"to read them as counts (format= / --format)")
        counts, meta = topk_to_counts(segments, path, num_experts, tokens_per_step)
        return LoadTrace(counts, None, str(path), fmt, meta)
    require_container(path, fmt, _CONTAINERS[fmt])
    if keys is not None and len(keys) > 1:
        return _read_plain_arrays(path, fmt, keys)
    counts, found_ids, meta = _read_plain(path, fmt, None if keys is None else keys[0])
    meta["model_layer_ids"] = found_ids is not None
    return LoadTrace(counts, found_ids, str(path), fmt, meta)


def _read_plain_arrays(path: Path, fmt: str, keys: list[str]) -> LoadTrace:
    """Several arrays of one plain file, one after another as steps (new-user pass: an
    OLMoE user mixing domains, or gpt-oss's think and answer counts, had to rewrite the
    file). They must agree on ``[layers, experts]`` and on the layers they name."""
    # the file is read once, not once per key (second attacker pass: 300 keys took 8.5 s)
    loaded = load_json_literals(path) if fmt == "json" else _named_arrays(
        path, keys, _IDS_BESIDE_COUNTS if "counts" in keys else ())
    parts = [_read_plain(path, fmt, key, loaded) for key in keys]
    # the first array that disagrees with the first one, by name (third attacker pass: a
    # sorted list of shapes paired none with its array)
    shape = tuple(parts[0][0].shape[1:])
    for key, (counts, _, _) in zip(keys, parts, strict=True):
        if tuple(counts.shape[1:]) != shape:
            raise FormatError(path, f"array {key!r} has [layers, experts] = "
                                    f"{tuple(counts.shape[1:])}, but {keys[0]!r} has {shape}")
    # arrays that name their layers must name the same ones; the others take them (as
    # files given together do)
    named = [(key, ids) for key, (_, ids, _) in zip(keys, parts, strict=True) if ids is not None]
    for key, ids in named[1:]:
        if ids != named[0][1]:
            raise FormatError(path, f"array {key!r} names model layers {integer_runs(ids)}, "
                                    f"but {named[0][0]!r} names {integer_runs(named[0][1])}")
    ids = named[0][1] if named else None
    segments, first = [], 0
    for key, (counts, _, _) in zip(keys, parts, strict=True):
        segments.append({"name": key, "first_step": first, "steps": counts.shape[0]})
        first += counts.shape[0]
    meta = {"keys": list(keys), "segments": segments, "model_layer_ids": ids is not None}
    return LoadTrace(torch.cat([counts for counts, _, _ in parts]), ids, str(path), fmt, meta)


def _keys(key: str | Sequence[str] | None) -> list[str] | None:
    if key is None:
        return None
    keys = [key] if isinstance(key, str) else list(key) if isinstance(key, Sequence) else []
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"key must be an array name or a list of them, got {key!r}")
    twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice is not None:  # its steps would be read twice, as a file given twice is refused
        raise ValueError(f"key (CLI: --key) names {twice!r} twice")
    return keys


# ---------------------------------------------------------------------------- SGLang
def _read_sglang(path: Path) -> LoadTrace:
    kind = sniff_container(path)
    if kind == "dir":
        return _read_sglang_folder(path)
    literals = False
    if kind == "json":
        obj, literals = load_json_literals(path)
    elif kind in ("pt-zip", "pt-pickle"):
        obj = _load_pt(path)
    else:
        raise FormatError(
            path, f"format 'sglang' expects a .json or .pt file, found {kind} content"
        )
    if not isinstance(obj, dict) or "logical_count" not in obj:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise FormatError(path, f"expected a dict with key 'logical_count', found {found}")
    if "load_history" in obj:
        raise FormatError(path, BOTH_LOAD_KEYS)
    counts = as_counts_of(obj["logical_count"], path, "logical_count", literals)
    meta = {k: v for k, v in obj.items() if k != "logical_count" and is_scalar(v)}
    # the recorder's circular buffer keeps all-zero rows for steps it never filled
    meta["empty_steps"] = int((counts.sum((1, 2)) == 0).sum())
    return LoadTrace(counts, None, str(path), "sglang", meta)


def _read_sglang_folder(path: Path) -> LoadTrace:
    """A folder of stat-mode dumps ``expert_distribution_recorder_{time}.pt`` (oldest
    first; rank 0 writes one per dump request) or, failing those, of ``{"logical_count"}``
    JSON files (by name): their steps one after another."""
    # (checked as detect_format checks them: the format may be named, detection skipped)
    files = sorted(recorder_dumps(path), key=_dump_time)
    if not files:
        files = sglang_json_dumps(path)  # e.g. the dumps the SGLang team published
    if not files:
        raise FormatError(path, "expected expert_distribution_recorder_*.pt dumps or "
                          '{"logical_count": ...} JSON files, found none')
    refuse_same_files(path, files)
    traces = [_read_sglang(f) for f in files]
    shapes = {t.counts.shape[1:] for t in traces}
    if len(shapes) > 1:
        raise FormatError(path, f"the dumps disagree on [layers, experts]: {sorted(shapes)}")
    counts = torch.cat([t.counts for t in traces])
    _warn_repeated_dumps(path, files, traces)
    meta = {"files": [f.name for f in files],
            "empty_steps": sum(t.meta.get("empty_steps", 0) for t in traces)}
    return LoadTrace(counts, None, str(path), "sglang", meta)


def _dump_time(file: Path) -> tuple[float, str]:
    match = re.match(r"expert_distribution_recorder_([0-9.]+?)(?:_\d+)?\.pt$", file.name)
    try:
        return (float(match.group(1)) if match else float("inf"), file.name)
    except ValueError:
        return float("inf"), file.name


def _warn_repeated_dumps(folder: Path, files: list[Path], traces: list[LoadTrace]) -> None:
    """A warning where two dumps of ``folder`` hold the same nonzero counts: a copy
    beside its original (``dump (1).json``) is a second step, its loads counted twice
    (they were, without a word; real traffic does not repeat a window to the token)."""
    seen: dict[bytes, Path] = {}
    for file, trace in zip(files, traces, strict=True):
        if not bool(trace.counts.any()):
            continue
        digest = hashlib.blake2b(trace.counts.numpy().tobytes(), digest_size=16).digest()
        if digest in seen:
            warnings.warn(f"{folder}: {seen[digest].name} and {file.name} hold the same "
                          "counts; read as two steps, their loads count twice (remove the "
                          "copy if it is one)", stacklevel=4)
        else:
            seen[digest] = file


# --------------------------------------------------------------------------- top-k ids
def _topk_segments(path: Path, keys: list[str] | None) -> list[tuple[str, torch.Tensor]]:
    arrays = _named_arrays(path, keys)
    if keys is not None:
        return [(k, arrays[k]) for k in keys]
    if len(arrays) == 1:
        return list(arrays.items())
    # integer arrays only: a router's top-k weights sit beside its ids under a like name
    chosen = [(k, v) for k, v in arrays.items() if TOPK_KEY_PATTERN.search(k)
              and not v.is_floating_point() and not v.is_complex()]
    if not chosen:
        raise FormatError(
            path,
            f"expected top-k id arrays (keys like '*topk_ids'), found {len(arrays)} arrays "
            f"{shown(sorted(arrays))}; choose one with key= (CLI: --key NAME)",
        )
    if len(chosen) > 1:
        names = [k for k, _ in chosen]
        raise FormatError(
            path,
            f"holds {len(chosen)} top-k id arrays {shown(names)} (e.g. one per task or batch); "
            "choose one with key= (CLI: --key NAME), or several to read them one after another "
            "(CLI: --key A,B)",
        )
    return chosen


def _named_arrays(
    path: Path, keys: list[str] | None = None, optional: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Arrays of an npz / npy / .pt / safetensors container by name, in file order: all of
    them, or only ``keys`` (each must exist) and those of ``optional`` the file holds."""
    kind = sniff_container(path)
    if kind == "npz":
        names = list(npz_headers(path))
        check_keys(path, keys, names)
        extra = [] if keys is None else [k for k in optional if k in names and k not in keys]
        loaded = load_npz(path, None if keys is None else keys + extra)
        out = {}
        for k, v in loaded.items():
            try:
                out[k] = to_tensor(v, path, k)
            except FormatError:
                if k not in extra:  # an optional array that is no numbers is left out
                    raise
        return out
    if kind == "npy":
        check_keys(path, keys, [path.stem])
        return {path.stem: to_tensor(load_npy(path), path, path.name)}
    if kind == "safetensors":
        tensors = load_safetensors(path)
    elif kind in ("pt-zip", "pt-pickle"):
        obj = _load_pt(path)
        if isinstance(obj, dict):
            found = _pt_arrays(obj)
            alike = sorted(name for name, n in Counter(n for n, _ in found).items() if n > 1)
            if alike:  # ({"a/b": {"c": x}, "a": {"b/c": y}}: the second replaced the first)
                raise FormatError(path, f"several arrays are named {alike[0]!r} (keys holding "
                                        "'/'); rename one")
            tensors = dict(found)  # converted once chosen: --key counts beside a list of
        else:  # text (names, tags) read that list and refused the file (attacker pass)
            tensors = {path.stem: to_tensor(obj, path, path.name)}
    else:
        raise FormatError(
            path,
            f"expected an array container (.npz, .npy, .pt, .safetensors), found {kind} content",
        )
    check_keys(path, keys, list(tensors))
    chosen = list(tensors) if keys is None else keys + [
        k for k in optional if k in tensors and k not in keys]
    return {k: to_tensor(tensors[k], path, k) for k in chosen}


def _pt_arrays(obj: dict, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """The arrays of a ``torch.save`` dict by name. A dict that holds none at its top level
    gives those of its nested dicts, named by their path (``"a/b"``, as JSON files' are;
    attacker pass: ``{"a": {"b": tensor}}`` held "0 arrays" and no key read it); beside
    arrays, nested dicts are metadata, left out as before. As deep as JSON files are
    searched (:data:`~eplb.formats._arrays.MAX_ARRAY_DEPTH`)."""
    arrays = [(f"{prefix}{key}", value) for key, value in obj.items()
              if isinstance(value, (torch.Tensor, np.ndarray, list))]
    if arrays or depth >= MAX_ARRAY_DEPTH:
        return arrays
    return [found for key, value in obj.items() if isinstance(value, dict)
            for found in _pt_arrays(value, f"{prefix}{key}/", depth + 1)]


# ---------------------------------------------------------------------- plain tensors
#: the array beside ``counts`` that names its layers (``write_loads``' npz / pt files)
_IDS_BESIDE_COUNTS = ("layer_ids",)


def _read_plain(
    path: Path, fmt: str, key: str | None, loaded: Any = None
) -> tuple[torch.Tensor, list[int] | None, dict[str, Any]]:
    """One array of a plain file: ``[T, L, E]`` counts, the layers it names (or
    ``None``), and its meta. ``loaded``: the file already read, when the caller reads
    several keys (:func:`load_json_literals` of a JSON file, else :func:`_named_arrays`)."""
    if fmt == "csv":
        counts, ids = _read_csv(path)
        return counts, ids, {}
    if fmt == "json":
        obj, literals = load_json_literals(path) if loaded is None else loaded
        if isinstance(obj, dict):
            name, value, ids = pick_array(obj, path, key)
            counts = as_counts_of(value, path, name, literals)
            return counts, record_layer_ids(ids, counts.shape[1], path, name), {"key": name}
        if key is not None:
            raise FormatError(path, f"is one JSON array, so key {key!r} (--key) picks nothing; "
                                    "leave it out")
        return as_counts_of(obj, path, "the JSON array", literals), None, {}
    if loaded is None and key is None and sniff_container(path) == "npz":
        # several arrays and no key: refused by their names alone, nothing inflated (an
        # archive of many compressed members was inflated whole to say so; attacker pass)
        names = list(npz_headers(path))
        if len(names) > 1 and set(names) != {"counts", *_IDS_BESIDE_COUNTS}:
            pick_flat(dict.fromkeys(names), path, None)
    if loaded is None:
        arrays = _named_arrays(path, None if key is None else [key],
                               _IDS_BESIDE_COUNTS if key == "counts" else ())
    else:
        arrays = {k: loaded[k] for k in (key, *_IDS_BESIDE_COUNTS) if k in loaded}
    if key is None and set(arrays) == {"counts", "layer_ids"}:  # written by write_loads
        ids = arrays["layer_ids"].flatten().tolist()  # checked by LoadTrace
        return as_counts_of(arrays["counts"], path, "counts"), ids, {"key": "counts"}
    if key == "counts" and "layer_ids" in arrays:
        # write_loads' pair read by key: its layer ids came back as 0..L-1 (third attacker
        # pass); a layer_ids array that does not fit the counts is another file's own
        # and left alone (the counts alone were readable by key before)
        counts = as_counts_of(arrays["counts"], path, "counts")
        ids = arrays["layer_ids"].flatten()  # read as key=None reads them (an [L, 1] column)
        fits = (len(ids) == counts.shape[1] and ids.dtype != torch.bool
                and not ids.is_complex()
                and bool((ids.isfinite() & (ids == ids.round())).all()))
        return counts, [int(x) for x in ids.tolist()] if fits else None, {"key": "counts"}
    name, value = pick_flat(arrays, path, key)
    if (not FORMAT_FORCED.get() and TOPK_KEY_PATTERN.search(name)
            and value.is_floating_point()):
        # top-k ids saved as floats, read as [T, L, E] loads, planned a k-expert model
        # without a word (attacker pass); forcing the plain format reads loads so named
        raise FormatError(path, f"array {name!r} is named like top-k expert ids but holds "
                                f"{str(value.dtype).removeprefix('torch.')}: top-k ids "
                                "must be integers (cast them); "
                                f"if it holds [T, L, E] loads, read it with format={fmt!r} "
                                f"(CLI: --format {fmt})")
    return as_counts_of(value, path, name), None, {"key": name}


def _read_csv(path: Path) -> tuple[torch.Tensor, list[float] | None]:
    values, ids = read_csv_table(path)
    return as_counts_of(values, path, "the CSV table"), ids


def read_routing_steps(
    path: str | PathLike[str], key: str | Sequence[str] | None = None,
    tokens_per_step: int | None = None,
) -> list[torch.Tensor]:
    """The ``[tokens, L, k]`` top-k ids of every step of the trace :func:`read_loads`
    reads from the top-k file ``path`` with the same ``key`` and ``tokens_per_step``
    (:func:`eplb.formats.routing.topk_steps`): the tokens behind each step's counts."""
    path = Path(path)
    require_regular_file(path)
    keys = [key] if isinstance(key, str) else (list(key) if key is not None else None)
    return topk_steps(_topk_segments(path, keys), tokens_per_step)


def read_routing(
    path: str | PathLike[str], key: str | Sequence[str] | None = None
) -> torch.Tensor:
    """``[T, L, k]`` int64 top-k expert ids of recorded tokens from a routing trace (the
    arrays of a multi-array file picked by ``key``, one after another along the tokens).

    Raises :class:`FormatError` for a file that holds no integer ``[T, L, k]`` ids.
    """
    path = Path(path)
    require_regular_file(path)
    keys = [key] if isinstance(key, str) else (list(key) if key is not None else None)
    segments = _topk_segments(path, keys)
    parts = []
    for name, ids in segments:
        ids = torch.as_tensor(ids)
        if ids.dim() != 3 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise FormatError(
                path, f"array {name!r} has shape {tuple(ids.shape)} and dtype {ids.dtype}; "
                "a routing trace holds integer top-k ids [tokens, layers, k]"
            )
        parts.append(ids.to(torch.int64))
    if len({tuple(p.shape[1:]) for p in parts}) > 1:
        raise FormatError(path, "the chosen arrays disagree on [layers, k]")
    return torch.cat(parts)
