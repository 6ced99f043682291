"""Hashes of many plans: does a change keep eplb's plans bit for bit?

Speed work on the planner is mostly meant to give the *same* plans faster; a change that
alters plans needs its quality measured again. Run this before and after:

    python benchmarks/plan_hashes.py --json before.json       # on the code before
    python benchmarks/plan_hashes.py --compare before.json    # after: exit 1 if any differs
                                                              # (2 if the inputs differ)
    python benchmarks/plan_hashes.py --only incremental,nearest

Each group is one SHA-256 (first 16 hex digits) over the ``phy2log`` maps of its plans,
in a fixed order, one torch thread:

- ``incremental``: vLLM's call, chains of ``rebalance_experts`` with the map in force
  (the first from vLLM's initial map ``slot i → expert i % E``; loads drifting by
  ``× exp(0.15·Z)`` per expert), under five topologies (4 or 2 nodes × 8 groups, 8 × 8 on
  64 GPUs, global, 96 GPUs), without a budget and with two; on 6 real DeepSeek-V3
  workloads and 3 generated ones.
- ``fresh``: fresh plans of generated loads at 12 shapes (DeepSeek-V3, Qwen3, Kimi-K2 and
  gpt-oss-like; 1 to 17 slots per GPU).
- ``generated-chains``: ``eplb.plan`` chains from vLLM's initial map on 8 generated
  DeepSeek-V3 workloads, global and hierarchical (the protocol of
  ``bench_incremental_settings.py``; they caught a bug the real files did not).
- ``nearest``: plans for the nearest-replica dispatch, fresh then from the map in force,
  and the GPU loads that dispatch realises (with and without token sources);
  ``nearest-dead-gpu``: the same plans with GPU 7 dead; ``nearest-one-node``: one node
  (SGLang's runtime table) of 8 and 32 GPUs, fresh, then from the map in force without a
  move budget, with totals of 200 and 10**6 slots and with 6 slots per layer.
- ``shapes``: every ``bench_shapes.py`` shape on 3 inputs (``rebalance_experts``,
  ``eplb.plan`` with its ``log2phy``, and a one-layer call), one hash per shape.
- ``variants``: gpt-oss-like shapes with a dead GPU, GPU speeds, groups on nodes, the
  nearest dispatch, explicit search options, each also re-planned from its own plan.

The real workloads are read from ``$EPLB_REAL_DATA`` (default ``../shared/data/real``);
without them the groups that use them say so, and their hashes cover the rest (compare
runs made with the same data). Hashes are the same for the same eplb, torch and NumPy
versions on any machine (ARCHITECTURE.md, "Determinism"); across versions compare plans,
not hashes. The whole run takes about 30 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from _harness import (
    DEEPSEEK_DIR,
    add_output_options,
    deepseek_loads,
    refuse_existing_outputs,
    start,
    write_output,
)
from bench_shapes import MODELS, SHAPES, model_loads
from bench_vllm_call import E, R, drift_chain

import eplb
from eplb.core.dispatch import realised_gpu_loads
from eplb.tools.generator import generate_loads

#: ``(R, P, N, G)`` of the ``incremental`` chains
CHAIN_TOPOLOGIES = [(288, 32, 4, 8), (288, 32, 2, 8), (320, 64, 8, 8), (288, 32, 1, 8),
                    (288, 96, 4, 8)]
#: ``(L, E, R, P, N, G, preset)`` of the ``fresh`` plans
FRESH_SHAPES = [
    (58, 256, 288, 32, 4, 8, "deepseek-v3"), (58, 256, 288, 96, 1, 1, "deepseek-v3"),
    (58, 256, 288, 144, 1, 1, "deepseek-v3"), (58, 256, 320, 64, 8, 8, "deepseek-v3"),
    (94, 128, 160, 32, 1, 1, "qwen3-235b"), (61, 384, 416, 32, 4, 8, "kimi-k2"),
    (36, 32, 40, 8, 1, 1, "gpt-oss-120b"), (36, 32, 64, 64, 1, 1, "gpt-oss-120b"),
    (58, 256, 512, 256, 1, 1, "deepseek-v3"), (58, 256, 272, 16, 1, 1, "deepseek-v3"),
    (94, 128, 384, 128, 1, 1, "qwen3-235b"), (61, 384, 512, 128, 1, 1, "kimi-k2"),
]


class Digest:
    """A running SHA-256 over tensors, and how many plans went in."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.plans = 0

    def add(self, *tensors: torch.Tensor, plan: bool = True) -> None:
        for tensor in tensors:
            self._hash.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.plans += plan

    def hexdigest(self) -> str:
        return self._hash.hexdigest()[:16]


#: the key of the --json file that records which inputs the run saw
INPUTS = "inputs"


