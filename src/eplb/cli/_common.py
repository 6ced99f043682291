"""Shared plumbing for the ``eplb`` commands: errors, output, input parsing, metrics.

Exit codes: 0 success; 2 a mistake the user can fix in the command line or its input files
(missing or malformed file, impossible topology, existing output without ``--force``);
1 a failure while running (internal error, a file that cannot be written).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from eplb.core import LoadTrace, balancedness_ceiling, layer_ceiling
from eplb.core.dispatch_plan import NEAREST_TIMES, nearest_size_problem
from eplb.core.inputs import scale_free
from eplb.core.planner import check_plan_size
from eplb.core.topology import Topology
from eplb.formats._files import (
    check_writable,
    only_regular_files_are_replaced,
    output_file,
    require_regular_file,
)
from eplb.formats.detect import folder_load_files
from eplb.formats.errors import FormatError
from eplb.tools.generator import PRESETS, generate_trace
from eplb.tools.report import Report, matplotlib_problem

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A problem reported as one ``eplb: error: ...`` line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------- output


def cli_words(message: str) -> str:
    """A file writer's message (``eplb.formats``) in the CLI's words: the writers name the
    API's keyword beside the flag ("force=True (CLI: --force)", "--force (force=True)");
    here only the flag means anything."""
    return message.replace("force=True (CLI: --force)", "--force").replace(" (force=True)", "")


def is_tty(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def fmt(value: object, digits: int = 4) -> str:
    """Format a table cell: floats with ``digits`` decimals (``digits`` significant ones
    from a million up, where decimals would print every integer digit), ``None`` as
    ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e6 else f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A rich table on a terminal, plain aligned columns otherwise (pipes, files, tests)."""
    cells = [[fmt(c) for c in row] for row in rows]
    if is_tty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in cells:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
    print(title)
    print(line)
    print("-" * len(line))
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    print()


def print_json(payload: object) -> None:
    json.dump(payload, sys.stdout, indent=2)
    sys.stdout.write("\n")


def info(message: str) -> None:
    """Progress chatter for humans; goes to stderr so stdout stays parseable."""
    print(message, file=sys.stderr)


@contextmanager
def progress(description: str, total: int, enabled: bool = True
             ) -> Iterator[Callable[..., object]]:
    """A rich progress bar on stderr when it is a terminal; a no-op ``advance`` otherwise."""
    if not (enabled and is_tty(sys.stderr)):
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                   "{task.total}"), TimeElapsedColumn(), console=Console(stderr=True),
                   transient=True)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


# ------------------------------------------------------------------------- inputs


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
        raise CliError(f"cannot write {path}: permission denied in {str(path.parent)!r}")
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


def check_cluster_flags(*, gpus: int | None, nodes: int | None,
                        groups: int | None = None) -> None:
    """``eval``'s -g/--nodes/--groups, each optional: >= 1 when given (0 is no "leave it
    out"), and GPUs that split over the nodes (a cluster that can exist, as in plan)."""
    for flag, value in (("--gpus", gpus), ("--nodes", nodes), ("--groups", groups)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be >= 1, got {value}")
    if gpus is not None and nodes is not None and gpus % nodes:
        raise CliError(f"--gpus ({gpus}) must be a multiple of --nodes ({nodes})")


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
    if getattr(args, "max_moves", None) is not None and (policy != "global" or dead):
        where = f"the {policy} policy" if policy != "global" else "--dead-gpus"
        raise CliError(f"--max-moves under --dispatch nearest budgets the global policy with "
                       f"every GPU live; with {where} eplb re-plans and relabels onto the "
                       "old GPUs (no budget): drop --max-moves")
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


def integer(text: str) -> int:
    """``int(text)`` of ASCII digits only: ``int`` also reads other scripts' digits ('３２',
    Arabic-Indic '١'), which eplb's own files refuse (attacker pass: ``-g ８`` planned).
    The CLI's argparse type for integers too (argparse then says "invalid integer
    value")."""
    if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):  # (int() takes '2_88' and '٣' too)
        raise ValueError(f"{text!r} is not an integer in ASCII digits")
    return int(text)


