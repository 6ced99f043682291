"""SGLang's per-pass expert-distribution dumps (``format="sglang-per-pass"`` of
:func:`eplb.formats.read_loads`): each record's per-slot counts, summed onto the experts
through the dump's last physical-to-logical map."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from eplb.core.inputs import first_bad_load
from eplb.core.trace import LoadTrace
from eplb.formats._counts import as_counts_of, to_tensor
from eplb.formats._expand import MAX_UNPACKED_VALUES
from eplb.formats._kinds import require_container, wrong_kind
from eplb.formats.detect import _load_pt, recorder_dumps, refuse_same_files
from eplb.formats.errors import FormatError, shown
from eplb.formats.routing import MAX_EXPERTS


def _check_size(file: Path, passes: int, experts: int, shape: tuple[int, ...], held: int) -> None:
    """Refuse loads ``[passes, layers, experts]`` of more numbers than the dumps read so
    far have bytes (and than :data:`MAX_UNPACKED_VALUES`): a map of one slot per layer
    naming expert 65535 made each record of 8 bytes a layer 65,536 loads a layer, and a
    175 kB dump took more than 10 GB (attacker pass). A real map covers every expert, so
    a real dump's loads are about as many as its counts, 8 bytes each."""
    numbers = passes * shape[0] * experts
    if numbers > max(MAX_UNPACKED_VALUES, held):
        raise FormatError(
            file, f"its {passes:,} forward pass{'es' if passes != 1 else ''} of {shape[0]:,} "
                  f"layers would hold {experts:,} experts' loads each ({numbers:,} numbers) "
                  f"from {shape[1]:,} slot{'s' if shape[1] != 1 else ''} a layer in "
                  f"{held:,} bytes of dumps; eplb reads at most "
                  f"{MAX_UNPACKED_VALUES:,} numbers, or one per byte of the dumps (a map "
                  "naming experts far beyond its slots is not SGLang's)")


def _int_field(record: dict, name: str, default: int | None, path: Path) -> int | None:
    """An integer field of an SGLang record (``default`` when absent), else FormatError."""
    value = record.get(name, default)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError, OverflowError):
        raise FormatError(path, f"a record's {name} must be an integer, got {shown(value)}"
                          ) from None


