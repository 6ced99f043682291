"""Public planning API (TEMPORARY placeholder: simple Jefferson + round-robin, global only)."""

from __future__ import annotations

import torch

from eplb.inputs import as_weight
from eplb.placement import Placement, Topology


def plan(weight, num_replicas, num_gpus, num_nodes=1, num_groups=1, *, policy="auto", seed=0,
         **options) -> Placement:
    w, _ = as_weight(weight)
    topo = Topology(num_replicas, num_gpus, num_nodes, num_groups)
    num_layers, num_experts = w.shape
    cnt = torch.ones(num_layers, num_experts, dtype=torch.int64, device=w.device)
    for _ in range(num_replicas - num_experts):
        best = (w / cnt).argmax(1, keepdim=True)
        cnt.scatter_add_(1, best, torch.ones_like(best))
    per = w / cnt
    order = per.argsort(1, descending=True)
    cnt_sorted = cnt.gather(1, order)
    items = torch.repeat_interleave(order.flatten(), cnt_sorted.flatten()).view(num_layers, -1)
    slots = torch.arange(num_replicas)
    slot_of_item = (slots % num_gpus) * topo.slots_per_gpu + slots // num_gpus
    phy2log = torch.empty_like(items)
    phy2log[:, slot_of_item] = items
    return Placement.from_phy2log(phy2log, num_experts, topo, "global")


def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, **kw):
    return plan(weight, num_replicas, num_gpus, num_nodes, num_groups, **kw).as_tuple()
