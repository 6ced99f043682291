"""Incremental planning under the hierarchical policy: node rows and warm regroups.

A hierarchical layer is ``N`` independent node problems once its expert groups are on
nodes, so the warm-start machinery works on *node rows*: ``(layer, node)`` pairs with
local expert ids ``[0, E/N)`` and ``R/N`` slots on ``P/N`` GPUs.

Two kinds of candidates come from here:

- **the node ladder** (:func:`node_ladder`): the warm-start ladder inside the nodes that
  can set the layer's time. The heaviest node's busiest GPU stays at or above that node's
  mean GPU load whatever is done inside it, so a node whose busiest GPU is already below
  that mean cannot. Each step may change a node row's share of the layer's ``quota``.
- **warm regroups** (:func:`candidates`): where the group→node assignment with the
  smallest bound puts groups on other nodes than the placement in force, and its bound is
  smaller than the assignment in force's, the groups that change node move and nothing
  else at first: their old slots empty, the arriving
  experts are dealt into them (:func:`fill_arrivals`), then the ladder refines the
  layer's nodes. A fresh plan of the layer would repack every node, moving most of its
  slots for the same groups.

Both are scored here, as node rows (:func:`eplb.online.score.gpu_moments` of each node
row's GPUs, :func:`eplb.online.score.draw_maxima` of each node row, then the max over
the layer's node rows): the same numbers as scoring whole layers, for a fraction of the
work, and only the chosen candidate of each layer is turned back into logical expert ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from eplb.core.bounds import assignment_node_bounds
from eplb.core.packing import repair_assignment
from eplb.core.placement import groups_on_nodes
from eplb.core.policies import HierarchicalPolicy
from eplb.core.policies.hierarchical import best_partition
from eplb.core.request import PlanRequest
from eplb.online import ladder, moves, score
from eplb.online.align import match_blocks


def group_nodes(phy2log: np.ndarray, request: PlanRequest) -> tuple[np.ndarray, np.ndarray]:
    """``(node_of_group [L, G], local [L])``: each group's (lowest) node, and whether every
    layer keeps every group on one node with ``G / N`` groups per node."""
    topo = request.topology
    nodes, groups = topo.num_nodes, topo.num_groups
    present = groups_on_nodes(phy2log, request.num_experts, topo)  # [L, G, N]
    held = present.any(2)
    lo = np.where(held, np.argmax(present, 2), nodes)
    hi = np.where(held, nodes - 1 - np.argmax(present[..., ::-1], 2), -1)
    per_node = np.stack([(lo == n).sum(1) for n in range(nodes)], 1)
    local = ((lo == hi) & (hi >= 0)).all(1) & (per_node == groups // nodes).all(1)
    return lo, local


def node_rows(
    weight: np.ndarray,
    phy2log: np.ndarray,
    request: PlanRequest,
    node_of_group: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split hierarchical layers into node rows with local expert ids.

    ``node_of_group [L, G]`` (default: where ``phy2log`` holds each group) says which
    experts each node row owns; a slot holding an expert its node does not own reads -1.

    Returns ``(node_weight [L·N, E/N], node_phy2log [L·N, R/N], node_experts [L·N, E/N])``
    where ``node_experts`` maps local ids back to logical experts.
    """
    topo = request.topology
    layers, num_experts = weight.shape
    nodes, groups = topo.num_nodes, topo.num_groups
    group_size = num_experts // groups
    if node_of_group is None:
        node_of_group, _ = group_nodes(phy2log, request)
    groups_by_node = np.argsort(node_of_group, 1, kind="stable").reshape(layers, nodes, -1)
    experts = (groups_by_node[..., None] * group_size + np.arange(group_size)).reshape(
        layers * nodes, -1
    )
    # flat 1-D takes and puts (a few times cheaper than the 2-D *_along_axis calls here)
    count, width = layers * nodes, experts.shape[1]
    layer_start = (np.arange(layers) * num_experts).repeat(nodes)[:, None]
    node_weight = np.ravel(weight)[experts + layer_start]
    # each row's local id of every expert, with a last column -1 that empty slots read
    local_id = np.full((count, num_experts + 1), -1)
    local_id.ravel()[(experts + (np.arange(count) * (num_experts + 1))[:, None]).ravel()] = (
        np.tile(np.arange(width), count))
    rows = phy2log.reshape(count, -1)
    held = np.where(rows >= 0, rows, num_experts) + (np.arange(count) * (num_experts + 1))[:, None]
    return node_weight, local_id.ravel()[held], experts


