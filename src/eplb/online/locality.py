"""Incremental planning under the locality policy (``policy="locality"``, SGLang's
nearest dispatch on several nodes, every GPU live).

A fresh locality plan re-decides every layer: which node holds each expert (the
cross-node traffic) and how each node's replicas are packed on its GPUs (the balance).
Relabelled onto the map in force it still moved 72–76 % of the slots per rebalance on
real DeepSeek-V3 loads, where re-packing every node's own replicas, keeping which
experts each node holds, served the next window as well (0.9404–0.9428 against
0.9418–0.9435 at drift 0.05, BENCHMARKS.md §14 "Fifty-fifth session"): the traffic is
in the node assignment, and between two windows it is the packing inside the nodes that
goes stale. So the candidates of every layer are:

- the map in force made valid for the call (:func:`eplb.online.forced.forced_base`);
- the warm-start ladder inside every node (:func:`eplb.online.ladder.warm_ladder` on
  node rows, swaps only: each node keeps its replicas, so a token's remote nodes do not
  change); a node row's loads are its replicas' loads as the nearest rule realises
  them;
- the fresh locality plan relabelled onto the old GPUs.

Each is valued as under the global policy (:func:`eplb.online.nearest.paying_values`:
the balancedness gain, the smaller of in sample and expected on the next window, minus
the move price × the share of slots moved). The fresh plan is also taken where it cuts
the expected remote nodes per token (:func:`eplb.core.dispatch.remote_nodes_by_node`) by
more than the move price × the share of slots it moves, as a fraction of the map in force's: a map
planned by another policy, or for other co-selection, gets the locality plan (within
``max_moves``, where given: traffic first, then balance, :func:`_within_budget`). That may
cost balance on the window at hand (a global plan's layers re-planned so lost up to
0.025 on real DeepSeek-V3 loads): the locality policy spends up to ``slack`` of balance
on fewer remote nodes by design, and its fresh plan would. A layer without load
(``request.idle``) keeps the map in force, as under the other policies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from eplb.core.dispatch import realised_slot_loads, remote_nodes_by_node
from eplb.core.locality import pair_stats, surrogate_co_selection
from eplb.core.request import PlanRequest
from eplb.online.budget import spend_budget
from eplb.online.forced import forced_base
from eplb.online.ladder import warm_ladder
from eplb.online.moves import counts_of
from eplb.online.nearest import expected_balance, paying_values


def co_selection(
    request: PlanRequest,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(freq [L, E], pair_times)`` as the locality policy plans with them
    (:func:`eplb.core.dispatch.remote_nodes_by_node`): from the request's routing trace,
    else the loads and groups (:class:`eplb.core.policies.LocalityPolicy`'s surrogate,
    whose matrix is never built: :func:`eplb.core.locality.surrogate_pair_times`)."""
    if request.routing is not None:
        freq, pair = pair_stats(torch.as_tensor(request.routing).cpu(), request.num_experts)
        return freq, lambda x: torch.bmm(pair.to(x.dtype), x)
    return surrogate_co_selection(request.weight, request.topology.num_groups)


