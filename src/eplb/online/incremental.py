"""Incremental planning: move few expert weights when rebalancing a running deployment.

Re-planning from scratch rewrites almost every slot, and every rewritten slot is one
expert's weights crossing NVLink or the network while traffic runs. Here the new plan is
built in two ways and the better one is kept per layer:

1. **Warm start** from the placement in force, with a per-layer slot budget:
   - *replica transfers* (one slot each): a replica of the expert that loses least moves
     to the expert with the largest per-replica load, only while that lowers the largest
     replica (Jefferson's rule applied as exchanges); slots on dead GPUs and experts with
     no live replica are served first, whatever the budget;
   - *swaps* (two slots each): the vectorized swap refinement from the old placement,
     charged against the budget, heaviest GPU pairs first.
2. **From scratch, relabelled**: a fresh plan whose GPUs are matched to the old ones by an
   assignment problem (most common replicas), with slots aligned inside each GPU.

A layer whose predicted gain (its ceiling minus its current balancedness) is below
``skip_threshold`` is left untouched.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from eplb.core.bounds import layer_ceiling
from eplb.core.packing import refine_assignment
from eplb.core.placement import Placement, expert_counts, slot_gpu_loads, validate_planned
from eplb.core.planner import plan_fresh
from eplb.core.request import PlanRequest
from eplb.core.topology import Topology

# a candidate must beat the fewer-moves one by this much balancedness to win
_QUALITY_TIE = 1e-4


def _previous_phy2log(
    previous: Placement | torch.Tensor,
    topology: Topology,
    num_layers: int,
    num_experts: int,
    device: torch.device,
) -> torch.Tensor:
    old = previous.phy2log if isinstance(previous, Placement) else previous
    if not isinstance(old, torch.Tensor):
        try:
            old = torch.as_tensor(np.asarray(old))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"previous must be a Placement or a phy2log tensor [L, R]: {exc}"
            ) from None
    if old.dim() == 1:
        old = old[None]
    if old.shape != (num_layers, topology.num_replicas):
        raise ValueError(
            f"previous placement has shape {tuple(old.shape)}, expected "
            f"[{num_layers}, {topology.num_replicas}] (layers, slots) to match the weight"
        )
    if old.is_floating_point() or old.dtype == torch.bool:
        raise TypeError(f"previous phy2log must hold integers, got {old.dtype}")
    old = old.to(device=device, dtype=torch.int64)
    if bool(((old < -1) | (old >= num_experts)).any()):
        raise ValueError(f"previous placement holds expert ids outside [-1, {num_experts})")
    return old


def _layer_budget(
    max_moves: int | torch.Tensor | None, gain: torch.Tensor, num_slots: int
) -> torch.Tensor:
    """``[L]`` slots each layer may change: all, a per-layer list, or a total split by gain."""
    num_layers = gain.shape[0]
    if max_moves is None:
        return torch.full((num_layers,), num_slots, dtype=torch.int64, device=gain.device)
    if isinstance(max_moves, int) and not isinstance(max_moves, bool):
        if max_moves < 0:
            raise ValueError(f"max_moves must be >= 0, got {max_moves}")
        share = gain.clamp(min=0)
        total = float(share.sum())
        if total <= 0:
            return torch.zeros(num_layers, dtype=torch.int64, device=gain.device)
        return torch.floor(share / total * max_moves).to(torch.int64)
    budget = torch.as_tensor(max_moves, device=gain.device)
    if budget.shape != (num_layers,) or budget.is_floating_point() or bool((budget < 0).any()):
        raise ValueError(
            f"max_moves must be a non-negative int (total) or {num_layers} non-negative ints "
            f"(per layer); got {max_moves!r}"
        )
    return budget.to(torch.int64)


def _transfers(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    live_slot: torch.Tensor,
    budget: torch.Tensor,
    num_gpus: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill empty live slots, re-home experts with no live replica, then move replicas
    while that lowers the largest replica load. Returns (phy2log, budget left)."""
    num_layers, num_slots = phy2log.shape
    num_experts = weight.shape[1]
    slots = num_slots // num_gpus
    phy2log = phy2log.clone()
    budget = budget.clone()
    rows = torch.arange(num_layers, device=phy2log.device)
    slot_gpu = torch.arange(num_slots, device=phy2log.device) // slots
    for _ in range(num_slots):
        counts = expert_counts(phy2log, num_experts)
        per = torch.where(counts > 0, weight / counts.clamp(min=1), float("inf"))
        receiver = per.max(1).indices  # largest per-replica load; inf = no replica at all
        holder = (phy2log == receiver[:, None]).view(num_layers, num_gpus, slots).any(2)
        blocked = holder[:, slot_gpu]  # [L, R] slot's GPU already holds the receiver
        hole = live_slot & (phy2log < 0) & ~blocked
        # donor: the expert whose replica matters least, w / (c − 1) over c >= 2
        loss = torch.where(counts >= 2, weight / (counts - 1).clamp(min=1), float("inf"))
        donor = loss.min(1).indices
        gain_ok = per[rows, receiver] > loss[rows, donor] * (1 + 1e-9)
        mandatory = hole.any(1) | torch.isinf(per[rows, receiver])
        go = mandatory | (gain_ok & (budget > 0))
        if not bool(go.any()):
            break
        # target slot: a hole if any, else a donor replica on a GPU without the receiver,
        # on the lightest such GPU
        loads = slot_gpu_loads(weight, phy2log, num_gpus)[:, slot_gpu]  # [L, R]
        from_donor = (phy2log == donor[:, None]) & ~blocked & live_slot
        candidate = torch.where(hole.any(1, keepdim=True), hole, from_donor)
        score = torch.where(candidate, loads, float("inf"))
        best_score, target = score.min(1)
        go &= torch.isfinite(best_score)
        if not bool(go.any()):
            break
        phy2log[rows[go], target[go]] = receiver[go]
        budget -= (go & ~mandatory).to(torch.int64)
    return phy2log, budget.clamp(min=0)