def to_layers(done: np.ndarray, experts: np.ndarray, layers: int) -> np.ndarray:
    """Node rows ``done [..., L·N, R/N]`` (local ids) back to ``[..., L, R]`` expert ids."""
    rows, width = experts.shape
    # one flat gather from the expert table with a -1 column appended to every row:
    # local id -1 wraps onto it
    table = np.empty((rows, width + 1), experts.dtype)
    table[:, :width], table[:, width] = experts, -1
    flat = done + (done < 0) * (width + 1) + (np.arange(rows) * (width + 1))[:, None]
    return table.ravel()[flat].reshape(*done.shape[:-2], layers, -1)


def per_node(
    weight: np.ndarray,
    phy2log: np.ndarray,
    request: PlanRequest,
    fn: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
) -> np.ndarray:
    """Apply ``fn(node_weight [L·N, E/N], node_phy2log [L·N, R/N], gpus_per_node)``, which
    returns ``[..., L·N, R/N]`` local ids, to every node row of ``weight [L, E]`` and
    ``phy2log [L, R]``; returns ``[..., L, R]`` expert ids."""
    node_weight, node_phy2log, experts = node_rows(weight, phy2log, request)
    done = fn(node_weight, node_phy2log, request.topology.gpus_per_node)
    return to_layers(done, experts, phy2log.shape[0])


def node_quota(request: PlanRequest, quota: np.ndarray) -> np.ndarray:
    """``[L]`` slots a node row's ladder step may change: the layer's per-step share of
    its slots (``quota [L]`` slots of ``R``), taken of the node's ``R / N``; at least 2
    (one swap)."""
    share = quota / request.topology.num_nodes
    return np.where(quota > 0, np.maximum(2, np.round(share)), 0).astype(np.int64)


