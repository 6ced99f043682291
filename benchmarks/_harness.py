"""The small harness every benchmark script shares.

- :func:`start`: one torch thread (this machine is shared; medians of one thread compare
  best) and a header line naming the script, date, machine, torch, load average and git
  state, so a quoted table says where it came from;
- :func:`median_ms`: the median of repeated calls after a warm-up;
- :data:`REAL_DATA` and :func:`deepseek_loads`: the real expert loads, read from
  ``../shared/data/real`` (or ``$EPLB_REAL_DATA``), never copied into the repository;
  a section that needs them says SKIPPED when they are absent;
- :func:`markdown_table`: the tables BENCHMARKS.md quotes;
- :func:`add_output_options` and :func:`write_output`: a script's output files are
  written atomically with the umask's permissions, and an existing one is replaced only
  with ``--force`` (checked before the run, not after minutes of it).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import eplb
from eplb.formats._files import atomic_write

REPO = Path(__file__).resolve().parents[1]
# the engines' released sources are loaded by a test helper (never shipped with eplb)
sys.path.insert(0, str(REPO / "tests"))
REAL_DATA = Path(os.environ.get("EPLB_REAL_DATA") or REPO.parent / "shared" / "data" / "real")
DEEPSEEK_DIR = REAL_DATA / "sglang_deepseek_ep_statistics"
#: what a SKIPPED line for absent real data adds: how to point the scripts at them
REAL_DATA_HINT = "(set EPLB_REAL_DATA to the real-data folder)"
ESFT_FILE = REAL_DATA / "esft_deepseek_v2_lite_routing" / "esft_topk_ids.npz"


def git_state() -> str:
    """``HEAD <rev>`` plus a note when ``src/`` has uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src").splitlines()
    return f"HEAD {head}" + (f" + uncommitted changes in {len(dirty)} src path(s)" if dirty else "")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def start(name: str) -> str:
    """One torch thread; returns the header line for the script's output."""
    torch.set_num_threads(1)
    date = datetime.date.today().isoformat()
    return (
        f"# {name} — {date}, {platform.machine()} {platform.processor()}, torch "
        f"{torch.__version__}, 1 thread, load average {load_average()}, {git_state()}"
    )


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return 1000 * statistics.median(times)


def deepseek_loads(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The 12 real DeepSeek-V3/R1 workloads as ``{name: [58, 256]}`` (MoE rows 3..60), or
    ``{}`` after printing a SKIPPED line when the data are absent."""
    if not DEEPSEEK_DIR.is_dir():
        print(f"SKIPPED: real DeepSeek-V3 loads not found at {DEEPSEEK_DIR} {REAL_DATA_HINT}")
        return {}
    return {
        path.stem: torch.tensor(json.loads(path.read_text())["logical_count"], dtype=dtype)[3:]
        for path in sorted(DEEPSEEK_DIR.glob("*.json"))
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def add_output_options(parser, *names: str) -> None:
    """Add ``--force`` to a script whose options ``names`` (e.g. ``"json"``) name output
    files; :func:`refuse_existing_outputs` checks them once the arguments are parsed."""
    listed = ", ".join(f"--{name}" for name in names)
    parser.add_argument("--force", action="store_true",
                        help=f"overwrite existing output files ({listed})")
    parser.set_defaults(_output_options=names)


def refuse_existing_outputs(args) -> None:
    """Exit naming the first output file of ``args`` that could not be written after the
    run: one that exists (a file, a folder or a dangling link) without ``--force``, a link
    or a folder even with it (the write replaces only regular files), one named by two
    options (the second write would fail, or with ``--force`` replace the first), or one
    under a folder that cannot be made or written. Before the run, so no result is lost
    after it."""
    seen: dict[str, str] = {}
    for name in getattr(args, "_output_options", ()):
        path = getattr(args, name, None)
        if path is None:
            continue
        path = Path(path)
        same = seen.setdefault(os.path.abspath(path), name)
        if same != name:
            sys.exit(f"--{same} and --{name} both name {path}; give each its own file")
        if os.path.lexists(path):
            if not args.force:
                sys.exit(f"{path} exists; pass --force to overwrite it")
            if path.is_symlink() or not path.is_file():
                sys.exit(f"{path} is a link or not a file: --force replaces only regular "
                         "files; remove it or name another file")
        folder = path.parent
        while not os.path.lexists(folder):  # write_output makes the missing folders
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            sys.exit(f"cannot write {path}: {folder} is not a folder this user can write to")


def write_output(path: str | Path, text: str, force: bool) -> None:
    """Write a script's output file: complete or absent, the umask's permissions, and an
    existing file replaced only with ``force`` (``FileExistsError`` otherwise); missing
    folders are made, as the pictures' are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(text), "w", force=force)


def vllm_planner(policy, num_replicas: int, num_gpus: int
                 ) -> Callable[[torch.Tensor, eplb.Placement | None], eplb.Placement]:
    """A simulator planner: vLLM's ``policy.rebalance_experts`` (e.g. its released
    ``DefaultEplbPolicy``) as vLLM calls it, with the loads, R, groups, nodes, GPUs and
    the map in force, as a Placement (one node, one group)."""
    topology = eplb.Topology(num_replicas, num_gpus)

    def planner(weight: torch.Tensor, previous: eplb.Placement | None) -> eplb.Placement:
        old = None if previous is None else previous.phy2log
        phy2log = policy.rebalance_experts(weight, num_replicas, 1, 1, num_gpus, old)
        return eplb.Placement.from_phy2log(phy2log, weight.shape[1], topology)

    return planner
