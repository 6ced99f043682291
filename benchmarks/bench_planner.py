"""Quality, speed and scale of the core planner, against the reference greedy and the bound.

Sections (run all by default, or name some):

- ``real``: the real DeepSeek-V3 loads (R=288, P=32; global and hierarchical G=8 N=4).
- ``synthetic``: log-normal loads (σ 0.4–1.1, spike layers) on three model shapes, S in
  {2, 3, 5, 7, 9}, P up to 256.
- ``speed``: the whole call on [58, 256] → R=288, P=32, median of repeated runs after a
  warm-up, eplb vs DeepSeek's greedy as vLLM 0.33 ships it (``DefaultEplbPolicy``, the
  released wheel's code: ``scripts/fetch_engines.py``) in the same run. The quality
  sections use ``eplb.core.plan_greedy``, which gives the same loads per GPU; its time is
  not the engine's, so it is not timed.
- ``ablation``: what the refinement buys: all-pairs L2 swaps vs max-GPU-only swaps vs
  none, at equal construction.
- ``scale``: time and extra peak memory from 58×256 (P=32) to 100×1024 on 1024 GPUs.

Usage: ``python benchmarks/bench_planner.py [real synthetic speed ablation scale] [--repeats N]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from _harness import deepseek_loads, median_ms, start
from engines import FETCH_HINT, engine_root, vllm_sources

import eplb
from eplb import PlanOptions
from eplb.core.baselines import plan_greedy
from eplb.core.bounds import balancedness_ceiling
from eplb.core.packing import PackingOptions
from eplb.tools.generator import generate_loads

real_loads = deepseek_loads


TOPOLOGIES = {"global": (1, 1), "hierarchical": (4, 8)}  # policy: (nodes, groups)


def section_real(repeats: int) -> None:
    loads = real_loads()
    if not loads:
        return
    print("\n## Real DeepSeek-V3 loads (R=288, P=32; hierarchical G=8, N=4)\n")
    print("| workload | policy | greedy | eplb | ceiling | eplb gap to ceiling |")
    print("|---|---|---|---|---|---|")
    summary: dict[str, list[tuple[float, float, float]]] = {p: [] for p in TOPOLOGIES}
    for name, w in loads.items():
        for policy, (nodes, groups) in TOPOLOGIES.items():
            ours = eplb.plan(w, 288, 32, nodes, groups, policy=policy).balancedness(w)
            ref = plan_greedy(w, 288, 32, nodes, groups, policy=policy).balancedness(w)
            ceil = balancedness_ceiling(w, 288, 32, nodes, groups, policy)
            summary[policy].append((ref, ours, ceil))
            print(
                f"| {name} | {policy} | {ref:.4f} | {ours:.5f} | {ceil:.5f} | {ceil - ours:.5f} |"
            )
    print()
    for policy, rows in summary.items():
        ref, ours, ceil = zip(*rows, strict=True)
        gaps = [c - o for _, o, c in rows]
        print(
            f"- {policy}: eplb {min(ours):.5f}–{max(ours):.5f}, "
            f"greedy {min(ref):.4f}–{max(ref):.4f}, ceiling {min(ceil):.4f}–{max(ceil):.4f}, "
            f"largest gap to ceiling {max(gaps):.5f}"
        )


SHAPES = [(58, 256), (61, 384), (94, 128)]
SLOTS = [2, 3, 5, 7, 9]


def synthetic_cases():
    for layers, experts in SHAPES:
        for slots in SLOTS:
            for gpus in (32, 64, 128, 256):
                replicas = slots * gpus
                if replicas < experts or replicas > 4 * experts:
                    continue
                yield layers, experts, slots, gpus, replicas


def section_synthetic(repeats: int) -> None:
    del repeats
    print("\n## Synthetic log-normal loads (σ 0.4–1.1, spike layers), global policy\n")
    print("| L×E | S | P | R | greedy | eplb | ceiling | eplb gap | eplb ≥ greedy |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst_s5 = 0.0
    for seed, (layers, experts, slots, gpus, replicas) in enumerate(synthetic_cases()):
        w = generate_loads(num_layers=layers, num_experts=experts, seed=seed)
        ours = eplb.plan(w, replicas, gpus).balancedness(w)
        ref = plan_greedy(w, replicas, gpus).balancedness(w)
        ceil = balancedness_ceiling(w, replicas, gpus)
        if slots >= 5:
            worst_s5 = max(worst_s5, (ceil - ours) / ceil)
        print(
            f"| {layers}×{experts} | {slots} | {gpus} | {replicas} | {ref:.4f} | {ours:.4f} | "
            f"{ceil:.4f} | {ceil - ours:.4f} | {'yes' if ours >= ref else 'NO'} |"
        )
    print(f"\n- largest relative gap to the ceiling where S ≥ 5: {100 * worst_s5:.3f}%")


def section_speed(repeats: int) -> None:
    loads = real_loads()
    w = next(iter(loads.values())) if loads else generate_loads("deepseek-v3", seed=0)
    source = "real prefill/decode file" if loads else "generated deepseek-v3 loads"
    print(f"\n## Speed: [58, 256] → R=288, P=32 ({source}), one thread, median of {repeats} runs\n")
    root = engine_root("vllm")
    if root is None:
        print(f"SKIPPED: the greedy is timed as vLLM 0.33.0 ships it; {FETCH_HINT}")
        return
    print("| policy | eplb ms | greedy ms (vLLM 0.33 DefaultEplbPolicy) | greedy / eplb |")
    print("|---|---|---|---|")
    with vllm_sources(root) as vllm:
        greedy = vllm.DefaultEplbPolicy
        for policy, (nodes, groups) in TOPOLOGIES.items():
            ours = median_ms(
                lambda n=nodes, g=groups, p=policy: eplb.rebalance_experts(w, 288, g, n, 32,
                                                                           policy=p),
                repeats,
            )
            # vLLM's call: (loads, R, groups, nodes, GPUs, map in force); hierarchical where
            # groups % nodes == 0, as here for both rows (G = N = 1 is the global policy)
            ref = median_ms(
                lambda n=nodes, g=groups: greedy.rebalance_experts(w, 288, g, n, 32, None),
                repeats,
            )
            print(f"| {policy} | {ours:.2f} | {ref:.2f} | {ref / ours:.1f}× |")


_DEFAULT = PackingOptions()
ABLATIONS = {
    "no refinement": PackingOptions(pair_steps=0, max_steps=0),
    "max-GPU-only swaps (12 steps)": PackingOptions(pair_steps=0, max_steps=12),
    "all-pairs L2 swaps only (12 steps)": PackingOptions(pair_steps=12, max_steps=0),
    (
        f"L2 ({_DEFAULT.pair_steps_for(32)}) then max-GPU polish "
        f"({_DEFAULT.max_steps_for(32)}): default at P=32"
    ): _DEFAULT,
    "L2 (16) then max-GPU polish (32)": PackingOptions(pair_steps=16, max_steps=32),
}


def section_ablation(repeats: int) -> None:
    loads = real_loads()
    cases = list(loads.items())[:4] if loads else []
    cases += [(f"synthetic S={s}", generate_loads("deepseek-v3", seed=s)) for s in (2, 9)]
    print("\n## Refinement ablation (global; same construction and replication)\n")
    print("| input | R/P | refinement | balancedness | ms |")
    print("|---|---|---|---|---|")
    for name, w in cases:
        slots = 2 if name.endswith("S=2") else 9
        gpus = 32 if slots == 9 else 144
        replicas = slots * gpus
        for label, packing in ABLATIONS.items():
            opts = PlanOptions(packing=packing)
            bal = eplb.plan(w, replicas, gpus, options=opts).balancedness(w)
            ms = median_ms(
                lambda opts=opts, w=w, r=replicas, g=gpus: eplb.plan(w, r, g, options=opts),
                max(3, repeats // 3),
            )
            print(f"| {name} | {replicas}/{gpus} | {label} | {bal:.5f} | {ms:.1f} |")


SCALE = [
    (58, 256, 288, 32),
    (61, 384, 512, 64),
    (94, 128, 512, 128),
    (100, 512, 1024, 256),
    (100, 1024, 2048, 512),
    (100, 1024, 2048, 1024),
]

_SCALE_CHILD = """
import resource, statistics, sys, time, torch
torch.set_num_threads(1)
import eplb
from eplb.tools.generator import generate_loads
L, E, R, P, repeats = map(int, sys.argv[1:6])
w = generate_loads(num_layers=L, num_experts=E, seed=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
p = eplb.plan(w, R, P)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(repeats):
    t = time.perf_counter(); eplb.plan(w, R, P); times.append(time.perf_counter() - t)
from eplb.core.bounds import balancedness_ceiling
ceiling = balancedness_ceiling(w, R, P)
print(statistics.median(times) * 1000, (after - before) / 1024, p.balancedness(w), ceiling)
"""


def section_scale(repeats: int) -> None:
    print("\n## Scale: time and extra peak memory (global policy, one thread)\n")
    print(
        "| L×E | R | P | L·R | ms (median) | ms per 1k L·R | extra peak MiB | balancedness | "
        "ceiling |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for layers, experts, replicas, gpus in SCALE:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                _SCALE_CHILD,
                str(layers),
                str(experts),
                str(replicas),
                str(gpus),
                str(max(3, repeats // 3)),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        ms, mib, bal, ceil = (float(x) for x in out[:4])
        lr = layers * replicas
        print(
            f"| {layers}×{experts} | {replicas} | {gpus} | {lr} | {ms:.1f} | "
            f"{1000 * ms / lr:.3f} | {mib:.0f} | {bal:.4f} | {ceil:.4f} |"
        )


SECTIONS = {
    "real": section_real,
    "synthetic": section_synthetic,
    "speed": section_speed,
    "ablation": section_ablation,
    "scale": section_scale,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", help=f"some of {list(SECTIONS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(start("bench_planner"))
    for name in args.sections or SECTIONS:
        SECTIONS[name](args.repeats)


if __name__ == "__main__":
    main()