_REAL = re.compile(  # ASCII only: Python's \d matches every script's digits
    r"\s*[+-]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?|inf(inity)?|nan)\s*", re.I)


def real(text: str) -> float:
    """``float(text)`` of ASCII digits only (``float`` also reads '０.５' and '1_0'), as
    :func:`integer` is for integers; the CLI's argparse type for decimal numbers too."""
    if not _REAL.fullmatch(text):
        raise ValueError(f"{text!r} is not a number in ASCII digits")
    return float(text)


def count_type(unit: str, least: int = 0, most: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``least`` (and <= ``most``) of ``unit``
    (``--max-moves``' slots, ``simulate --expert-bytes``), refused by flag, not by the
    API's keyword."""

    def parse(text: str) -> int:
        try:
            value = integer(text)
        except ValueError:
            value = least - 1
        if value < least or (most is not None and value > most):
            within = f">= {least}" if most is None else f"in {least}..{most}"
            raise argparse.ArgumentTypeError(
                f"must be an integer {within} ({unit}), got {text!r}")
        return value

    return parse


def price_type(text: str) -> float:
    """An argparse type: a number in [0, 1) (``--move-price``, the balancedness a whole
    layer's move must buy: as the API takes it), refused by flag."""
    try:
        value = real(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def named_file(text: str) -> str:
    """An argparse type for an option that names a file (``--previous``, ``--placement``,
    ``--routing``): an empty or blank value is refused by flag. ``--previous ""`` (an unset
    shell variable) planned fresh without a word, moving nearly every slot, and the others
    read the current folder (attacker pass)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"needs a file name, got {text!r}")
    return text


def speed_spec(text: str) -> str:
    """An argparse type for ``--gpu-speed``: an empty value is refused by flag (it planned
    for equal GPUs without a word; attacker pass). The list or file is read later, where
    the GPU count is known (:func:`gpu_speed_from`)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"needs one number per GPU (comma-separated) or a file of them, got {text!r}")
    return text


def parse_int_list(text: str, what: str) -> list[int]:
    """``"3, 17"`` -> ``[3, 17]``. An empty item (``3,``, ``3,,17``) is refused: a number
    left out by a slip, most likely, and which one is not for eplb to guess."""
    items = text.replace(" ", "").split(",")
    if "" in items:
        raise CliError(f"{what} {text!r} has an empty item: give comma-separated integers "
                       "like 3,17")
    try:
        return [integer(x) for x in items]
    except ValueError:
        raise CliError(f"{what} must be a comma-separated list of integers, got {text!r}") from None


def active_gpus_from(dead: str | None, num_gpus: int) -> torch.Tensor | None:
    """``--dead-gpus 3,17`` -> ``[P]`` bool mask with those GPUs False (``None`` if not given)."""
    if dead is None:
        return None
    ids = parse_int_list(dead, "--dead-gpus") if dead.strip(" ,") else []
    if not ids:
        raise CliError("--dead-gpus names no GPU (give ids like 3,17, or leave it out)")
    bad = [g for g in ids if not 0 <= g < num_gpus]
    if bad:
        raise CliError(f"--dead-gpus: GPU {bad[0]} is outside 0..{num_gpus - 1}")
    twice = sorted({g for g in ids if ids.count(g) > 1})
    if twice:  # a typo for another GPU, most likely: do not guess which
        raise CliError(f"--dead-gpus names GPU {twice[0]} twice")
    mask = torch.ones(num_gpus, dtype=torch.bool)
    mask[ids] = False
    if not bool(mask.any()):
        raise CliError("--dead-gpus marks every GPU dead")
    return mask


def gpu_speed_from(spec: str | None, num_gpus: int) -> torch.Tensor | None:
    """``--gpu-speed``: a comma list (``1,1,0.5,...``) or a file (JSON list or plain numbers)."""
    if not spec:
        return None
    path = Path(spec)
    if path.exists():
        require_regular_file(path, "--gpu-speed file")  # a FIFO would block forever
        if path.is_dir():  # (folders pass that check: load statistics may be one)
            raise CliError(f"--gpu-speed {spec}: a folder; expected {num_gpus} comma-separated "
                           "numbers or a file of them")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CliError(f"--gpu-speed file {path} is not UTF-8 text: give a text file of "
                           f"{num_gpus} numbers (a JSON list, or separated by commas or "
                           "blanks) or the comma list itself") from None
        try:
            values = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError, deep nesting, huge ints
            values = text.replace(",", " ").split()
    else:
        values = spec.split(",")
    try:
        speed = torch.tensor([real(v) if isinstance(v, str) else float(v) for v in values],
                             dtype=torch.float64)
    except (TypeError, ValueError, OverflowError):
        missing = "" if path.exists() else " (and no file of that name exists)"
        raise CliError(f"--gpu-speed: expected {num_gpus} comma-separated numbers or a file of "
                       f"them, got {spec!r}{missing}") from None
    if speed.numel() != num_gpus:
        count = speed.numel()
        raise CliError(f"--gpu-speed has {count} value{'' if count == 1 else 's'}, expected one "
                       f"per GPU ({num_gpus})")
    if bool((speed <= 0).any()) or not bool(torch.isfinite(speed).all()):
        raise CliError("--gpu-speed values must be finite and > 0")
    return speed


# ------------------------------------------------------------------------ metrics


def static_gpu_loads(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[L, P]`` per-GPU load without rebalancing: expert ``e`` on GPU ``e * P // E``, one copy.

    This is what an engine does with EPLB off: contiguous experts, no redundant replicas.
    """
    num_layers, num_experts = weight.shape
    gpu = torch.arange(num_experts) * num_gpus // num_experts
    loads = torch.zeros(num_layers, num_gpus, dtype=torch.float64)
    # rescaled by a power of two where sums could overflow: balancedness is a ratio
    return loads.index_add_(1, gpu, scale_free(weight))


@dataclass
class Ceiling:
    per_layer: torch.Tensor | None
    overall: float | None
    note: str = ""

    @property
    def worst(self) -> float | None:
        """The worst layer's best-possible max/mean (1 / the smallest per-layer ceiling)."""
        if self.per_layer is None or not self.per_layer.numel():
            return None
        return 1 / float(self.per_layer.min())


def _runs(speeds: torch.Tensor) -> str:
    """GPU speeds as runs, e.g. ``16×1, 16×2``: a list of 32 values cut after its first
    few would hide where two lists differ."""
    runs: list[list] = []
    for x in speeds.tolist():
        if runs and runs[-1][1] == x:
            runs[-1][0] += 1
        else:
            runs.append([1, x])
    return ", ".join(f"{n}×{x:g}" if n > 1 else f"{x:g}" for n, x in runs)


def eval_gpu_speed(spec: str | None, meta: dict, num_gpus: int, placement: object
                   ) -> torch.Tensor | None:
    """The GPU speeds ``eval`` scores with: ``--gpu-speed``, else those the placement file
    records (eplb's files planned with ``--gpu-speed``). A flag that contradicts recorded
    speeds is refused; one given for a file planned for equal GPUs asks how that plan
    fares on them."""
    given = gpu_speed_from(spec, num_gpus)
    recorded = meta.get("gpu_speed")
    if recorded is None:
        return given
    recorded = torch.tensor(recorded, dtype=torch.float64)
    if given is not None and not torch.equal(given, recorded):
        gpu = int((given != recorded).nonzero()[0, 0])
        raise CliError(f"{placement} records the GPU speeds it was planned for "
                       f"({_runs(recorded)}); --gpu-speed gives {_runs(given)}, which differs "
                       f"first at GPU {gpu} ({given[gpu].item():g} against "
                       f"{recorded[gpu].item():g}): leave --gpu-speed out")
    return recorded


def ceiling(weight: torch.Tensor, num_replicas: int, num_gpus: int, num_nodes: int,
            num_groups: int, policy: str, *, active: torch.Tensor | None = None,
            speed: bool = False) -> Ceiling:
    """The physical limit from :mod:`eplb.core.bounds` over the live GPUs ``active [P]`` (``n/a``
    with GPU speeds, where the bound does not apply)."""
    if speed:
        return Ceiling(None, None, "ceiling not computed with GPU speeds")
    args = (weight, num_replicas, num_gpus, num_nodes, num_groups)
    kwargs = {"policy": policy, "active_gpus": active}
    per_layer = torch.as_tensor(layer_ceiling(*args, **kwargs), dtype=torch.float64)
    return Ceiling(per_layer, float(balancedness_ceiling(*args, **kwargs)))


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[object, float]:
    """Run ``fn`` ``repeats`` times; return the last result and the median seconds."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


# ---------------------------------------------------------------- reports and generated loads
def generated_trace(preset: str, steps: int, seed: int) -> LoadTrace:
    """A synthetic :class:`~eplb.formats.LoadTrace` from :mod:`eplb.tools.generator`."""
    if preset not in PRESETS:
        raise CliError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
    return generate_trace(preset=preset, steps=steps, seed=seed)


#: what incremental planning moves whatever ``--max-moves`` allows (online/incremental.py)
FORCED_MOVES = ("slots of dead or revived GPUs, replicas stacked on one GPU, and "
                "hierarchical layers whose groups straddle nodes or sit unequally on them "
                "(re-planned whole)")


def key_note(key: str | None) -> str:
    """`` [key NAME]`` where ``--key`` chose the array(s) of a file holding several, else
    nothing: two domains of one file must read apart (new-user pass)."""
    return f" [key {key}]" if key else ""


def cluster_note(nodes: int, groups: int) -> str:
    """`` in 4 nodes, 8 groups`` for a table's title: the cluster beyond its slots and
    GPUs, each side only where it is more than one (`` in 4 nodes``, `` with 8 groups``;
    nothing for one node and no groups). New-user passes: a hierarchical replay's title
    read as a global one's, and a plan's gave no sign that ``--nodes``/``--groups`` were
    taken."""
    node_part = f"{nodes} nodes" if nodes > 1 else ""
    group_part = f"{groups} groups" if groups > 1 else ""
    if node_part and group_part:
        return f" in {node_part}, {group_part}"
    return f" in {node_part}" if node_part else f" with {group_part}" if group_part else ""


def summed_note(trace: LoadTrace) -> str:
    """`` (12 steps summed)`` where the loads are a sum of several steps or files (a
    folder of dumps, a trace), else nothing: what a plan or a score was made of."""
    steps = trace.num_steps
    return f" ({steps} steps summed)" if steps > 1 else ""


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


def prepare_report(directory: str | None, force: bool, title: str,
                   flag: str = "--report") -> Report | None:
    """A :class:`Report` for ``--report DIR`` (``None`` without one; ``flag``: the option
    that named the folder, for messages), refused before any work when a file it would
    write exists without ``force`` or cannot be written."""
    if directory is None:
        return None
    if not directory.strip():  # Path("") is the current folder: say which folder to use
        raise CliError(f"{flag} needs a folder name (e.g. {flag} bench-report/)")
    report = Report(title)
    # a folder that cannot be made is found now, not after a long run has done its work
    existing = Path(directory)
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if os.path.lexists(existing) and not existing.is_dir():
        raise CliError(f"report folder {directory}: {existing} exists and is not a directory")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"cannot write the report into {directory}: {existing}: permission "
                       "denied")
    if Path(directory).is_dir():  # fail before the work, not after
        for name in report.planned_files():
            path = Path(directory) / name
            if path.is_dir():  # first: --force cannot replace a folder, so not suggested
                raise CliError(f"{path} is a folder where the report writes a file; remove "
                               "it or choose another directory")
            if os.path.lexists(path) and not force:  # a dangling link counts as there
                raise CliError(f"{path} already exists; pass --force to overwrite it or "
                               "choose another directory")
            try:
                check_writable(path, force)
            except OSError as exc:
                raise CliError(cli_words(str(exc))) from None
    return report


def say_written(written: list[Path]) -> None:
    pictures = len(written) - 2
    print(f"report: {written[0]} (+ {written[1].name}, {pictures} "
          f"picture{'' if pictures == 1 else 's'})")
    problem = matplotlib_problem()
    if problem is not None:
        print(f"pictures skipped: {problem}")
