"""Forced moves of incremental planning, and what they may cost.

The map in force (read and checked by :func:`previous_map`) is made valid for the call
with as few changes as possible (:func:`forced_base`: un-stacking replicas, filling revived
GPUs, re-homing dead GPUs' replicas, re-planning layers whose groups straddle nodes);
those moves are made whatever the budget. :func:`fresh_aligned` is the fallback candidate
of every incremental plan, a fresh plan relabelled onto the old GPUs
(:func:`fresh_candidates`: two of them where a GPU has two slots);
:func:`undo_forced_losses` spends moves where the forced ones left a layer worse on the
window at hand than the map in force.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import numpy as np
import torch

from eplb.core.expert_ids import as_old_map
from eplb.core.placement import Placement
from eplb.core.planner import fresh_phy2log
from eplb.core.policies import HierarchicalPolicy
from eplb.core.request import PlanRequest
from eplb.core.topology import Topology
from eplb.online import hierarchy, moves, score
from eplb.online.align import align_to_previous


def previous_map(previous: object, request: PlanRequest) -> np.ndarray:
    """The placement in force as a validated ``[L, R]`` int64 host array."""
    if isinstance(previous, Placement):
        topo, theirs = request.topology, previous.topology
        # a record edited by hand (dataclasses.replace): named as validate() names it, where
        # an AttributeError on None came out (attacker pass)
        if not isinstance(theirs, Topology):
            raise TypeError(f"previous placement's topology is a {type(theirs).__name__}, "
                            "expected an eplb.Topology")
        if not isinstance(previous.phy2log, torch.Tensor):
            raise TypeError(f"previous placement's phy2log is a "
                            f"{type(previous.phy2log).__name__}, expected a torch.Tensor")
        if (theirs.num_gpus, theirs.num_replicas) != (topo.num_gpus, topo.num_replicas):
            raise ValueError(
                f"previous placement is for {theirs.num_replicas} slots on {theirs.num_gpus} "
                f"GPUs, this call for {topo.num_replicas} on {topo.num_gpus}: its slots would "
                f"be read as other GPUs' (plan without previous=)"
            )
        if previous.num_experts != request.num_experts:
            raise ValueError(f"previous placement has {previous.num_experts} experts, the "
                             f"weight {request.num_experts}")
        grouped = request.policy != "global"  # (a global even-split plan ignores both)
        if ((theirs.num_nodes != topo.num_nodes and (grouped or request.dispatch == "nearest"))
                or (theirs.num_groups != topo.num_groups and grouped)):
            # the same slots, grouped otherwise: taken as it is, said (fuzz pass: silent)
            warnings.warn(f"previous placement was planned for {theirs.num_nodes} node(s) and "
                          f"{theirs.num_groups} group(s), this call is for {topo.num_nodes} "
                          f"and {topo.num_groups}: its map is taken as the slots hold it",
                          stacklevel=5)  # eplb.plan's caller
    old = previous.phy2log if isinstance(previous, Placement) else previous
    expected = (request.num_layers, request.topology.num_replicas)
    return as_old_map(old, expected, request.num_experts, " to match the weight").numpy()


def forced_base(
    request: PlanRequest, old: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The old placement made valid for this call with as few changes as possible
    (``weight [L, E]``: the request's loads on the host, float64), ``[L]`` the layers
    re-planned from scratch (hierarchical layers whose groups straddled nodes), and,
    under the hierarchical policy when nothing was forced, the node of every group of
    the result (``[L, G]``, :func:`eplb.online.hierarchy.group_nodes`; else ``None``)."""
    topo = request.topology
    live_slot = request.live.cpu().numpy().repeat(topo.slots_per_gpu)
    base = old.copy()
    replanned = np.zeros(request.num_layers, bool)
    if request.policy == "hierarchical":
        start = np.where(live_slot[None], old, -1)
        node_of_group, local = hierarchy.group_nodes(start, request)
        redo = np.nonzero(~local)[0]
        if len(redo):
            sub = request.layers(torch.from_numpy(redo))
            fresh = fresh_phy2log(sub).cpu()
            aligned = align_to_previous(fresh, torch.from_numpy(start[redo]), topo.num_gpus,
                                        topo.gpus_per_node)
            base[redo] = aligned.numpy()
            replanned[redo] = True
        # inside each node: fill, cover, spread (locality stays); a layer with every slot
        # filled, every expert held and no expert twice on a GPU needs none of it
        whole = (start >= 0).all(1) & (moves.counts_of(start, request.num_experts) > 0).all(1)
        twice = moves.stacked(start, topo.num_gpus)
        keep = np.nonzero(local & ~(whole & ~twice))[0]
        if len(keep):
            base[keep] = hierarchy.per_node(weight[keep], start[keep], request,
                                            moves.fill_and_spread)
        # the old map itself (every GPU live, nothing changed): its group nodes hold
        untouched = not len(redo) and not len(keep) and request.active_gpus is None
        return base, replanned, node_of_group if untouched else None
    return (moves.fill_and_spread(weight, old, topo.num_gpus, request.live.cpu().numpy()),
            replanned, None)


