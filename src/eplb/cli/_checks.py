"""The checks the ``eplb`` commands make before any work: the output file (never one
of the inputs), the cluster flags and topology, and the shape a file gets without
``--replicas``/``--gpus``. Each mistake is one :class:`~eplb.cli._common.CliError`
naming the flag."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from eplb.cli._common import CliError, cli_words, unwritable_reason
from eplb.core.dispatch_plan import NEAREST_TIMES, nearest_size_problem
from eplb.core.planner import check_plan_size
from eplb.core.topology import Topology
from eplb.core.trace import MAX_MODEL_LAYERS
from eplb.formats._files import only_regular_files_are_replaced, output_file
from eplb.formats.detect import folder_load_files
from eplb.formats.errors import FormatError
from eplb.online.budget import takes_budget


def existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CliError(f"{what} {str(path)!r} not found")
    return path


def check_output(path: str | Path, force: bool) -> Path:
    """Fail before the work when OUT exists (a dangling symlink counts) or has no folder.

    The writers re-check when they publish, so a file that appears meanwhile is kept.
    """
    if str(path) == "-":  # the usual spelling of stdout: never a file named '-' by surprise
        raise CliError("-o -: eplb writes files, not stdout (--json prints the summary); give "
                       "a file name (./- for a file named '-')")
    if not str(path).strip():
        raise CliError("-o needs a file name")
    try:
        path = output_file(path)  # the writers' own rule: a trailing separator names a folder
    except IsADirectoryError as exc:
        raise CliError(f"-o {exc}") from None
    if path.is_dir():  # first: --force cannot replace a folder, so do not suggest it
        raise CliError(f"{path} is a directory; give a file name to write to")
    try:  # nor a device or a link, which --force does not replace either
        only_regular_files_are_replaced(path)
    except FileExistsError as exc:
        raise CliError(cli_words(str(exc))) from None
    if os.path.lexists(path) and not force:
        raise CliError(f"{path} already exists; pass --force to overwrite it")
    if path.parent != Path() and not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise CliError(f"directory {str(path.parent)!r} for the output {what}")
    if not os.access(path.parent, os.W_OK | os.X_OK):  # fail before the work, not after
        reason = unwritable_reason(path.parent)
        if reason == ": permission denied":
            raise CliError(f"cannot write {path}: permission denied in {str(path.parent)!r}")
        raise CliError(f"cannot write {path}: {str(path.parent)!r}{reason}")
    return path


def refuse_input_as_output(out: Path, inputs: list[tuple[str, str | None]]) -> None:
    """Refuse an OUT that names a file the command reads (``inputs``: ``(label, path or
    None)``), even with ``--force``: the new placement would replace the user's loads
    (or GPU speeds, or routing trace), and ``--force`` means "replace my old output",
    not "replace my data". ``--previous`` is not passed here: replacing the placement in
    force by the next one is what a re-plan in place means."""
    if not os.path.lexists(out):
        return
    for label, given in inputs:
        if given is None:
            continue
        read = [Path(given)]
        if os.path.isdir(given):
            # a folder's dumps or rank files are read too (attacker pass: -o naming one of
            # them with --force replaced an SGLang dump, or a TensorRT-LLM rank file)
            try:
                read = folder_load_files(Path(given))
            except (OSError, FormatError):  # the reader says what is wrong with it
                read = []
            # a TensorRT-LLM folder's meta file is read too (second attacker pass)
            read.append(Path(given) / "meta_info.json")
        for file in read:
            try:
                same = file.is_file() and os.path.samefile(out, file)
            except OSError:
                continue  # not a file that exists: nothing to lose
            if same:
                what = f"{label} {given}" + ("" if file == Path(given) else
                                            f" (its file {file.name})")
                raise CliError(f"-o {out} is {what}: writing the placement there would "
                               "replace it (even --force does not); choose another output "
                               "name")


def refuse_rows_past_model_layers(layer_ids: list[int], emit: str, loads: str) -> None:
    """Engine files key rows by model layer (0..4095): a file of more bare rows than that,
    which eplb's own files take, is refused before the planning (it failed only after it,
    or on the --mtp-layers 0 no one passed: attacker pass)."""
    if max(layer_ids) >= MAX_MODEL_LAYERS and emit in ("sglang", "trtllm"):
        raise CliError(f"{loads} has {len(layer_ids)} rows, one per model layer, but an "
                       f"engine file names model layers 0..{MAX_MODEL_LAYERS - 1} only: write "
                       "eplb's own format (-o NAME.json or .pt), or check the rows are layers")


def check_cluster_flags(*, gpus: int | None, nodes: int | None,
                        groups: int | None = None) -> None:
    """``eval``'s -g/--nodes/--groups, each optional: >= 1 when given (0 is no "leave it
    out"), and GPUs that split over the nodes (a cluster that can exist, as in plan)."""
    for flag, value in (("--gpus", gpus), ("--nodes", nodes), ("--groups", groups)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be >= 1, got {value}")
    if gpus is not None and nodes is not None and gpus % nodes:
        raise CliError(f"--gpus ({gpus}) must be a multiple of --nodes ({nodes})")


def check_nearest_moves(args: argparse.Namespace, policy: str, dead: bool = False) -> None:
    """Under ``--dispatch nearest`` (plan and simulate alike): on several nodes
    ``--max-moves`` budgets and ``--move-price`` prices the global and locality policies'
    moves with every GPU live (the others re-plan and relabel onto the old GPUs:
    :func:`eplb.online.budget.takes_budget`);
    refuse each elsewhere by flag, before the API refuses it in its keywords. One node
    budgets and prices every plan."""
    if (getattr(args, "max_moves", None) is not None
            and not takes_budget("nearest", args.nodes, policy, dead)):
        where = f"the {policy} policy" if policy != "global" else "--dead-gpus"
        fix = "drop --max-moves" if policy == "global" else ("add --policy global, or drop "
                                                             "--max-moves")
        raise CliError(f"--max-moves under --dispatch nearest on several nodes budgets the "
                       f"global and locality policies with every GPU live; with {where} "
                       f"eplb re-plans and relabels onto the old GPUs (no budget): {fix}")
    for flag, name, verb in (("--move-price", "move_price", "prices"),
                             ("--drift", "drift", "values")):
        if (getattr(args, name, None) is not None
                and not takes_budget("nearest", args.nodes, policy, False)):
            raise CliError(f"{flag} under --dispatch nearest {verb} the global and "
                           f"locality policies' moves; with the {policy} policy eplb re-plans "
                           f"and relabels onto the old GPUs, scoring no moves: drop {flag}")


def check_nearest_flags(args: argparse.Namespace, policy: str, num_experts: int,
                        num_layers: int, dead: bool = False) -> None:
    """Under ``--dispatch nearest``: ``--fair`` shapes a global plan, ``--routing``
    feeds the locality policy and ``--max-moves`` budgets the global policy with every GPU
    live; refuse each elsewhere by flag (the API's refusal names its keywords)."""
    too_large = (nearest_size_problem(args.gpus, args.replicas // args.gpus, num_experts,
                                      num_layers)
                 if policy == "global" and args.nodes > 1 else None)
    if too_large:
        raise CliError(f"--dispatch nearest with the global policy over {args.nodes} nodes "
                       f"is beyond what eplb plans: {too_large} (its node-aware relabelling "
                       f"grows about as GPUs³ and with the slots: {NEAREST_TIMES}). Plan "
                       "with --dispatch even, or --policy hierarchical")
    check_nearest_moves(args, policy, dead)
    if args.fair != "auto" and policy != "global":
        raise CliError(f"--fair shapes the global policy's plan for nearest dispatch; this "
                       f"plan is {policy}: add --policy global, or drop --fair")
    if args.routing is not None and policy != "locality":
        raise CliError(f"--routing gives the locality policy its co-selection statistics; "
                       f"this plan is {policy}: add --policy locality, or drop --routing")


def check_topology(num_replicas: int, num_gpus: int, num_nodes: int, num_groups: int,
                   num_experts: int, num_layers: int | None = None) -> None:
    """Reject impossible cluster shapes up front, with the option names in the message,
    and (given ``num_layers``) problems beyond what eplb plans, before anything is
    allocated for them."""
    for name, value in (("--replicas", num_replicas), ("--gpus", num_gpus),
                        ("--nodes", num_nodes), ("--groups", num_groups)):
        if value < 1:
            raise CliError(f"{name} must be >= 1, got {value}")
    if num_replicas % num_gpus:
        # fewer slots than GPUs that the GPUs' count is a multiple of (-r 16 -g 160): the
        # two were most likely swapped (new-user pass)
        swapped = (num_replicas < num_gpus and num_gpus % num_replicas == 0
                   and num_gpus >= num_experts)
        hint = (f" (swapped? -r {num_gpus} -g {num_replicas} is "
                f"{num_gpus // num_replicas} slots on each of {num_replicas} GPUs)")
        raise CliError(f"--replicas ({num_replicas}) must be a multiple of --gpus ({num_gpus})"
                       + (hint if swapped else ""))
    if num_gpus % num_nodes:
        raise CliError(f"--gpus ({num_gpus}) must be a multiple of --nodes ({num_nodes})")
    if num_replicas < num_experts:
        raise CliError(f"--replicas ({num_replicas}) must be >= the number of experts "
                       f"({num_experts}): every expert needs a slot")
    if num_layers is not None:
        try:
            # the size does not depend on nodes and groups
            check_plan_size(num_layers, Topology(num_replicas, num_gpus), num_experts)
        except ValueError as exc:
            raise CliError(str(exc)) from None


def default_shape(num_experts: int, gpus: int | None, replicas: int | None) -> tuple[int, int]:
    """``(R, P)`` for a file without ``--replicas/--gpus``: 32 GPUs (or E if fewer) and one
    redundant slot per GPU."""
    for flag, value in (("--replicas", replicas), ("--gpus", gpus)):
        if value is not None and value < 1:  # 0 is no "leave it out": it was read as one
            raise CliError(f"{flag} must be >= 1, got {value}")
    default_gpus = min(32, num_experts)
    if gpus is None and replicas is not None and replicas % default_gpus:
        # the user typed only -r: name the GPU count they did not type
        raise CliError(f"--replicas ({replicas}) must be a multiple of --gpus, which defaults "
                       f"to {default_gpus} here (32, or E if fewer experts): pass -g/--gpus")
    gpus = default_gpus if gpus is None else gpus
    replicas = (-(-num_experts // gpus) + 1) * gpus if replicas is None else replicas
    return replicas, gpus
