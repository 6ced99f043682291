"""The hierarchical policy (DeepSeek's): expert groups → nodes, then each node alone.

Groups go to nodes first (exactly, by enumerating assignments when there are few: 105 for
8 groups on 4 nodes), then every node replicates and packs its own experts, batched over
layers × nodes. Every replica of a group's experts stays on the group's node, which keeps
group-limited routing's traffic inside one node.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.bounds import assignment_node_bounds, enumerated_node_bounds
from eplb.core.map_tables import slot_gpu_loads
from eplb.core.options import PlanOptions
from eplb.core.packing import make_items, pack, to_slots
from eplb.core.policies.base import PlacementPolicy, plan_rows
from eplb.core.request import PlanRequest
from eplb.core.topology import Topology


class HierarchicalPolicy(PlacementPolicy):
    """Groups → nodes, then replicate and pack within every node.

    Two group→node assignments compete per layer: the one with the smallest hierarchical
    lower bound, and DeepSeek's balanced packing of group loads (heaviest group to the
    lightest node with room). They usually agree; where they differ both are packed and
    the layer keeps the one with the smaller max GPU load.
    """

    name = "hierarchical"

    def place(self, request: PlanRequest) -> torch.Tensor:
        weight, topology, options = request.weight, request.topology, request.options
        generator = request.generator()
        by_load = self.balanced_groups(weight, topology)
        best = best_partition(weight, topology)
        if best is None:
            by_bound = self.assign_groups(weight, topology, options, generator)
            layer_bound = None
        else:
            by_bound, bounds = best
            # no node needs a max GPU load below the layer's bound: most nodes are lighter
            # than the heaviest and skip the swap search
            layer_bound = bounds.amin(1).to(weight.dtype)
        idle = request.idle
        first = self.place_groups(weight, by_bound, topology, options, generator, layer_bound,
                                  idle)
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
            None if idle is None else idle[rows],
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
        idle: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Plan every node given ``node_of_group [L, G]`` → ``phy2log [L, R]``.

        ``floor [L]``: a max GPU load each layer cannot beat anyway (its bound); nodes
        packed at or below it are not refined. ``idle [L]``: the layers that carried no
        load (``PlanRequest.idle``; ``None``: none); their node rows are spread evenly.
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
            idle=None if idle is None else idle.repeat_interleave(nodes),
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
        best = best_partition(weight, topology)
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


def best_partition(
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