def node_ladder(
    node_weight: np.ndarray,
    node_start: np.ndarray,
    request: PlanRequest,
    quota: np.ndarray,
    budgeted: bool,
    always: np.ndarray | None = None,
    alias: np.ndarray | None = None,
    fine: bool | np.ndarray = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Warm-start candidates of hierarchical layers given as node rows
    (:func:`node_rows`: ``node_weight [L·N, E/N]``, ``node_start [L·N, R/N]``), refining
    inside the nodes that can set each layer's time (module docstring) and the node rows
    flagged in ``always [L, N]``.

    ``quota [L]``: slots per step of the whole layer (0: the layer keeps its start).
    ``alias [L·N]``: for every node row, a row with the same loads, start and quota (its
    own index where none), searched once for both. ``fine`` (one flag, or ``[L]``): the
    transfer-only candidates make at most one and two transfers
    (:func:`eplb.online.ladder.warm_ladder`).

    Returns ``(done [C, L·N, R/N], moving [M], twin [M], counts [M, E/N])``: the
    candidates as node rows (local ids; candidate 0 is the start), the node rows that
    were searched (the others hold their start in every candidate), for each of them the
    first of ``moving`` with the same search (its candidates are that row's: score them
    once), and its replica counts in the swap steps (the last ``steps`` candidates).
    """
    topo = request.topology
    nodes, per_gpu = topo.num_nodes, topo.gpus_per_node
    layers = node_start.shape[0] // nodes
    peak = moves.gpu_loads_of(node_weight, node_start, per_gpu).max(1).reshape(layers, nodes)
    mean = node_weight.sum(1).reshape(layers, nodes) / per_gpu
    critical = peak > mean.max(1, keepdims=True)  # [L, N]
    if always is not None:
        critical |= always
    row_quota = np.where(critical, node_quota(request, quota)[:, None], 0).reshape(-1)
    # rows are independent: only the node rows with a quota are searched, and a row that
    # repeats another (``alias``) takes that row's search
    moving = np.nonzero(row_quota > 0)[0]
    source = moving if alias is None else alias[moving]
    unique, first, back = np.unique(source, return_index=True, return_inverse=True)
    options = request.options
    # a base row searched only for its regrouped twin takes the twin's quota (equal)
    row_fine = np.broadcast_to(fine, layers).repeat(nodes)[moving[first]]
    # every start is spread where it need not stack (``spread``): a base row is a node
    # of a layer the forced moves spread, a regroup's row was spread by fill_arrivals;
    # an expert with more replicas than the node's GPUs is checked by warm_ladder
    steps = options.incremental.steps_for(topo.slots_per_gpu, request.dispatch,
                                          topo.num_nodes)
    searched, _, counts = ladder.warm_ladder(node_weight[unique], node_start[unique], per_gpu,
                                            row_quota[moving[first]], steps, options.packing,
                                            budgeted, spread=True, fine=row_fine)
    done = np.repeat(node_start[None], searched.shape[0], 0)
    done[:, moving] = searched[:, back]
    return done, moving, first[back], counts[back]


@dataclasses.dataclass(frozen=True)
class Scored:
    """Candidates of every layer with their scores (see
    :func:`eplb.online.score.expected_peak`); candidate 0 is the placement in force.

    Attributes:
        peak: ``[C, L]`` expected next-window max GPU load over the mean (``inf``: not
            offered in that layer).
        now: ``[C, L]`` max GPU load on the window at hand over the mean.
        cost: ``[C, L]`` slots whose expert differs from candidate 0.
        take: ``take(pick [L]) → [L, R]``, the placement of candidate ``pick[l]`` in
            every layer ``l``.
        bound: ``[L]`` a lower bound on any hierarchical placement's max GPU load over
            the mean (:func:`eplb.core.bounds.assignment_node_bounds` of the best group→node
            assignment found), which a fresh plan comes close to.
        rungs: ``K``, the candidates of one ladder: the node ladder's are ``[0, K)``, the
            regroups' ``[K, 2K)``, a fine ladder's (where searched) the rest.
    """

    peak: np.ndarray
    now: np.ndarray
    cost: np.ndarray
    take: Callable[[np.ndarray], np.ndarray]
    bound: np.ndarray
    rungs: int


def candidates(
    weight: np.ndarray, base: np.ndarray, request: PlanRequest, quota: np.ndarray,
    budgeted: bool, node_of_group: np.ndarray | None = None,
    units: np.ndarray | None = None, fine_quota: np.ndarray | None = None,
) -> Scored:
    """Warm-start candidates of hierarchical layers ``base [L, R]``, scored: the node
    ladder of ``base`` (``K`` candidates, the first is ``base``), then the warm regroup
    and its node ladder (``K`` more) for the layers whose best group→node assignment
    differs from ``base``'s and has a smaller bound (module docstring; elsewhere not
    offered). Both ladders run as one batched search, and are scored as node rows (a node
    row's GPUs are the layer's, so nothing is turned back into layers but the chosen
    candidates).
    ``node_of_group [L, G]``: each group's node in ``base`` (:func:`group_nodes`), and
    ``units [L, E]``: the integer loads (:func:`eplb.online.score.units_of`), when the
    caller has them.

    ``fine_quota [L]`` (with ``budgeted``): the fine ladder's quota (``fine`` of
    :func:`node_ladder`), searched and scored in the same batched calls as the default
    one (its blocks are independent rows: the same candidates as a call of their own).
    Its ``2K − 1`` candidates follow, but the first (``base`` again): its ladder, then
    its regroups.
    """
    topo = request.topology
    layers, nodes = base.shape[0], topo.num_nodes
    current = group_nodes(base, request)[0] if node_of_group is None else node_of_group
    host = torch.from_numpy(weight)
    best = best_partition(host, topo)
    if best is None:  # too many assignments to enumerate: offered wherever labels differ
        target = HierarchicalPolicy.assign_groups(host, topo, request.options,
                                                  request.generator()).numpy()
        worth = np.ones(layers, bool)
        bound = assignment_node_bounds(host, torch.from_numpy(target), topo.num_replicas,
                                       topo.num_gpus, nodes, topo.num_groups).amax(1).numpy()
    else:
        # a regroup only where it lowers the layer's bound: where the assignment in force
        # has the best bound already, the best one differs only by its tie-break (even
        # nodes), and such regroups were taken in 49 of 375 steady layers (BENCHMARKS.md
        # §3) at the cost of a second ladder
        target, bounds = (t.numpy() for t in best)  # [L, G] node labels, [L, A]
        held = assignment_node_bounds(host, torch.from_numpy(current), topo.num_replicas,
                                      topo.num_gpus, nodes, topo.num_groups).amax(1).numpy()
        worth = held > bounds.min(1) * (1 + 1e-9)
        bound = bounds.min(1)
    # relabel each target node onto the current node that keeps most of its groups
    onehot = np.eye(nodes, dtype=np.float32)
    kept = np.einsum("lgn,lgm->lnm", onehot[target], onehot[current])  # [L, N_new, N_old]
    wanted = np.take_along_axis(match_blocks(kept), target, 1)  # [L, G] in current labels
    rows = np.nonzero((wanted != current).any(1) & worth)[0]
    node_weight, node_start, experts = node_rows(weight, base, request, current)
    always = None
    if len(rows):
        # the regrouped layers' start: departing groups' slots emptied, arrivals filled in
        sub = base[rows]
        group_size = request.num_experts // topo.num_groups
        node_of_slot = np.arange(topo.num_replicas) // (topo.num_replicas // nodes)
        group = np.where(sub >= 0, sub // group_size, 0)
        leaving = np.take_along_axis(wanted[rows], group, 1) != node_of_slot[None]
        start = np.where(leaving & (sub >= 0), -1, sub)
        moved_weight, moved_start, moved_experts = node_rows(weight[rows], start, request,
                                                             wanted[rows])
        filled = fill_arrivals(moved_weight, moved_start, topo.gpus_per_node)
        # the slots whose group left (base's expert is no local id of the new node row)
        gone = ((start < 0) & (sub >= 0)).reshape(len(rows) * nodes, -1)
        # one ladder over the base layers and the regrouped ones; nodes whose groups
        # changed are always searched
        changed = np.stack([(wanted[rows] == n) != (current[rows] == n) for n in range(nodes)],
                           2)
        always = np.zeros((layers + len(rows), nodes), bool)
        always[layers:] = changed.any(1)
        node_weight = np.concatenate([node_weight, moved_weight])
        node_start = np.concatenate([node_start, filled])
        experts = np.concatenate([experts, moved_experts])
        quota = np.concatenate([quota, quota[rows]])
    alias = None
    if len(rows):
        # a regrouped layer's nodes that keep their groups start as the base layer's do:
        # searched once (rows are independent, so the candidates are the same)
        in_base = nodes * layers
        twin = (rows[:, None] * nodes + np.arange(nodes)).reshape(-1)  # base row of each
        same = ((node_start[in_base:] == node_start[twin]).all(1)
                & (node_weight[in_base:] == node_weight[twin]).all(1)
                & (quota[layers:].repeat(nodes) == quota[rows].repeat(nodes)))
        alias = np.arange(len(node_start))
        alias[in_base:] = np.where(same, twin, alias[in_base:])
    of_layer = np.concatenate([np.arange(layers), rows])  # the layer of each block
    sets = len(of_layer)  # blocks of one ladder: the layers, then their regroups
    fine = False
    if fine_quota is not None:  # the fine ladder's blocks after the default one's
        node_weight, node_start = np.concatenate([node_weight] * 2), np.concatenate(
            [node_start] * 2)
        experts, of_layer = np.concatenate([experts] * 2), np.concatenate([of_layer] * 2)
        quota = np.concatenate([quota, fine_quota, fine_quota[rows]])
        always = None if always is None else np.concatenate([always, always])
        alias = None if alias is None else np.concatenate([alias, alias + sets * nodes])
        fine = np.arange(2 * sets) >= sets
    done, moving, twin, counts = node_ladder(node_weight, node_start, request, quota,
                                             budgeted, always, alias, fine)
    ladder = done.shape[0]
    # scores: every node row's start once, the searched rows' later candidates
    options = request.options.incremental
    units = score.units_of(weight) if units is None else units  # [L, E]
    # one flat take (no [B·N, E] copy of the layers' units first)
    node_units = np.ravel(units)[experts + (of_layer * units.shape[1]).repeat(nodes)[:, None]]
    groups = topo.num_groups // nodes

    def moments(unit_rows: np.ndarray, rows_done: np.ndarray,
                shared: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
        return score.gpu_moments(unit_rows, rows_done, topo.gpus_per_node, groups,
                                 options.group_share, shared)

    # each node row's max GPU load per draw (and now), then the max over the layer's
    # node rows (maxima are exact: the same numbers as over the layer's GPUs at once).
    # Every row's start is scored once, a search's later candidates once for the rows
    # that share it (a row's moments depend on its own slots and loads only)
    per_gpu, blocks = topo.gpus_per_node, len(of_layer)
    z = torch.from_numpy(score.normal_draws(score.DRAWS, topo.num_gpus)).view(
        score.DRAWS, 1, 1, nodes, per_gpu)  # node n's GPUs draw columns n·P/N + k
    gpu, variance = moments(node_units, done[:1])  # [1, B·N, P/N]
    shape = (1, blocks, nodes, per_gpu)
    row_peak = score.draw_maxima(gpu.view(shape), variance.reshape(shape), options.drift, z)
    row_peak = np.repeat(row_peak.reshape(score.DRAWS, 1, -1), ladder, 1)  # [D, K, B·N]
    row_now = np.repeat(gpu.amax(2).numpy(), ladder, 0)  # [K, B·N]
    if ladder > 1 and len(moving):
        distinct, back = np.unique(twin, return_inverse=True)
        rows_of = moving[distinct]
        # without a budget every later candidate is a swap step: one set of replica
        # counts per row (with one, the transfer-only candidates have their own)
        shared = None if budgeted else counts[distinct]
        gpu, variance = moments(node_units[rows_of], done[1:, rows_of], shared)  # [K − 1, M, P/N]
        own = z.view(score.DRAWS, 1, nodes, per_gpu)[:, :, rows_of % nodes]  # [D, 1, M, P/N]
        row_peak[:, 1:, moving] = score.draw_maxima(gpu, variance, options.drift, own)[:, :, back]
        row_now[1:, moving] = gpu.amax(2).numpy()[:, back]
    mean = np.maximum(units.sum(1)[of_layer] / topo.num_gpus, 1e-300)  # [B]
    # (torch's max over a short last axis is several times faster than NumPy's)
    layer_peak = torch.from_numpy(row_peak).view(score.DRAWS, ladder, blocks, nodes).amax(3)
    expected = score.mean_of_draws(layer_peak.numpy()) / mean
    now = torch.from_numpy(row_now).view(ladder, blocks, nodes).amax(2).numpy() / mean
    in_layers = nodes * layers

    def ladders(first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Layers' candidates of the ladder whose blocks start at block ``first``: its
        ladder, then its regroups (base where none is offered)."""
        peak = np.full((2 * ladder, layers), np.inf)
        peak[:ladder] = expected[:, first:first + layers]
        peak[ladder:, rows] = expected[:, first + layers:first + sets]
        now_all = np.concatenate([now[:, first:first + layers]] * 2)
        now_all[ladder:, rows] = now[:, first + layers:first + sets]
        cost = np.zeros((2 * ladder, layers), np.int64)
        # the ladder keeps the node rows' labels: local ids compare like expert ids
        own = done[:, first * nodes:first * nodes + in_layers]
        cost[:ladder] = (own != own[:1]).reshape(ladder, layers, -1).sum(2)
        if len(rows):
            # the regroups compare in their own local ids too: base's slots read as them
            # (``moved_start``) differ from a candidate's exactly where the expert ids
            # do, but for a slot whose group left that the candidate leaves empty
            moved = done[:, (first + layers) * nodes:(first + sets) * nodes]
            differ = (moved != moved_start[None]) | ((moved < 0) & gone[None])
            cost[ladder:, rows] = differ.reshape(ladder, len(rows), -1).sum(2)
        return peak, now_all, cost

    peak, now_all, cost = ladders(0)
    if fine_quota is not None:  # the fine ladder's, but its first candidate (base)
        peak, now_all, cost = (np.concatenate([a, b[1:]])
                               for a, b in zip((peak, now_all, cost), ladders(sets), strict=True))

    def take(pick: np.ndarray) -> np.ndarray:
        # every layer's node rows in its chosen candidate: its own block's, or its
        # regroup's block's (of the default ladder's blocks or the fine one's); one turn
        # back into expert ids for all of them
        later = pick >= 2 * ladder  # the fine ladder's
        local = np.where(later, pick - 2 * ladder + 1, pick)
        first = np.where(later, sets, 0)
        step = np.minimum(local, ladder - 1)
        block = first + np.arange(layers)
        late = np.nonzero(local[rows] >= ladder)[0]
        step[rows[late]] = local[rows[late]] - ladder
        block[rows[late]] = first[rows[late]] + layers + late
        node_row = (block[:, None] * nodes + np.arange(nodes)).reshape(-1)
        return to_layers(done[step.repeat(nodes), node_row][None], experts[node_row],
                         layers)[0]

    layer_mean = np.maximum(weight.sum(1) / topo.num_gpus, 1e-300)
    return Scored(peak, now_all, cost, take, bound / layer_mean, ladder)


