"""A speed-aware first packing for GPUs of different speeds.

The planner packs for equal GPUs (every GPU near the mean load), and
:func:`~eplb.core.packing.refine_assignment` then moves load toward the fast GPUs by
swaps. Where a GPU holds few slots, swaps starting from equal loads stall far from
``load ∝ speed``: on real DeepSeek-V3 loads with half the GPUs twice as fast, 288 slots on
96 GPUs reached 0.878 of the ideal time, 288 on 32 GPUs 0.957. :func:`speed_greedy`
packs the same replicas heaviest first onto the GPU where the replica finishes earliest
(``(load + x) / speed``), which the same swaps then take further (0.91 and 0.97 there);
the planner keeps, per layer, the better of the two refined packings.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.map_tables import expert_counts, slot_gpu_loads
from eplb.core.ordering import descending_order


def speed_greedy(
    weight: torch.Tensor, phy2log: torch.Tensor, live: torch.Tensor, speed: torch.Tensor
) -> torch.Tensor:
    """``[L, R]`` the replicas of ``phy2log [L, R]`` (its counts; ``-1`` on dead GPUs)
    repacked heaviest first, each onto the live GPU with a free slot, no replica of its
    expert yet, and the smallest ``(load + x) / speed`` (first GPU on ties). An expert with
    more replicas than live GPUs stacks where it must. ``weight [L, E]``, ``speed [P]``."""
    num_layers, num_slots = phy2log.shape
    num_experts = weight.shape[1]
    num_gpus = live.shape[0]
    slots = num_slots // num_gpus
    live_ids = np.nonzero(live.cpu().numpy())[0]
    counts = expert_counts(phy2log, num_experts).cpu().numpy()
    w = weight.detach().to(torch.float64).cpu().numpy()
    per_replica = w / np.maximum(counts, 1)
    order = descending_order(per_replica)
    rows = np.arange(num_layers)[:, None]
    times = counts[rows, order]
    item_expert = np.stack([np.repeat(order[r], times[r]) for r in range(num_layers)])
    item_load = np.take_along_axis(per_replica, item_expert, 1)
    sp = speed.detach().to(torch.float64).cpu().numpy()[live_ids]
    num_live = len(live_ids)
    load = np.zeros((num_layers, num_live))
    fill = np.zeros((num_layers, num_live), dtype=np.int64)
    # the GPUs holding the current expert (an expert's replicas are adjacent)
    held = np.zeros((num_layers, num_live), dtype=bool)
    current = np.full(num_layers, -1, dtype=np.int64)
    out = np.full((num_layers, num_slots), -1, dtype=np.int64)
    layer = np.arange(num_layers)
    for i in range(item_expert.shape[1]):
        x, e = item_load[:, i], item_expert[:, i]
        held[e != current] = False
        current = e
        cost = (load + x[:, None]) / sp
        cost[fill >= slots] = np.inf
        legal = np.where(held, np.inf, cost)
        # an expert on every live GPU already: stacking is unavoidable there
        gpu = np.where(np.isinf(legal).all(1), cost.argmin(1), legal.argmin(1))
        out[layer, live_ids[gpu] * slots + fill[layer, gpu]] = e
        load[layer, gpu] += x
        fill[layer, gpu] += 1
        held[layer, gpu] = True
    return torch.from_numpy(out).to(phy2log.device)


def keep_faster(
    weight: torch.Tensor, first: torch.Tensor, second: torch.Tensor, speed: torch.Tensor
) -> torch.Tensor:
    """``[L, R]``: per layer, ``second`` where its max ``load / speed`` is smaller than
    ``first``'s, else ``first`` (float64 GPU loads, :func:`eplb.core.placement.
    slot_gpu_loads`)."""
    w, sp = weight.detach().to(torch.float64), speed.detach().to(torch.float64).cpu()

    def peak(phy2log: torch.Tensor) -> torch.Tensor:
        return (slot_gpu_loads(w, phy2log, speed.shape[0]).cpu() / sp).amax(1)

    better = (peak(second) < peak(first) * (1 - 1e-12)).to(first.device)
    return torch.where(better[:, None], second, first)
