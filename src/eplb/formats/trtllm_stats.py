"""TensorRT-LLM's expert-load statistics (``format="trtllm"`` of :func:`read_loads`)."""

from __future__ import annotations

import itertools
import re
import stat
import warnings
from pathlib import Path
from typing import Any

import torch

from eplb.core.inputs import first_bad_load
from eplb.core.trace import LoadTrace
from eplb.formats._counts import as_counts_of
from eplb.formats._files import import_safetensors_torch, load_safetensors, require_regular_file
from eplb.formats._json import load_json_literals
from eplb.formats._kinds import is_scalar, require_container, wrong_kind
from eplb.formats.detect import RANK_FILE, refuse_same_files
from eplb.formats.errors import FormatError, shown

#: a statistics key: ``{iteration}_{layer}``
_ITER_LAYER = re.compile(r"^([0-9]+)_([0-9]+)$")
#: what format "trtllm" reads, in the errors for another kind of file
_TRTLLM_FOLDER = "a TensorRT-LLM statistics folder (meta_info.json + rank{r}.safetensors)"


def read_trtllm_stats(path: Path) -> LoadTrace:
    """TensorRT-LLM's expert statistics: a folder of ``meta_info.json`` and one
    ``rank{r}.safetensors`` per rank (keys ``{iteration}_{layer}``, summed over ranks), or
    one rank's file: ``[iterations, layers, experts]`` with the layers as named."""
    import_safetensors_torch()  # a missing package is said before any file is read
    meta: dict[str, Any] = {}
    if path.is_dir():
        info_path = path / "meta_info.json"
        if not info_path.is_file():
            raise wrong_kind(path, "trtllm", _TRTLLM_FOLDER, "a folder without meta_info.json")
        info = load_json_literals(info_path)[0]
        experts = info.get("num_experts") if isinstance(info, dict) else None
        if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
            raise FormatError(
                info_path,
                f"expected {{'num_experts': E, 'num_experts_per_token': k}}, found {shown(info)}",
            )
        meta.update({k: v for k, v in info.items() if is_scalar(v)})
        files = sorted(
            (int(m.group(1)), p) for p in path.iterdir() if (m := RANK_FILE.match(p.name))
        )
        if not files:
            raise FormatError(
                path, "expected rank{r}.safetensors files next to meta_info.json, found none"
            )
        refuse_same_files(path, [p for _, p in files])
        ranks = [rank for rank, _ in files]
        twice = [rank for k, rank in enumerate(ranks[1:]) if rank == ranks[k]]
        if twice:
            # (rank0 and rank00 both read as rank 0: summed, its tokens counted twice)
            names = [p.name for rank, p in files if rank == twice[0]]
            raise FormatError(path, f"{' and '.join(names)} are both rank {twice[0]}'s "
                                    "statistics; keep one")
        # meta_info.json records the EP size only where the dump was asked to (some
        # releases, EXPERT_STATISTIC_EP_SIZE); where it does, every rank's file is expected
        # (a folder of 2 of 32 ranks' files was read without a word: new-user pass)
        ep_size = info.get("ep_size", ranks[-1] + 1)
        if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
            # ("32" or 32.0 left the check out silently; review pass)
            raise FormatError(info_path, f"ep_size is {shown(ep_size)}; expected a positive "
                                         "integer (the EP size), or no ep_size")
        if ranks[-1] >= ep_size:
            raise FormatError(path, f"meta_info.json records ep_size {ep_size}, but there "
                                    f"are rank files up to rank{ranks[-1]}")
        if len(ranks) < ep_size:
            # else a gap is the one sign of a lost rank, whose tokens the summed loads would
            # silently lack (ranks are distinct and below ep_size: no range of it is built,
            # a huge ep_size took the host's memory; review pass)
            first = next((k for k, rank in enumerate(ranks) if rank != k), len(ranks))
            more = ep_size - len(ranks) - 1
            warnings.warn(f"{path}: no rank{first}.safetensors"
                          f"{f' (nor {more} more)' if more else ''} "
                          f"between rank0 and rank{ep_size - 1}; the loads are summed over "
                          f"the {len(ranks)} rank files there", UserWarning, stacklevel=2)
    else:
        m = RANK_FILE.match(path.name)
        files = [(int(m.group(1)) if m else 0, path)]
    num_experts = meta.get("num_experts")
    total: dict[tuple[int, int], torch.Tensor] = {}
    entries: list[tuple[Path, set[tuple[int, int]]]] = []  # each rank file's entries
    for _rank, file in files:
        if stat.S_ISDIR(require_regular_file(file).st_mode):
            raise FormatError(file, "is a folder; expected a rank's safetensors file")
        require_container(file, "trtllm", ("safetensors",),
                          f"{_TRTLLM_FOLDER} or one rank's .safetensors file")
        tensors = load_safetensors(file)
        named: dict[tuple[int, int], str] = {}  # this file's key of each (iteration, layer)
        for name, data in tensors.items():
            m = _ITER_LAYER.match(name)
            if m is None:
                raise wrong_kind(file, "trtllm", "TensorRT-LLM statistics, keys "
                                 "'{iter}_{layer}'", f"key {shown(name)}")
            # (bool: 0/1 "counts" every other reader refuses; attacker pass)
            if data.dim() != 1 or data.is_floating_point() or data.is_complex() or (
                    data.dtype == torch.bool):
                raise FormatError(
                    file,
                    f"{name!r} must be an integer [experts] vector, found {data.dtype} "
                    f"{tuple(data.shape)}",
                )
            if num_experts is None:
                num_experts = data.shape[0]
            if data.shape[0] != num_experts:
                raise FormatError(
                    file, f"{name!r} has {data.shape[0]} experts; expected {num_experts}"
                )
            key = (int(m.group(1)), int(m.group(2)))
            if key in named:  # '100_3' and '100_03': one entry, not two to sum
                raise FormatError(file, f"keys {named[key]!r} and {name!r} both name iteration "
                                        f"{key[0]}, layer {key[1]}")
            named[key] = name
            bad = first_bad_load(data)
            if bad is not None:
                # checked per rank file: summed over the ranks, a -5 and a 100 made a 95
                # that no later check could see (attacker pass)
                raise FormatError(file, f"{name!r}[{bad[0]}] is {int(data[bad])}; token "
                                        "counts must be >= 0")
            total[key] = (
                total[key] + data.to(torch.float64) if key in total else data.to(torch.float64)
            )
        entries.append((file, set(named)))
    # a rank records every iteration of the layers it runs (with pipeline parallelism,
    # only its stage's layers): an iteration of one of them that it lacks would be summed
    # from the other ranks' tokens alone, without a word (attacker pass: 1600 beside 3200)
    for file, held in entries:
        layers_run = {layer for _, layer in held}
        lacking = sorted(key for key in set(total) - held if key[1] in layers_run)
        if lacking:
            raise FormatError(
                file, f"lacks {len(lacking)} (iteration, layer) entr"
                      f"{'y' if len(lacking) == 1 else 'ies'} of its layers that other ranks "
                      f"record, e.g. {lacking[:3]}: its tokens there would be summed as none "
                      "(statistics of one dump, from every rank)")
    if not total:
        raise FormatError(path, "the statistics hold no '{iter}_{layer}' entries")
    iters = sorted({i for i, _ in total})
    layers = sorted({layer for _, layer in total})
    # counted, not listed: a rank file of 30,000 keys 'i_{i % 4096}' (2 MB) listed its
    # 1.2e8 missing entries, some 10 GB, before the error (attacker pass)
    missing = len(iters) * len(layers) - len(total)
    if missing:
        examples = list(itertools.islice(((i, layer) for i in iters for layer in layers
                                          if (i, layer) not in total), 3))
        raise FormatError(
            path, f"{missing} (iteration, layer) entries are missing, e.g. {examples}"
        )
    counts = torch.stack([torch.stack([total[(i, layer)] for layer in layers]) for i in iters])
    meta.update({"iterations": iters, "ranks": [r for r, _ in files]})
    return LoadTrace(as_counts_of(counts, path, "counts"), layers, str(path), "trtllm", meta)