def align_to_previous(
    new: torch.Tensor, old: torch.Tensor, num_gpus: int, gpus_per_node: int | None = None
) -> torch.Tensor:
    """Relabel the GPUs of ``new [L, R]`` to match ``old [L, R]`` as well as possible.

    GPUs are matched by an assignment problem maximising common replicas (SciPy's
    ``linear_sum_assignment``), then each GPU's slots are ordered so that an expert kept
    on a GPU stays in the slot it had. With ``gpus_per_node`` whole nodes are matched
    first and GPUs only inside matched nodes, so a hierarchical plan stays hierarchical.
    Returns the relabelled ``[L, R]``.
    """
    from scipy.optimize import linear_sum_assignment

    num_layers, num_slots = new.shape
    slots = num_slots // num_gpus
    per_node = num_gpus if gpus_per_node is None else gpus_per_node
    nodes = num_gpus // per_node
    new_np = new.cpu().numpy().reshape(num_layers, nodes, per_node, slots)
    old_np = old.cpu().numpy().reshape(num_layers, nodes, per_node, slots)
    out = np.empty_like(new_np)
    for layer in range(num_layers):
        a, b = new_np[layer], old_np[layer]  # [N, P/N, S]
        if nodes > 1:
            node_overlap = _overlap(a.reshape(nodes, -1), b.reshape(nodes, -1))
            node_new, node_old = linear_sum_assignment(node_overlap, maximize=True)
        else:
            node_new, node_old = np.zeros(1, dtype=int), np.zeros(1, dtype=int)
        for n_new, n_old in zip(node_new, node_old, strict=True):
            gpu_new, gpu_old = linear_sum_assignment(_overlap(a[n_new], b[n_old]), maximize=True)
            for g_new, g_old in zip(gpu_new, gpu_old, strict=True):
                out[layer, n_old, g_old] = _align_slots(a[n_new, g_new], b[n_old, g_old])
    return torch.from_numpy(out.reshape(num_layers, num_slots)).to(new.device)


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[G_a, G_b]`` replicas in common between the GPUs (rows of experts) of a and b."""
    common = (a[:, None, :, None] == b[None, :, None, :]) & (a[:, None, :, None] >= 0)
    return common.any(3).sum(2)


def _align_slots(items: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Order ``items`` so each expert also in ``old`` keeps its old slot."""
    result = np.full_like(old, -2)
    rest = []
    used = np.zeros(len(old), dtype=bool)
    for expert in items:
        spots = np.nonzero((old == expert) & ~used & (result == -2))[0]
        if len(spots):
            result[spots[0]] = expert
            used[spots[0]] = True
        else:
            rest.append(expert)
    free = np.nonzero(result == -2)[0]
    result[free] = rest
    return result