def fresh_aligned(request: PlanRequest, base: np.ndarray, layers: np.ndarray,
                  fresh: torch.Tensor | None = None) -> np.ndarray:
    """``[1, L, R]`` fresh plans of ``layers`` relabelled onto ``base``'s GPUs (other rows:
    ``base``); dead GPUs allowed under the global policy. Under the hierarchical policy
    whole nodes are matched first, then GPUs inside them, so the plan stays
    hierarchical. ``fresh [len(layers), R]``: the plans to relabel (default: planned
    here)."""
    topo = request.topology
    if fresh is None:
        fresh = fresh_phy2log(request.layers(torch.from_numpy(layers))).cpu()
    out = base.copy()
    live_slot = request.live.cpu().numpy().repeat(topo.slots_per_gpu)
    old_live = torch.from_numpy(base[layers][:, live_slot])
    per_node = topo.gpus_per_node if request.policy == "hierarchical" else None
    aligned = align_to_previous(fresh[:, live_slot], old_live, int(request.live.sum()),
                                per_node)
    rows = out[layers]
    rows[:, live_slot] = aligned.numpy()
    out[layers] = rows
    return out[None]


def fresh_plans_per_layer(request: PlanRequest) -> int:
    """How many fresh plans :func:`fresh_candidates` may relabel per layer: 2 where a GPU
    has two slots and the count search runs (spare slots, search steps not set to 0),
    else 1."""
    searched = request.options.packing.two_slot_iterations() != 0
    spare = request.topology.num_replicas > request.num_experts
    return 2 if request.topology.slots_per_gpu == 2 and searched and spare else 1