def plan_locality_incremental(
    request: PlanRequest, old: np.ndarray, fresh: torch.Tensor,
    max_moves: int | np.ndarray | None = None,
) -> torch.Tensor:
    """``[L, R]``: per layer the candidate that pays best (module docstring), from the map
    in force ``old [L, R]`` and the fresh locality plan relabelled onto it
    ``fresh [L, R]``, under ``request`` (locality policy, nearest dispatch, several
    nodes, every GPU live), within ``max_moves`` (:func:`_within_budget`)."""
    topology = request.topology
    nodes, per_gpu = topology.num_nodes, topology.gpus_per_node
    layers, num_slots = old.shape
    weight = request.weight.detach().cpu().to(torch.float64)
    host = dataclasses.replace(request, weight=weight)
    base = torch.from_numpy(forced_base(host, old, weight.numpy())[0])
    candidates = [base[None]]
    if per_gpu > 1:
        # node rows: each node's slots with its replicas' realised loads, the layer's id
        # space (a row's absent experts weigh nothing); an idle row weighs its replicas 1
        rows, width = layers * nodes, num_slots // nodes
        start = base.reshape(rows, width).numpy()
        slot_load = realised_slot_loads(weight, base, topology.num_gpus, nodes, "nearest")
        node_weight = np.zeros((rows, request.num_experts))
        np.add.at(node_weight, (np.arange(rows)[:, None], start),
                  slot_load.reshape(rows, width).numpy())
        counts = counts_of(start, request.num_experts)
        node_weight = np.where(node_weight.sum(1, keepdims=True) > 0, node_weight,
                               (counts > 0).astype(np.float64))
        options = request.options.incremental
        quota = max(2, round(options.quota * width))
        steps = options.steps_for(topology.slots_per_gpu, "nearest", nodes)
        # swaps only: the transfers' target is the counts in force (no replica changes
        # node, so no token's remote nodes change)
        ladder, _, _ = warm_ladder(node_weight, start, per_gpu, np.full(rows, quota), steps,
                                   request.options.packing, transfers_only=False,
                                   spread=True, base_counts=counts, target=counts)
        candidates.append(torch.from_numpy(ladder[1:]).reshape(-1, layers, num_slots))
    candidates.append(fresh.cpu()[None])
    stacked = torch.cat(candidates)  # [C, L, R]: base, the ladder's steps, fresh
    # the candidates' expected and in-sample balance, once for both valuations
    balance = expected_balance(weight, stacked, topology.num_gpus, nodes,
                               request.options.incremental.drift)
    value = paying_values(host, stacked, balance=balance)
    # the fresh plan also where its traffic gain pays for its moves
    freq, pair_times = co_selection(request)
    remote = torch.stack([remote_nodes_by_node(phy, freq, pair_times, nodes)
                          for phy in (base, stacked[-1])])
    share = (stacked[-1] != base).sum(1).to(torch.float64) / num_slots
    price = request.options.incremental.layer_price(topology.slots_per_gpu)
    # (a difference below 1e-9 remote nodes per token is rounding: where no token reaches
    # a remote node both read about 3e-12, and their ratio would be noise)
    fewer = remote[0] - remote[1]
    cut = torch.where(fewer > 1e-9, fewer / remote[0].clamp(min=1e-12), 0.0)
    paid = cut > price * share  # [L] the fresh plan pays on traffic
    idle = (torch.zeros(layers, dtype=torch.bool) if request.idle is None
            else request.idle.cpu())
    # no load: nothing to gain (the layer was planned as uniform loads, whose surrogate
    # traffic took the fresh plan: 47 of 64 slots moved in an idle layer)
    paid &= ~idle
    free = torch.where(paid[None] & (torch.arange(len(value)) == len(value) - 1)[:, None],
                       torch.inf, value).argmax(0)  # first on ties: the map in force
    free[idle] = 0
    if max_moves is None:
        return stacked[free, torch.arange(layers)]
    # a budget caps the plan without one: no layer moves more than it would there
    cost = (stacked != stacked[:1]).sum(2)  # [C, L]
    most = cost.gather(0, free[None])[0]
    timed = paying_values(host, stacked, by_time=True, balance=balance)
    value = torch.where(cost <= most[None], value, -torch.inf)
    timed = torch.where(cost <= most[None], timed, -torch.inf)
    pick = _within_budget(cost, value, timed, paid & (free == len(value) - 1), idle, cut,
                          max_moves)
    return stacked[pick, torch.arange(layers)]


def _within_budget(cost: torch.Tensor, value: torch.Tensor, timed: torch.Tensor,
                   paid: torch.Tensor, idle: torch.Tensor, cut: torch.Tensor,
                   max_moves: int | np.ndarray) -> torch.Tensor:
    """``[L]`` candidate per layer (candidate 0 the map in force made valid, the last
    the fresh plan; ``cost [C, L]`` the slots each changes from candidate 0) within
    ``max_moves`` slots, in total or ``[L]`` per layer. ``value [C, L]``: what each pays in
    balance, ``timed [C, L]`` the same in MoE time (:func:`eplb.online.nearest.
    paying_values`, plain and ``by_time``); ``paid [L]``: the fresh plan
    pays on traffic (``cut [L]``, its share fewer remote nodes per token), ``idle [L]``:
    layers without load, which keep candidate 0.

    Traffic first, as the policy plans: a layer whose fresh plan pays on traffic takes it
    where it fits (within a total, the largest cut per slot first); the rest of the
    budget buys balance where it pays most (:func:`eplb.online.budget.spend_budget` on
    the gains in MoE time, as under the global policy). A budget caps the moves that
    pay; it buys none that do not."""
    fresh, layers = cost.shape[0] - 1, cost.shape[1]
    if isinstance(max_moves, np.ndarray):  # per layer: the best affordable in each
        cap = torch.from_numpy(max_moves.astype(np.int64))
        take = paid & (cost[-1] <= cap)
        affordable = torch.where(cost <= cap[None], value, -torch.inf)
        pick = torch.where(take, fresh, affordable.argmax(0))
        return torch.where(idle, 0, pick)
    left = int(max_moves)
    pick = torch.zeros(layers, dtype=torch.int64)
    taken = torch.zeros(layers, dtype=torch.bool)
    order = torch.argsort(-(cut / cost[-1].clamp(min=1)), stable=True)
    for layer in order[paid[order]].tolist():  # the traffic cuts, most per slot first
        if int(cost[-1, layer]) <= left:
            pick[layer], taken[layer] = fresh, True
            left -= int(cost[-1, layer])
    timed = timed.numpy().copy()
    timed[:, (taken | idle).numpy()] = -np.inf  # decided already (candidate 0 stays 0)
    timed[0] = 0.0
    rest = torch.from_numpy(spend_budget(timed, cost.numpy(), left))
    return torch.where(taken, pick, torch.where(idle, 0, rest))