def fill_arrivals(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """Fill the empty slots of rows ``phy2log [B, R]`` with the experts no slot holds.

    The uncovered experts share a row's empty slots by Jefferson's rule (one replica
    each, then the extra ones by ``w / c``). The empty slots are dealt round-robin over
    the GPUs, lightest GPU first in every round, and the replicas take them heaviest
    first; replicas that land twice on one GPU are spread by the cheapest swaps. The
    warm-start ladder refines from there. Rows with no uncovered expert to fill their
    empty slots with, or fewer empty slots than uncovered experts, get
    :func:`eplb.online.moves.fill_and_spread`. ``weight [B, E]``. Returns ``[B, R]``.
    """
    rows, num_slots = phy2log.shape
    num_experts = weight.shape[1]
    slots = num_slots // num_gpus
    out = phy2log.copy()
    counts = moves.counts_of(out, num_experts)
    uncovered = counts == 0  # [B, E]
    holes = (out < 0).sum(1)
    arrivals = uncovered.sum(1)
    fallback = (holes < arrivals) | ((holes > 0) & (arrivals == 0))
    # replicas of the arrivals: one each, then Jefferson for the rest of the holes
    given = uncovered.astype(np.int64)
    # the greedy's priority w / c of every arrival (−1 elsewhere), updated where it grants
    priority = np.where(uncovered, weight, -1.0)
    left = holes - arrivals  # [B] replicas still to grant
    for _ in range(int(np.maximum(left, 0).max(initial=0))):
        more = np.nonzero(left > 0)[0]
        pick = np.argmax(priority[more], 1)
        given[more, pick] += 1
        priority[more, pick] = weight[more, pick] / given[more, pick]
        left[more] -= 1
    # the arrivals' replicas, heaviest first: [B, K] expert ids (-1 padding)
    per = np.where(given > 0, weight / np.maximum(given, 1), -np.inf)
    order = np.argsort(-per, 1, kind="stable")
    reps = np.take_along_axis(given, order, 1)  # [B, E] replicas in that order
    width = int(reps.sum(1).max(initial=0))
    expert = np.full((rows, width), -1)
    row_of = np.repeat(np.arange(rows), reps.sum(1))
    ids = np.repeat(order.ravel(), reps.ravel())  # row by row, heaviest first
    start = np.cumsum(reps.sum(1)) - reps.sum(1)
    expert[row_of, np.arange(len(ids)) - start[row_of]] = ids
    # the k-th heaviest replica takes the k-th hole of the round-robin order
    loads = moves.gpu_loads_of(weight, out, num_gpus, counts)
    hole = (out < 0).reshape(rows, num_gpus, slots)
    round_of = np.cumsum(hole, 2) - 1  # [B, P, S] a hole's rank inside its GPU
    light_rank = np.argsort(np.argsort(loads, 1, kind="stable"), 1)  # [B, P]
    key = np.where(hole, round_of * num_gpus + light_rank[:, :, None], num_slots * num_gpus)
    order = np.argsort(key.reshape(rows, -1), 1, kind="stable")[:, :width]  # [B, K] slots
    take = (expert >= 0) & ~fallback[:, None]
    out[np.nonzero(take)[0], order[take]] = expert[take]
    spread = moves.stacked(out, num_gpus) & ~fallback
    if spread.any():
        bad = np.nonzero(spread)[0]
        out[bad] = repair_assignment(torch.from_numpy(weight[bad]), torch.from_numpy(out[bad]),
                                     torch.ones(num_gpus, dtype=torch.bool)).numpy()
    if fallback.any():
        redo = np.nonzero(fallback)[0]
        out[redo] = moves.fill_and_spread(weight[redo], phy2log[redo], num_gpus)
    return out
