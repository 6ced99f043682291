"""Placement policies: global and hierarchical, behind one interface and a registry.

- :class:`GlobalPolicy` packs all replicas onto all GPUs.
- :class:`HierarchicalPolicy` (DeepSeek's): expert groups → nodes first (exactly, by
  enumerating assignments when there are few), then replicate and pack inside every node,
  batched over layers × nodes. Every replica of a group's experts stays on its node.

Both reduce to :func:`plan_rows`, which solves a batch of independent global problems:
a portfolio of replica allocations, each scored by a cheap packing, then the best one
packed with randomised starts and swap refinement.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from eplb.core.bounds import assignment_node_bounds, enumerated_node_bounds
from eplb.core.packing import PackingOptions, make_items, max_load, pack, to_slots
from eplb.core.placement import Topology, slot_gpu_loads
from eplb.core.replication import DEFAULT_SHIFTS, expand_replicas, replica_counts

__all__ = [
    "POLICIES",
    "GlobalPolicy",
    "HierarchicalPolicy",
    "PlacementPolicy",
    "PlanOptions",
    "plan_rows",
]


@dataclass(frozen=True)
class PlanOptions:
    """Everything that tunes a plan; the defaults are fast and near-optimal.

    Attributes:
        packing: the packing search (candidates, refinement steps, construction).
        shifts: divisor shifts ``δ`` of the replication portfolio (``w / (c + δ)``).
        hamilton: also try largest-remainder replication.
        portfolio_threshold: the portfolio is scored only in layers whose largest
            Jefferson replica exceeds this fraction of the mean GPU load (elsewhere every
            allocation packs alike).
    """

    packing: PackingOptions = field(default_factory=PackingOptions)
    shifts: tuple[float, ...] = DEFAULT_SHIFTS
    hamilton: bool = True
    portfolio_threshold: float = 1 / 3

    def __post_init__(self) -> None:
        if not self.shifts and not self.hamilton:
            raise ValueError("the replication portfolio is empty: give shifts or hamilton=True")
        for shift in self.shifts:
            if not -1 < float(shift) <= 0:
                raise ValueError(f"divisor shifts must lie in (-1, 0], got {shift!r}")

    @property
    def rules(self) -> tuple[float | str, ...]:
        return tuple(float(s) for s in self.shifts) + (("hamilton",) if self.hamilton else ())


def plan_rows(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    options: PlanOptions,
    generator: torch.Generator | None = None,
    floor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Solve ``rows`` independent global problems.

    Args:
        weight: ``[rows, E]`` non-negative loads.
        num_replicas: ``R >= E`` slots per row, a multiple of ``num_gpus``.
        floor: ``[rows]`` max GPU load that needs no improving (e.g. the bound of the
            row's layer when rows are nodes of one layer): rows packed at or below it
            skip the swap search.

    Returns:
        ``[rows, R]`` logical expert per slot; slot ``s`` is on GPU ``s // (R / P)``.
    """
    rows, num_experts = weight.shape
    # an all-zero row (a dense layer in a dump) is planned as uniform: replicas spread evenly
    zero = weight.sum(1, keepdim=True) <= 0
    weight = torch.where(zero, torch.ones_like(weight), weight)
    rules = options.rules
    counts = replica_counts(weight, num_replicas, rules[:1])[0]  # [rows, E]
    # the portfolio only matters where replicas are coarse next to a GPU's mean load;
    # elsewhere every allocation packs alike and the first rule's (Jefferson's) is kept
    extra = torch.empty(0, dtype=torch.int64)
    if len(rules) > 1:
        largest = (weight / counts).amax(1)
        extra = (largest > options.portfolio_threshold * weight.sum(1) / num_gpus).nonzero()[:, 0]
    weight_all = weight
    if floor is not None:
        # in item units: make_items scales every row to a mean replica load of 1
        floor = torch.where(zero[:, 0], 0.0, floor * num_replicas / weight.sum(1))
    if len(extra):
        # rows × the first rule, then the coarse rows × every other rule
        others = replica_counts(weight[extra], num_replicas, rules[1:])
        counts = torch.cat([counts, others.reshape(-1, num_experts)])
        weight_all = torch.cat([weight, weight[extra].repeat(len(rules) - 1, 1)])
        if floor is not None:
            floor = torch.cat([floor, floor[extra].repeat(len(rules) - 1)])
    load, expert = expand_replicas(weight_all, counts)
    items = make_items(load, expert)  # [2, rows', R]; rows of one layer share a scale
    allow_shared = counts.amax(1) > num_gpus
    state = pack(items, num_gpus, options.packing, allow_shared, generator, floor=floor)
    if len(extra):
        # keep, per coarse row, the allocation whose refined packing has the smallest peak
        peak = max_load(state)
        candidates = torch.cat([peak[extra][None], peak[rows:].view(len(rules) - 1, -1)])
        best = candidates.min(0).indices  # first on ties: Jefferson
        choice = torch.where(
            best == 0,
            extra,
            rows + (best - 1) * len(extra) + torch.arange(len(extra), device=weight.device),
        )
        pick = torch.arange(rows, device=weight.device).index_put((extra,), choice)
        state = state[:, :, pick]
    return to_slots(state)


