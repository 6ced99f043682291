"""Lower bounds on the max GPU load, and the balancedness ceiling they imply.

Global policy, per layer: every placement has ``max GPU load >= W / P`` (the mean) and
``>= T_rep``, the smallest achievable largest replica load (Jefferson's optimum, because
some GPU holds the largest replica). So ``LB = max(W / P, T_rep)``. Where the slots are
exactly the experts (no spare slot, vLLM's default) every count is 1, and the GPU holding
a heavy expert also holds ``S − 1`` others: the cardinality bound of
:func:`eplb.core.count_bounds.packing_bound` holds for every placement and joins the max
(at two slots a GPU, the largest-with-smallest pairing: the optimum itself). With spare
slots and ``S >= 2``, the GPU holding the largest piece holds the lightest pieces too:
:func:`eplb.core.companion_bound.companion_bound` joins the max.

Hierarchical policy: a group's replicas stay on its node, so for a given group→node
assignment every node ``n`` needs ``max(W_n / (P/N), T_rep(n))`` (and, in the ceiling,
the node's companion or cardinality bound) and the layer needs the worst node. Minimising
over assignments gives the hierarchical bound; it is enumerated when the number of
assignments is small (8 groups on 4 nodes: 105) and relaxed otherwise.

The balancedness ceiling is ``Σ_l mean_l / Σ_l LB_l`` (1.0 = no placement can do better
than perfect balance).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch

from eplb.core.companion_bound import companion_bound
from eplb.core.count_bounds import packing_bound
from eplb.core.inputs import (
    as_gpu_speed,
    as_live_mask,
    as_weight,
    scale_free,
    scale_rows_to_unit,
)
from eplb.core.map_tables import load_balance, ratio_or_one
from eplb.core.placement import Placement
from eplb.core.replication import replica_bound
from eplb.core.topology import Topology, is_name

#: group→node assignments are enumerated exactly up to this many, else relaxed/greedy
MAX_ENUMERATED_ASSIGNMENTS = 20_000
#: ... and while their distinct node contents (``C(G, G/N)`` sets of groups, each bounded
#: on every layer) are at most this many: 16 groups on 2 nodes have 6,435 assignments but
#: 12,870 contents, and bounding them took 0.4-1.5 s and 1-2.6 GB per call (58×256 on 32
#: GPUs; a quality attacker pass) where the relaxed assignment took 10-40 ms and planned
#: within 0.0002 of it, above it on one real input (``benchmarks/bench_group_counts.py``)
MAX_ENUMERATED_CONTENTS = 1024


def _num_partitions(num_groups: int, num_nodes: int) -> int:
    size = num_groups // num_nodes
    return math.factorial(num_groups) // (
        math.factorial(size) ** num_nodes * math.factorial(num_nodes)
    )


@lru_cache(maxsize=32)
def _partitions(num_groups: int, num_nodes: int) -> tuple[tuple[int, ...], ...]:
    size = num_groups // num_nodes
    out: list[tuple[int, ...]] = []
    node_of = [-1] * num_groups
    fill = [0] * num_nodes

    def place(group: int, used_nodes: int) -> None:
        if group == num_groups:
            out.append(tuple(node_of))
            return
        # nodes are interchangeable: a group may open at most one new node
        for node in range(min(used_nodes + 1, num_nodes)):
            if fill[node] < size:
                node_of[group] = node
                fill[node] += 1
                place(group + 1, max(used_nodes, node + 1))
                fill[node] -= 1
        node_of[group] = -1

    place(0, 0)
    return tuple(out)


def group_partitions(
    num_groups: int, num_nodes: int, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """``[A, G]`` node of every group for each assignment of ``G/N`` groups per node, up
    to relabelling the nodes; ``None`` when there are more than
    :data:`MAX_ENUMERATED_ASSIGNMENTS`, or more than :data:`MAX_ENUMERATED_CONTENTS`
    distinct node contents."""
    if num_groups % num_nodes:
        raise ValueError(f"num_groups ({num_groups}) must be a multiple of num_nodes ({num_nodes})")
    tables = _partition_tables(num_groups, num_nodes)
    return None if tables is None else tables[0].to(device, copy=True)


@lru_cache(maxsize=32)
def _partition_tables(
    num_groups: int, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Cached CPU tables of the enumerated assignments: ``(partitions [A, G], members
    [B, G/N] the groups of every distinct node content, block_of [A, N])``; ``None`` when
    there are too many assignments or node contents. Read-only: shared by every call."""
    if _num_partitions(num_groups, num_nodes) > MAX_ENUMERATED_ASSIGNMENTS or (
            num_nodes > 1
            and math.comb(num_groups, num_groups // num_nodes) > MAX_ENUMERATED_CONTENTS):
        return None
    partitions = _partitions(num_groups, num_nodes)
    blocks, block_of = _blocks(partitions, num_nodes, num_groups)
    return (
        torch.tensor(partitions, dtype=torch.int64),
        torch.tensor(blocks, dtype=torch.int64),
        torch.tensor(block_of, dtype=torch.int64),
    )


def enumerated_node_bounds(
    weight: torch.Tensor, num_replicas: int, num_gpus: int, num_nodes: int, num_groups: int,
    ceiling: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Bounds of every enumerated assignment, from the cached tables.

    Returns ``(partitions [A, G], per_node [L, A, N])`` with ``per_node`` the bound
    ``max(W_n / (P/N), T_rep(n))`` of every node, or ``None`` when the assignments are
    too many to enumerate. ``partitions`` is shared: do not modify it. ``ceiling``: the
    ceiling's node bounds also count that a GPU holds exactly ``S`` items: with slots =
    experts (each node's counts forced) the cardinality bound, with spare slots and ``S >=
    2`` the companion bound; the planner's choice of assignment does not (its plans stay
    as they were measured).
    """
    tables = _partition_tables(num_groups, num_nodes)
    if tables is None:
        return None
    partitions, members, block_of = (t.to(weight.device) for t in tables)
    per_block = _block_bounds(weight, members, num_replicas, num_gpus, num_nodes, num_groups,
                              ceiling)
    per_node = per_block.index_select(1, block_of.view(-1))
    return partitions, per_node.view(weight.shape[0], *block_of.shape)


def _forced_counts_bound(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[rows]`` lower bound on the max GPU load of ``weight [rows, E]`` placed one expert
    a slot (``E = S·num_gpus``): :func:`eplb.core.count_bounds.packing_bound` of the
    experts as items (the optimum itself at two slots a GPU)."""
    items = weight.sort(1, descending=True).values
    return torch.from_numpy(packing_bound(items.cpu().numpy(), num_gpus)).to(items)


def _block_bounds(
    weight: torch.Tensor,
    members: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int,
    num_groups: int,
    ceiling: bool = False,
) -> torch.Tensor:
    """``[L, B]`` bound of a node holding the groups ``members [B, G/N]``; with
    ``ceiling`` also :func:`_forced_counts_bound` of it where slots = experts, else
    :func:`~eplb.core.companion_bound.companion_bound`."""
    num_layers, num_experts = weight.shape
    group_w = weight.view(num_layers, num_groups, num_experts // num_groups)
    block_w = group_w.index_select(1, members.view(-1))  # [L, B·G/N, E/G]
    block_w = block_w.view(num_layers * members.shape[0], -1)
    node_gpus = num_gpus // num_nodes
    mean = block_w.sum(1) / node_gpus
    node_slots = num_replicas // num_nodes
    bound = replica_bound(block_w, node_slots, mean)
    if ceiling and node_slots == block_w.shape[1]:
        bound = torch.maximum(bound, _forced_counts_bound(block_w, node_gpus))
    elif ceiling:
        bound = companion_bound(block_w, node_slots, node_gpus, bound)
    return bound.view(num_layers, -1)


def hierarchical_node_bounds(
    weight: torch.Tensor,
    assignment: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int,
    num_groups: int,
    per_node: bool = False,
) -> torch.Tensor:
    """Per-layer bound for each assignment.

    Args:
        weight: ``[L, E]`` float loads.
        assignment: ``[A, G]`` node of every group.

    Returns:
        ``[L, A]`` the max over nodes of ``max(W_n / (P/N), T_rep(n))``, or the per-node
        values ``[L, A, N]`` with ``per_node=True``.
    """
    blocks, block_of = _blocks(tuple(map(tuple, assignment.tolist())), num_nodes, num_groups)
    members = torch.tensor(blocks, dtype=torch.int64, device=weight.device)  # [B, G/N]
    block_bound = _block_bounds(weight, members, num_replicas, num_gpus, num_nodes, num_groups)
    block_of = torch.tensor(block_of, dtype=torch.int64, device=weight.device)
    per_node_bound = block_bound[:, block_of]  # [L, A, N]
    return per_node_bound if per_node else per_node_bound.amax(2)


def assignment_node_bounds(
    weight: torch.Tensor,
    node_of_group: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int,
    num_groups: int,
) -> torch.Tensor:
    """``[L, N]`` bound of every node under one assignment per layer, ``node_of_group
    [L, G]`` (``G/N`` groups on every node)."""
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    groups_by_node = node_of_group.argsort(dim=1, stable=True)  # [L, G], node-major
    group_w = weight.view(num_layers, num_groups, group_size)
    node_w = group_w.gather(1, groups_by_node[:, :, None].expand(-1, -1, group_size))
    node_w = node_w.view(num_layers * num_nodes, -1)
    mean = node_w.sum(1) / (num_gpus // num_nodes)
    return replica_bound(node_w, num_replicas // num_nodes, mean).view(num_layers, num_nodes)


@lru_cache(maxsize=32)
def _blocks(
    assignment: tuple[tuple[int, ...], ...], num_nodes: int, num_groups: int
) -> tuple[list[tuple[int, ...]], list[list[int]]]:
    """Distinct node contents (sorted group tuples) and, per assignment and node, its index."""
    blocks: dict[tuple[int, ...], int] = {}
    block_of = []
    for row in assignment:
        block_of.append(
            [
                blocks.setdefault(
                    tuple(g for g in range(num_groups) if row[g] == node), len(blocks)
                )
                for node in range(num_nodes)
            ]
        )
    return list(blocks), block_of


def _relaxed_hierarchical_bound(
    weight: torch.Tensor, num_gpus: int, num_nodes: int, num_groups: int
) -> torch.Tensor:
    """A valid (not tight) bound when assignments are too many to enumerate: the node
    holding the heaviest group carries at least it plus the lightest other groups."""
    num_layers, _num_experts = weight.shape
    per_node = num_groups // num_nodes
    group_load = weight.view(num_layers, num_groups, -1).sum(2).sort(1).values
    heaviest_node = group_load[:, -1] + group_load[:, : per_node - 1].sum(1)
    return heaviest_node / (num_gpus // num_nodes)


#: the policies a bound is defined for (``locality`` is bounded as global)
BOUND_POLICIES = ("auto", "global", "hierarchical", "locality")


def _num_live(num_gpus: int, active_gpus: torch.Tensor | None) -> int:
    return num_gpus if active_gpus is None else int(as_live_mask(active_gpus, num_gpus,
                                                                 torch.device("cpu")).sum())


_MAX_BOUND_SLOTS = 1 << 53


def _check_cluster(num_experts: int, num_replicas: int, num_gpus: int, num_nodes: int,
                   num_groups: int, policy: str, active_gpus: object) -> int:
    """The checks :func:`eplb.plan` makes of the same arguments; returns the live GPUs.
    Raises ``ValueError``/``TypeError`` naming the argument, as planning would."""
    topology = Topology(num_replicas, num_gpus, num_nodes, num_groups)
    if topology.num_replicas > _MAX_BOUND_SLOTS:
        # the bounds count replicas in torch integers and float64: exact only below this
        raise ValueError(f"num_replicas={topology.num_replicas} is beyond what the bounds "
                         f"compute (at most 2**53)")
    if not is_name(policy, BOUND_POLICIES):
        raise ValueError(f"policy must be one of {BOUND_POLICIES}, got {policy!r}")
    live = _num_live(num_gpus, active_gpus)
    if live * topology.slots_per_gpu < num_experts:
        raise ValueError(f"{live * topology.slots_per_gpu} slots on {live} live GPUs cannot "
                         f"hold {num_experts} experts (each needs a replica)")
    if policy == "hierarchical":
        problems = topology.hierarchy_problems(num_experts, has_dead_gpus=live != num_gpus)
        if problems:
            raise ValueError("no hierarchical bound: " + "; ".join(problems))
    return live


def layer_lower_bound(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    policy: str = "auto",
    active_gpus: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[L]`` lower bound on the max GPU load of any placement, float64.

    ``weight [L, E]`` (or ``[E]``). With ``active_gpus [P]`` only live GPUs (and their
    slots) count. ``policy="hierarchical"`` adds the group→node constraint; ``"auto"``
    (default) applies it where :func:`eplb.plan`'s ``"auto"`` plans hierarchically
    (several nodes and groups, groups even over nodes, every GPU live). Where the live
    slots are exactly the experts the bound also counts that each GPU holds ``S`` of
    them (exact at ``S <= 2``).
    """
    w, _ = as_weight(weight)
    w = w.to(torch.float64)
    live = _check_cluster(w.shape[1], num_replicas, num_gpus, num_nodes, num_groups, policy,
                          active_gpus)
    policy = _auto_policy(policy, w.shape[1], num_replicas, num_gpus, num_nodes, num_groups,
                          live != num_gpus)
    # each row scaled by a power of two (exact: the same bound, scaled back) so that loads
    # near float64's largest do not overflow in the sums: 16 loads of 1e307 read inf
    w, shift = scale_rows_to_unit(w)
    return torch.ldexp(_lower_bound(w, num_replicas, num_gpus, num_nodes, num_groups, policy,
                                    live), -shift)


def _lower_bound(w: torch.Tensor, num_replicas: int, num_gpus: int, num_nodes: int,
                 num_groups: int, policy: str, live: int) -> torch.Tensor:
    """:func:`layer_lower_bound` of ``w [L, E]`` (float64) on ``live`` GPUs, ``policy``
    resolved."""
    live_slots = live * (num_replicas // num_gpus)
    mean = w.sum(1) / live
    global_bound = replica_bound(w, live_slots, mean)
    if live_slots > w.shape[1]:
        # at few slots a GPU the largest piece's GPU also holds the lightest pieces: at
        # 3 slots on 96 GPUs the real prefill_in4096 ceiling read 0.9966 without it, 0.9931
        # with it (fifty-third session)
        global_bound = companion_bound(w, live_slots, live, global_bound)
    elif live_slots == w.shape[1]:
        # every expert exactly once: the counts are forced, so the bound for given counts
        # is a bound for every placement. Without it the ceiling read 1.0 on OLMoE's real
        # loads on 8 GPUs of 8 slots, where no packing passes 0.918 (thirty-fourth session)
        global_bound = torch.maximum(global_bound, _forced_counts_bound(w, live))
    if policy != "hierarchical":
        return global_bound
    enumerated = enumerated_node_bounds(w, num_replicas, num_gpus, num_nodes, num_groups,
                                        ceiling=True)
    if enumerated is None:
        return torch.maximum(
            global_bound, _relaxed_hierarchical_bound(w, num_gpus, num_nodes, num_groups)
        )
    return torch.maximum(global_bound, enumerated[1].amax(2).amin(1))


def ceilings(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    policy: str = "auto",
    active_gpus: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """:func:`layer_ceiling` and :func:`balancedness_ceiling` from one bound computation
    (the reports print both; the bound is the costly part): ``([L] per layer, overall)``."""
    w = scale_free(as_weight(weight)[0])
    bound = layer_lower_bound(w, num_replicas, num_gpus, num_nodes, num_groups, policy, active_gpus)
    live = _num_live(num_gpus, active_gpus)
    w = w.to(torch.float64)
    total = float(bound.sum())
    overall = float(w.sum() / live) / total if total > 0 else 1.0
    return ratio_or_one(w.sum(1) / live, bound), overall  # (1 where there is no bound)


def layer_ceiling(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    policy: str = "global",
    active_gpus: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[L]`` best possible per-layer balancedness: mean live-GPU load / lower bound."""
    return ceilings(weight, num_replicas, num_gpus, num_nodes, num_groups, policy,
                    active_gpus)[0]


def _auto_policy(policy: str, num_experts: int, num_replicas: int, num_gpus: int,
                 num_nodes: int, num_groups: int, has_dead_gpus: bool) -> str:
    """``"auto"`` resolved as the planner resolves it (without its warning)."""
    if policy != "auto":
        return policy
    if num_nodes <= 1 or num_groups <= 1:
        return "global"
    topology = Topology(num_replicas, num_gpus, num_nodes, num_groups)
    hierarchical = topology.grouped and not topology.hierarchy_problems(
        num_experts, has_dead_gpus=has_dead_gpus)
    return "hierarchical" if hierarchical else "global"


def balancedness_ceiling(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    policy: str = "auto",
    active_gpus: torch.Tensor | None = None,
) -> float:
    """Σ_l mean_l / Σ_l LB_l: no placement's balancedness can exceed it (``policy`` as in
    :func:`layer_lower_bound`). ``weight [L, E]`` (or ``[E]``), ``active_gpus [P]`` the
    live GPUs (``None``: all)."""
    return ceilings(weight, num_replicas, num_gpus, num_nodes, num_groups, policy,
                    active_gpus)[1]


def placement_scores(
    placement: Placement, weight: object, gpu_speed: object = None
) -> dict[str, Any]:
    """How good ``placement`` is under ``weight [L, E]`` and how good it could be.

    Returns ``balancedness`` and ``ceiling`` (floats), ``layer_balancedness`` and
    ``layer_ceiling`` (lists of ``L`` floats), for the placement's own topology, policy
    and live GPUs. With ``gpu_speed [P]`` (as planned with ``eplb.plan(..., gpu_speed=)``)
    the balancedness is in time (:func:`eplb.core.map_tables.load_balance`) and the
    ceiling ``None`` (the bounds here are for equal GPUs). Raises ``ValueError`` when
    ``weight`` does not match the placement, ``TypeError`` when ``placement`` is no
    :class:`~eplb.core.placement.Placement` (e.g. a bare phy2log tensor).
    """
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be an eplb.Placement (e.g. Placement.from_phy2log), "
                        f"got {type(placement).__name__}")
    w, _ = as_weight(weight)
    w = w.to(torch.float64).cpu()
    if w.shape != (placement.num_layers, placement.num_experts):
        raise ValueError(
            f"weight has shape {tuple(w.shape)}; the placement needs "
            f"[{placement.num_layers}, {placement.num_experts}]"
        )
    placement = placement.to("cpu")
    topo = placement.topology
    active = placement.active_gpus
    if active is not None and bool(active.all()):
        active = None
    if gpu_speed is not None:
        speed = as_gpu_speed(gpu_speed, topo.num_gpus, w.device)
        per_layer, overall, _ = load_balance(placement.scaled_gpu_loads(w), placement.live_gpus(),
                                             speed)
        return {"balancedness": overall, "layer_balancedness": [float(x) for x in per_layer],
                "ceiling": None, "layer_ceiling": None}
    args = (topo.num_replicas, topo.num_gpus, topo.num_nodes, topo.num_groups, placement.policy)
    per_layer, overall = ceilings(w, *args, active)
    return {
        "balancedness": placement.balancedness(w),
        "layer_balancedness": [float(x) for x in placement.layer_balancedness(w)],
        "ceiling": overall,
        "layer_ceiling": [float(x) for x in per_layer],
    }