def fresh_candidates(request: PlanRequest, base: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """``[F, L, R]`` the fresh candidates of ``layers`` (other rows: ``base``), each
    relabelled onto ``base``'s GPUs (:func:`fresh_aligned`): a fresh plan, and where a GPU
    has two slots and the count search runs (:func:`fresh_plans_per_layer`), also the plan
    of the search's start (the portfolio's best counts, optimally paired), for the
    next-window score to choose from. A layer whose start has the searched plan's counts
    (the same pairs) takes the searched plan there: only the others are relabelled (none
    differing: the fresh plan alone).

    Why: the count search fits the counts to the window at hand (it splits cold experts
    into small partners for warm ones, :mod:`eplb.core.small_slots`), and under drift that
    fit need not last. On DeepSeek-V3 at 144 GPUs its in-sample gain over its start
    (+0.008) was −0.0009 on the next window at drift 0.15 and +0.0056 at drift 0.02
    (BENCHMARKS.md §12, ``bench_two_slot_next.py``). Offered both, vLLM's call at 144 GPUs
    (``bench_vllm_robustness.py``, S = 2 rows) gained 0.0003–0.0021 on the next window at
    drift 0.05–0.3, global and hierarchical (§3); offered only the start, the global
    plans lost 0.0032 at drift 0.05. Each candidate is relabelled by an assignment problem
    per layer, most of its cost.
    """
    fresh = fresh_aligned(request, base, layers)
    if fresh_plans_per_layer(request) == 1:
        return fresh
    packing = request.options.packing
    start = dataclasses.replace(request, options=dataclasses.replace(
        request.options, packing=dataclasses.replace(packing, pair_steps=0, max_steps=0)))
    sub = start.layers(torch.from_numpy(layers))
    if request.policy == "hierarchical":
        # the start inside the searched plan's group→node assignment: enumerating the
        # assignments is most of a hierarchical fresh plan's time (relabelling moved
        # whole nodes, so the plan still keeps every group on one node)
        node_of_group = hierarchy.group_nodes(fresh[0, layers], sub)[0]
        planned = HierarchicalPolicy.place_groups(
            sub.weight, torch.from_numpy(node_of_group).to(sub.weight.device), sub.topology,
            sub.options, sub.generator(), idle=sub.idle).cpu()
    else:
        planned = fresh_phy2log(sub).cpu()
    num_experts = request.num_experts
    differ = (moves.counts_of(planned.numpy(), num_experts)
              != moves.counts_of(fresh[0, layers], num_experts)).any(1)
    if not differ.any():
        return fresh
    second = fresh_aligned(start, base, layers[differ], planned[torch.from_numpy(differ)])
    second[0, layers[~differ]] = fresh[0, layers[~differ]]  # the same plan: no second look
    return np.concatenate([fresh, second])


@dataclasses.dataclass(frozen=True)
class Offered:
    """Every layer's candidates: ``now [C, L]`` in-sample peaks (integer units over the
    mean, :func:`eplb.online.score.expected_peak`), ``cost [C, L]`` slots changed from the
    forced base, and ``take(pick [L]) → [L, R]``."""

    now: np.ndarray
    cost: np.ndarray
    take: Callable[[np.ndarray], np.ndarray]


def undo_forced_losses(request: PlanRequest, weight: np.ndarray, old: np.ndarray,
                        base: np.ndarray, best: np.ndarray, replanned: np.ndarray,
                        offered: Offered, now_of: Callable[[np.ndarray], np.ndarray]
                        ) -> np.ndarray:
    """``best [L, R]``, but in the layers that forced moves left worse on the window at
    hand than the map in force ``old`` (e.g. a greedy's replicas stacked on one GPU and
    spread by force): the cheapest candidate at least as good as ``old`` in sample, else a
    fresh plan relabelled onto ``base``'s GPUs where that is better than ``best``.
    ``now_of(phy2log [C, L, R]) → [C, L]``: in-sample peaks as ``offered.now`` has them.

    The candidates are priced against the forced base, so a loss the forced moves made
    was not worth undoing by that measure (within the drift's noise), and a user handing
    in a greedy map got a plan below it in sample (attacker pass: 0.958 against the
    greedy's 0.977, where a fresh plan reaches 1.0). Only layers whose old map is whole
    (every slot filled, every expert held, every GPU serving) compare: elsewhere it is no
    placement to keep; and layers re-planned for locality are fresh plans already."""
    if request.active_gpus is not None:
        return best
    whole = (old >= 0).all(1) & (moves.counts_of(np.maximum(old, 0),
                                                 request.num_experts) > 0).all(1)
    forced = np.nonzero((base != old).any(1) & whole & ~replanned)[0]
    if not len(forced):
        return best
    num_gpus = request.topology.num_gpus
    kept = score.exact_peak(weight[forced], old[forced], num_gpus)
    lost = score.exact_peak(weight[forced], best[forced], num_gpus) > kept
    layers, kept = forced[lost], kept[lost]
    if not len(layers):
        return best
    out = best.copy()
    # the cheapest candidate no worse than the old map (in units), checked exactly
    target = now_of(old[None])[0, layers]
    good = offered.now[:, layers] <= target[None] * (1 + 1e-12)
    cost = np.where(good, offered.cost[:, layers], np.iinfo(np.int64).max)
    pick = np.zeros(request.num_layers, np.int64)
    pick[layers] = np.where(good.any(0), cost.argmin(0), 0)
    cheap = offered.take(pick)[layers]
    fixed = pick[layers] > 0
    if fixed.any():
        fixed[fixed] = (score.exact_peak(weight[layers[fixed]], cheap[fixed], num_gpus)
                        <= kept[fixed])
    out[layers[fixed]] = cheap[fixed]
    layers, kept = layers[~fixed], kept[~fixed]
    if len(layers):
        fresh = fresh_aligned(request, base, layers)[0, layers]
        better = (score.exact_peak(weight[layers], fresh, num_gpus)
                  < score.exact_peak(weight[layers], out[layers], num_gpus))
        out[layers[better]] = fresh[better]
    return out


def within_limits(undone: np.ndarray, best: np.ndarray, base: np.ndarray, old: np.ndarray,
                  max_moves: int | np.ndarray | None, skip_threshold: float | None,
                  gain: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``best [L, R]`` with :func:`undo_forced_losses`'s repair ``undone [L, R]`` taken in
    the layers where the user's limits allow it. A repair that changes no more slots of
    the map in force ``old`` than the forced moves did (``base``) is another way of making
    them: always taken. Another is a voluntary move of its slots beyond the forced ones:
    taken where it gains at least ``skip_threshold`` (``gain(rows) → [n]``, its expected
    next-window balancedness over ``base``'s, as the choice measures it) and those slots
    fit ``max_moves`` (per layer, or what a total leaves after ``best``'s own moves, layer
    by layer in order).

    Why: any limit skipped the repair, so where an old map stacked replicas a budget
    above what pays, or ``skip_threshold=0``, planned below the plan without one, moving
    more slots (fuzz pass: 0.9495 and 3 slots against 0.9758 and 1); and a repair priced
    against the forced base was refused by a budget of 1 where it moved fewer slots than
    the forced moves themselves (attacker pass: 0.7291 kept against 0.9676)."""
    changed = np.nonzero((undone != best).any(1))[0]
    if not len(changed):
        return best
    forced = (base[changed] != old[changed]).sum(1)
    voluntary = np.maximum((undone[changed] != old[changed]).sum(1) - forced, 0)
    keep = np.ones(len(changed), bool)
    limited = voluntary > 0  # (the others are the forced moves made another way)
    if skip_threshold is not None and limited.any():
        keep[limited] = gain(changed[limited]) >= skip_threshold
    if max_moves is not None:
        if isinstance(max_moves, np.ndarray):
            keep &= voluntary <= max_moves[changed]
        else:
            room = int(max_moves) - int((best != base).sum())
            # swapping the layer's own choice for its repair: the budget's moves change by
            delta = voluntary - (best[changed] != base[changed]).sum(1)
            for i in np.nonzero(keep)[0]:
                keep[i] = delta[i] <= room
                room -= int(delta[i]) if keep[i] else 0
    out = best.copy()
    out[changed[keep]] = undone[changed[keep]]
    return out