class PlacementPolicy(ABC):
    """A way to place replicas; subclasses register in :data:`POLICIES` by ``name``."""

    name: ClassVar[str]

    @abstractmethod
    def place(
        self,
        weight: torch.Tensor,
        topology: Topology,
        options: PlanOptions,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``weight [L, E]`` → ``phy2log [L, R]``."""


class GlobalPolicy(PlacementPolicy):
    """All replicas onto all GPUs."""

    name = "global"

    def place(
        self,
        weight: torch.Tensor,
        topology: Topology,
        options: PlanOptions,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        return plan_rows(weight, topology.num_replicas, topology.num_gpus, options, generator)


class HierarchicalPolicy(PlacementPolicy):
    """Groups → nodes, then replicate and pack within every node.

    Two group→node assignments compete per layer: the one with the smallest hierarchical
    lower bound, and DeepSeek's balanced packing of group loads (heaviest group to the
    lightest node with room). They usually agree; where they differ both are packed and
    the layer keeps the one with the smaller max GPU load.
    """

    name = "hierarchical"

    def place(
        self,
        weight: torch.Tensor,
        topology: Topology,
        options: PlanOptions,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        by_load = self.balanced_groups(weight, topology)
        best = _best_partition(weight, topology)
        if best is None:
            by_bound = self.assign_groups(weight, topology, options, generator)
            layer_bound = None
        else:
            by_bound, bounds = best
            # no node needs a max GPU load below the layer's bound: most nodes are lighter
            # than the heaviest and skip the swap search
            layer_bound = bounds.amin(1).to(weight.dtype)
        first = self.place_groups(weight, by_bound, topology, options, generator, layer_bound)
        differ = ~_same_partition(by_bound, by_load)
        if not bool(differ.any()):
            return first
        rows = differ.nonzero()[:, 0]
        peak_first = slot_gpu_loads(weight[rows], first[rows], topology.num_gpus).amax(1)
        if best is not None:
            # the balanced assignment can only win where the first plan's peak exceeds its
            # bound by more than packing slack (0.1%)
            load_bound = assignment_node_bounds(
                weight[rows].to(torch.float64),
                by_load[rows],
                topology.num_replicas,
                topology.num_gpus,
                topology.num_nodes,
                topology.num_groups,
            ).amax(1)
            worth = peak_first > load_bound.to(peak_first.dtype) * (1 + 1e-3)
            if not bool(worth.any()):
                return first
            rows, peak_first = rows[worth], peak_first[worth]
        second = self.place_groups(
            weight[rows],
            by_load[rows],
            topology,
            options,
            generator,
            None if layer_bound is None else layer_bound[rows],
        )
        take = slot_gpu_loads(weight[rows], second, topology.num_gpus).amax(1) < peak_first
        first[rows[take]] = second[take]
        return first

    @staticmethod
    def place_groups(
        weight: torch.Tensor,
        node_of_group: torch.Tensor,
        topology: Topology,
        options: PlanOptions,
        generator: torch.Generator | None = None,
        floor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Plan every node given ``node_of_group [L, G]`` → ``phy2log [L, R]``.

        ``floor [L]``: a max GPU load each layer cannot beat anyway (its bound); nodes
        packed at or below it are not refined.
        """
        num_layers, num_experts = weight.shape
        nodes, groups = topology.num_nodes, topology.num_groups
        group_size = num_experts // groups
        groups_by_node = node_of_group.argsort(dim=1, stable=True).view(num_layers, nodes, -1)
        offsets = torch.arange(group_size, device=weight.device)
        node_experts = (groups_by_node[..., None] * group_size + offsets).view(
            num_layers * nodes, -1
        )
        node_weight = weight.repeat_interleave(nodes, 0).gather(1, node_experts)
        local = plan_rows(
            node_weight,
            topology.num_replicas // nodes,
            topology.num_gpus // nodes,
            options,
            generator,
            None if floor is None else floor.repeat_interleave(nodes),
        )
        return node_experts.gather(1, local).view(num_layers, topology.num_replicas)

    @staticmethod
    def assign_groups(
        weight: torch.Tensor,
        topology: Topology,
        options: PlanOptions,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``[L, G]`` node of every expert group with the smallest lower bound.

        Exact when the assignments can be enumerated (see :mod:`eplb.core.bounds`); otherwise a
        balanced packing of group loads onto nodes with swap refinement.
        """
        num_layers, _num_experts = weight.shape
        nodes, groups = topology.num_nodes, topology.num_groups
        best = _best_partition(weight, topology)
        if best is not None:
            return best[0]
        group_load = weight.view(num_layers, groups, -1).sum(2)
        order = group_load.argsort(dim=1, descending=True, stable=True)
        items = make_items(group_load.gather(1, order), order)
        state = pack(items, nodes, options.packing, generator=generator)
        slots = to_slots(state)  # [L, G] group per (node, slot)
        node_of_slot = torch.arange(groups, device=weight.device) // (groups // nodes)
        return torch.empty_like(slots).scatter_(1, slots, node_of_slot.expand(num_layers, -1))

    @staticmethod
    def balanced_groups(weight: torch.Tensor, topology: Topology) -> torch.Tensor:
        """``[L, G]`` DeepSeek's group assignment: heaviest group first, each to the lightest
        node that still has room for ``G/N`` groups."""
        # G dependent steps on [L, N] arrays: NumPy on the host costs a fraction of torch
        num_layers = weight.shape[0]
        nodes, groups = topology.num_nodes, topology.num_groups
        per_node = groups // nodes
        group_load = weight.view(num_layers, groups, -1).sum(2).to(torch.float64).cpu().numpy()
        order = np.argsort(-group_load, axis=1, kind="stable")  # heaviest first
        sorted_load = np.take_along_axis(group_load, order, 1)
        room = np.zeros((num_layers, nodes))  # node load; +inf once full
        filled = np.zeros((num_layers, nodes), np.int64)
        node_of_rank = np.empty((num_layers, groups), np.int64)
        layer = np.arange(num_layers)
        for k in range(groups):
            node = room.argmin(1)  # first on ties, as DeepSeek's
            node_of_rank[:, k] = node
            room[layer, node] += sorted_load[:, k]
            filled[layer, node] += 1
            room[filled >= per_node] = np.inf
        node_of_group = np.empty_like(node_of_rank)
        np.put_along_axis(node_of_group, order, node_of_rank, 1)
        return torch.from_numpy(node_of_group).to(weight.device)


def _best_partition(
    weight: torch.Tensor, topology: Topology
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The group→node assignment with the smallest hierarchical bound per layer; ties (common:
    the heaviest node often fixes the bound) go to the most even nodes (least Σ bound²).

    Returns ``(node_of_group [L, G], bounds [L, A])``, or ``None`` when the assignments
    are too many to enumerate.
    """
    enumerated = enumerated_node_bounds(
        weight.to(torch.float64),
        topology.num_replicas,
        topology.num_gpus,
        topology.num_nodes,
        topology.num_groups,
    )
    if enumerated is None:
        return None
    partitions, per_node = enumerated  # [A, G], [L, A, N]
    bounds = per_node.amax(2)
    tied = bounds <= bounds.amin(1, keepdim=True) * (1 + 1e-12)
    evenness = torch.where(tied, per_node.square().sum(2), float("inf"))
    return partitions[evenness.argmin(1)], bounds


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[L]`` True where two node labellings ``[L, G]`` group the groups the same way."""
    return ((a[:, :, None] == a[:, None, :]) == (b[:, :, None] == b[:, None, :])).flatten(1).all(1)


#: name → policy class; ``auto`` is resolved by :func:`eplb.api.plan`
POLICIES: dict[str, type[PlacementPolicy]] = {
    GlobalPolicy.name: GlobalPolicy,
    HierarchicalPolicy.name: HierarchicalPolicy,
}
