"""Placement files: eplb's own JSON and .pt, SGLang's ``--init-expert-location`` JSON and
TensorRT-LLM's load-balancer YAML. :mod:`eplb.formats.placement_writer` writes them,
``read_placement`` here reads every one of them back.

Engine constraints honoured here (read from the engines' sources):

- SGLang passes the file's dict to ``ExpertLocationMetadata.init_by_mapping(**data)``,
  so its JSON must hold the single key ``physical_to_logical_map`` ``[L][R]`` covering
  **all** the model's layers. No topology fits in it: reading it back needs ``num_gpus=``.
- TensorRT-LLM's ``MoeLoadBalancerConfig`` takes ``num_slots``, ``layer_updates_per_iter``
  (0 = static placement) and ``initial_global_assignments {layer: [num_slots ints]}``
  keyed by the model's own layer index; ``num_slots % ep_size == 0``. eplb adds a YAML
  comment line with the topology, which TensorRT-LLM ignores and ``read_placement`` uses.
- Neither engine can express an empty slot, so placements with dead GPUs (``-1`` slots)
  are refused for ``"sglang"``/``"trtllm"``; eplb's JSON/.pt keep them.
"""

from __future__ import annotations

import functools
import json
import math
import re
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from eplb.core.dispatch import DISPATCH_RULES
from eplb.core.inputs import RepeatedKeyError, irregularity, unique_keys
from eplb.core.placement import Placement, PlacementError
from eplb.core.topology import Topology, positive_int
from eplb.core.trace import model_layer_ids
from eplb.formats._counts import unplain_kind
from eplb.formats._expand import check_expansion
from eplb.formats.detect import _load_pt, sniff_container
from eplb.formats.errors import FormatError, json_value_error, repeated_key, shown
from eplb.formats.routing import MAX_EXPERTS

#: Tag in eplb's own placement files, and its version.
PLACEMENT_FORMAT = "eplb.placement"
PLACEMENT_FORMAT_VERSION = 1

_TRT_COMMENT = re.compile(r"^#\s*eplb-topology:(.*)$", re.M)



# ------------------------------------------------------------------------------ reading
def read_placement(
    path: str | PathLike[str],
    *,
    num_gpus: int | None = None,
    num_nodes: int = 1,
    num_groups: int = 1,
    num_experts: int | None = None,
    policy: str | None = None,
) -> Placement:
    """Read a placement written by :func:`write_placement` (any emit) or by hand for an engine.

    eplb's JSON/.pt carry their topology, and TensorRT-LLM YAML written by eplb carries it
    in a comment: a recorded cluster wins over ``num_nodes``/``num_groups``, and a
    ``num_gpus`` that contradicts it is refused (its slots would be other GPUs'). A plain
    engine file (SGLang JSON, foreign YAML) needs ``num_gpus=`` (and
    ``num_nodes``/``num_groups`` for hierarchical checks). ``num_experts`` defaults to the
    largest expert id + 1 (every expert holds a slot). ``policy`` defaults to the
    file's, else ``"global"``. The result is validated (``anti_affinity=False``).

    Raises:
        FormatError: malformed file, unknown content, or a placement that breaks the
            contract (the message names the file and the violation).
        ValueError: ``num_gpus`` is needed and missing, is not a positive integer, or
            contradicts the file's.
    """
    placement, meta = read_placement_meta(
        path,
        num_gpus=num_gpus,
        num_nodes=num_nodes,
        num_groups=num_groups,
        num_experts=num_experts,
        policy=policy,
    )
    recorded = placement.topology.num_gpus
    if num_gpus is not None and "topology" in meta and num_gpus != recorded:
        # read on the file's cluster, the caller's count was silently ignored: a caller
        # reading GPU g's slots as slots g·S.. of num_gpus GPUs would read other GPUs'
        raise ValueError(f"{path}: the placement records {recorded} GPUs; num_gpus={num_gpus} "
                         f"contradicts it (leave num_gpus out for a file that records its "
                         f"cluster)")
    return placement


