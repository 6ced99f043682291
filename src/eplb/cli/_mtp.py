"""``eplb plan --mtp-layers``: the multi-token-prediction layers of a TensorRT-LLM YAML,
written after the loads' last layer and kept across ``--previous``."""

from __future__ import annotations

import argparse

import torch

from eplb.api import plan
from eplb.cli._inputs import warn
from eplb.core.messages import integer_runs
from eplb.core.placement import Placement


def with_mtp_layers(placement: Placement, layer_ids: list[int], last: int,
                    args: argparse.Namespace) -> tuple[Placement, list[int]]:
    """``placement`` with ``--mtp-layers`` rows after its last, and their model layer ids:
    ``last + 1`` and on, ``last`` the loads' last model layer (a row ``--previous`` left
    out of ``layer_ids``, the rows planned, still counts).

    TensorRT-LLM builds a model's multi-token-prediction layers after its last layer
    (``layer_idx`` = the layer count and on: 61 for DeepSeek-V3) and looks up every MoE
    layer it builds in ``initial_global_assignments``; a file without them stops it at
    start-up (``KeyError: 'layer_idx 61 not found in `initial_global_assignments`'``,
    TensorRT-LLM pull request 13974). Statistics recorded without speculative decoding
    hold no loads for them, so they are planned as layers that saw no tokens (an even
    spread), under the plan's policy (a hierarchical file's every row keeps its groups on
    one node, as eval and --previous check)."""
    policy = "hierarchical" if placement.policy == "hierarchical" else "global"
    extra = plan(torch.zeros(args.mtp_layers, placement.num_experts, dtype=torch.float64),
                 args.replicas, args.gpus, args.nodes, args.groups, policy=policy,
                 seed=args.seed)
    rows = torch.cat([placement.phy2log, extra.phy2log.to(placement.phy2log)])
    return (Placement.from_phy2log(rows, placement.num_experts, placement.topology,
                                   placement.policy, placement.active_gpus),
            [*layer_ids, *range(last + 1, last + 1 + args.mtp_layers)])


def warn_dropped_mtp(recorded_ids: list[int], last: int, args: argparse.Namespace) -> None:
    """Warn where the ``--previous`` YAML holds layers after ``last``, the loads' last
    model layer (its multi-token-prediction layers), that this file will lack: re-planning
    it without ``--mtp-layers`` dropped them silently, and TensorRT-LLM then stops at
    start-up."""
    dropped = sorted(layer for layer in recorded_ids if layer > last + args.mtp_layers)
    if dropped:
        warn(f"--previous {args.previous} holds model layer{'s' if len(dropped) > 1 else ''} "
             f"{integer_runs(dropped)} after the loads' last, {last}, which this file lacks: "
             "TensorRT-LLM raises KeyError at start-up for a multi-token-prediction layer it "
             f"lacks; pass --mtp-layers {max(dropped) - last} to keep them")
