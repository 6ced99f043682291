"""Public planning API: :func:`plan` and the drop-in :func:`rebalance_experts`.

``rebalance_experts`` has DeepSeek's signature and return value, so it replaces
``eplb.rebalance_experts`` from DeepSeek's repository and the ports in vLLM and SGLang.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from eplb.core.inputs import as_weight, check_gpu_vector
from eplb.core.packing import PackingOptions
from eplb.core.placement import Placement, Topology
from eplb.core.planner import plan_placement
from eplb.core.policies import POLICIES, PlanOptions

__all__ = ["PlanOptions", "plan", "rebalance_experts", "resolve_policy"]

_POLICY_NAMES = ("auto", *POLICIES)


def resolve_policy(
    policy: str,
    topology: Topology,
    num_experts: int,
    has_dead_gpus: bool = False,
    has_speeds: bool = False,
) -> str:
    """The concrete policy for ``policy`` ("auto", "global" or "hierarchical").

    ``auto`` works as in DeepSeek: hierarchical when ``num_groups > 1`` and groups divide
    evenly over nodes, else global. When hierarchical cannot apply (GPUs or experts do
    not divide, or GPUs are dead) ``auto`` warns and plans globally, and a forced
    ``"hierarchical"`` raises ``ValueError`` naming the reason.
    """
    if policy not in _POLICY_NAMES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(_POLICY_NAMES)}")
    if policy == "global":
        return "global"
    nodes, groups = topology.num_nodes, topology.num_groups
    if policy == "auto" and (groups <= 1 or nodes <= 1 or groups % nodes):
        return "global"
    problems = []
    if num_experts % groups:
        problems.append(f"num_experts ({num_experts}) is not a multiple of num_groups ({groups})")
    if groups % nodes:
        problems.append(f"num_groups ({groups}) is not a multiple of num_nodes ({nodes})")
    if topology.num_gpus % nodes:
        problems.append(f"num_gpus ({topology.num_gpus}) is not a multiple of num_nodes ({nodes})")
    if has_dead_gpus:
        problems.append("some GPUs are dead (active_gpus), so nodes are no longer alike")
    if has_speeds:
        problems.append("GPU speeds differ (gpu_speed), so nodes are no longer alike")
    if not problems:
        return "hierarchical"
    reason = "; ".join(problems)
    if policy == "hierarchical":
        raise ValueError(f"hierarchical placement is impossible: {reason}")
    warnings.warn(
        f"eplb: planning globally because hierarchical placement is impossible: {reason}",
        RuntimeWarning,
        stacklevel=3,
    )
    return "global"


def _options(
    options: PlanOptions | None, num_candidates: int | None, refine_steps: int | None
) -> PlanOptions:
    if options is None:
        options = PlanOptions()
    elif not isinstance(options, PlanOptions):
        raise TypeError(f"options must be an eplb.PlanOptions, got {type(options).__name__}")
    if num_candidates is None and refine_steps is None:
        return options
    p = options.packing
    kwargs = {
        "num_candidates": p.num_candidates if num_candidates is None else num_candidates,
        "construction": p.construction,
        "noise": p.noise,
    }
    if refine_steps is None:
        packing = PackingOptions(pair_steps=p.pair_steps, max_steps=p.max_steps, **kwargs)
    else:
        packing = PackingOptions.with_budget(refine_steps, **kwargs)
    return dataclasses.replace(options, packing=packing)


def plan(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    *,
    policy: str = "auto",
    seed: int = 0,
    num_candidates: int | None = None,
    refine_steps: int | None = None,
    options: PlanOptions | None = None,
    active_gpus: torch.Tensor | None = None,
    gpu_speed: torch.Tensor | None = None,
    previous: Placement | torch.Tensor | None = None,
    max_moves: int | torch.Tensor | None = None,
    skip_threshold: float | None = None,
) -> Placement:
    """Plan an expert placement.

    Args:
        weight: ``[L, E]`` (or ``[E]``) expert loads, any real/integer dtype, CPU or CUDA.
        num_replicas: ``R`` physical slots, ``R >= E`` and a multiple of ``num_gpus``.
        num_gpus: ``P`` GPUs; slot ``s`` lives on GPU ``s // (R / P)``.
        num_nodes: ``N`` nodes (hierarchical policy).
        num_groups: ``G`` expert groups (hierarchical policy).
        policy: ``"auto"`` (DeepSeek's rule), ``"global"`` or ``"hierarchical"``.
        seed: seed of the randomised packing starts; same input and seed → same output.
        num_candidates: randomised packing starts per layer (default 1).
        refine_steps: most swap-refinement steps in total, a third of them all-pairs L2
            steps (default: 8 heaviest-GPU polish steps, ``max(4, P/2)`` for problems of
            fewer GPUs, after 2 all-pairs steps where ``P/2`` exceeds the polish steps:
            10 steps for the DeepSeek-V3 shape, 4 for its 8-GPU nodes); both stop early
            when converged.
        options: full :class:`PlanOptions` (replication portfolio, packing search).
        active_gpus: ``[P]`` bool; dead GPUs' slots get ``-1`` and hold nothing.
        gpu_speed: ``[P]`` relative speeds; the plan minimises the max of load / speed.
        previous: the placement in force (``Placement`` or ``phy2log [L, R]``); the new
            plan keeps as many of its slots as pays (incremental rebalancing).
        max_moves: with ``previous``, most slots allowed to change: an int (in total,
            shared among layers by their predicted gain) or one int per layer. Moves the
            new call makes unavoidable are made outside the budget: re-homing replicas of
            dead GPUs, and un-stacking replicas the contract no longer allows.
        skip_threshold: with ``previous``, leave a layer untouched when re-planning it
            would raise its balancedness by less than this (e.g. ``0.01``).

    Returns:
        A validated :class:`Placement` on the weight's device.
    """
    w, _ = as_weight(weight)
    topology = Topology(num_replicas, num_gpus, num_nodes, num_groups)
    _num_layers, num_experts = w.shape
    if num_replicas < num_experts:
        raise ValueError(
            f"num_replicas ({num_replicas}) must be at least the number of experts "
            f"({num_experts}): every expert needs a slot"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    opts = _options(options, num_candidates, refine_steps)
    live = None
    if active_gpus is not None:
        live = check_gpu_vector(active_gpus, num_gpus, "active_gpus", torch.bool, w.device)
        if bool(live.all()):
            live = None
    speed = None
    if gpu_speed is not None:
        speed = check_gpu_vector(gpu_speed, num_gpus, "gpu_speed", torch.float64, w.device)
    chosen = resolve_policy(
        policy, topology, num_experts, has_dead_gpus=live is not None, has_speeds=speed is not None
    )
    generator = torch.Generator().manual_seed(seed)

    return plan_placement(
        w,
        topology,
        chosen,
        opts,
        generator,
        active_gpus=live,
        gpu_speed=speed,
        previous=previous,
        max_moves=max_moves,
        skip_threshold=skip_threshold,
    )


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "auto",
    seed: int = 0,
    old_phy2log: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for DeepSeek's ``eplb.rebalance_experts``.

    Args:
        weight: ``[L, E]`` load statistics (or ``[E]``).
        num_replicas, num_groups, num_nodes, num_gpus: as in DeepSeek's function.
        old_phy2log: ``[L, R]`` placement in force; enables incremental planning.
        **kwargs: any keyword of :func:`plan`.

    Returns:
        ``(phy2log [L, R], log2phy [L, E, maxcnt], logcnt [L, E])``, int64, on the weight's
        device (without the layer dimension for a one-layer ``[E]`` tensor).
    """
    placement = plan(
        weight,
        num_replicas,
        num_gpus,
        num_nodes,
        num_groups,
        policy=policy,
        seed=seed,
        previous=old_phy2log,
        **kwargs,
    )
    phy2log, log2phy, logcnt = placement.as_tuple()
    if np.ndim(weight) == 1:  # one layer in, one layer out (already validated by plan)
        return phy2log[0], log2phy[0], logcnt[0]
    return phy2log, log2phy, logcnt