def read_placement_meta(
    path: str | PathLike[str],
    *,
    num_gpus: int | None = None,
    num_nodes: int = 1,
    num_groups: int = 1,
    num_experts: int | None = None,
    policy: str | None = None,
) -> tuple[Placement, dict[str, Any]]:
    """Like :func:`read_placement`, plus the file's metadata: ``format`` (the emit name),
    ``layer_ids`` (``None`` when the file does not say), ``policy`` (``None`` when the file
    does not record one, as in SGLang files), ``topology`` (only where the file records
    its cluster: eplb's files, and TensorRT-LLM YAML that eplb wrote) and, for eplb files,
    the recorded balancedness and versions.

    A file that records its cluster is read on it: ``num_gpus``, ``num_nodes`` and
    ``num_groups`` describe files that do not. Unlike :func:`read_placement`, a
    contradicting ``num_gpus`` is not refused here: the caller compares ``topology`` with
    what it asked for (the CLI does, to name its own flags)."""
    path = Path(path)
    if num_gpus is not None:  # the caller's, checked whether or not the file needs it
        num_gpus = positive_int("num_gpus", num_gpus)
    kind = sniff_container(path)
    if kind == "json":
        doc = _load_json_doc(path)
    elif kind in ("pt-zip", "pt-pickle"):
        doc = _load_pt(path)
        _refuse_tensors_without_data(path, doc)
    elif kind == "yaml":
        return _read_trtllm_yaml(path, num_gpus, num_nodes, num_groups, num_experts, policy)
    elif kind == "dir":
        raise FormatError(path, "is a folder; expected a placement file")
    else:
        raise FormatError(
            path,
            f"expected a placement (eplb .json/.pt, SGLang .json, TensorRT-LLM .yaml), found "
            f"{kind} content",
        )
    if not isinstance(doc, dict):
        raise FormatError(path, f"expected a JSON object / dict, found {type(doc).__name__}")
    if doc.get("format") == PLACEMENT_FORMAT:
        return _read_eplb(path, doc, kind, policy)
    if "physical_to_logical_map" in doc:
        rows = _int_rows(path, doc["physical_to_logical_map"], "physical_to_logical_map")
        topo = _topology(path, rows.shape[1], num_gpus, num_nodes, num_groups, "SGLang")
        placement = _build(path, rows, num_experts, topo, policy or "global", None)
        return placement, {"format": "sglang", "layer_ids": None, "policy": None}
    if "initial_global_assignments" in doc or "moe_config" in doc:
        return _read_trtllm_doc(path, doc, "", num_gpus, num_nodes, num_groups, num_experts, policy)
    if "logical_count" in doc or "load_history" in doc:
        raise FormatError(
            path,
            "holds load statistics, not a placement; give it as LOADS (Python: "
            "eplb.formats.read_loads)",
        )
    raise FormatError(
        path,
        f"expected a placement ('format': '{PLACEMENT_FORMAT}', 'physical_to_logical_map' or "
        f"'initial_global_assignments'), found keys {sorted(map(str, doc))}",
    )


def _refuse_tensors_without_data(path: Path, doc: Any) -> None:
    """A ``FormatError`` naming the first field of a loaded ``.pt`` placement (or of its
    topology) that is a meta, sparse or quantized tensor: the checks read every field as
    plain values, and torch raised its own errors from deep inside them."""
    if not isinstance(doc, dict):
        return
    fields = [*doc.items()]
    if isinstance(doc.get("topology"), dict):
        fields += [(f"topology.{k}", v) for k, v in doc["topology"].items()]
    for name, value in fields:
        kind = unplain_kind(value) if isinstance(value, torch.Tensor) else None
        if kind is not None:
            raise FormatError(path, f"{name} is a {kind} tensor; expected a plain tensor")


def _load_json_doc(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=unique_keys)
    except RepeatedKeyError as exc:
        raise FormatError(path, repeated_key(exc.key)) from None
    except RecursionError:
        raise FormatError(path, "JSON nested too deeply to be a placement") from None
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"is not UTF-8 text: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, > 4300-digit ints
        raise FormatError(path, json_value_error(exc)) from None


