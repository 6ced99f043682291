"""What the engine plugins' ``threads`` option buys: a plan on one torch thread against
the process's own setting, on an idle host and on one whose cores are busy.

eplb's plans are many small tensor operations; torch's intra-op pool makes each wait on
its threads when other work holds the cores, as an inference node's processes do. The
vLLM policy class (``eplb.integrations.vllm.EplbPolicy``, the call vLLM makes: int64 loads
of the real DeepSeek-V3 files, 288 slots on 32 GPUs, the map in force from the previous
window's plan) is timed with ``threads`` 1 (the plugins' default) and ``null`` (the
process's own torch threads, ``--process-threads``), alternately, first with nothing else
running, then beside ``--busy`` processes that spin on the CPU (default: one per core).

    python benchmarks/bench_plugin_threads.py [--files 3] [--repeats 9] [--process-threads 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch
from _harness import deepseek_loads, markdown_table
from _harness import start as header

from eplb.integrations import vllm as plugin


def _spin() -> None:
    while True:
        pass


def _policy(threads: int | None) -> type:
    return type("Policy", (plugin.EplbPolicy,),
                {"options": {"agree_timeout_s": 0, "threads": threads}})


def _times(loads: list[tuple[torch.Tensor, torch.Tensor]], repeats: int) -> dict[str, float]:
    """Median ms of the steady call per setting, the settings alternating call by call."""
    settings = {"threads 1 (default)": _policy(1), "threads null (the process's)": _policy(None)}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for k in range(repeats):
        for name, policy in (settings.items() if k % 2 == 0 else reversed(settings.items())):
            for weight, old in loads:
                begin = time.perf_counter()
                policy.rebalance_experts(weight, 288, 1, 1, 32, old)
                times[name].append(time.perf_counter() - begin)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=3, help="real workloads timed")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per setting")
    parser.add_argument("--process-threads", type=int, default=2,
                        help="the process's torch threads (what 'threads: null' plans on)")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1,
                        help="spinning processes in the busy phase")
    args = parser.parse_args(argv)
    print(header("bench_plugin_threads"), flush=True)
    torch.set_num_threads(args.process_threads)  # (after the header, which sets one)
    print(f"the process on {args.process_threads} torch threads\n", flush=True)
    real = list(deepseek_loads(torch.int64).values())[: args.files]
    if not real:
        return 0
    # the steady call: the previous window's plan in force, this window's loads
    loads = [(w, _policy(1).rebalance_experts(w.roll(1, 1), 288, 1, 1, 32)) for w in real]
    rows = []
    for phase, busy in (("no spinner", 0), (f"{args.busy} spinning processes", args.busy)):
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        try:
            time.sleep(0.5 if busy else 0)
            ms = _times(loads, args.repeats)
        finally:
            for p in spinners:
                p.terminate()
                p.join()
        one, own = ms["threads 1 (default)"], ms["threads null (the process's)"]
        rows.append([phase, f"{one:.1f}", f"{own:.1f}", f"{own / one:.1f}×"])
    print(markdown_table(["host", "threads 1: ms", f"{args.process_threads} threads: ms",
                          "ratio"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
