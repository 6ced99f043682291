"""The torch threads the engine plugins plan on (plugin option ``threads``).

eplb's plans are many small tensor operations. On a host whose cores are busy, as an
inference node's are, torch's intra-op pool makes them wait on its threads: on the
2-core development machine with other work running, the vLLM policy's steady DeepSeek-V3
call took 628 ms on two threads against 17 ms on one (``benchmarks/bench_plugin_threads.py``,
BENCHMARKS.md §3, fifty-fourth session). vLLM's multiprocessing executor already runs its workers on
one thread unless ``OMP_NUM_THREADS`` is set; SGLang's schedulers keep torch's default.
So the plugins plan on ``threads`` torch threads (default 1) and give the calling thread
its own setting back afterwards; ``threads: null`` plans on whatever the process has.

torch's CPU builds take the count per calling thread (OpenMP's ``nthreads-var``): the
engine's threads that have run torch work keep their counts while a plan runs. torch also
keeps one process-wide count, the last one set, which a thread takes on its first torch
work: a thread whose first torch work falls inside a plan starts on the plan's count and
keeps it, and the plan leaves that process-wide count at the caller's own (attacker pass).
"""

from __future__ import annotations

import contextlib
import numbers
import reprlib
from collections.abc import Iterator
from typing import Any

import torch

#: the plugins' default ``threads``
DEFAULT_THREADS = 1
#: the most ``threads`` taken: OpenMP starts that many threads at the plan's first
#: parallel region, so a typo (1e6) would exhaust the host's threads mid-rebalance
MAX_THREADS = 1024


def check_threads_option(options: dict[str, Any], source: str) -> int | None:
    """The ``threads`` option of ``options`` (default :data:`DEFAULT_THREADS`; ``None``:
    the process's own setting) as an int; ``ValueError`` naming ``source`` (where the
    options came from) for anything else."""
    threads = options.get("threads", DEFAULT_THREADS)
    if threads is None:
        return None
    # (NumPy integers too, as every option of the plugins; a bool is no count; an array
    # or tensor is none either, as for the planner's int options: one with __index__
    # passed, a bool tensor as 1, and a 1-element array raised a TypeError naming no option)
    if (isinstance(threads, bool) or not isinstance(threads, numbers.Integral)
            or not 1 <= int(threads) <= MAX_THREADS):
        raise ValueError(f"{source}: threads must be a whole number of torch threads in "
                         f"[1, {MAX_THREADS}], or null for the process's own setting; got "
                         f"{reprlib.repr(threads)}")
    return int(threads)


@contextlib.contextmanager
def planning_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` torch threads (``None``: unchanged), then restore the
    calling thread's setting, also when the block raises."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
