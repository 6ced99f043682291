"""``eplb plan`` and ``eplb eval``."""

from __future__ import annotations

import argparse
from pathlib import Path

from eplb.api import plan
from eplb.cli._common import (
    CliError,
    active_gpus_from,
    ceiling,
    check_output,
    check_topology,
    existing_file,
    gpu_speed_from,
    info,
    layer_balance,
    load_weight,
    print_json,
    print_table,
    static_gpu_loads,
    timed,
)

EMIT_BY_SUFFIX = {".yaml": "trtllm", ".yml": "trtllm", ".pt": "pt", ".json": "json"}


def infer_emit(emit: str | None, output: str | Path) -> str:
    """``--emit`` or, when absent, the format implied by OUT's name (see ``eplb plan --help``)."""
    if emit:
        return emit
    name = Path(output).name.lower()
    if name.endswith((".sglang.json", ".sglang.pt")):
        return "sglang"
    return EMIT_BY_SUFFIX.get(Path(name).suffix, "json")


def _layer_ids(trace, first_layer: int | None, num_layers: int) -> list[int]:
    if first_layer is not None:
        return list(range(first_layer, first_layer + num_layers))
    return list(trace.layer_ids)


def cmd_plan(args: argparse.Namespace) -> int:
    from eplb.formats import read_placement, write_placement

    out = check_output(args.output, args.force)
    emit = infer_emit(args.emit, out)
    weight, trace = load_weight(args.loads, args.format)
    num_layers, num_experts = weight.shape
    check_topology(args.replicas, args.gpus, args.nodes, args.groups, num_experts)
    layer_ids = _layer_ids(trace, args.first_layer, num_layers)

    active = active_gpus_from(args.dead_gpus, args.gpus)
    speed = gpu_speed_from(args.gpu_speed, args.gpus)
    options: dict = {}
    if active is not None:
        options["active_gpus"] = active
    if speed is not None:
        options["gpu_speed"] = speed
    previous = None
    if args.previous:
        previous = read_placement(existing_file(args.previous, "previous placement"),
                                  num_gpus=args.gpus, num_nodes=args.nodes,
                                  num_groups=args.groups)
        options["previous"] = previous
    if args.max_moves is not None:
        if previous is None:
            raise CliError("--max-moves needs --previous (the placement in service)")
        options["max_moves"] = args.max_moves

    placement, seconds = timed(lambda: plan(
        weight, args.replicas, args.gpus, args.nodes, args.groups, policy=args.policy,
        seed=args.seed, **options))
    placement.validate()
    write_placement(placement, out, emit=emit, weight=weight, layer_ids=layer_ids,
                    force=args.force)

    live = placement.live_gpus()
    _, before, before_worst = layer_balance(static_gpu_loads(weight, args.gpus))
    _, after, after_worst = layer_balance(placement.gpu_loads(weight), live, speed)
    policy = placement.policy
    ceil = ceiling(weight, args.replicas, args.gpus, args.nodes, args.groups, policy,
                   active=placement.active_gpus, speed=speed is not None)
    moved = None
    if previous is not None:
        moved = placement.moved_slots(previous)
    summary = {
        "output": str(out),
        "emit": emit,
        "layers": num_layers,
        "experts": num_experts,
        "layer_ids": layer_ids,
        "topology": placement.topology.as_dict(),
        "policy": policy,
        "plan_seconds": seconds,
        "balancedness_before": before,
        "balancedness_after": after,
        "balancedness_ceiling": ceil.overall,
        "worst_max_over_mean_before": before_worst,
        "worst_max_over_mean_after": after_worst,
        "dead_gpus": None if active is None else (~active).nonzero().flatten().tolist(),
        "moved_slots_total": None if moved is None else int(moved.sum()),
        "moved_slots_max_layer": None if moved is None else int(moved.max()),
    }
    if args.json:
        print_json(summary)
        return 0
    rows = [
        ["no rebalancing (before)", before, before_worst],
        [f"eplb {policy} (after)", after, after_worst],
        ["ceiling (best possible)", ceil.overall, ceil.worst],
    ]
    print_table(
        f"{num_layers} layers × {num_experts} experts -> {args.replicas} slots on {args.gpus} "
        f"GPUs ({policy})",
        ["placement", "balancedness", "worst max/mean"], rows,
    )
    if moved is not None:
        print(f"moved {int(moved.sum())} slots in total, at most {int(moved.max())} in one layer")
    if ceil.note and ceil.overall is None:
        print(f"({ceil.note})")
    print(f"planned in {seconds * 1e3:.1f} ms; wrote {out} ({emit})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from eplb.formats import read_placement

    placement = read_placement(existing_file(args.placement, "placement file"),
                               num_gpus=args.gpus, num_nodes=args.nodes, num_groups=args.groups)
    weight, trace = load_weight(args.loads, args.format)
    if weight.shape != (placement.num_layers, placement.num_experts):
        raise CliError(
            f"loads {args.loads} have {weight.shape[0]} layers × {weight.shape[1]} experts but "
            f"the placement {args.placement} has {placement.num_layers} × {placement.num_experts}"
        )
    topo = placement.topology
    live = placement.live_gpus()
    before_layer, before, before_worst = layer_balance(static_gpu_loads(weight, topo.num_gpus))
    after_loads = placement.gpu_loads(weight)
    after_layer, after, after_worst = layer_balance(after_loads, live)
    ceil = ceiling(weight, topo.num_replicas, topo.num_gpus, topo.num_nodes, topo.num_groups,
                   placement.policy, active=placement.active_gpus)
    static = static_gpu_loads(weight, topo.num_gpus)
    mean_b = static.mean(1).clamp(min=1e-300)
    mean_a = after_loads[:, live].mean(1).clamp(min=1e-300)
    ratio_b = (static.max(1).values / mean_b).tolist()
    ratio_a = (after_loads[:, live].max(1).values / mean_a).tolist()
    per_layer = [
        {
            "layer": lid,
            "balancedness_before": float(before_layer[i]),
            "balancedness_after": float(after_layer[i]),
            "ceiling": None if ceil.per_layer is None else float(ceil.per_layer[i]),
            "max_over_mean_before": ratio_b[i],
            "max_over_mean_after": ratio_a[i],
        }
        for i, lid in enumerate(trace.layer_ids)
    ]
    result = {
        "placement": str(args.placement),
        "loads": str(args.loads),
        "topology": topo.as_dict(),
        "policy": placement.policy,
        "balancedness_before": before,
        "balancedness_after": after,
        "balancedness_ceiling": ceil.overall,
        "worst_max_over_mean_before": before_worst,
        "worst_max_over_mean_after": after_worst,
        "layers": per_layer,
    }
    if args.json:
        print_json(result)
        return 0
    if not args.summary:
        print_table(
            "per layer (balancedness = mean / max GPU load; max/mean = worst GPU vs mean)",
            ["layer", "bal before", "bal after", "ceiling", "max/mean before", "max/mean after"],
            [[r["layer"], r["balancedness_before"], r["balancedness_after"], r["ceiling"],
              r["max_over_mean_before"], r["max_over_mean_after"]] for r in per_layer],
        )
    print_table(
        f"{args.placement} on {args.loads}: {topo.num_replicas} slots on {topo.num_gpus} GPUs "
        f"({placement.policy})",
        ["", "balancedness", "worst max/mean"],
        [["no rebalancing (before)", before, before_worst],
         ["this placement (after)", after, after_worst],
         ["ceiling (best possible)", ceil.overall, ceil.worst]],
    )
    if ceil.note and ceil.overall is None:
        info(f"({ceil.note})")
    return 0