def _odd_entry(value: Any, what: str) -> str | None:
    """A message naming the first entry of the table ``value`` (lists of rows) that is not
    an integer id in int64's range, ``None`` when every entry is one (or ``value`` is not
    a list of lists: the caller's checks speak then). Torch reads a JSON ``true`` as 1 and
    reports a string or a 2**70 by an unrelated message."""
    if not isinstance(value, list) or not all(isinstance(row, list) for row in value):
        return None
    for i, row in enumerate(value):
        for j, entry in enumerate(row):
            if isinstance(entry, bool):
                return f"{what}[{i}][{j}] is {str(entry).lower()}, not an expert id"
            if isinstance(entry, int):
                if not -(1 << 63) <= entry < (1 << 63):
                    return f"{what}[{i}][{j}] is {shown(entry)}, not an expert id (beyond int64)"
            elif not isinstance(entry, float):  # floats: refused below, with the dtype
                return f"{what}[{i}][{j}] is {shown(entry)}, not an expert id"
    return None


def _int_rows(path: Path, value: Any, what: str) -> torch.Tensor:
    odd = _odd_entry(value, what)
    if odd is not None:
        raise FormatError(path, odd)
    problem: Exception | None = None
    try:
        rows = torch.as_tensor(value)
    except RecursionError:
        raise FormatError(path, f"{what} is nested too deeply") from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        rows, problem = None, exc
    if rows is None or (rows.numel() == 0 and isinstance(value, list | tuple)):
        # named in the file's terms ("[1] has 31 entries where [0] has 32") where it can
        # tell: torch's text reads backwards ("expected sequence of length 31 ... got 32"),
        # and torch reads [[], [0, 1]] as an empty (2, 0) table without a word
        detail = irregularity(value) or problem
        if detail:
            raise FormatError(path, f"{what} is not a rectangular [layers][slots] table: "
                                    f"{detail}")
    if rows.numel() == 0:  # ("must be integer ...; found torch.float32 (0,)" read as a type
        # mistake: attacker pass)
        raise FormatError(path, f"{what} is empty ({tuple(rows.shape)}); expected a "
                                "[layers][slots] table of expert ids")
    if (rows.dim() != 2 or rows.is_floating_point() or rows.is_complex()
            or rows.dtype == torch.bool):  # complex: the cast to int64 drops its parts
        raise FormatError(
            path, f"{what} must be integer [layers][slots]; found {rows.dtype} {tuple(rows.shape)}"
        )
    return rows.to(torch.int64)


def _topology(
    path: Path, num_slots: int, num_gpus: int | None, num_nodes: int, num_groups: int, engine: str,
    recorded: bool = False,
) -> Topology:
    if num_gpus is None:
        raise ValueError(
            f"{path}: {'an' if engine.startswith('S') else 'a'} {engine} placement does not "
            "record the number of GPUs; give the EP "
            f"size with num_gpus= (CLI: -g/--gpus; {num_slots} slots must divide evenly)"
        )
    try:
        topo = Topology(num_slots, num_gpus, num_nodes, num_groups)
        topo.gpus_per_node  # noqa: B018 (the GPUs must split into equal nodes)
    except ValueError as exc:
        # the file's own slot count first: "num_replicas (72)" alone read as the caller's
        whose = "recorded" if recorded else "given"
        raise FormatError(path, f"its {num_slots} slots per layer do not fit the {whose} "
                                f"topology of {num_gpus} GPUs: {exc}") from None
    return topo


