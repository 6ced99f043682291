"""Shared plumbing for the ``eplb`` commands: errors, output, metrics, reports and the
notes their titles carry (option values: :mod:`eplb.cli._values`; the checks before any
work: :mod:`eplb.cli._checks`).

Exit codes: 0 success; 2 a mistake the user can fix in the command line or its input files
(missing or malformed file, impossible topology, existing output without ``--force``);
1 a failure while running (internal error, a file that cannot be written).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from eplb.core import LoadTrace
from eplb.core.bounds import ceilings
from eplb.core.inputs import scale_free
from eplb.formats._files import check_writable
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
    here only the flag means anything (the EP size of a placement file likewise: the
    keyword first misled a CLI user, newcomer pass)."""
    return (message.replace("force=True (CLI: --force)", "--force").replace(" (force=True)", "")
            .replace("with num_gpus= (CLI: -g/--gpus; ", "with -g/--gpus ("))


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


@contextmanager
def messages_held() -> Iterator[Callable[[], None]]:
    """Hold what a command writes to stderr (warnings, notes) until it calls the
    ``release`` this yields, once every input is checked: a :class:`CliError` before then
    drops them, so a refusal stays the one ``eplb: error:`` line; anything else (a failure,
    a Ctrl-C, the command's end) lets them out first."""
    real, held = sys.stderr, io.StringIO()

    def release() -> None:
        if sys.stderr is held:
            sys.stderr = real
            real.write(held.getvalue())

    sys.stderr = held
    try:
        yield release
    except CliError:
        if sys.stderr is held:
            sys.stderr = real  # the lines held are dropped: the error says what is wrong
        raise
    finally:
        release()


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


def ceiling(weight: torch.Tensor, num_replicas: int, num_gpus: int, num_nodes: int,
            num_groups: int, policy: str, *, active: torch.Tensor | None = None,
            speed: bool = False) -> Ceiling:
    """The physical limit from :mod:`eplb.core.bounds` over the live GPUs ``active [P]`` (``n/a``
    with GPU speeds, where the bound does not apply)."""
    if speed:
        return Ceiling(None, None, "ceiling not computed with GPU speeds")
    per_layer, overall = ceilings(weight, num_replicas, num_gpus, num_nodes, num_groups,
                                  policy, active)
    return Ceiling(torch.as_tensor(per_layer, dtype=torch.float64), float(overall))


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


def unwritable_reason(folder: Path) -> str:
    """Why ``folder``, which ``os.access`` says this user cannot write, takes no new file:
    ``" is on a read-only file system"`` where it is mounted so (no ``chmod`` helps, and
    "permission denied" sent users to the folder's mode), else ``": permission denied"``."""
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # (no statvfs on Windows)
        read_only = False
    return " is on a read-only file system" if read_only else ": permission denied"


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
        raise CliError(f"cannot write the report into {directory}: {existing}"
                       f"{unwritable_reason(existing)}")
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
