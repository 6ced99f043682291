"""Peak memory of ``eplb simulate``: the replay, its planners and the oracle's windows.

Generates a DeepSeek-V3 trace (``eplb generate --preset deepseek-v3``, seed 0: 58 MoE
layers × 256 experts) into a temporary folder, then runs ``eplb simulate`` on it once per
case, each in its own process (one thread), and reports the process's peak resident
memory (``getrusage``'s ``ru_maxrss`` of the finished child) and its wall time. The
cases: a rebalance after every step (``--interval 1``, the most planning and the most
oracle windows per step) with eplb's planner and with none, and vLLM's cadence
(``--interval 100``); 288 slots on 32 GPUs, each plan made on the last 100 steps
(``--window 100``) and scored on windows of ``--interval`` steps, so at ``--interval 1``
the oracle plans a window per step.

    python benchmarks/bench_simulate_memory.py
    python benchmarks/bench_simulate_memory.py --steps 1200

To compare with an earlier library, run it with ``PYTHONPATH`` on a worktree of that
commit's ``src``: the children inherit it (the header names this script's checkout).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import markdown_table, start

#: (label, extra ``eplb simulate`` arguments)
CASES = (
    ("--interval 1", ["--interval", "1"]),
    ("--interval 1 --planner none", ["--interval", "1", "--planner", "none"]),
    ("--interval 100", ["--interval", "100"]),
)


def _eplb(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from eplb.cli import main; sys.exit(main())",
            *args]


def peak_of(command: list[str]) -> tuple[float, float]:
    """``(peak resident MB, seconds)`` of ``command`` run alone in a child process."""
    # fork a runner whose only child is the command, so that RUSAGE_CHILDREN is its own
    runner = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
              "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
              "time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", runner, *command], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(done.stderr)
    kilobytes, seconds = done.stdout.split()
    return int(kilobytes) / 1024, float(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="trace steps (default 600)")
    args = parser.parse_args(argv)
    if args.steps < 200:
        # (--interval 100: the first rebalance at step 100, then a scoring window of 100)
        parser.error("--steps must be at least 200 (the --interval 100 case scores from "
                     "step 100 on, in windows of 100 steps)")
    print(start("bench_simulate_memory"))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.pt"
        subprocess.run(_eplb("generate", "--preset", "deepseek-v3", "--steps", str(args.steps),
                             "-o", str(trace), "-q"), check=True, capture_output=True)
        for label, extra in CASES:
            began = time.strftime("%H:%M")
            mb, seconds = peak_of(_eplb("simulate", str(trace), "--window", "100", *extra,
                                        "-r", "288", "-g", "32", "--threads", "1", "--json"))
            rows.append([label, f"{mb:,.0f}", f"{seconds:.1f}", began])
    print(f"{args.steps} steps of a generated DeepSeek-V3 trace, 288 slots on 32 GPUs, "
          "each plan made on the last 100 steps:\n")
    print(markdown_table(["eplb simulate", "peak resident MB", "seconds", "started"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
