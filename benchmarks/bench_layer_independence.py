"""Does a layer plan the same alone as in a call with other layers?

Four measurements (BENCHMARKS.md §1, "A layer plans alike whatever else is in the call"):

- **Random problems.** ``--cases`` random shapes (1-17 slots per GPU, 2-32 GPUs, 4-64
  experts, one node or a hierarchical cluster, log-normal, integer and tied loads). For
  each, the whole call is planned, then one layer alone, and the layer's two plans are
  compared. Counted apart: at most 4 slots per GPU, and 5 or more (where torch's float32
  sum over a GPU's slots depends on the GPU's place in its vector block; see
  ARCHITECTURE.md).
- **Large calls.** ``--large`` random layers (2-9 slots per GPU, 8-32 GPUs, 8-64
  experts), each planned alone and as one row of a call with 100-200 other random
  layers: large enough for the polish's checked search (its choice is made by the size
  of the whole call), where a layer alone gets the masked one.
- **Beside a one-hot layer.** ``--one-hot`` random hierarchical layers (5-8 slots per
  GPU, 1-2 nodes of 4-16 GPUs), each planned alone and beside a layer whose tokens all
  go to two experts: that layer's node rows sit at their bound and skip the swap search,
  which left the packing state in the construction's memory layout (torch's float32 sum
  over slots adds that layout in another order).
- **A real dump with its dense rows.** Each real DeepSeek-V3 file (61 rows, the first 3
  all zero) against its 58 MoE rows alone, at several shapes: the MoE layers whose plans
  differ; and each MoE layer planned alone against the 58-row call (SKIPPED without the
  real data).
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch
from _harness import DEEPSEEK_DIR, markdown_table, start

import eplb


def random_case(rng: random.Random, index: int) -> tuple[torch.Tensor, int, int, dict]:
    """``(weight [L, E], R, P, plan keyword arguments)`` of one random problem."""
    while True:
        experts = rng.choice([4, 8, 16, 32, 64])
        gpus = rng.choice([2, 4, 8, 16, 32])
        slots = rng.choice([1, 2, 3, 4, 5, 6, 9, 17])
        if slots * gpus >= experts:
            break
    layers = rng.choice([2, 5, 12])
    kwargs: dict = {}
    if rng.random() < 0.4:
        nodes = rng.choice([2, 4])
        groups = nodes * rng.choice([1, 2])
        if experts % groups == 0 and gpus % nodes == 0:
            kwargs = {"num_nodes": nodes, "num_groups": groups}
    gen = np.random.default_rng(index)
    weight = np.exp(rng.choice([0.3, 1.0, 2.0]) * gen.standard_normal((layers, experts)))
    if rng.random() < 0.3:
        weight = np.round(weight * 100)
    if rng.random() < 0.2:
        weight[:, : experts // 4] = 0.0
    return torch.from_numpy(weight), slots * gpus, gpus, kwargs


def random_problems(cases: int, seed: int) -> None:
    rng = random.Random(seed)
    counts = {"≤ 4 slots per GPU": [0, 0], "≥ 5 slots per GPU": [0, 0]}
    examples = []
    for index in range(cases):
        weight, replicas, gpus, kwargs = random_case(rng, index)
        whole = eplb.plan(weight, replicas, gpus, **kwargs).phy2log
        layer = rng.randrange(weight.shape[0])
        alone = eplb.plan(weight[[layer]], replicas, gpus, **kwargs).phy2log[0]
        key = "≤ 4 slots per GPU" if replicas // gpus <= 4 else "≥ 5 slots per GPU"
        counts[key][0] += 1
        if not torch.equal(alone, whole[layer]):
            counts[key][1] += 1
            examples.append(f"E={weight.shape[1]} P={gpus} S={replicas // gpus} "
                            f"L={weight.shape[0]} {kwargs or 'one node'}")
    print(f"\nRandom problems (seed {seed}): one layer alone against the whole call\n")
    print(markdown_table(["slots per GPU", "problems", "layer plans that differ"],
                         [[key, n, bad] for key, (n, bad) in counts.items()]))
    for example in examples:
        print(f"- differs: {example}")


def large_calls(cases: int, seed: int) -> None:
    rng = random.Random(seed)
    differ, examples = 0, []
    for index in range(cases):
        experts = rng.choice([8, 16, 20, 32, 64])
        gpus = rng.choice([8, 16, 32])
        slots = rng.choice([2, 3, 4, 5, 9])
        if slots * gpus < experts:
            slots = -(-experts // gpus)
        layers = rng.randrange(100, 201)
        gen = np.random.default_rng(10_000 + index)
        weight = torch.from_numpy(np.exp(gen.normal(0, rng.choice([0.5, 1.0, 2.0]),
                                                    (layers, experts))))
        layer = rng.randrange(layers)
        whole = eplb.plan(weight, slots * gpus, gpus).phy2log[layer]
        alone = eplb.plan(weight[[layer]], slots * gpus, gpus).phy2log[0]
        if not torch.equal(alone, whole):
            differ += 1
            examples.append(f"E={experts} P={gpus} S={slots} L={layers}")
    _report(f"Large calls (seed {seed}): one layer alone against the same layer among "
            "100-200 others", cases, differ, examples)


def beside_one_hot(cases: int, seed: int) -> None:
    """A hierarchical layer alone against the same layer beside a one-hot layer (two
    experts carry all its tokens): that layer's node rows sit at their bound and skip the
    swap search, which kept the packing state in the construction's memory layout."""
    rng = random.Random(seed)
    planned = differ = 0
    examples = []
    for index in range(cases):
        nodes = rng.choice([1, 2])
        gpus = nodes * rng.choice([4, 8, 16])
        slots = rng.choice([5, 6, 7, 8])
        replicas = gpus * slots
        groups = rng.choice([2, 4]) * nodes
        experts = groups * rng.randrange(max(1, replicas // 2 // groups),
                                         replicas // groups + 1)
        gen = np.random.default_rng(40_000 + index)
        layer = np.round(np.exp(gen.normal(3.5, rng.choice([0.5, 1.0]), experts)))
        hot = np.zeros(experts)
        hot[gen.choice(experts, 2, replace=False)] = 1000.0
        weight = torch.from_numpy(np.stack([layer, hot]))
        kwargs = {"num_nodes": nodes, "num_groups": groups, "policy": "hierarchical"}
        try:
            both = eplb.plan(weight, replicas, gpus, **kwargs).phy2log[0]
        except ValueError:  # a shape hierarchical placement cannot take (one node)
            continue
        planned += 1
        alone = eplb.plan(weight[:1], replicas, gpus, **kwargs).phy2log[0]
        if not torch.equal(alone, both):
            differ += 1
            examples.append(f"E={experts} P={gpus} S={slots} N={nodes} G={groups}")
    _report(f"Beside a one-hot layer (seed {seed}): one hierarchical layer alone against "
            "the same layer beside a layer whose tokens go to two experts", planned, differ,
            examples)


def _report(title: str, problems: int, differ: int, examples: list[str]) -> None:
    print(f"\n{title}\n")
    print(markdown_table(["problems", "layer plans that differ"], [[problems, differ]]))
    for example in examples[:10]:
        print(f"- differs: {example}")


def real_dumps() -> None:
    files = sorted(DEEPSEEK_DIR.glob("*.json")) if DEEPSEEK_DIR.is_dir() else []
    if not files:
        print(f"\nReal dumps: SKIPPED (no real DeepSeek-V3 files at {DEEPSEEK_DIR}; set "
              f"EPLB_REAL_DATA)")
        return
    # the whole dumps: 61 rows, the 3 dense layers first
    loads = [torch.tensor(json.loads(path.read_text())["logical_count"], dtype=torch.float64)
             for path in files]
    shapes = [("S=3 P=96", 288, 96, {}), ("S=9 P=32", 288, 32, {}),
              ("S=9 P=32 N=4 G=8", 288, 32, {"num_nodes": 4, "num_groups": 8}),
              ("S=4 P=64", 256, 64, {}), ("S=2 P=144", 288, 144, {}),
              ("S=16 P=16", 256, 16, {})]
    rows = []
    for label, replicas, gpus, kwargs in shapes:
        differ = alone_differ = 0
        for weight in loads:
            dense = weight.shape[0] - 58
            with_dense = eplb.plan(weight, replicas, gpus, **kwargs).phy2log[dense:]
            moe_only = eplb.plan(weight[dense:], replicas, gpus, **kwargs).phy2log
            differ += int((with_dense != moe_only).any(1).sum())
            for layer in range(dense, weight.shape[0]):
                alone = eplb.plan(weight[layer:layer + 1], replicas, gpus, **kwargs).phy2log[0]
                alone_differ += int(not torch.equal(alone, moe_only[layer - dense]))
        rows.append([label, len(loads), 58 * len(loads), differ, alone_differ])
    print("\nReal dumps: the 58 MoE layers planned with the dump's dense rows, and each alone, "
          "against the 58 MoE rows\n")
    print(markdown_table(["shape", "files", "MoE layers", "differ with the dense rows",
                          "differ alone"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300, help="random problems")
    parser.add_argument("--large", type=int, default=100,
                        help="random layers planned alone and in a large call")
    parser.add_argument("--one-hot", type=int, default=400,
                        help="random hierarchical layers planned alone and beside a one-hot "
                             "layer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(start("bench_layer_independence"))
    random_problems(args.cases, args.seed)
    large_calls(args.large, args.seed)
    beside_one_hot(args.one_hot, args.seed)
    real_dumps()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
