"""Planning orchestration: from-scratch plans, dead GPUs, GPU speeds, incremental plans.

:func:`plan_placement` is what :func:`eplb.plan` runs after validating its arguments.
It never imports I/O or the CLI.
"""

from __future__ import annotations

import torch

from eplb.placement import Placement, Topology
from eplb.policies import POLICIES, PlanOptions, plan_rows

__all__ = ["plan_placement"]


def _plan_live(weight: torch.Tensor, topology: Topology, options: PlanOptions,
               generator: torch.Generator, live: torch.Tensor) -> torch.Tensor:
    """Global plan over the live GPUs only; dead GPUs' slots get ``-1``. → ``[L, R]``."""
    num_layers, num_experts = weight.shape
    slots = topology.slots_per_gpu
    num_live = int(live.sum())
    live_slots = num_live * slots
    if live_slots < num_experts:
        raise ValueError(
            f"only {num_live} of {topology.num_gpus} GPUs are live: {live_slots} slots cannot hold "
            f"{num_experts} experts (each needs at least one replica on a live GPU)"
        )
    planned = plan_rows(weight, live_slots, num_live, options, generator)
    phy2log = torch.full((num_layers, topology.num_replicas), -1, dtype=torch.int64,
                         device=weight.device)
    slot_is_live = live.repeat_interleave(slots)
    phy2log[:, slot_is_live] = planned
    return phy2log


def plan_placement(
    weight: torch.Tensor,
    topology: Topology,
    policy: str,
    options: PlanOptions,
    generator: torch.Generator,
    *,
    active_gpus: torch.Tensor | None = None,
    gpu_speed: torch.Tensor | None = None,
    previous: Placement | torch.Tensor | None = None,
    max_moves: int | None = None,
    skip_threshold: float | None = None,
) -> Placement:
    """Plan ``weight [L, E]`` (validated float) on ``topology`` with a resolved policy."""
    num_experts = weight.shape[1]
    if previous is not None:
        from eplb.incremental import plan_incremental

        return plan_incremental(weight, topology, policy, options, generator, previous,
                                active_gpus=active_gpus, max_moves=max_moves,
                                skip_threshold=skip_threshold)
    if max_moves is not None or skip_threshold is not None:
        raise ValueError("max_moves and skip_threshold need the previous placement (previous=...)")
    if active_gpus is not None:
        phy2log = _plan_live(weight, topology, options, generator, active_gpus)
    else:
        phy2log = POLICIES[policy]().place(weight, topology, options, generator)
    if gpu_speed is not None:
        from eplb.speed import assign_to_speeds

        phy2log = assign_to_speeds(weight, phy2log, topology, gpu_speed, active_gpus)
    return Placement.from_phy2log(phy2log, num_experts, topology, policy, active_gpus)
