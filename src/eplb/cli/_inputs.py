"""Reading options shared by the commands, and the CLI's view of policy resolution.

- :func:`add_input_options` adds ``--format``, ``--key``, ``--tokens-per-step``,
  ``--num-experts`` and ``--step-range`` to a command that reads loads; :func:`read_trace`
  reads one or several files with them (several files are steps one after another).
- :func:`cli_policy` asks :func:`eplb.core.resolve_policy` what a policy means for the
  given cluster and reports, with the flags' names, when the user's ``--nodes`` /
  ``--groups`` cannot be honoured.
- :func:`warn` prints one ``eplb: warning: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from eplb.cli._common import CliError
from eplb.cli._values import integer
from eplb.core import LoadTrace, Placement, Topology, resolve_policy
from eplb.core.messages import integer_runs
from eplb.core.placement import PlacementError, groups_on_nodes
from eplb.formats import (
    FormatError,
    check_emit_fits_name,
    detect_format,
    emit_for,
    read_loads,
    read_routing_steps,
)
from eplb.formats._files import name_suffix
from eplb.formats.detect import file_identity, folder_load_files
from eplb.formats.placement_writer import PLACEMENT_NAMES, other_format_named
from eplb.formats.placements import name_model_layers
from eplb.tools.scoring import step_routing


def warn(message: str) -> None:
    """One ``eplb: warning: ...`` line on stderr (even with ``--json``: stdout stays clean)."""
    text = " ".join(str(message).split())
    if text.startswith("eplb: "):
        text = text[len("eplb: "):]
    print(f"eplb: warning: {text}", file=sys.stderr)


def warn_guessed_experts(trace: LoadTrace, what: str = "") -> None:
    """Warn where the expert count was read off a top-k trace's largest id (the file does
    not record it): plan, simulate and bench alike (new-user passes: 4 tokens of a
    64-expert trace planned 63 experts, and SGLang then failed on the file; simulate and
    bench replayed such a count without a word). ``what``: the file, where several are
    read apart (bench)."""
    if trace.meta.get("num_experts_from_ids"):
        where = f" of {what}" if what else ""
        warn(f"the expert count{where}, {trace.num_experts}, is the largest expert id in the "
             f"top-k ids + 1 (the file does not record it): if the model has more experts, "
             f"pass --num-experts, else the ones this trace never routes to get no slot")


def add_input_options(p: argparse.ArgumentParser, what: str = "LOADS") -> None:
    """``--format``, ``--key``, ``--tokens-per-step``, ``--num-experts`` for reading ``what``."""
    g = p.add_argument_group("reading " + what)
    g.add_argument("--format", default=None, metavar="FMT",
                   help=f"input format of {what} (default: detected from the content)")
    g.add_argument("--key", default=None, metavar="NAME[,NAME...]",
                   help="which array of a multi-array file (.npz, .pt dict, .safetensors; "
                        "in JSON a path such as olmoe/expert_counts/arxiv) to read; several "
                        "names are read one after another as steps (tasks or batches of a "
                        "top-k routing file, or count arrays of one shape, e.g. domains)")
    g.add_argument("--tokens-per-step", type=integer, default=None, metavar="N",
                   help="top-k routing traces: cut each array of token ids into steps of N "
                        "tokens (default: one step per array)")
    g.add_argument("--num-experts", type=integer, default=None, metavar="E",
                   help="top-k routing traces and SGLang per-pass dumps: the number of experts "
                        "(default: the largest expert id + 1)")
    g.add_argument("--step-range", default=None, metavar="START:STOP",
                   help="use only these steps of the loads, as a Python slice of integers or "
                        "percentages of the steps (after several files are joined and a "
                        "top-k trace is cut by --tokens-per-step): e.g. plan on ':50%%' and "
                        "eval on '50%%:' to score out of sample; '100:', ':-10', '0:1'")


def require_loads_files(names: list[str]) -> None:
    """A clear error for a loads file that is not there (a dangling link is left to the
    reader, which names it as such), or one named twice (several files are steps one
    after another: a file named twice would count its loads twice)."""
    seen: dict[object, str] = {}  # each file by its (device, inode): through any link
    inside: dict[object, tuple[str, Path]] = {}  # files read from the folders named
    for name in names:
        if not name.strip():  # (Path("") is the current folder: it was read as a dump folder)
            raise CliError(f"a loads file name is empty ({name!r}): an unset shell variable?")
        path = Path(name)
        if not path.exists() and not path.is_symlink():
            raise CliError(f"loads file {name!r} not found")
        where = file_identity(path) or name  # (unreadable: the reader names the problem)
        if where in seen:
            raise CliError(f"loads file {name!r} is given twice (as {seen[where]!r} too): "
                           f"several files are steps one after another, so its loads would "
                           f"count twice")
        seen[where] = name
        if path.is_dir():  # (a link inside one folder is the reader's to refuse)
            try:
                files = folder_load_files(path)
            except (OSError, FormatError):  # the reader says what is wrong with it
                files = []
            for file in files:
                key = file_identity(file)
                if key is None:
                    continue
                if key in inside and inside[key][0] != name:
                    first, twin = inside[key]
                    raise CliError(f"the folders {first!r} and {name!r} both hold one file "
                                   f"({twin.name}, {file.name}: a link or the same file): "
                                   f"several files are steps one after another, so its loads "
                                   f"would count twice")
                inside[key] = (name, file)
    for where, name in seen.items():
        folder = inside.get(where, (None,))[0]
        if folder is not None and folder != name:
            raise CliError(f"loads file {name!r} is read from the folder {folder!r} too: "
                           f"several files are steps one after another, so its loads would "
                           f"count twice")


def placement_name(meta: dict, what: str) -> tuple[str, bool]:
    """``what`` (a placement file's name in messages), said to be SGLang's where it is, and
    whether it is: an SGLang file has a row per model layer, so its row index is a claim
    about layers that messages and :func:`eplb.cli.commands.rows_of_loads` weigh."""
    if meta.get("format") == "sglang":
        return f"{what} (SGLang's: row r is model layer r)", True
    return what, False


def all_zero_rows_note(count: int) -> str:
    """``" (2 all-zero rows left out)"`` after a file's name (empty for none): bench and
    simulate leave a dump's dense layers out and say so alike."""
    return f" ({count} all-zero row{'s' if count > 1 else ''} left out)" if count else ""


def check_reading_options(args: argparse.Namespace) -> None:
    """Refuse a reading option that is wrong whatever the files: a command calls it before
    it reports an existing output (new-user pass: ``plan --step-range abc -o x.json`` said
    only that x.json existed, and the real mistake came once the user had cleared it)."""
    if getattr(args, "tokens_per_step", None) is not None and args.tokens_per_step < 1:
        raise CliError(f"--tokens-per-step must be >= 1, got {args.tokens_per_step}")
    if getattr(args, "num_experts", None) is not None and args.num_experts < 1:
        raise CliError(f"--num-experts must be >= 1, got {args.num_experts}")
    text = getattr(args, "step_range", None)
    if text is not None:
        _step_bounds(text)


def read_trace(paths: str | Sequence[str], args: argparse.Namespace, *, progress: bool = False
               ) -> LoadTrace:
    """Read ``paths`` with the reading options in ``args``; several files are concatenated
    along their steps (they must agree on layers, experts and layer ids)."""
    names = [paths] if isinstance(paths, str) else list(paths)
    check_reading_options(args)
    key = getattr(args, "key", None)
    keys = None if key is None else [k.strip() for k in key.split(",") if k.strip()]
    require_loads_files(names)
    traces = []
    for name in names:
        path = Path(name)
        traces.append(read_loads(
            path, format=getattr(args, "format", None), progress=progress,
            key=None if keys is None else (keys[0] if len(keys) == 1 else keys),
            tokens_per_step=getattr(args, "tokens_per_step", None),
            num_experts=getattr(args, "num_experts", None)))
    trace = traces[0] if len(traces) == 1 else _join_steps(names, traces)
    text = getattr(args, "step_range", None)
    return trace if text is None else select_steps(trace, text)


#: one bound of ``--step-range``: an integer (signed as :func:`eplb.cli._values.integer`
#: takes it) or a percentage, in ASCII digits: ``\d`` also matched other scripts' digits,
#: which ``int`` and ``Fraction`` read, so '١٢:' kept steps 12 on where ``-g ١٢`` is refused
#: (attacker pass)
_STEP_BOUND = r"\s*(?:([+-]?[0-9]+)|([0-9]+(?:\.[0-9]+)?)%)?\s*"


class EmptyStepRange(CliError):
    """``--step-range`` keeps no step of the loads; ``steps``: how many they hold (bench
    gathers these, one file at a time, into one error)."""

    def __init__(self, message: str, steps: int) -> None:
        super().__init__(message)
        self.steps = steps


def kept_steps(steps: int, text: str) -> range:
    """The steps of ``steps`` that ``--step-range text`` keeps (:func:`select_steps`)."""
    # exact, not float: 18.4 % of 375 steps is 69, and 375 * 18.4 is 6899.999... in
    # binary floating point, so ':18.4%' kept 68 (attacker pass)
    bounds = [int(steps * b // 100) if isinstance(b, Fraction) else b
              for b in _step_bounds(text)]
    return range(steps)[slice(*bounds)]


def select_steps(trace: LoadTrace, text: str) -> LoadTrace:
    """``trace`` cut to the steps ``text`` names (``--step-range``): ``START:STOP``, each
    bound an integer (negative counts from the end, as in Python) or a percentage of the
    steps (rounded down), in ASCII digits, either one left out for the start or the end."""
    steps = trace.num_steps
    kept = kept_steps(steps, text)
    if not len(kept):
        raise EmptyStepRange(f"--step-range {text} keeps none of the {steps} step(s) of "
                             f"{trace.source or 'the loads'}", steps)
    counts = trace.counts[kept.start:kept.stop]
    # the meta that holds one entry per step is cut alike: simulate's note on short top-k
    # steps named steps outside the range, and numbered them in the whole trace (attacker
    # pass: ':2' of 4 steps of 300 tokens noted "step 3: 100")
    meta = dict(trace.meta)
    for key in _PER_STEP_META:
        value = meta.get(key)
        if isinstance(value, list) and len(value) == steps:
            meta[key] = value[kept.start:kept.stop]
    if "empty_steps" in meta:
        meta["empty_steps"] = int((counts.sum((1, 2)) == 0).sum())
    return replace(trace, counts=counts, meta=meta)


def _step_bounds(text: str) -> list[int | Fraction | None]:
    """``--step-range``'s START and STOP: an integer, a percentage (a :class:`Fraction`
    of 100) or ``None`` (left out); a :class:`CliError` names a malformed range."""
    match = re.fullmatch(_STEP_BOUND + ":" + _STEP_BOUND, text)
    if match is None:
        raise CliError(f"--step-range must be START:STOP, each an integer or a percentage "
                       f"of the steps in ASCII digits (e.g. ':50%', '50%:', '100:', ':-10'), "
                       f"got {text!r}")
    bounds: list[int | Fraction | None] = []
    for whole, percent in (match.group(1, 2), match.group(3, 4)):
        if percent is not None:
            share = Fraction(percent)
            if share > 100:
                raise CliError(f"--step-range {text!r}: a percentage must be at most 100%")
            bounds.append(share)
        else:
            bounds.append(None if whole is None else int(whole))
    return bounds


#: a trace's meta entries with one item per step (top-k tokens, generated regimes, TRT-LLM
#: iteration ids)
_PER_STEP_META = ("step_tokens", "regime", "iterations")


def _join_steps(names: list[str], traces: list[LoadTrace]) -> LoadTrace:
    """Several files of one model, their steps one after another, rows matched by model
    layer (new-user pass: an SGLang dump, layers 0..60, and an eplb trace of the MoE
    layers 3..60 were refused as different models):

    - a file that names no layers (bare rows) takes the ids of the files that do, where
      its row count is theirs (or that of their layers that carry load);
    - rows a file holds beyond the others' layers are dropped where they carry no load in
      any step (a dump's dense layers); the files then share the others' layers.
    """
    named = [t for t in traces if t.meta.get("model_layer_ids")]
    for name, trace in zip(names[1:], traces[1:], strict=True):
        if trace.num_experts != traces[0].num_experts or (
                not named and trace.num_layers != traces[0].num_layers):
            # (a top-k trace's count is its largest id + 1: two traces of one model whose
            # hottest ids differ were refused with no word of the fix; CLI-bugs pass)
            guessed = [n for n, t in ((names[0], traces[0]), (name, trace))
                       if t.num_experts != max(traces[0].num_experts, trace.num_experts)
                       and t.meta.get("num_experts_from_ids")]
            hint = (f" ({', '.join(guessed)}: the expert count was read off the largest "
                    "expert id; give the model's with --num-experts)" if guessed else "")
            raise CliError(
                f"{name} holds {trace.num_layers} layers × {trace.num_experts} experts but "
                f"{names[0]} holds {traces[0].num_layers} × {traces[0].num_experts}; several "
                f"LOADS files must describe the same model{hint}")
    # ascending: bare rows are read lowest layer first, as a file of them alone is (an
    # attacker pass summed bare row 0 into layer 3 beside a file listing 3, 2, 1, 0)
    layers = sorted((named or traces)[0].layer_ids)
    # the layers every file has (rows of no load elsewhere are a dump's dense layers)
    for trace in named:
        layers = [lid for lid in layers if lid in set(trace.layer_ids)]
    if not layers:
        raise CliError(f"{', '.join(names)} have no model layer in common: several LOADS "
                       "files must hold the same layers")
    bare_rows = {t.num_layers for t in traces if not t.meta.get("model_layer_ids")}
    if named and bare_rows and bare_rows != {len(layers)}:
        # bare rows of the loaded layers alone (a trace of the MoE layers beside a dump
        # whose dense rows are zero; second attacker pass)
        loaded = [lid for lid in layers
                  if any(bool(t.counts[:, t.layer_ids.index(lid)].any()) for t in named)]
        if bare_rows == {len(loaded)}:
            layers = loaded
    joined = []
    for name, trace in zip(names, traces, strict=True):
        if not trace.meta.get("model_layer_ids") and named:
            if trace.num_layers != len(layers):
                raise CliError(
                    f"{name} holds {trace.num_layers} rows without model layer ids, and the "
                    f"other files' layers are {integer_runs(layers)} ({len(layers)}): "
                    "several LOADS files must hold the same layers")
            trace = replace(trace, layer_ids=layers)
        extra = [row for row, lid in enumerate(trace.layer_ids) if lid not in set(layers)]
        if extra and bool(trace.counts[:, extra].any()):
            held = "; ".join(f"{n}: {integer_runs(t.layer_ids)}"
                             for n, t in zip(names, traces, strict=True))
            raise CliError(
                f"several LOADS files must hold the same model layers, and {name} has load "
                f"in layers the others lack ({held}; rows of no load, as a dump's dense "
                "layers, are left out)")
        if trace.layer_ids != layers:  # (every named file holds them all)
            trace = trace.select_layers(layers)
        joined.append(trace)
    first = joined[0]
    meta = {**first.meta, **_joined_step_meta(joined), "files": names,
            "model_layer_ids": bool(named)}
    return LoadTrace(torch.cat([t.counts for t in joined]), layers,
                     ", ".join(names), first.format, meta)


def _joined_step_meta(traces: list[LoadTrace]) -> dict:
    """The meta of ``traces`` that describes their steps, for the steps one after another:
    the per-step lists joined (or ``None`` where a file lacks one: the joined list would
    be short, and step i of it another step), ``segments`` renumbered, ``empty_steps``
    and ``num_experts_from_ids`` over every file, ``top_k`` only where the files agree.
    (The first file's meta was kept: ``simulate`` on two top-k files noted the short
    steps of the first file only, and said the trace held the first file's tokens.)"""
    meta: dict = {}
    for key in _PER_STEP_META:
        lists = [t.meta.get(key) for t in traces]
        if any(key in t.meta for t in traces):
            meta[key] = ([item for value in lists for item in value]
                         if all(isinstance(v, list) and len(v) == t.num_steps
                                for v, t in zip(lists, traces, strict=True)) else None)
    if any("segments" in t.meta for t in traces):
        segments, offset = [], 0
        for trace in traces:
            for seg in trace.meta.get("segments") or []:
                if isinstance(seg, dict) and isinstance(seg.get("first_step"), int):
                    seg = {**seg, "first_step": seg["first_step"] + offset}
                segments.append(seg)
            offset += trace.num_steps
        meta["segments"] = segments
    if any("empty_steps" in t.meta for t in traces):
        meta["empty_steps"] = sum(int((t.counts.sum((1, 2)) == 0).sum()) for t in traces)
    if any("num_experts_from_ids" in t.meta for t in traces):
        meta["num_experts_from_ids"] = any(t.meta.get("num_experts_from_ids") for t in traces)
    if any("top_k" in t.meta for t in traces):
        values = {t.meta.get("top_k") for t in traces}
        meta["top_k"] = values.pop() if len(values) == 1 else None
    return meta


def _hierarchy_problems(num_experts: int, num_gpus: int, num_nodes: int, num_groups: int,
                        dead: bool, speeds: bool) -> list[str]:
    """Why hierarchical placement cannot apply, in the CLI's words (empty: it can)."""
    problems = []
    if num_groups <= 1:
        problems.append("it needs --groups > 1")
    elif num_groups % num_nodes:
        problems.append(f"--groups ({num_groups}) is not a multiple of --nodes ({num_nodes})")
    if num_groups > 1 and num_experts % num_groups:
        problems.append(f"the {num_experts} experts do not divide into --groups ({num_groups})")
    if num_gpus % num_nodes:
        problems.append(f"--gpus ({num_gpus}) is not a multiple of --nodes ({num_nodes})")
    return problems + _flag_problems(dead, speeds)


def _flag_problems(dead: bool, speeds: bool) -> list[str]:
    """The flags that rule hierarchical placement out whatever the loads."""
    return ((["with --dead-gpus the nodes no longer have the same number of live GPUs"]
             if dead else [])
            + (["with --gpu-speed the nodes no longer have the same speed"] if speeds else []))


def refuse_forced_hierarchy(policy: str, dead: bool, speeds: bool) -> None:
    """``--policy hierarchical`` with flags that rule it out, refused before any file is
    read or an existing output is reported (:func:`cli_policy` checks the rest)."""
    problems = _flag_problems(dead, speeds)
    if policy == "hierarchical" and problems:
        raise CliError("--policy hierarchical is impossible: " + "; ".join(problems))


def cli_policy(policy: str, num_replicas: int, num_gpus: int, num_nodes: int, num_groups: int,
               num_experts: int, *, dead: bool = False, speeds: bool = False,
               where: str = "") -> str:
    """The concrete policy ``eplb.plan`` will use, from :func:`eplb.core.resolve_policy`.

    ``"hierarchical"`` that cannot apply is a :class:`CliError`; ``"auto"`` that falls back
    to global although the user asked for several nodes and groups prints a warning,
    ``where`` before its text (e.g. ``"x.npy: "``, where one call reads several models).
    """
    try:
        topology = Topology(num_replicas, num_gpus, num_nodes, num_groups)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    problems = _hierarchy_problems(num_experts, num_gpus, num_nodes, num_groups, dead, speeds)
    try:  # (quiet: reported below, in the flags' names)
        chosen = resolve_policy(policy, topology, num_experts, has_dead_gpus=dead,
                                has_speeds=speeds, quiet=True)
    except ValueError as exc:
        if policy != "hierarchical":
            raise CliError(str(exc)) from None
        raise CliError("--policy hierarchical is impossible: " + "; ".join(problems)) \
            from None
    if policy == "auto" and chosen == "global" and num_nodes > 1 and num_groups > 1:
        warn(f"{where}planning globally, because hierarchical placement is impossible: "
             + "; ".join(problems or ["see --policy"]))
    return chosen


def infer_emit(emit: str | None, output: str | Path) -> str:
    """``--emit`` or, when absent, the format implied by OUT's name (see ``eplb plan --help``)."""
    if emit:
        try:  # before any planning: the writer would refuse it after
            check_emit_fits_name(emit, output)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        return emit
    implied = emit_for(output)
    name = Path(Path(output).name.lower())
    # a name that is a suffix alone ('.npy': Python reads it as a stem) names that format
    # too: it wrote JSON to a hidden file '.npy' with a warning (attacker pass)
    suffix = name_suffix(output)
    other = other_format_named(output)
    if other is not None:
        # JSON under a name that says NumPy, CSV or gzip misleads every reader that trusts
        # the name (np.load fails on it), and a dumps folder reads it as loads
        raise CliError(f"{Path(output).name}: '{suffix}' names {other}, "
                       f"which eplb does not write placements as; name OUT {PLACEMENT_NAMES} "
                       f"(or pass --emit to write that format under this name anyway)")
    if implied is None:
        what = f"'{suffix}' names no placement format" if suffix else "no suffix"
        warn(f"{Path(output).name}: {what}; writing eplb's JSON (name OUT "
             f"{PLACEMENT_NAMES}, or pass --emit)")
    elif implied == "json" and name.stem.endswith("sglang"):
        # sglang.json, x-sglang.json: not the *.sglang.json SGLang's files are named
        warn(f"{Path(output).name}: writing eplb's JSON, which SGLang does not read; name "
             "OUT *.sglang.json (or pass --emit sglang) for SGLang's --init-expert-location")
    return implied or "json"


def warn_if_no_load(weight: torch.Tensor, source: object) -> None:
    """Warn when every layer of ``weight [L, E]`` (read from ``source``) carried no load:
    any placement balances nothing perfectly, so a plan or a score of 1.0 says nothing
    (an SGLang dump taken before traffic, a recorder never fed)."""
    if weight.numel() and not bool((weight > 0).any()):
        warn(f"{source}: every layer's loads are zero (no tokens were routed): any placement "
             "scores 1.0 on them, so this says nothing about the model's traffic; record "
             "loads under traffic")


def straddling_layers(previous: Placement, num_nodes: int, num_groups: int) -> list[int]:
    """Rows of ``previous`` that do not hold ``num_groups`` expert groups (consecutive
    expert ids) as the hierarchical policy does on ``num_nodes`` nodes: some group on more
    than one node, or a node without an equal share of the groups (the planner's rule,
    :func:`eplb.online.hierarchy.group_nodes`). A hierarchical plan from that map re-plans
    them, whatever the budget (unequal shares went uncounted: a budget of 0 read as broken,
    attacker pass)."""
    topo = previous.topology
    if (num_nodes <= 1 or num_groups <= 1 or previous.num_experts % num_groups
            or num_groups % num_nodes or topo.num_gpus % num_nodes):
        return []
    present = groups_on_nodes(previous.phy2log.cpu().numpy(), previous.num_experts,
                              Topology(topo.num_replicas, topo.num_gpus, num_nodes, num_groups))
    unequal = (present.sum(1) != num_groups // num_nodes).any(1)
    return np.nonzero((present.sum(2) > 1).any(1) | unequal)[0].tolist()


def revived_gpus(placement: Placement, active: torch.Tensor | None = None) -> list[int]:
    """The GPUs that hold nothing in ``placement`` (dead there) and are live now
    (``active [P]``, ``None`` for all): a plan from it fills their slots."""
    grid = placement.phy2log.cpu().view(placement.num_layers, placement.topology.num_gpus, -1)
    empty = (grid < 0).all(2).all(0)  # [P]: dead in the placement
    live = torch.ones_like(empty) if active is None else active.cpu().bool()
    return (empty & live).nonzero()[:, 0].tolist()


def anti_affinity_breach(placement: Placement, layer_ids: list[int] | None) -> str | None:
    """Where a placement read from a file (read with ``anti_affinity=False``: engines'
    maps may stack replicas) puts two replicas of an expert on one GPU, in model layers
    (``layer_ids``: those its file records), else ``None``: eval and simulate --initial
    use it as it is, and say so."""
    try:
        placement.validate()
    except PlacementError as exc:
        return name_model_layers(str(exc).removeprefix("anti-affinity: "), layer_ids)
    return None


def warn_revived(previous: Placement, active: torch.Tensor | None,
                 args: argparse.Namespace) -> None:
    """Say so when GPUs that hold nothing in ``--previous`` will be filled now (``active
    [P]``: the live GPUs, ``None`` for all)."""
    revived = revived_gpus(previous, active)
    if revived:
        ids = ",".join(map(str, revived))
        many = len(revived) > 1
        warn(f"GPU{'s' if many else ''} {ids} hold{'' if many else 's'} nothing in "
             f"{args.previous} (dead then) and {'are' if many else 'is'} live now, so "
             f"{'their' if many else 'its'} slots will be filled; pass --dead-gpus {ids} to "
             "keep them out")


def trace_routing(files: list[str], args: argparse.Namespace, read: LoadTrace,
                   trace: LoadTrace) -> list[torch.Tensor] | None:
    """The top-k ids behind every step of ``trace`` (``read`` before its empty layers were
    left out), to count the replay's cross-node traffic from rather than model it: where
    it measures traffic (nearest dispatch on several nodes) of top-k files (several: their
    steps one after another, as :func:`read_trace` joins them). ``None`` elsewhere, and
    where the ids do not count to the steps (warned: the figure is then modelled)."""
    if args.dispatch != "nearest" or args.nodes <= 1 or read.format != "topk":
        return None
    # every file top-k (a join takes its first file's format): two were modelled, the notes
    # saying a top-k trace's are counted (attacker pass: 0.991 where one file counts 0.630)
    if len(files) > 1 and any((args.format or detect_format(f)) != "topk" for f in files):
        return None
    key = getattr(args, "key", None)
    keys = None if key is None else [k.strip() for k in key.split(",") if k.strip()]
    steps = [ids for f in files for ids in read_routing_steps(f, keys, args.tokens_per_step)]
    if args.step_range is not None:
        kept = kept_steps(len(steps), args.step_range)
        steps = steps[kept.start:kept.stop]
    layers = [read.layer_ids.index(lid) for lid in trace.layer_ids]
    steps = [ids[:, layers] for ids in steps]
    try:
        return step_routing(steps, trace.counts, True)
    except ValueError as exc:
        warn(f"the remote nodes per token are modelled, not counted from the trace's tokens: "
             f"{exc}")
        return None
