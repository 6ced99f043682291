"""A long-running :class:`eplb.online.Rebalancer`'s memory, rebalance after rebalance.

An engine (or ``eplb simulate``) keeps one ``Rebalancer`` for the whole run, and every
rebalance leaves a :class:`~eplb.online.RebalanceEvent` in ``rebalancer.events``. Each
case runs in a fresh Python process: ``interval=1`` (a rebalance after every step, the
most events per step), incremental planning, window 4, Poisson counts around fixed
log-normal loads (seed 0), one thread. It prints the process's resident memory
(``/proc/self/statm``) every ``--every`` rebalances, beside the same run that empties
``rebalancer.events`` after each step (the memory the planning itself needs): the
difference is what the kept events cost.

    python benchmarks/bench_rebalancer_memory.py
    python benchmarks/bench_rebalancer_memory.py --rebalances 2000 --every 500
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

from _harness import markdown_table, start

#: the shapes run: (layers, experts, replicas, GPUs)
SHAPES = ((58, 256, 288, 32), (8, 64, 80, 16))

_CASE = textwrap.dedent("""
    import json, os, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from eplb.online import Rebalancer

    layers, experts, replicas, gpus, rebalances, every, keep = (int(a) for a in sys.argv[1:])

    def resident_mb():
        pages = int(open("/proc/self/statm").read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    rng = np.random.default_rng(0)
    loads = rng.lognormal(0, 1, (layers, experts)) * 50
    steps = [torch.from_numpy(rng.poisson(loads)) for _ in range(50)]
    rebalancer = Rebalancer(replicas, gpus, window=4, interval=1, incremental=True)
    seen = []
    for step in range(rebalances + 1):
        rebalancer.record(steps[step % len(steps)])
        if not keep:
            rebalancer.events.clear()
        if step % every == 0:
            seen.append([step, resident_mb(), len(rebalancer.events)])
    print(json.dumps(seen))
""")


def run_case(shape: tuple[int, int, int, int], rebalances: int, every: int,
             keep: bool) -> list[list[float]]:
    """``[[rebalances, MB, events kept], ...]`` of one case, in its own process."""
    done = subprocess.run([sys.executable, "-c", _CASE, *map(str, shape), str(rebalances),
                           str(every), str(int(keep))], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebalances", type=int, default=5000)
    parser.add_argument("--every", type=int, default=1000)
    args = parser.parse_args()
    print(start("bench_rebalancer_memory"))
    rows = []
    for shape in SHAPES:
        kept = run_case(shape, args.rebalances, args.every, keep=True)
        cleared = run_case(shape, args.rebalances, args.every, keep=False)
        layers, experts, replicas, gpus = shape
        for (step, mb, events), (_, floor, _) in zip(kept, cleared, strict=True):
            rows.append([f"{layers}×{experts}, R={replicas}, P={gpus}", int(step), int(events),
                         f"{mb:.0f}", f"{floor:.0f}", f"{mb - floor:+.0f}"])
        growth = (kept[-1][1] - kept[1][1]) / max(1, kept[-1][0] - kept[1][0]) * 1024
        print(f"{layers}×{experts}: {growth:.1f} KB per rebalance after the first "
              f"{int(kept[1][0])} (events kept)", file=sys.stderr)
    print(markdown_table(["shape", "rebalances", "events kept", "resident MB",
                          "events emptied: MB", "difference MB"], rows))


if __name__ == "__main__":
    main()
