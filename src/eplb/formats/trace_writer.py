"""``write_loads``: save a :class:`LoadTrace` so that :func:`read_loads` reads it back."""

from __future__ import annotations

import json
import warnings
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eplb.core.messages import integer_runs
from eplb.core.topology import is_name
from eplb.core.trace import LoadTrace
from eplb.formats._files import atomic_write, check_writable, name_suffix, output_file

#: Formats ``write_loads`` can write (each is a ``read_loads`` format).
TRACE_EMITS: tuple[str, ...] = ("pt", "npz", "npy", "vllm-history", "sglang")
#: the file name suffix of each format's container
SUFFIX_BY_FORMAT = {"pt": ".pt", "npz": ".npz", "npy": ".npy", "vllm-history": ".json",
                    "sglang": ".json"}
#: the format a name's suffix implies (``*.sglang.json``: SGLang's, see :func:`format_for`)
FORMAT_BY_SUFFIX = {".pt": "pt", ".json": "vllm-history", ".npz": "npz", ".npy": "npy"}
#: suffixes of load formats ``read_loads`` reads that no format here writes, by their names
UNWRITTEN_SUFFIXES = {".safetensors": "safetensors", ".csv": "CSV"}
#: compressed-archive suffixes: no format here is written compressed (a torch archive
#: under ``x.json.gz`` failed gunzip and every reader that trusts the name; attacker pass)
ARCHIVE_SUFFIXES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}


def format_for(path: Path, format: str | None) -> str:
    """The format to write: ``format``, else the one the name implies (``*.sglang.json``
    SGLang's, ``.json`` vLLM's history, ``.npz``, ``.npy``, else ``pt``). A name whose
    known suffix contradicts ``format``, or a ``.safetensors`` or ``.csv`` name (no format
    here writes one), is refused: other tools open the file by its name (third attacker
    pass: a ``.safetensors`` name held a torch file that ``read_loads`` then refused; a
    ``.csv`` name held a torch zip archive, which pandas or a spreadsheet cannot open)."""
    # a name that is a suffix alone ('.json') names that format too: format 'pt' wrote a
    # torch archive into a file named '.json' (attacker pass)
    suffix = name_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)]
    # the suffix of the format asked for, if any, for the names the refusals suggest
    asked = (".sglang.json" if format == "sglang" else SUFFIX_BY_FORMAT.get(format or ""))
    if suffix in ARCHIVE_SUFFIXES:
        base = stem[: len(stem) - len(Path(stem).suffix)] if asked else stem
        inner = f"{base}{asked}" if asked else (stem if Path(stem).suffix else f"{stem}.pt")
        raise ValueError(f"{path.name!r} names a {ARCHIVE_SUFFIXES[suffix]} archive, and load "
                         f"traces are written uncompressed: name the file {inner} (and "
                         f"compress it afterwards if you need to)")
    if suffix in UNWRITTEN_SUFFIXES:
        # the name for the format asked for, if any (``eplb generate --format npz -o t.csv``
        # was told to write t.pt; and the message names no function: the CLI shows it too)
        name = f"{stem}{asked}" if asked else f"{stem}.pt (or .npz)"
        raise ValueError(f"load traces are written as {', '.join(TRACE_EMITS)} files, no "
                         f"{UNWRITTEN_SUFFIXES[suffix]}: name the file {name}")
    implied = ("sglang" if path.name.lower().endswith(".sglang.json") else
               FORMAT_BY_SUFFIX.get(suffix))
    if format is None and path.name.lower().endswith(".sglang.pt"):
        raise ValueError(sglang_pt_refusal(path))
    if format is None:
        return implied or "pt"
    want = SUFFIX_BY_FORMAT.get(format, suffix)
    if implied is not None and want != suffix:
        # (without format a *.sglang.pt name is refused: pt is asked for by name there)
        instead = ("give format 'pt'" if path.name.lower().endswith(".sglang.pt")
                   else "leave format out")
        raise ValueError(f"format {format!r} writes a {want} file, but the name "
                         f"{path.name!r} says {suffix}: name it {stem}{want}, "
                         f"or {instead} to write {implied}")
    return format


def sglang_pt_refusal(path: Path) -> str:
    """Why a trace is not written to ``*.sglang.pt`` by its name alone: ``eplb plan`` reads
    that name as SGLang's output, and SGLang's ``--init-expert-location`` as its own file,
    but a trace written there was eplb's own ``.pt``, which SGLang refused at start-up
    (integrations pass); SGLang's trace layout is written as JSON."""
    stem = path.name[: -len(".sglang.pt")]
    return (f"{path.name!r} names an SGLang file, and SGLang's trace layout is written as "
            f"JSON: name it {stem}.sglang.json (SGLang reads it), or {stem}.pt for eplb's "
            f"own trace")