def read_sglang_per_pass(path: Path, num_experts: int | None) -> LoadTrace:
    """SGLang per-pass dumps (a file, or a folder of one per rank) as ``[passes, layers,
    experts]`` loads, each pass summed over the ranks; ``num_experts`` where the map's
    largest id + 1 is not the count."""
    files = recorder_dumps(path) if path.is_dir() else [path]
    if not files:
        raise wrong_kind(path, "sglang-per-pass", "expert_distribution_recorder_*.pt dumps",
                         "a folder without any")
    refuse_same_files(path, files)
    passes: dict[int, torch.Tensor] = {}
    ranks: list[int] = []
    seen: dict[tuple, str] = {}  # (pass, rank, gatherer, counts) → the record holding it
    first: tuple[tuple[int, int], str] | None = None  # the first dump's [layers, experts]
    held = 0  # bytes of the dumps read so far
    for file in files:
        require_container(file, "sglang-per-pass", ("pt-zip", "pt-pickle"),
                          "an SGLang expert_distribution_recorder_*.pt dump (or a folder "
                          "of them)")
        obj = _load_pt(file)
        if (
            not isinstance(obj, dict)
            or "records" not in obj
            or ("last_physical_to_logical_map" not in obj)
        ):
            found = (f"keys {shown(sorted(map(str, obj)))}" if isinstance(obj, dict)
                     else f"a {type(obj).__name__}")
            raise wrong_kind(file, "sglang-per-pass", "an SGLang per-pass dump {'records': "
                             "[...], 'last_physical_to_logical_map': [L, R]}", found)
        phys_map = to_tensor(
            obj["last_physical_to_logical_map"], file, "last_physical_to_logical_map"
        )
        if phys_map.dim() != 2 or phys_map.is_floating_point() or phys_map.numel() == 0:
            raise FormatError(
                file,
                f"last_physical_to_logical_map must be an integer [layers, slots] array, found "
                f"{phys_map.dtype} {tuple(phys_map.shape)}",
            )
        phys_map = phys_map.to(torch.int64)
        num_e = int(phys_map.max()) + 1 if num_experts is None else num_experts
        if int(phys_map.min()) < 0 or int(phys_map.max()) >= min(num_e, MAX_EXPERTS):
            raise FormatError(file, f"last_physical_to_logical_map holds ids outside "
                                    f"[0, {min(num_e, MAX_EXPERTS)})")
        first = first or ((phys_map.shape[0], num_e), file.name)
        if (phys_map.shape[0], num_e) != first[0]:  # (summed: torch's RuntimeError, exit 1)
            raise FormatError(path, f"the dumps disagree on [layers, experts]: {file.name} maps "
                                    f"{[phys_map.shape[0], num_e]}, {first[1]} {list(first[0])}")
        records = obj["records"]
        if not isinstance(records, list):
            raise FormatError(file, f"'records' must be a list, found {type(records).__name__}")
        held += file.stat().st_size
        for i, record in enumerate(records):
            if not isinstance(record, dict) or "global_physical_count" not in record:
                raise FormatError(file, f"records[{i}] has no 'global_physical_count'")
            phys = to_tensor(
                record["global_physical_count"], file, f"records[{i}].global_physical_count"
            )
            if phys.shape != phys_map.shape:
                raise FormatError(
                    file,
                    f"records[{i}].global_physical_count has shape {tuple(phys.shape)}; expected "
                    f"{tuple(phys_map.shape)} like last_physical_to_logical_map",
                )
            physical = phys.to(torch.float64)
            bad = first_bad_load(physical)
            if bad is not None:
                # checked per slot: summed onto their experts, a -5 and a 100 made a 95
                # that no later check could see (attacker pass)
                raise FormatError(file, f"records[{i}].global_physical_count[{bad[0]}, "
                                        f"{bad[1]}] (layer {bad[0]}, slot {bad[1]}) is "
                                        f"{float(physical[bad])}; loads must be finite and "
                                        ">= 0")
            pass_id = _int_field(record, "forward_pass_id", i, file)
            rank = _int_field(record, "rank", None, file)
            if pass_id not in passes:  # (one more [layers, experts] of loads to hold)
                _check_size(file, len(passes) + 1, num_e, phys_map.shape, held)
            logical = torch.zeros(phys_map.shape[0], num_e, dtype=torch.float64)
            logical.scatter_add_(1, phys_map, physical)
            if rank is not None:
                # two dumps taken without restarting the recorder both hold its earlier
                # passes, which summed twice (attacker pass): a record of the same pass,
                # rank and gatherer with the same counts is that. (A server restarted
                # numbers its passes anew, and two-batch overlap records a pass per
                # gatherer: their counts differ, and they sum.)
                digest = hashlib.blake2b(physical.numpy().tobytes(), digest_size=16).digest()
                ident = (pass_id, rank, str(record.get("gatherer_key")), digest)
                where = seen.setdefault(ident, f"{file.name} records[{i}]")
                if where != f"{file.name} records[{i}]":
                    raise FormatError(
                        file, f"records[{i}] repeats forward pass {pass_id} of rank {rank}, "
                              f"the same counts as {where}: its loads would count twice; "
                              "keep one dump per rank (each holds the recorder's whole "
                              "buffer)")
            passes[pass_id] = passes[pass_id] + logical if pass_id in passes else logical
            if rank is not None and rank not in ranks:
                ranks.append(rank)
    if not passes:
        raise FormatError(path, "the dump holds no records (no forward pass was recorded)")
    ids = sorted(passes)  # (one [layers, experts] for all: checked per dump above)
    counts = as_counts_of(torch.stack([passes[i] for i in ids]), path, "logical counts")
    meta = {
        "forward_pass_ids": ids,
        "ranks": sorted(ranks),
        "files": [f.name for f in files],
        "note": "slots mapped with SGLang's *last* physical_to_logical_map; passes recorded "
        "before a rebalance are mapped approximately",
    }
    return LoadTrace(counts, None, str(path), "sglang-per-pass", meta)