def plan_incremental(
    request: PlanRequest,
    previous: Placement | torch.Tensor,
    *,
    max_moves: int | torch.Tensor | None = None,
    skip_threshold: float | None = None,
) -> Placement:
    """Re-plan ``request`` starting from ``previous``; see the module docstring.

    Returns a validated :class:`Placement`.
    """
    # float64 throughout: balancedness ties between candidates are compared to 1e-4
    request = dataclasses.replace(request, weight=request.weight.to(torch.float64))
    w, topology, policy = request.weight, request.topology, request.policy
    options = request.options.packing
    active_gpus = request.active_gpus
    num_layers, num_experts = w.shape
    device = w.device
    old = _previous_phy2log(previous, topology, num_layers, num_experts, device)
    live = request.live
    live_slot = live.repeat_interleave(topology.slots_per_gpu)
    if skip_threshold is not None and not skip_threshold >= 0:
        raise ValueError(f"skip_threshold must be >= 0, got {skip_threshold!r}")
    # the old placement restricted to live GPUs: slots of dead GPUs are lost
    start = torch.where(live_slot, old, torch.full_like(old, -1))

    current = _balancedness(w, start, live, topology.num_gpus)
    ceiling = layer_ceiling(
        w,
        topology.num_replicas,
        topology.num_gpus,
        topology.num_nodes,
        topology.num_groups,
        policy,
        None if active_gpus is None else live,
    )
    gain = (ceiling - current).clamp(min=0)
    budget = _layer_budget(max_moves, gain, topology.num_replicas)
    if skip_threshold is not None:
        budget = torch.where(gain < skip_threshold, torch.zeros_like(budget), budget)

    if policy == "hierarchical":
        # swaps stay inside each node (rows = layers × nodes); replica counts only change
        # through the relabelled fresh plan, which keeps groups on their nodes
        nodes = topology.num_nodes
        rows_w = w.repeat_interleave(nodes, 0)
        rows_start = start.view(num_layers * nodes, -1)
        rows_budget = (budget // nodes).repeat_interleave(nodes)
        warm = refine_assignment(
            rows_w,
            rows_start,
            live[: topology.gpus_per_node],
            options,
            origin=rows_start,
            budget=rows_budget,
        ).view(num_layers, -1)
        warm = torch.where(_local(warm, topology, num_experts)[:, None], warm, start)
    else:
        # replica transfers may take half the budget; swaps get the rest (the refinement
        # charges every slot that differs from the old placement, transfers included)
        warm, _ = _transfers(w, start, live_slot, budget // 2, topology.num_gpus)
        warm = refine_assignment(w, warm, live, options, origin=start, budget=budget)
        if isinstance(max_moves, int) and not isinstance(max_moves, bool):
            # a total budget: hand what converged layers left over to the layers that ran
            # out, in proportion to their gain, and refine those once more
            used = ((warm != start) & live_slot).sum(1)
            spare = int(budget.sum() - used.sum())
            hungry = (used >= budget - 1) & (gain > 0) & (budget > 0)
            if spare > 1 and bool(hungry.any()):
                share = torch.where(hungry, gain, torch.zeros_like(gain))
                more = torch.floor(share / share.sum() * spare).to(torch.int64)
                warm = refine_assignment(w, warm, live, options, origin=start, budget=used + more)

    candidates = [warm]
    fresh = plan_fresh(request).phy2log
    per_node = topology.gpus_per_node if policy == "hierarchical" else None
    candidates.append(align_to_previous(fresh, start, topology.num_gpus, per_node))

    # per layer: the best balancedness within budget, fewer moves on near ties
    best = start
    cap_gpus = topology.gpus_per_node if policy == "hierarchical" else int(live.sum())
    valid_start = _complete(start, live_slot, num_experts) & _anti_affine(start, live, cap_gpus)
    best_bal = torch.where(valid_start, current, -1.0)
    best_moves = torch.zeros(num_layers, dtype=torch.int64, device=device)
    for cand in candidates:
        moves = ((cand != old) & live_slot).sum(1)
        bal = _balancedness(w, cand, live, topology.num_gpus)
        mandatory = ((start < 0) & live_slot).sum(1) + _missing(start, num_experts)
        affordable = moves <= budget + 2 * mandatory
        better = affordable & (
            (bal > best_bal + _QUALITY_TIE)
            | ((bal >= best_bal - _QUALITY_TIE) & (moves < best_moves))
        )
        better |= best_bal < 0  # the old placement is invalid (dead GPU, stacking): must change
        better &= _complete(cand, live_slot, num_experts) & _anti_affine(cand, live, cap_gpus)
        best = torch.where(better[:, None], cand, best)
        best_bal = torch.where(better, bal, best_bal)
        best_moves = torch.where(better, moves, best_moves)
    placement = Placement.from_phy2log(best, num_experts, topology, policy, active_gpus)
    return validate_planned(placement)


def _balancedness(
    weight: torch.Tensor, phy2log: torch.Tensor, live: torch.Tensor, num_gpus: int
) -> torch.Tensor:
    loads = slot_gpu_loads(weight, phy2log, num_gpus)[:, live]
    peak = loads.amax(1)
    return torch.where(peak > 0, loads.mean(1) / peak.clamp(min=1e-300), torch.ones_like(peak))


def _missing(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    return (expert_counts(phy2log, num_experts) == 0).sum(1)


def _complete(phy2log: torch.Tensor, live_slot: torch.Tensor, num_experts: int) -> torch.Tensor:
    return (((phy2log >= 0) | ~live_slot).all(1)) & (_missing(phy2log, num_experts) == 0)


def _local(phy2log: torch.Tensor, topology: Topology, num_experts: int) -> torch.Tensor:
    """``[L]`` True where every group's replicas sit on one node."""
    group = phy2log.clamp(min=0) // (num_experts // topology.num_groups)
    node = torch.arange(topology.num_replicas, device=phy2log.device) // (
        topology.num_replicas // topology.num_nodes
    )
    node = node.expand_as(group)
    lo = torch.full(
        (phy2log.shape[0], topology.num_groups),
        topology.num_nodes,
        dtype=torch.int64,
        device=phy2log.device,
    )
    hi = torch.full_like(lo, -1)
    lo = lo.scatter_reduce(1, group, node, reduce="amin")
    hi = hi.scatter_reduce(1, group, node, reduce="amax")
    return ((lo == hi) | (hi < 0)).all(1)


def _anti_affine(phy2log: torch.Tensor, live: torch.Tensor, cap_gpus: int) -> torch.Tensor:
    """``[L]`` True where no GPU holds two replicas of an expert, except experts with more
    replicas than the ``cap_gpus`` GPUs that may hold them."""
    num_layers, _ = phy2log.shape
    num_gpus = live.shape[0]
    grid = phy2log.view(num_layers, num_gpus, -1).sort(dim=2).values
    dup = (grid[..., 1:] == grid[..., :-1]) & (grid[..., 1:] >= 0)  # [L, P, S-1]
    if not bool(dup.any()):
        return torch.ones(num_layers, dtype=torch.bool, device=phy2log.device)
    counts = expert_counts(phy2log, int(phy2log.max()) + 1)
    crowded = counts.gather(1, grid[..., 1:].clamp(min=0).reshape(num_layers, -1)) > cap_gpus
    return ~(dup & ~crowded.view_as(dup)).flatten(1).any(1)