def write_loads(
    trace: LoadTrace, path: str | PathLike[str], format: str | None = None, *,
    force: bool = False,
) -> Path:
    """Write ``trace.counts [T, L, E]`` to ``path``; return the path. ``format``: one of
    :data:`TRACE_EMITS`; by default the one the name implies (``.npz``, ``.npy``,
    ``*.sglang.json`` SGLang's, ``.json`` vLLM's history), else ``"pt"``.

    ``"pt"`` / ``"npz"`` keep ``counts`` and ``layer_ids`` (``read_loads`` restores both);
    ``"npy"`` is the bare ``[T, L, E]`` array; ``"vllm-history"`` (ADRS JSON, written step by
    step) and ``"sglang"`` (``{"logical_count": [T][M][E]}``) are the engines' own layouts.
    ``"npy"`` and ``"vllm-history"`` drop the layer ids. ``"sglang"`` keeps them as SGLang's
    recorder does: a row for every model layer ``0..M-1`` (``M`` = the largest id + 1), all
    zero for layers the trace lacks (dense ones), since ``read_loads`` takes an SGLang
    dump's row index as its model layer.
    A ``*.sglang.pt`` name without ``format`` is refused (:func:`sglang_pt_refusal`).
    Integer-valued counts are stored as integers: int32 where they fit (half the size of
    int64: a 6000-step DeepSeek-V3 trace is 0.36 GB, not 0.71), else int64. Refuses to
    overwrite unless ``force``.
    """
    path = output_file(path)
    if format is not None and not is_name(format, TRACE_EMITS):
        raise ValueError(f"cannot write loads as {format!r}; expected one of {TRACE_EMITS}")
    format = format_for(path, format)
    if not isinstance(trace, LoadTrace):
        raise TypeError(f"trace must be an eplb.formats.LoadTrace, got {type(trace).__name__}")
    check_writable(path, force)
    if format in ("npy", "vllm-history") and trace.layer_ids != list(range(trace.num_layers)):
        # (attacker pass: DeepSeek-V3's layers 3..60 read back as 0..57, without a word)
        warnings.warn(f"{format} files have no place for layer ids: the trace's model layers "
                      f"{integer_runs(trace.layer_ids)} will read back as "
                      f"0..{trace.num_layers - 1}; write pt, npz or sglang to keep them",
                      UserWarning, stacklevel=2)
    counts = trace.counts.cpu()
    whole = counts.numel() == 0 or float(counts.max()) < 2**53
    if whole and bool((counts == counts.round()).all()):
        fits = counts.numel() == 0 or float(counts.max()) <= torch.iinfo(torch.int32).max
        counts = counts.to(torch.int32 if fits else torch.int64)
    layer_ids = torch.tensor(trace.layer_ids, dtype=torch.int64)
    if format == "pt":
        payload = {"counts": counts, "layer_ids": layer_ids}
        atomic_write(path, lambda f: torch.save(payload, f), "wb", force=force)
    elif format == "npz":
        atomic_write(
            path, lambda f: np.savez(f, counts=counts.numpy(), layer_ids=layer_ids.numpy()), "wb",
            force=force,
        )
    elif format == "npy":
        atomic_write(path, lambda f: np.save(f, counts.numpy()), "wb", force=force)
    elif format == "sglang":
        atomic_write(path, lambda f: _write_sglang(counts, trace.layer_ids, f), "w",
                     force=force)
    else:
        atomic_write(path, lambda f: _write_history(counts, f), "w", force=force)
    return path


def _write_history(counts: torch.Tensor, handle: Any) -> None:
    """One step at a time, so a long trace never exists as one Python list."""
    handle.write('{"load_history": [')
    for t in range(counts.shape[0]):
        if t:
            handle.write(", ")
        handle.write(json.dumps({"logical_expert_load": counts[t].tolist()}))
    handle.write("]}\n")


def _write_sglang(counts: torch.Tensor, layer_ids: list[int], handle: Any) -> None:
    """``{"logical_count": [T][M][E]}`` of ``counts [T, L, E]``, one step at a time.

    Rows are model layers in SGLang's dumps: a trace of layers 3..60 written as rows 0..57
    would be read back (and planned, keyed and matched) as layers 0..57, so every model
    layer ``0..max(layer_ids)`` gets a row, all zero where the trace has none. Streamed:
    neither the padded ``[T, M, E]`` array nor the whole trace as Python lists is built
    (a stray high layer id would have multiplied both by up to ``M / L``)."""
    row_of = {layer: i for i, layer in enumerate(layer_ids)}
    model_layers = range(max(layer_ids) + 1)
    zero = json.dumps(counts.new_zeros(counts.shape[2]).tolist())
    handle.write('{"logical_count": [')
    for t in range(counts.shape[0]):
        step = counts[t].tolist()
        rows = (json.dumps(step[row_of[m]]) if m in row_of else zero
                for m in model_layers)
        handle.write((", " if t else "") + "[" + ", ".join(rows) + "]")
    handle.write("]}\n")

