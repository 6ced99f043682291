"""Time and peak memory of ``Placement.validate()`` next to the planner, at a large shape.

``validate()`` used to build a dense ``[L, P, E + 1]`` tensor (15 GB at 200 × 4096 experts
on 2048 GPUs); it is now O(L·R). Each measurement runs in a fresh process: the peak
resident set (``ru_maxrss``) above what the process held before the measured call.

    python benchmarks/bench_validate.py [--layers 200 --experts 4096 --gpus 2048 --slots 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import markdown_table, start

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
import eplb
from eplb.tools.generator import generate_loads
layers, experts, gpus, slots, what, path = sys.argv[1:7]
layers, experts, gpus, slots = int(layers), int(experts), int(gpus), int(slots)
replicas = gpus * slots
w = generate_loads(num_layers=layers, num_experts=experts, seed=0)
if what == "validate":
    p = eplb.Placement.from_phy2log(torch.load(path), experts, eplb.Topology(replicas, gpus))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
begin = time.perf_counter()
if what == "plan":
    p = eplb.plan(w, replicas, gpus)
    torch.save(p.phy2log, path)
else:
    p.validate()
seconds = time.perf_counter() - begin
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "extra_mib": (peak - before) / 1024}))
"""


def child(args, what: str, path: str) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(args.layers), str(args.experts), str(args.gpus),
           str(args.slots), what, path]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--experts", type=int, default=4096)
    parser.add_argument("--gpus", type=int, default=2048)
    parser.add_argument("--slots", type=int, default=4)
    args = parser.parse_args()
    print(start("bench_validate"))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "phy2log.pt")
        planned = child(args, "plan", path)
        checked = child(args, "validate", path)
    shape = f"{args.layers}×{args.experts} on {args.gpus} GPUs, R={args.gpus * args.slots}"
    print()
    print(markdown_table(
        ["shape", "call", "seconds", "extra peak MiB"],
        [[shape, "eplb.plan", f"{planned['seconds']:.1f}", f"{planned['extra_mib']:.0f}"],
         [shape, "Placement.validate", f"{checked['seconds']:.2f}",
          f"{checked['extra_mib']:.0f}"]],
    ))
    ratio = checked["extra_mib"] / max(planned["extra_mib"], 1e-9)
    print(f"\nvalidate / plan peak memory: {ratio:.2f}")


if __name__ == "__main__":
    main()