def _build(
    path: Path,
    rows: torch.Tensor,
    num_experts: int | None,
    topo: Topology,
    policy: str,
    active: torch.Tensor | None,
    layer_ids: list[int] | None = None,
) -> Placement:
    if num_experts is None:
        num_experts = int(rows.max()) + 1
    if not 0 < num_experts <= MAX_EXPERTS:
        raise FormatError(path, f"num_experts {num_experts} is outside [1, {MAX_EXPERTS}]")
    try:
        placement = Placement.from_phy2log(rows, num_experts, topo, policy, active)
        placement.validate(anti_affinity=False)
    except (PlacementError, ValueError) as exc:
        raise FormatError(path, "invalid placement: "
                                + name_model_layers(str(exc), layer_ids)) from None
    return placement


def name_model_layers(message: str, layer_ids: list[int] | None) -> str:
    """``message`` of :meth:`Placement.validate`, whose ``layer N`` is a row index, with
    the model layer of that row where a file keys its rows by layer (a TensorRT-LLM YAML
    of layers 3..60: its row 0 is model layer 3, not layer 0)."""
    if not layer_ids:
        return message

    def named(match: re.Match[str]) -> str:
        row = int(match.group(1))
        if row >= len(layer_ids) or int(layer_ids[row]) == row:
            return match.group(0)
        return f"model layer {int(layer_ids[row])} (row {row})"

    return re.sub(r"\blayer (\d+)", named, message)


def _field_int(path: Path, record: dict[str, Any], name: str, default: int | None = None,
               where: str = "") -> int | None:
    """Integer field ``name`` of a file's metadata ``record`` (``default`` when absent);
    anything else is a :class:`FormatError` naming the field."""
    value = record.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(path, f"{where}{name} must be an integer, got {shown(value)}")
    return value


def _read_eplb(path: Path, doc: dict[str, Any], kind: str, policy: str | None):
    version = _field_int(path, doc, "format_version")
    if version is None or version < 1:
        raise FormatError(path, f"eplb placement format_version must be a positive integer, "
                                f"got {shown(doc.get('format_version'))}")
    if version > PLACEMENT_FORMAT_VERSION:
        raise FormatError(
            path,
            f"eplb placement format_version {version!r} is not supported (this eplb reads up to "
            f"{PLACEMENT_FORMAT_VERSION}); upgrade eplb",
        )
    for name in ("topology", "num_experts", "phy2log"):
        if name not in doc:
            raise FormatError(path, f"eplb placement lacks the field {name!r}")
    keys, given = ("num_replicas", "num_gpus", "num_nodes", "num_groups"), doc["topology"]
    if not (isinstance(given, dict) and set(keys[:2]) <= set(given) <= set(keys)):
        raise FormatError(path, f"bad topology {shown(given)}: expected a mapping of "
                                f"{', '.join(keys)} (the last two optional)")
    try:
        topo = Topology(**doc["topology"])
        topo.gpus_per_node  # noqa: B018 (a recorded cluster must split into equal nodes)
    except (TypeError, ValueError) as exc:
        raise FormatError(path, f"bad topology {shown(doc['topology'])}: {exc}") from None
    rows = _int_rows(path, doc["phy2log"], "phy2log")
    active = doc.get("active_gpus")
    if active is not None:
        values = active.tolist() if isinstance(active, torch.Tensor) else active
        if (not isinstance(values, list) or len(values) != topo.num_gpus
                or not all(isinstance(v, bool) for v in values)):
            raise FormatError(path, f"active_gpus must be null or {topo.num_gpus} booleans "
                                    f"(one per GPU), got {str(active)[:80]}")
        active = torch.tensor(values, dtype=torch.bool)
    speed = doc.get("gpu_speed")
    if speed is not None:
        values = speed.tolist() if isinstance(speed, torch.Tensor) else speed
        if (not isinstance(values, list) or len(values) != topo.num_gpus
                or not all(isinstance(v, int | float) and not isinstance(v, bool)
                           and math.isfinite(v) and v > 0 for v in values)):
            raise FormatError(path, f"gpu_speed must be null or {topo.num_gpus} positive "
                                    f"numbers (one per GPU), got {str(speed)[:80]}")
    if doc.get("dispatch") not in (None, *DISPATCH_RULES):
        raise FormatError(path, f"dispatch must be null or one of {', '.join(DISPATCH_RULES)}, "
                                f"got {shown(doc['dispatch'])}")
    num_layers = _field_int(path, doc, "num_layers", rows.shape[0])
    if num_layers != rows.shape[0]:
        raise FormatError(path, f"num_layers is {num_layers} but phy2log has {rows.shape[0]} rows")
    if doc.get("layer_ids") is not None:
        try:
            model_layer_ids(doc["layer_ids"], rows.shape[0], "layer_ids")
        except ValueError as exc:
            raise FormatError(path, str(exc)) from None
    num_experts = _field_int(path, doc, "num_experts")
    if num_experts is None:  # present (checked above) but null
        raise FormatError(path, "num_experts must be an integer, got None")
    placement = _build(path, rows, num_experts, topo, policy or doc.get("policy", "global"),
                       active, doc.get("layer_ids"))
    meta = {k: v for k, v in doc.items() if k not in ("phy2log", "active_gpus")}
    meta["format"] = "json" if kind == "json" else "pt"
    for k, v in meta.items():
        if isinstance(v, torch.Tensor):
            meta[k] = v.tolist()
    return placement, meta


