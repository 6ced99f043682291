"""Writing placement files: eplb's own JSON and .pt, SGLang's ``--init-expert-location``
(JSON or a ``torch.save`` dict) and TensorRT-LLM's load-balancer YAML
(:func:`eplb.formats.read_placement` reads every one of them back; the engines'
constraints are listed in :mod:`eplb.formats.placements`).

The format is ``emit``'s, or, left out, the one the file's name implies
(:func:`emit_for`), as the CLI infers it: a plan written to ``lb.yaml`` is YAML.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from eplb._version import __version__
from eplb.core.bounds import placement_scores
from eplb.core.dispatch import DISPATCH_RULES
from eplb.core.inputs import as_gpu_speed
from eplb.core.messages import integer_runs
from eplb.core.placement import Placement
from eplb.core.topology import is_name
from eplb.core.trace import MAX_MODEL_LAYERS, LoadTrace, model_layer_ids
from eplb.formats._files import atomic_write, check_writable, name_suffix, output_file
from eplb.formats.placements import PLACEMENT_FORMAT, PLACEMENT_FORMAT_VERSION

#: Placement formats ``write_placement`` can emit.
EMITS: tuple[str, ...] = ("json", "pt", "sglang", "trtllm")
#: The format a file name's suffix implies (``*.sglang.json``/``*.sglang.pt``: ``"sglang"``).
EMIT_BY_SUFFIX = {".yaml": "trtllm", ".yml": "trtllm", ".pt": "pt", ".json": "json"}
#: Suffixes that name a file format other than the placements eplb writes. Without
#: ``emit=`` such a name is refused (the CLI's ``-o x.npy`` too): eplb's JSON under a name
#: that says NumPy, CSV or gzip misleads every reader that trusts the name (``np.load``
#: fails on it), and a dumps folder reads it as loads.
OTHER_FORMATS = {
    ".npy": "a NumPy array", ".npz": "NumPy arrays", ".csv": "CSV", ".tsv": "TSV",
    ".safetensors": "safetensors", ".pth": "a torch.save file (eplb's is named *.pt)",
    ".pkl": "a pickle", ".pickle": "a pickle", ".bin": "a binary file",
    ".gz": "a gzip archive", ".bz2": "a bzip2 archive", ".xz": "an xz archive",
    ".zst": "a zstd archive", ".zip": "a zip archive", ".tar": "a tar archive",
    ".toml": "TOML",
}
#: The names a placement file may take for its format to follow from them.
PLACEMENT_NAMES = "*.json, *.pt, *.yaml, *.sglang.json or *.sglang.pt"


def other_format_named(path: str | PathLike[str]) -> str | None:
    """What the name of ``path`` says it holds where that is a format eplb does not write
    placements as (``plan.npy``: ``"a NumPy array"``), else ``None``. A name that is a
    suffix alone (``.npy``, which Python reads as a stem) names that format too."""
    if emit_for(path) is not None:
        return None
    return OTHER_FORMATS.get(name_suffix(path))


def emit_for(path: str | PathLike[str]) -> str | None:
    """The placement format ``path``'s name implies, or ``None`` for a name that implies
    none: ``*.sglang.json``/``*.sglang.pt`` → ``"sglang"``, ``.yaml``/``.yml`` →
    ``"trtllm"``, ``.pt`` → ``"pt"``, ``.json`` → ``"json"`` (case-insensitive; a name
    that is a suffix alone, ``.pt``, names that format too)."""
    name = Path(path).name.lower()
    if name.endswith((".sglang.json", ".sglang.pt")):
        return "sglang"
    return EMIT_BY_SUFFIX.get(name_suffix(name))


def dead_gpus_message(emit: str, dead: list[int], num_gpus: int, slots_per_gpu: int,
                      num_experts: int) -> str:
    """Why engine format ``emit`` cannot take a plan with the GPUs ``dead`` of
    ``num_gpus`` (their slots hold -1), and the live-only plan to make instead."""
    live = num_gpus - len(dead)
    # the smallest slot count per live GPU that still holds every expert
    slots = max(slots_per_gpu, -(-num_experts // max(live, 1)))
    return (
        f"{emit} cannot express empty slots, but GPUs {dead} are dead (their slots hold -1). "
        f"Plan for the {live} live GPUs only before emitting an engine format (e.g. CLI: "
        f"-g {live} -r {live * slots}, {slots} slots per GPU) and restart the engine on "
        "them; or write eplb's own format, which keeps dead GPUs "
        "(emit='json'/'pt'; CLI: --emit json/pt or an OUT ending .json/.pt)"
    )


def write_placement(
    placement: Placement,
    path: str | PathLike[str],
    emit: str | None = None,
    *,
    weight: Any = None,
    layer_ids: Sequence[int] | None = None,
    num_model_layers: int | None = None,
    gpu_speed: Any = None,
    dispatch: str | None = None,
    force: bool = False,
) -> Path:
    """Write ``placement`` to ``path`` in the ``emit`` format; return the path.

    Args:
        placement: the plan; it must pass ``validate(anti_affinity=False)``.
        emit: the format; ``None`` (the default) takes the one ``path``'s name implies
            (:func:`emit_for`: ``lb.yaml`` is TensorRT-LLM YAML, ``plan.pt`` a ``torch.save``
            dict, ``init.sglang.json`` SGLang's), and eplb's JSON for any other name.
            ``"json"`` (eplb's own: phy2log, topology, policy, active GPUs, layer ids,
            per-layer balancedness and ceiling when ``weight`` is given, versions),
            ``"pt"`` (the same as a ``torch.save`` dict of tensors, load with
            ``weights_only=True``), ``"sglang"`` (``--init-expert-location``: SGLang parses
            a path ending ``.json`` as JSON and ``torch.load``s one ending ``.pt``, so the
            file is ``{"physical_to_logical_map": [L][R]}`` as JSON, or as a ``torch.save``
            dict holding an int64 tensor; other names are refused, SGLang would read them
            as inline JSON text) or ``"trtllm"`` (load-balancer YAML).
        weight: ``[L, E]`` loads (or a :class:`~eplb.formats.LoadTrace`, summed over steps)
            to record balancedness (json/pt only).
        layer_ids: ``[L]`` the model layer of each placement row (default ``0..L-1``).
            ``"trtllm"`` keys its assignments by them. ``"sglang"`` needs a row for every
            model layer ``0..max(layer_ids)``: rows not in ``layer_ids`` (dense layers)
            get SGLang's own trivial map ``slot % E``, which the engine accepts and never
            uses for routing. To control those rows, plan all layers (all-zero loads for
            dense ones) and leave ``layer_ids`` out.
        num_model_layers: ``"sglang"`` only: rows in the file, the model's layer count
            (e.g. 61 for DeepSeek-V3, whose MoE layers are 3..60). SGLang fails at start-up
            on a file with fewer rows than the model has layers. Default
            ``max(layer_ids) + 1``.
        gpu_speed: ``[P]`` the GPU speeds the plan was made for (``eplb.plan(...,
            gpu_speed=)``), json/pt only: recorded, and the recorded balancedness is in
            time; ``eval`` scores the file with them.
        dispatch: the engine dispatch the plan was made for, ``"even"`` or ``"nearest"``
            (``eplb.plan(..., dispatch=)``), json/pt only: recorded, and ``eval`` scores
            the file under it unless told otherwise. Engine files have no place for it
            (the engine's own setting decides), so it is not recorded there.
        force: overwrite an existing file (otherwise ``FileExistsError``).

    Raises:
        ValueError: unknown ``emit``, bad ``layer_ids``, an invalid placement, or dead
            GPUs for an engine format.
        FileExistsError: ``path`` exists and ``force`` is false.
        IsADirectoryError: ``path`` is a folder or ends in a separator.
    """
    path = output_file(path)
    named_by = ""  # where the name chose the format, messages about it say so
    if emit is None:
        other = other_format_named(path)
        if other is not None:
            # write_placement(p, "plan.npy") wrote eplb's JSON there without a word, where
            # the CLI's -o plan.npy is refused (new-user pass)
            raise ValueError(
                f"{path.name}: the name says {other}, which eplb does not write placements "
                f"as; name the file {PLACEMENT_NAMES}, or pass emit= to write that format "
                "under this name anyway")
        emit = emit_for(path) or "json"
        named_by = f" ({path.name!r} implies emit={emit!r}; pass emit= for another format)"
    if not is_name(emit, EMITS):
        raise ValueError(f"unknown emit {emit!r}; expected one of {', '.join(EMITS)}")
    check_emit_fits_name(emit, path)
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be an eplb.Placement, got {type(placement).__name__}")
    placement = placement.to("cpu")
    placement.validate(anti_affinity=False)
    layer_ids = _trace_layer_ids(weight, placement, layer_ids)
    ids = _layer_ids(layer_ids, placement.num_layers)
    if (named_by and weight is not None and emit in ("sglang", "trtllm")
            and not isinstance(weight, LoadTrace)):
        # the caller asked for the balancedness record the name's format has no place for
        # (an explicit engine emit= says the caller knows: the CLI passes both). A trace is
        # the README's way to key the rows by its layers: no word, whether or not it names
        # any (new-user passes: it warned on every engine file, then on a trace of a file
        # without layer ids)
        warnings.warn(f"{emit} files cannot record balancedness: weight= is not written"
                      f"{named_by}", UserWarning, stacklevel=2)
    if emit in ("sglang", "trtllm") and bool((placement.phy2log < 0).any()):
        dead = (~placement.live_gpus()).nonzero().flatten().tolist()
        topo = placement.topology
        raise ValueError(dead_gpus_message(emit, dead, topo.num_gpus, topo.slots_per_gpu,
                                           placement.num_experts) + named_by)
    if emit == "sglang":
        num_rows = _sglang_num_rows(ids, num_model_layers)
        # SGLang's test is str.endswith, case-sensitive: it parses "init.JSON" as inline
        # JSON text and fails at start-up on every rank (and reads a file named ".pt" itself
        # with torch.load)
        if not path.name.endswith((".json", ".pt")):
            raise ValueError(
                f"SGLang reads --init-expert-location as JSON from a path ending .json and with "
                f"torch.load from one ending .pt (lower case), and parses anything else as "
                f"inline JSON text; name the output *.json or *.pt, not {path.name!r}"
            )
    elif num_model_layers is not None:
        raise ValueError(f"num_model_layers (CLI: --num-model-layers) applies to emit='sglang' "
                         f"only, not {emit!r}{named_by}")
    if gpu_speed is not None:
        if emit not in ("json", "pt"):
            raise ValueError(f"gpu_speed is recorded in eplb's own files only (emit 'json' or "
                             f"'pt'); {emit} files have no place for it{named_by}")
        gpu_speed = as_gpu_speed(gpu_speed, placement.topology.num_gpus, torch.device("cpu"))
    if dispatch is not None and dispatch not in DISPATCH_RULES:
        raise ValueError(f"dispatch must be one of {', '.join(DISPATCH_RULES)} or None, got "
                         f"{dispatch!r}")
    if dispatch is not None:  # a plain str (a NumPy string would not load with weights_only)
        dispatch = str(dispatch)
    check_writable(path, force)
    if emit == "sglang":
        rows = _sglang_rows(placement, ids, num_rows)
        if path.suffix == ".pt":
            payload = {"physical_to_logical_map": rows}
            atomic_write(path, lambda f: torch.save(payload, f), "wb", force=force)
        else:
            doc = {"physical_to_logical_map": rows.tolist()}
            atomic_write(path, lambda f: _dump_json_rows(doc, f), "w", force=force)
    elif emit == "trtllm":
        text = _trtllm_text(placement, ids, layer_ids is not None)
        atomic_write(path, lambda f: f.write(text), "w", force=force)
    else:
        record = _eplb_record(placement, ids if layer_ids is not None else None, weight,
                              gpu_speed, dispatch)
        if emit == "json":
            atomic_write(path, lambda f: _dump_json_rows(record, f), "w", force=force)
        else:
            tensors = dict(record)
            tensors["phy2log"] = placement.phy2log.clone()
            if placement.active_gpus is not None:
                tensors["active_gpus"] = placement.active_gpus.to(torch.bool).clone()
            if gpu_speed is not None:
                tensors["gpu_speed"] = gpu_speed.to(torch.float64).clone()
            for name in ("layer_balancedness", "layer_ceiling"):
                if tensors.get(name) is not None:
                    tensors[name] = torch.tensor(tensors[name], dtype=torch.float64)
            atomic_write(path, lambda f: torch.save(tensors, f), "wb", force=force)
    return path


#: what each suffix's readers parse a file as, and the emits whose content they can parse
#: (JSON is YAML too; an SGLang file is JSON or a torch.save dict by its suffix, and its own
#: rule refuses other names with SGLang's reasons)
_PARSED_AS = {".json": ("JSON", ("json", "sglang")), ".pt": ("a torch.save file", ("pt", "sglang")),
              ".yaml": ("YAML", ("trtllm", "json", "sglang")),
              ".yml": ("YAML", ("trtllm", "json", "sglang"))}
_CONTENT = {"json": "JSON text", "pt": "a torch.save file", "trtllm": "YAML with comments",
            "sglang": "SGLang's JSON or torch.save file"}


def check_emit_fits_name(emit: str, path: str | PathLike[str]) -> None:
    """``ValueError`` where an explicit ``emit`` writes what the name's readers cannot parse:
    e.g. TensorRT-LLM's YAML (with eplb's topology comment) into ``lb.json``, which
    ``json.load`` then failed on (attacker pass), or a torch archive into ``plan.json``."""
    path = Path(path)
    kind, fits = _PARSED_AS.get(name_suffix(path), ("", (emit,)))
    if emit not in fits:
        raise ValueError(
            f"emit={emit!r} writes {_CONTENT[emit]}, but a file named {path.name!r} is read "
            f"as {kind}: name it for its content (e.g. {_EXAMPLE_NAMES[emit]}) or pick the "
            f"emit its name implies ({emit_for(path)!r})")


_EXAMPLE_NAMES = {"json": "plan.json", "pt": "plan.pt", "trtllm": "lb.yaml",
                  "sglang": "init.sglang.json"}


def _layer_ids(layer_ids: Sequence[int] | None, num_layers: int) -> list[int]:
    return model_layer_ids(layer_ids, num_layers, "layer_ids")


def _trace_layer_ids(weight: Any, placement: Placement,
                     layer_ids: Sequence[int] | None = None) -> list[int] | None:
    """The layer ids to write for ``weight`` given as a :class:`LoadTrace` that names its
    model layers (a file's own, OLMoE's ``[0, 7, 15]`` or ESFT's ``1..26``, or ids other
    than ``0..L-1`` given in code, e.g. a generated DeepSeek-V3 trace's ``3..60``): its
    rows are those layers, as the CLI writes them (new-user pass: through the API they
    were written as layers ``0..L-1``, layer 7's plan keyed as layer 1). ``layer_ids``
    given too must agree where the trace has the placement's rows (a trace of other rows
    is the caller's to pair: its ids are not used). ``None`` where neither names any."""
    given = None if layer_ids is None else list(layer_ids)
    if not isinstance(weight, LoadTrace) or not (
            weight.meta.get("model_layer_ids")
            or weight.layer_ids != list(range(weight.num_layers))):
        return given
    if given is not None:
        if (weight.num_layers == placement.num_layers
                and _layer_ids(given, placement.num_layers) != weight.layer_ids):
            raise ValueError(f"layer_ids {integer_runs(given)} differ from the model layers "
                             f"weight= (a LoadTrace) names, {integer_runs(weight.layer_ids)}")
        return given
    if weight.num_layers != placement.num_layers:
        raise ValueError(f"weight= (a LoadTrace) has {weight.num_layers} layers, the placement "
                         f"{placement.num_layers}: pass layer_ids= for the placement's rows")
    return list(weight.layer_ids)


def _dump_json_rows(doc: dict[str, Any], handle: Any) -> None:
    """JSON with one line per placement row: diff-friendly and still compact."""
    parts = []
    for k, v in doc.items():
        if isinstance(v, list) and v and isinstance(v[0], list):
            rows = ",\n    ".join(json.dumps(row, separators=(",", ":")) for row in v)
            parts.append(f"  {json.dumps(k)}: [\n    {rows}\n  ]")
        else:
            parts.append(f"  {json.dumps(k)}: {json.dumps(v)}")
    handle.write("{\n" + ",\n".join(parts) + "\n}\n")


def _sglang_num_rows(ids: list[int], num_model_layers: int | None) -> int:
    """Rows of an SGLang file: the model's layer count, which must cover every layer id."""
    if num_model_layers is None:
        return max(ids) + 1
    if (isinstance(num_model_layers, bool) or not isinstance(num_model_layers, int)
            or not 1 <= num_model_layers <= MAX_MODEL_LAYERS):
        raise ValueError(
            f"num_model_layers (CLI: --num-model-layers) must be an integer in "
            f"1..{MAX_MODEL_LAYERS}, got {num_model_layers!r}"
        )
    if max(ids) >= num_model_layers:
        raise ValueError(
            f"the placement's rows are model layers {ids[0]}..{ids[-1]}, but the model has only "
            f"{num_model_layers} layers (num_model_layers / --num-model-layers); check the "
            "layer ids (layer_ids / --first-layer)"
        )
    return num_model_layers


def _sglang_rows(placement: Placement, ids: list[int], num_rows: int) -> torch.Tensor:
    """``[num_rows, R]`` int64: the plan on its layers, SGLang's trivial map elsewhere."""
    slots = torch.arange(placement.topology.num_replicas)
    full = (slots % placement.num_experts).repeat(num_rows, 1)  # SGLang's init_trivial
    full[torch.tensor(ids)] = placement.phy2log
    return full


def _topology_comment(placement: Placement, ids: list[int] | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        **placement.topology.as_dict(),
        "policy": placement.policy,
        "num_experts": placement.num_experts,
    }
    if ids is not None:
        info["layer_ids"] = ids
    return info


def _trtllm_text(placement: Placement, ids: list[int], ids_given: bool) -> str:
    import yaml

    rows = placement.phy2log.tolist()
    doc = {
        "num_slots": placement.topology.num_replicas,
        "layer_updates_per_iter": 0,
        "initial_global_assignments": {lid: row for lid, row in zip(ids, rows, strict=True)},
    }
    info = json.dumps(_topology_comment(placement, None), separators=(",", ":"))
    header = (
        f"# TensorRT-LLM MoE load-balancer config written by eplb {__version__} "
        f"(static placement, ep_size={placement.topology.num_gpus})\n"
        f"# eplb-topology: {info}\n"
    )
    # libyaml's emitter where PyYAML has it: the same text, 2.4x faster (4.0 -> 1.7 s for
    # 200 layers of 2,048 slots)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return header + yaml.dump(doc, Dumper=dumper, default_flow_style=None, sort_keys=False,
                              width=1 << 16)


def _eplb_record(
    placement: Placement, ids: list[int] | None, weight: Any, gpu_speed: torch.Tensor | None,
    dispatch: str | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "format": PLACEMENT_FORMAT,
        "format_version": PLACEMENT_FORMAT_VERSION,
        "eplb_version": __version__,
        "topology": placement.topology.as_dict(),
        "policy": placement.policy,
        "num_layers": placement.num_layers,
        "num_experts": placement.num_experts,
        "layer_ids": ids,
        "active_gpus": None
        if placement.active_gpus is None
        else [bool(x) for x in placement.active_gpus.tolist()],
        "gpu_speed": None if gpu_speed is None else [float(x) for x in gpu_speed.tolist()],
        "dispatch": dispatch,
        "balancedness": None,
        "layer_balancedness": None,
        "ceiling": None,
        "layer_ceiling": None,
    }
    if weight is not None:
        if isinstance(weight, LoadTrace):
            weight = weight.total()
        record.update(placement_scores(placement, weight, gpu_speed))
    record["phy2log"] = placement.phy2log.tolist()
    return record