def real_loads(count: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The first ``count`` real DeepSeek-V3 workloads ``[58, 256]`` (none when absent)."""
    return list(deepseek_loads(dtype).values())[:count]


def vllm_initial_map(num_replicas: int, num_layers: int) -> torch.Tensor:
    """vLLM's first map: slot ``i`` holds expert ``i % E``, ``[L, R]``."""
    return torch.arange(num_replicas).remainder(E).repeat(num_layers, 1)


def incremental() -> Iterator[tuple[str, Digest]]:
    loads = real_loads(6, torch.int64)
    loads += [generate_loads("deepseek-v3", seed=s).round().to(torch.int64)
              for s in (200, 201, 202)]
    digest = Digest()
    for replicas, gpus, nodes, groups in CHAIN_TOPOLOGIES:
        for i, weight in enumerate(loads):
            windows = drift_chain(weight, 2, 0.15, i)
            layer_slots = replicas * weight.shape[0]
            # no budget; 20 % of all slots; 10 % of all slots
            for budget in (None, layer_slots // 5, layer_slots // 10):
                old = vllm_initial_map(replicas, weight.shape[0])
                for window in windows:
                    options = {} if budget is None else {"max_moves": budget}
                    old = eplb.rebalance_experts(window, replicas, groups, nodes, gpus,
                                                 old_phy2log=old, **options)[0]
                    digest.add(old)
    yield "incremental", digest


def fresh() -> Iterator[tuple[str, Digest]]:
    digest = Digest()
    for layers, experts, replicas, gpus, nodes, groups, preset in FRESH_SHAPES:
        for seed in (0, 1):
            weight = generate_loads(preset, seed=seed, num_layers=layers, num_experts=experts)
            digest.add(eplb.rebalance_experts(weight, replicas, groups, nodes, gpus)[0])
    yield "fresh", digest


def generated_chains() -> Iterator[tuple[str, Digest]]:
    digest = Digest()
    for nodes, groups in ((1, 1), (4, 8)):
        for k in range(8):
            weight = generate_loads("deepseek-v3", seed=100 + k).round().to(torch.int64)
            old = vllm_initial_map(R, weight.shape[0])
            for window in drift_chain(weight, 3, 0.15, 1000 + k)[:3]:
                old = eplb.plan(window, R, 32, nodes, groups, previous=old).phy2log
                digest.add(old)
    yield "generated-chains", digest


def nearest() -> Iterator[tuple[str, Digest]]:
    plans, realised = Digest(), Digest()
    loads = real_loads(3, torch.float64)
    loads += [generate_loads("deepseek-v3", seed=s) for s in (5, 6)]
    for i, weight in enumerate(loads):
        for replicas, gpus, nodes, groups in ((288, 32, 4, 8), (320, 64, 8, 8)):
            options = {"policy": "global", "dispatch": "nearest"}
            first = eplb.plan(weight, replicas, gpus, nodes, groups, **options)
            plans.add(first.phy2log)
            gen = torch.Generator().manual_seed(i)
            drifted = torch.round(
                weight * torch.exp(0.15 * torch.randn(weight.shape, generator=gen,
                                                      dtype=torch.float64)))
            then = eplb.plan(drifted, replicas, gpus, nodes, groups, previous=first, **options)
            plans.add(then.phy2log)
            sources = torch.rand(gpus, generator=gen, dtype=torch.float64)
            realised.add(realised_gpu_loads(drifted, then.phy2log, gpus, nodes, source=sources),
                         realised_gpu_loads(drifted, then.phy2log, gpus, nodes), plan=False)
    yield "nearest", plans
    yield "nearest-realised-loads", realised
    # a dead GPU: fresh, then from the map in force (the path that relabels within nodes)
    dead = Digest()
    for i, weight in enumerate(loads[:3]):
        for replicas, gpus, nodes, groups in ((288, 32, 4, 8), (320, 64, 8, 8)):
            live = torch.ones(gpus, dtype=torch.bool)
            live[7] = False
            options = {"policy": "global", "dispatch": "nearest", "active_gpus": live}
            first = eplb.plan(weight, replicas, gpus, nodes, groups, **options)
            dead.add(first.phy2log)
            gen = torch.Generator().manual_seed(100 + i)
            drifted = torch.round(
                weight * torch.exp(0.15 * torch.randn(weight.shape, generator=gen,
                                                      dtype=torch.float64)))
            dead.add(eplb.plan(drifted, replicas, gpus, nodes, groups, previous=first,
                               **options).phy2log)
    yield "nearest-dead-gpu", dead
    # one node, SGLang's runtime table: fresh, then from the map in force without a
    # budget, with small and ample totals and with a per-layer cap (the budgeted path
    # offers the even split's own plan within the budget too)
    table = Digest()
    for i, weight in enumerate(loads[:3]):
        for gpus in (8, 32):
            first = eplb.plan(weight, 288, gpus, dispatch="nearest")
            table.add(first.phy2log)
            gen = torch.Generator().manual_seed(200 + i)
            drifted = torch.round(
                weight * torch.exp(0.15 * torch.randn(weight.shape, generator=gen,
                                                      dtype=torch.float64)))
            layers = weight.shape[0]
            for budget in (None, 200, 10**6, [6] * layers):
                table.add(eplb.plan(drifted, 288, gpus, dispatch="nearest", previous=first,
                                    max_moves=budget).phy2log)
    yield "nearest-one-node", table
    # the locality policy: fresh, then from its own map and from a global plan's
    locality = Digest()
    for i, weight in enumerate(loads[:2]):
        options = {"policy": "locality", "dispatch": "nearest"}
        first = eplb.plan(weight, 288, 32, 4, 8, **options)
        other = eplb.plan(weight, 288, 32, 4, 8, policy="global", dispatch="nearest")
        locality.add(first.phy2log)
        gen = torch.Generator().manual_seed(300 + i)
        drifted = torch.round(
            weight * torch.exp(0.15 * torch.randn(weight.shape, generator=gen,
                                                  dtype=torch.float64)))
        for previous in (first, other):
            locality.add(eplb.plan(drifted, 288, 32, 4, 8, previous=previous,
                                   **options).phy2log)
    yield "nearest-locality", locality


def shapes() -> Iterator[tuple[str, Digest]]:
    cache: dict[str, list[torch.Tensor]] = {}
    for key, slots, gpus in SHAPES:
        if key not in cache:
            cache[key] = model_loads(key, 3)[0]
        digest = Digest()
        for weight in cache[key]:
            digest.add(*eplb.rebalance_experts(weight, slots * gpus, 1, 1, gpus))
            placement = eplb.plan(weight, slots * gpus, gpus)
            digest.add(placement.phy2log, placement.log2phy)
            digest.add(*eplb.rebalance_experts(weight[0], slots * gpus, 1, 1, gpus))
        model = MODELS[key]
        yield f"shape {model.layers}x{model.experts} S={slots} P={gpus}", digest


def variants() -> Iterator[tuple[str, Digest]]:
    weight = model_loads("gptoss", 1)[0][0].round()
    gen = torch.Generator().manual_seed(0)
    digest = Digest()
    for slots, gpus in ((1, 64), (2, 32), (3, 16), (5, 8), (9, 8)):
        live = torch.ones(gpus, dtype=torch.bool)
        live[1] = False
        speeds = 1 + torch.rand(gpus, generator=gen)
        for options in ({"active_gpus": live}, {"gpu_speed": speeds},
                        {"num_nodes": 2, "num_groups": 4},
                        {"num_nodes": 2, "num_groups": 4, "policy": "global",
                         "dispatch": "nearest"},
                        {"seed": 3, "num_candidates": 3, "refine_steps": 20}):
            first = eplb.plan(weight, slots * gpus, gpus, **options)
            digest.add(first.phy2log)
            again = {k: v for k, v in options.items() if k != "gpu_speed"}
            digest.add(eplb.plan(weight * 1.1, slots * gpus, gpus, previous=first,
                                 **again).phy2log)
    yield "variants", digest


GROUPS: dict[str, Callable[[], Iterator[tuple[str, Digest]]]] = {
    "incremental": incremental, "fresh": fresh, "generated-chains": generated_chains,
    "nearest": nearest, "shapes": shapes, "variants": variants,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups (default: all of {', '.join(GROUPS)})")
    parser.add_argument("--json", metavar="FILE", help="also write the hashes to FILE")
    parser.add_argument("--compare", metavar="FILE",
                        help="a --json file of an earlier run: report and fail on differences")
    add_output_options(parser, "json")
    args = parser.parse_args(argv)
    refuse_existing_outputs(args)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    before = json.loads(Path(args.compare).read_text()) if args.compare else None
    print(start("plan_hashes"))
    # which inputs the groups saw: without the real files several groups plan on other
    # loads, and a comparison across that would report changed plans of unchanged code
    inputs = (f"{len(list(DEEPSEEK_DIR.glob('*.json')))} real DeepSeek-V3 workloads"
              if DEEPSEEK_DIR.is_dir() else "no real DeepSeek-V3 workloads")
    hashes: dict[str, str] = {INPUTS: inputs}
    for group in chosen:
        begin = time.perf_counter()
        for label, digest in GROUPS[group]():
            hashes[label] = digest.hexdigest()
            print(f"{label}: {digest.hexdigest()} ({digest.plans} plans)", flush=True)
        print(f"  ({group}: {time.perf_counter() - begin:.1f} s)", flush=True)
    if args.json:
        write_output(args.json, json.dumps(hashes, indent=1) + "\n", args.force)
    if before is None:
        return 0
    if before.get(INPUTS, inputs) != inputs:
        print(f"INPUTS DIFFER: {args.compare} was made with {before[INPUTS]}, this run has "
              f"{inputs} (set EPLB_REAL_DATA alike): the plans cannot be compared")
        return 2
    labels = [label for label in hashes if label != INPUTS]
    differ = [label for label in labels if label in before and before[label] != hashes[label]]
    missing = [label for label in labels if label not in before]
    for label in differ:
        print(f"DIFFERENT: {label}: {before[label]} before, {hashes[label]} now")
    if missing:
        print(f"not in {args.compare}: {', '.join(missing)}")
    print("same plans in every group compared" if not differ else
          f"{len(differ)} of {len(labels) - len(missing)} groups differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
