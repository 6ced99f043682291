"""Does ``policy="locality"`` give the same plan under every ``ATEN_CPU_CAPABILITY``?

The locality search scores in float32 through torch's BLAS and ``exp``/``log1p``, whose
last bit may differ between torch's CPU kernels, so unlike the other policies (checked by
``bench_determinism.py``) it is not guaranteed to plan identically on ranks with
different instruction sets. This script counts how often it does not: it plans
``--problems`` tiny random problems (seeds 0, 1, ...: 4 layers of 16 experts with
log-normal loads, 24 slots on 8 GPUs in 2 nodes, nearest dispatch, slack 0.03) and,
with ``--real``, the real DeepSeek-V3 files (MoE rows 3..60, R = 288 on 32 GPUs in 4
nodes, 8 groups) at slack 0 and 0.03, each in a fresh interpreter per capability (set
before torch is imported, one torch thread), and reports the problems whose plan hash
is not the same under all of them.

``--incremental`` also plans each tiny problem's next window (every load × exp(0.2·Z),
rounded) from its plan, as SGLang's runtime rebalance plans from the map in force.

    python benchmarks/bench_locality_determinism.py [--problems 5000] [--real 4]
        [--incremental]

Real DeepSeek-V3 loads: ``$EPLB_REAL_DATA`` (default ``../shared/data/real``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from _determinism_worker import real_dir, supported_capabilities  # noqa: E402

sys.path.pop(0)

LAYERS, EXPERTS, SLOTS, GPUS, NODES, SLACK = 4, 16, 24, 8, 2, 0.03


def worker(problems: int, real: int, incremental: bool = False) -> dict[str, str]:
    """``{problem: sha256 of its phy2log}`` planned in this process, and ``{"input-" +
    problem: sha256 of its loads}`` (the parent checks that every capability planned the
    same inputs)."""
    import numpy as np
    import torch

    import eplb

    torch.set_num_threads(1)
    hashes = {}
    for seed in range(problems):
        # [LAYERS, EXPERTS] integer token counts, log-normal (σ 1) around 100. Made by
        # NumPy, which ATEN_CPU_CAPABILITY does not touch: torch's float32 exp differs in
        # the last bit between its CPU kernels, and rounding then gave another input
        # (the 2 of 5,000 problems this script reported until the fifty-eighth session,
        # both of them such inputs, planned the same on their own inputs)
        rng = np.random.default_rng(seed)
        weight = torch.from_numpy(np.round(np.exp(rng.standard_normal((LAYERS, EXPERTS)))
                                           * 100))
        plan = eplb.plan(weight, SLOTS, GPUS, NODES, policy="locality", dispatch="nearest",
                         slack=SLACK)
        hashes[f"tiny-{seed}"] = hashlib.sha256(plan.phy2log.numpy().tobytes()).hexdigest()
        hashes[f"input-tiny-{seed}"] = hashlib.sha256(weight.numpy().tobytes()).hexdigest()
        if incremental:
            # the next window, each expert × exp(0.2·N(0, 1)), planned from this plan as
            # SGLang's runtime rebalance plans from the map in force
            drifted = torch.from_numpy(np.round(
                weight.numpy() * np.exp(0.2 * rng.standard_normal((LAYERS, EXPERTS)))))
            step = eplb.plan(drifted, SLOTS, GPUS, NODES, policy="locality",
                             dispatch="nearest", slack=SLACK, previous=plan)
            hashes[f"tiny-{seed}-incremental"] = hashlib.sha256(
                step.phy2log.numpy().tobytes()).hexdigest()
            hashes[f"input-tiny-{seed}-incremental"] = hashlib.sha256(
                drifted.numpy().tobytes()).hexdigest()
    for path in sorted(real_dir().glob("*.json"))[:real]:
        # [58, 256]: the MoE rows of the dump
        weight = torch.tensor(json.loads(path.read_text())["logical_count"],
                              dtype=torch.float64)[3:61]
        for slack in (0.0, 0.03):
            plan = eplb.plan(weight, 288, 32, 4, 8, policy="locality", dispatch="nearest",
                             slack=slack)
            hashes[f"{path.stem}-slack{slack}"] = hashlib.sha256(
                plan.phy2log.numpy().tobytes()).hexdigest()
    return hashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=5000,
                        help="tiny random problems (seeds 0, 1, ...)")
    parser.add_argument("--real", type=int, default=0,
                        help="real DeepSeek-V3 files to plan too (of 12), at slack 0 and 0.03")
    parser.add_argument("--capabilities", default=",".join(supported_capabilities()))
    parser.add_argument("--incremental", action="store_true",
                        help="also plan each tiny problem's next window (drift 0.2) from its "
                             "plan, as SGLang's runtime rebalance plans from the map in force")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.problems < 0 or args.real < 0:
        parser.error("--problems and --real must be at least 0")
    if args.worker:  # one capability, set by the parent before torch was imported
        print(json.dumps(worker(args.problems, args.real, args.incremental)))
        return 0
    if args.real and not real_dir().is_dir():
        sys.exit(f"--real: no real loads at {real_dir()} (set EPLB_REAL_DATA)")
    caps = [cap for cap in args.capabilities.split(",") if cap]
    seen: dict[str, dict[str, str]] = {}
    start = time.perf_counter()
    for cap in caps:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, OMP_NUM_THREADS="1")
        out = subprocess.run(
            [sys.executable, __file__, "--worker", "--problems", str(args.problems),
             "--real", str(args.real), *(["--incremental"] if args.incremental else [])],
            env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"worker failed under ATEN_CPU_CAPABILITY={cap}:\n{out.stderr}")
        seen[cap] = json.loads(out.stdout.strip().splitlines()[-1])
    inputs = [name for name in seen[caps[0]] if name.startswith("input-")]
    unequal = [name for name in inputs if len({seen[cap][name] for cap in caps}) > 1]
    if unequal:  # a difference in the problem, not in the planner: no claim either way
        sys.exit(f"the capabilities planned different inputs ({len(unequal)}, e.g. "
                 f"{unequal[0][len('input-'):]}): the problems must not depend on torch's "
                 "kernels")
    names = [name for name in seen[caps[0]] if not name.startswith("input-")]
    differ = [name for name in names if len({seen[cap][name] for cap in caps}) > 1]
    tiny = [name for name in differ if name.startswith("tiny-")
            and not name.endswith("-incremental")]
    steps = [name for name in differ if name.endswith("-incremental")]
    print(f"{len(names)} plans x {len(caps)} capabilities {caps} in "
          f"{time.perf_counter() - start:.0f} s")
    print(f"tiny random problems ({LAYERS} layers x {EXPERTS} experts, {SLOTS} slots on "
          f"{GPUS} GPUs, {NODES} nodes, slack {SLACK}): {len(tiny)} of {args.problems} "
          "differ between capabilities")
    if args.incremental:
        print(f"their next windows planned from their plans (drift 0.2): {len(steps)} of "
              f"{args.problems} differ between capabilities")
    real = [name for name in names if not name.startswith("tiny-")]
    if real:
        print(f"real DeepSeek-V3 plans: {len(set(real) & set(differ))} of {len(real)} differ")
    for name in differ:
        groups: dict[str, list[str]] = {}
        for cap in caps:
            groups.setdefault(seen[cap][name][:12], []).append(cap)
        print(f"  {name}: " + "; ".join(f"{h} {'/'.join(c)}" for h, c in groups.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
