"""What the slow options cost: time and peak memory of the calls the README warns about.

- ``dispatch="nearest"`` (global policy, ``fair="avoid"``): its node-labelling search
  grows about as ``L·P³``; timed at DeepSeek-V3's size (from scratch, and from the
  placement in force on a drifted window, as SGLang's runtime rebalance calls it, also
  with a total move budget), on 256 GPUs (32 nodes) and on 512;
- ``eplb.tools.routing.sample_group_limited``: fitting the router to the loads, at
  DeepSeek-V3's size (1024 tokens);
- with ``--relabel`` instead (minutes, not in the default run): planning from a
  placement in force on thousands of GPUs, where the relabelling's assignment problems
  (layers × GPUs³) reach the ``2**41`` limit: 58 layers on 3,300 GPUs and 32 on 4,096,
  one slot each, from a plan of the same loads drifted ×exp(0.15·Z) (seed 0).

Each case runs in a fresh interpreter (one torch thread) so that its peak resident memory
(``ru_maxrss``) is its own; the time is the median of ``--repeats`` calls after one
warm-up call. Loads: the real DeepSeek-V3 dump ``prefill_in4096`` where present (else
generated DeepSeek-V3-like loads), generated loads for the large shape.

    python benchmarks/bench_costs.py [--repeats 3] [--skip-large]
    python benchmarks/bench_costs.py --relabel [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _harness import DEEPSEEK_DIR, markdown_table, start

CASES = {
    "nearest-deepseek": "eplb.plan(w, 288, 32, 4, 8, policy='global', dispatch='nearest')",
    # SGLang's runtime rebalance: from the placement in force, on the next window's loads
    "nearest-deepseek-previous": "eplb.plan(w2, 288, 32, 4, 8, policy='global', "
                                 "dispatch='nearest', previous=p0)",
    # the same with a total move budget (1000 slots of 16,704): its candidates and choice
    "nearest-deepseek-budget": "eplb.plan(w2, 288, 32, 4, 8, policy='global', "
                               "dispatch='nearest', previous=p0, max_moves=1000)",
    # DeepSeek-V3 on 256 GPUs, 8 a node: where the relabelling's search grew as L·P³
    "nearest-256": "eplb.plan(w, 512, 256, 32, 8, policy='global', dispatch='nearest')",
    "nearest-512": "eplb.plan(w, 4096, 512, 64, 64, policy='global', dispatch='nearest')",
    "sample-group-limited": "sample_group_limited(w, 1024)",
}
#: ``--relabel``: one slot per GPU, so R = P; the work is layers × P³ (2**41 at most)
RELABEL_CASES = {
    "relabel-3300": "eplb.plan(w2, 3300, 3300, previous=p0)",
    "relabel-4096": "eplb.plan(w2, 4096, 4096, previous=p0)",
}
SHAPES = {"nearest-deepseek": (58, 256), "nearest-deepseek-previous": (58, 256),
          "nearest-deepseek-budget": (58, 256), "nearest-256": (58, 256),
          "nearest-512": (1, 2048),
          "sample-group-limited": (58, 256), "relabel-3300": (58, 256),
          "relabel-4096": (32, 256)}

WORKER = """
import json, resource, statistics, sys, time
import torch
torch.set_num_threads(1)
import eplb
from eplb.tools.generator import generate_loads
from eplb.tools.routing import sample_group_limited
layers, experts, real, repeats = {layers}, {experts}, {real!r}, {repeats}
if real:
    counts = json.load(open(real))["logical_count"]
    w = torch.tensor(counts, dtype=torch.float64)[3:][:layers]
else:
    w = generate_loads("deepseek-v3", seed=0, num_layers=layers, num_experts=experts)
if "previous" in {name!r} or "budget" in {name!r}:  # the map in force, a drifted window
    p0 = eplb.plan(w, 288, 32, 4, 8, policy="global", dispatch="nearest")
    drift = torch.exp(0.15 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    w2 = (w * drift).round()
if {name!r}.startswith("relabel"):  # the map in force: a plan of the loads before a drift
    gpus = int({name!r}.split("-")[1])
    p0 = eplb.plan(w, gpus, gpus)
    drift = torch.exp(0.15 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    w2 = (w * drift).round()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(repeats + 1):
    begin = time.perf_counter()
    {call}
    times.append(time.perf_counter() - begin)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"s": statistics.median(times[1:]), "first_s": times[0],
                   "extra_mib": (peak - base) / 1024, "peak_mib": peak / 1024}}))
"""


def run_case(name: str, repeats: int) -> dict:
    layers, experts = SHAPES[name]
    real = DEEPSEEK_DIR / "prefill_in4096.json"
    use_real = experts == 256 and real.is_file()
    code = WORKER.format(layers=layers, experts=experts, repeats=repeats, name=name,
                         real=str(real) if use_real else "",
                         call={**CASES, **RELABEL_CASES}[name])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["loads"] = "real" if use_real else "synthetic"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true",
                        help="leave out the 256- and 512-GPU cases")
    parser.add_argument("--relabel", action="store_true",
                        help="only the relabelling cases at the 2**41 limit (3,300 and 4,096 "
                             "GPUs; minutes)")
    args = parser.parse_args(argv)
    print(start("bench_costs"))
    rows = []
    for name in RELABEL_CASES if args.relabel else CASES:
        if args.skip_large and name in ("nearest-256", "nearest-512"):
            continue
        result = run_case(name, args.repeats)
        layers, experts = SHAPES[name]
        rows.append([name, f"{layers}×{experts}", result["loads"], f"{result['s']:.2f}",
                     f"{result['s'] / layers:.3f}", f"{result['first_s']:.2f}",
                     f"{result['extra_mib']:.0f}", f"{result['peak_mib']:.0f}"])
        print(f"{name}: {result}", file=sys.stderr, flush=True)
    print(markdown_table(["case", "L×E", "loads", "s (median)", "s per layer",
                          "first call s", "extra peak MiB", "peak MiB"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