@functools.cache
def _unique_key_loader(safe_loader: type) -> type:
    """``safe_loader`` (PyYAML's safe loader, or libyaml's) refusing a mapping that gives one
    key twice (:class:`eplb.core.inputs.RepeatedKeyError`): like JSON, YAML keeps the last
    silently, so a layer listed twice in ``initial_global_assignments`` took its second
    map."""
    import yaml

    class UniqueKeyLoader(safe_loader):
        def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # "<<: *defaults" may be overridden: that is its point
                    key = self.construct_object(key_node, deep=True)
                    try:
                        repeated = key in seen
                    except TypeError:  # unhashable: the base loader names it
                        continue
                    if repeated:
                        raise RepeatedKeyError(str(key))
                    seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _read_trtllm_yaml(path, num_gpus, num_nodes, num_groups, num_experts, policy):
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"is not UTF-8 text: {exc}") from None
    try:
        # libyaml's parser where PyYAML was built with it (the same documents but for a
        # tab inside [...] or {...}, which libyaml accepts; the constructor is Python's
        # either way): a 200-layer, 2,048-slot file took 13.6 s to read, now 3.2
        # (benchmarks/bench_formats.py --trtllm, BENCHMARKS.md §7)
        safe_loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        try:
            doc = yaml.load(text, Loader=_unique_key_loader(safe_loader))
        except yaml.YAMLError:
            if safe_loader is yaml.SafeLoader:
                raise
            # a refused file is parsed again by PyYAML's own parser, for its message:
            # libyaml's names no character and quotes no line ("found character that
            # cannot start any token" for a tab, "found duplicate anchor" without its name)
            doc = yaml.load(text, Loader=_unique_key_loader(yaml.SafeLoader))
    except RepeatedKeyError as exc:
        raise FormatError(path, repeated_key(exc.key, "YAML")) from None
    except yaml.YAMLError as exc:
        raise FormatError(path, f"malformed YAML: {exc}") from None
    except ValueError as exc:  # an integer of more than 4300 digits (Python's limit)
        raise FormatError(path, json_value_error(exc).replace("malformed JSON", "malformed YAML")
                          ) from None
    except RecursionError:
        raise FormatError(path, "YAML nested too deeply to be a placement") from None
    check_expansion(doc, path)  # aliases: a 1.5 KB "billion laughs" file took all memory
    if not isinstance(doc, dict):
        raise FormatError(path, f"expected a YAML mapping, found {type(doc).__name__}")
    return _read_trtllm_doc(path, doc, text, num_gpus, num_nodes, num_groups, num_experts, policy)


