"""Planning orchestration: from-scratch plans, dead GPUs, GPU speeds, incremental plans.

:func:`plan_placement` is what :func:`eplb.plan` runs after validating its arguments.
It never imports I/O or the CLI.
"""

from __future__ import annotations

import torch

from eplb.core.packing import EXPERT, Tracking, refine, repair_conflicts
from eplb.core.placement import Placement, Topology, expert_counts
from eplb.core.policies import POLICIES, PlanOptions, plan_rows

__all__ = ["plan_live_global", "plan_placement", "refine_placement"]


def plan_live_global(
    weight: torch.Tensor,
    topology: Topology,
    options: PlanOptions,
    generator: torch.Generator,
    live: torch.Tensor,
) -> torch.Tensor:
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
    phy2log = torch.full(
        (num_layers, topology.num_replicas), -1, dtype=torch.int64, device=weight.device
    )
    phy2log[:, live.repeat_interleave(slots)] = planned
    return phy2log


def refine_placement(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    live: torch.Tensor,
    options: PlanOptions,
    *,
    speed: torch.Tensor | None = None,
    origin: torch.Tensor | None = None,
    budget: torch.Tensor | None = None,
) -> torch.Tensor:
    """Swap refinement of a placement whose GPUs keep their identity.

    Args:
        weight: ``[L, E]`` loads; phy2log: ``[L, R]`` (``-1`` on dead GPUs).
        live: ``[P]`` bool live GPUs; only their slots are touched.
        speed: ``[P]`` GPU speeds: minimise Σ load² / speed (heaviest bins start on the
            fastest GPUs).
        origin: ``[L, R]`` placement to charge moves against, with ``budget [L]`` slots.

    Returns:
        ``[L, R]`` refined placement.
    """
    num_layers, num_slots = phy2log.shape
    num_gpus = live.shape[0]
    slots = num_slots // num_gpus
    live_ids = live.nonzero()[:, 0]
    num_live = len(live_ids)
    counts = expert_counts(phy2log, weight.shape[1])
    per = weight / counts.clamp(min=1)
    scale = weight.sum(1, keepdim=True) / max(1, num_live * slots)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    grid = phy2log.view(num_layers, num_gpus, slots)[:, live_ids]  # [L, P_live, S]
    load = (
        per.gather(1, grid.reshape(num_layers, -1).clamp(min=0)).view_as(grid) / scale[:, :, None]
    )
    state = (
        torch.stack([load, grid.to(load.dtype)]).permute(0, 3, 1, 2).to(torch.float32).contiguous()
    )
    # an inherited placement may stack replicas of an expert on one GPU: repair first
    # (moves the budget cannot refuse); swaps never create new conflicts
    state = repair_conflicts(state, counts.amax(1) > num_live)
    gpu = torch.arange(num_live, device=phy2log.device).expand(num_layers, -1)
    speed_live = None
    if speed is not None:
        speed_live = speed[live_ids].to(torch.float32).expand(num_layers, -1).contiguous()
        # rearrangement: the heaviest bin goes to the fastest GPU
        bins = state[0].sum(0).argsort(dim=1, descending=True)
        fastest = speed_live.argsort(dim=1, descending=True)
        gpu = torch.empty_like(bins).scatter_(1, bins, fastest)  # gpu of each bin
        speed_live = speed_live.gather(1, gpu)
    track = Tracking(gpu=gpu.to(torch.float32).contiguous(), speed=speed_live)
    if origin is not None:
        origin_grid = origin.view(num_layers, num_gpus, slots)[:, live_ids]
        origin_grid = origin_grid.gather(1, gpu[:, :, None].expand(-1, -1, slots))
        track.origin = origin_grid.permute(2, 0, 1).to(torch.float32)
        track.budget = budget
    packing = options.packing
    polish = packing.max_steps_for(num_live)
    steps = max(packing.pair_steps_for(num_live) + polish, 2 * slots)
    state = refine(state, steps, "pairs", track=track)
    if speed is None:  # the polish keeps GPUs in place; it does not weigh speeds
        state = refine(state, polish, "max", track=track)
    # put every bin back on its GPU
    back = track.gpu.long().argsort(dim=1)
    state = state.gather(3, back.expand(2, slots, -1, -1))
    result = phy2log.clone().view(num_layers, num_gpus, slots)
    result[:, live_ids] = state[EXPERT].permute(1, 2, 0).long()
    return result.view(num_layers, num_slots)


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
    max_moves: int | torch.Tensor | None = None,
    skip_threshold: float | None = None,
) -> Placement:
    """Plan ``weight [L, E]`` (validated float) on ``topology`` with a resolved policy."""
    num_experts = weight.shape[1]
    if previous is not None:
        if gpu_speed is not None:
            raise ValueError("gpu_speed cannot be combined with previous (incremental planning)")
        from eplb.online.incremental import plan_incremental

        return plan_incremental(
            weight,
            topology,
            policy,
            options,
            generator,
            previous,
            active_gpus=active_gpus,
            max_moves=max_moves,
            skip_threshold=skip_threshold,
        )
    if max_moves is not None or skip_threshold is not None:
        raise ValueError("max_moves and skip_threshold need the previous placement (previous=...)")
    if active_gpus is not None:
        phy2log = plan_live_global(weight, topology, options, generator, active_gpus)
    else:
        phy2log = POLICIES[policy]().place(weight, topology, options, generator)
    if gpu_speed is not None:
        live = (
            active_gpus
            if active_gpus is not None
            else torch.ones(topology.num_gpus, dtype=torch.bool, device=weight.device)
        )
        zero = weight.sum(1, keepdim=True) <= 0
        w = torch.where(zero, torch.ones_like(weight), weight)
        phy2log = refine_placement(w, phy2log, live, options, speed=gpu_speed)
    return Placement.from_phy2log(phy2log, num_experts, topology, policy, active_gpus)