def _read_trtllm_doc(path, doc, text, num_gpus, num_nodes, num_groups, num_experts, policy):
    # a full LLM-API config nests the balancer under moe_config.load_balancer
    if "initial_global_assignments" not in doc and isinstance(doc.get("moe_config"), dict):
        doc = doc["moe_config"].get("load_balancer") or {}
    assignments = doc.get("initial_global_assignments") if isinstance(doc, dict) else None
    if not isinstance(assignments, dict) or not assignments:
        raise FormatError(
            path, "expected TensorRT-LLM 'initial_global_assignments: {layer: [slots]}', found none"
        )
    # keys are layer indices: YAML ints (or digit strings); 3.9 or true must not be read
    # as a layer, and two keys must not name one layer
    # (ASCII digits only: int() also reads other scripts' digits, '١' as 1)
    keys = [int(k) if isinstance(k, str) and k.strip().isascii() and k.strip().isdecimal()
            else k for k in assignments]
    try:
        checked = model_layer_ids(keys, len(keys), "initial_global_assignments keys")
    except ValueError as exc:
        raise FormatError(path, str(exc)) from None
    rows_by_id = dict(zip(checked, assignments.values(), strict=True))
    ids = sorted(checked)
    num_slots = doc.get("num_slots")
    # each row named by its layer (a null row read "lists of one length, found {-1}")
    for i in ids:
        if not isinstance(rows_by_id[i], list):
            raise FormatError(path, f"initial_global_assignments[{i}] is "
                                    f"{shown(rows_by_id[i])}, not a list of expert ids")
    width = len(rows_by_id[ids[0]])
    for i in ids:
        if len(rows_by_id[i]) != width:
            raise FormatError(path, f"initial_global_assignments rows must have one length "
                                    f"(a slot each): layer {ids[0]} has {width} entries, "
                                    f"layer {i} {len(rows_by_id[i])}")
    if num_slots is not None and (type(num_slots) is not int or num_slots <= 0):
        # TensorRT-LLM's MoeLoadBalancerConfig types it int (YAML's 2.0 is a float)
        raise FormatError(path, f"num_slots must be a positive integer, got {shown(num_slots)}")
    if num_slots is not None and num_slots != width:
        raise FormatError(
            path, f"num_slots is {shown(num_slots)} but the assignment lists have {width} entries"
        )
    rows = _int_rows(path, [rows_by_id[i] for i in ids], "initial_global_assignments")
    info: dict[str, Any] = {}
    match = _TRT_COMMENT.search(text)
    if match:
        # a damaged comment is refused, not skipped: the cluster it records is what the
        # map is read on (it was read as no comment, silently; files attacker pass)
        damaged = FormatError(path, f"the eplb-topology comment {shown(match.group(1).strip())} "
                                    "is not one JSON object: restore it as eplb wrote it, or "
                                    "delete the line and give the cluster (-g/--gpus)")
        try:
            info = json.loads(match.group(1), object_pairs_hook=unique_keys)
        except RepeatedKeyError as exc:  # which cluster was meant is not ours to pick
            raise FormatError(path, f"the eplb-topology comment {repeated_key(exc.key)}") \
                from None
        except json.JSONDecodeError:
            raise damaged from None
        if not isinstance(info, dict):
            raise damaged
    where = "the eplb-topology comment's "
    recorded = None
    if "num_gpus" in info:
        # the cluster eplb recorded, as for its own files (the arguments describe files
        # that record none)
        num_gpus = _field_int(path, info, "num_gpus", where=where)
        num_nodes = _field_int(path, info, "num_nodes", 1, where)
        num_groups = _field_int(path, info, "num_groups", 1, where)
        recorded = {"num_gpus": num_gpus, "num_nodes": num_nodes, "num_groups": num_groups}
    if num_experts is None and "num_experts" in info:
        num_experts = _field_int(path, info, "num_experts", where=where)
    topo = _topology(path, width, num_gpus, num_nodes, num_groups, "TensorRT-LLM",
                     recorded is not None)
    placement = _build(path, rows, num_experts, topo, policy or info.get("policy", "global"), None,
                       ids)
    meta = {"format": "trtllm", "layer_ids": ids, "policy": info.get("policy")}
    if recorded is not None:
        meta["topology"] = {"num_replicas": width, **recorded}
    return placement, meta
