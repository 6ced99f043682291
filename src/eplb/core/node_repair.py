"""Slot-level repairs of nearest-dispatch plans, after the node labelling.

:func:`eplb.core.node_labels.spread_over_nodes` moves whole GPUs between nodes; what it
cannot settle these functions settle one replica at a time, each a batched loop over
layers (see :mod:`eplb.core.dispatch_plan` for why the node patterns matter):

- :func:`repair_node_pairs`: experts that need distinct nodes (a second replica on a node
  moves to a node without one; also the incremental plans' repair within a budget);
- :func:`gather_together`: experts kept on one node (a stray replica moves home);
- :func:`polish_realised`: heaviest-GPU swaps on the loads the rule realises, where
  tokens do not arise evenly over equal nodes (dead GPUs, a given source).
"""

from __future__ import annotations

import torch

from eplb.core.dispatch import realised_slot_loads
from eplb.core.map_tables import expert_counts


def _tally(phy2log: torch.Tensor, unit_of_slot: torch.Tensor, units: int, num_experts: int
           ) -> torch.Tensor:
    """``[L, units, E + 1]`` replicas of every expert per unit (GPU or node)."""
    num_layers = phy2log.shape[0]
    expert = torch.where(phy2log >= 0, phy2log, num_experts)
    cnt = torch.zeros(num_layers, units * (num_experts + 1), dtype=torch.int64,
                      device=phy2log.device)
    cnt.scatter_add_(1, unit_of_slot[None] * (num_experts + 1) + expert, torch.ones_like(expert))
    return cnt.view(num_layers, units, num_experts + 1)


def _move_counts(
    table: torch.Tensor, unit_of_slot: torch.Tensor, out: torch.Tensor, rows: torch.Tensor,
    a: torch.Tensor, b: torch.Tensor, num_experts: int,
) -> None:
    """Keep a :func:`_tally` table ``[L, units, E + 1]`` up to date (in place) after the
    swaps ``out[rows, a] <-> out[rows, b]`` (``rows, a, b [k]``, ``out`` already swapped).

    A swap moves two replicas, so four counts change: a rebuilt table (a ``[L, P, E+1]``
    fill and scatter every step) was most of a repair at 128 GPUs. The counts are
    integers, so the table is the one :func:`_tally` would build."""
    width = num_experts + 1
    moved = torch.where(out >= 0, out, num_experts)
    e, f = moved[rows, b], moved[rows, a]  # e went from slot a to b, f from b to a
    at_a, at_b = unit_of_slot[a] * width, unit_of_slot[b] * width
    ones = torch.ones_like(e)
    table.view(table.shape[0], -1).index_put_(
        (rows.repeat(4), torch.cat([at_a + e, at_b + e, at_b + f, at_a + f])),
        torch.cat([-ones, ones, -ones, ones]), accumulate=True)


def repair_node_pairs(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    num_nodes: int,
    budget: torch.Tensor | None = None,
    max_swaps: int | None = None,
    min_count: int = 3,
    keep_together: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap replicas so that experts with ``c >= min_count`` have at most one replica per
    node (``keep_together``: only those with at most one replica per node to go round,
    and never moving a replica of the others, which :func:`node_attraction` keeps
    together).

    GPUs keep their identity (this is the step for incremental plans and for conflicts
    :func:`spread_over_nodes` leaves). Per step and layer, the first conflicting replica
    (a second replica of an expert on one node) swaps with the item on a node without
    that expert whose exchange keeps the two GPUs' larger even-split load smallest; the
    partner's own pattern must stay valid and no GPU may hold two replicas of one expert.

    Args:
        weight: ``[L, E]``; phy2log: ``[L, R]`` (``-1`` on dead GPUs).
        budget: ``[L]`` slots each layer may still change (2 per swap); ``None``: no limit.
        max_swaps: most steps (default: the largest number of conflicts in a layer).

    Returns:
        ``(phy2log [L, R], swaps [L])``.
    """
    num_layers, num_experts = phy2log.shape[0], weight.shape[1]
    if num_nodes <= 1:
        # one node: no pair of nodes to spread over, so nothing to swap; said here once
        # (it searched to return the map unchanged, and the one-node nearest plans each
        # skipped the call themselves)
        return phy2log.clone(), torch.zeros(num_layers, dtype=torch.int64,
                                            device=phy2log.device)
    gpu_of_slot, node_of_slot, rows, w = _layout(weight, phy2log, num_gpus, num_nodes)
    out = phy2log.clone()
    done = torch.zeros(num_layers, dtype=torch.int64, device=phy2log.device)
    steps = None if max_swaps is None else max_swaps
    # a swap keeps every expert's replica count (so its replicas' loads); the node and GPU
    # tables are kept up to date swap by swap (_move_counts)
    count = expert_counts(out, num_experts)
    count = torch.cat([count, count.new_zeros(num_layers, 1)], 1)
    per = w / count.clamp(min=1)
    node_cnt = _tally(out, node_of_slot, num_nodes, num_experts)  # [L, N, E+1]
    gpu_cnt = _tally(out, gpu_of_slot, num_gpus, num_experts)
    node_index = node_of_slot[None] * (num_experts + 1)  # [1, R] a slot's row in node_cnt
    while steps is None or steps > 0:
        expert = torch.where(out >= 0, out, num_experts)
        c = count.gather(1, expert)  # [L, R]
        # replicas of each slot's expert on the slot's node
        on_node = node_cnt.view(num_layers, -1).gather(1, node_index + expert)
        # the later replica of a pair on one node is the one to move (an expert with more
        # replicas than nodes cannot be spread: kept together, it is left alone)
        bad = (c >= min_count) & (on_node >= 2) & (out >= 0)
        if keep_together:
            bad &= c <= num_nodes
        if budget is not None:
            bad &= (budget - 2 * done >= 2)[:, None]
        has = bad.any(1)
        if not bool(has.any()):
            break
        s = torch.where(has, bad.to(torch.int64).argmax(1), 0)  # [L] slot to move
        e = expert[rows, s]
        g, n = gpu_of_slot[s], node_of_slot[s]
        # partner t: on another node without e, live, its expert f stays valid on node n
        no_e_there = node_cnt[rows, :, e].gather(1, node_of_slot[None].expand(num_layers, -1)) == 0
        f_at_n = node_cnt[rows, n].gather(1, expert)  # [L, R] replicas of f on node n
        f_at_g = gpu_cnt[rows, g].gather(1, expert)
        ok = no_e_there & (out >= 0) & (f_at_g == 0) & ((c < min_count) | (f_at_n == 0))
        if keep_together:  # nor would it move a replica of an expert kept together
            ok &= c <= num_nodes
        ok &= node_of_slot[None] != n[:, None]
        apply, partner = _swap_with_best_partner(out, per, expert, s, has, ok, gpu_of_slot,
                                                 num_gpus)
        if not bool(apply.any()):
            break
        r, a, b = rows[apply], s[apply], partner[apply]
        _move_counts(node_cnt, node_of_slot, out, r, a, b, num_experts)
        _move_counts(gpu_cnt, gpu_of_slot, out, r, a, b, num_experts)
        done += apply.to(torch.int64)
        if steps is not None:
            steps -= 1
    return out, done


def gather_together(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    num_nodes: int,
    attract: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap stray replicas of experts kept on one node onto that node.

    :func:`eplb.core.node_labels.spread_over_nodes` moves whole GPUs, so where two such
    experts share a GPU both cannot go home (gpt-oss-like 32 experts on 2 nodes, 3 slots
    per GPU: 0.81 served, 0.97 after this step). Per step and layer, the first replica
    of an expert in ``attract [L, E]`` with at most a node's GPUs of replicas that is off
    its home node (the node holding most of them; ties: the lower) swaps with an item on
    the home node whose exchange keeps the two GPUs' larger even-split load smallest. The
    partner's expert must be neither kept together nor, where it needs distinct nodes
    (3 to ``N`` replicas), already on the stray's node; no GPU may hold two replicas of
    one expert.

    Args:
        weight: ``[L, E]``; phy2log: ``[L, R]`` (all GPUs live).

    Returns:
        ``(phy2log [L, R], swaps [L])``.
    """
    (num_layers, num_slots), num_experts = phy2log.shape, weight.shape[1]
    per_node = num_gpus // num_nodes
    gpu_of_slot, node_of_slot, rows, w = _layout(weight, phy2log, num_gpus, num_nodes)
    out = phy2log.clone()
    pull = torch.cat([attract, attract.new_zeros(num_layers, 1)], 1)  # [L, E+1]
    done = torch.zeros(num_layers, dtype=torch.int64, device=phy2log.device)
    # swaps keep the replica counts; the tables follow them (_move_counts)
    count = torch.cat([expert_counts(out, num_experts), out.new_zeros(num_layers, 1)], 1)
    per = w / count.clamp(min=1)
    node_cnt = _tally(out, node_of_slot, num_nodes, num_experts)  # [L, N, E+1]
    gpu_cnt = _tally(out, gpu_of_slot, num_gpus, num_experts)  # [L, P, E+1]
    # each swap sends one stray home for good (its partner is not kept together)
    for _ in range(num_slots):
        expert = torch.where(out >= 0, out, num_experts)
        home = node_cnt.argmax(1)  # [L, E+1]: first on ties, the lower node
        c = count.gather(1, expert)  # [L, R]
        one_node = pull.gather(1, expert) & (c <= per_node)
        stray = one_node & (node_of_slot[None] != home.gather(1, expert)) & (out >= 0)
        has = stray.any(1)
        if not bool(has.any()):
            break
        s = torch.where(has, stray.to(torch.int64).argmax(1), 0)  # [L] slot to move
        e = expert[rows, s]
        g, n = gpu_of_slot[s], node_of_slot[s]
        e_there = gpu_cnt[rows, :, e].gather(1, gpu_of_slot[None].expand(num_layers, -1))
        f_at_n = node_cnt[rows, n].gather(1, expert)  # [L, R] partner's replicas on n
        f_at_g = gpu_cnt[rows, g].gather(1, expert)
        ok = (node_of_slot[None] == home[rows, e][:, None]) & (out >= 0) & (e_there == 0)
        ok &= (f_at_g == 0) & ~pull.gather(1, expert)
        ok &= (c < 3) | (c > num_nodes) | (f_at_n == 0)
        apply, partner = _swap_with_best_partner(out, per, expert, s, has, ok, gpu_of_slot,
                                                 num_gpus)
        if not bool(apply.any()):
            break
        r, a, b = rows[apply], s[apply], partner[apply]
        _move_counts(node_cnt, node_of_slot, out, r, a, b, num_experts)
        _move_counts(gpu_cnt, gpu_of_slot, out, r, a, b, num_experts)
        done += apply.to(torch.int64)
    return out, done


def _layout(
    weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gpu_of_slot [R], node_of_slot [R], rows [L], w [L, E+1])``: where each slot is,
    the layer indices, and the loads in float64 with a zero column for empty slots."""
    num_layers, num_slots = phy2log.shape
    slot = torch.arange(num_slots, device=phy2log.device)
    gpu_of_slot = slot // (num_slots // num_gpus)
    w = torch.cat([weight.to(torch.float64),
                   weight.new_zeros(num_layers, 1, dtype=torch.float64)], 1)
    return (gpu_of_slot, gpu_of_slot // (num_gpus // num_nodes),
            torch.arange(num_layers, device=phy2log.device), w)


def _swap_with_best_partner(
    out: torch.Tensor, per: torch.Tensor, expert: torch.Tensor, moving: torch.Tensor,
    has: torch.Tensor, ok: torch.Tensor, gpu_of_slot: torch.Tensor, num_gpus: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer with ``has [L]``, swap slot ``moving [L]`` of ``out [L, R]`` (in place)
    with the allowed partner (``ok [L, R]``) whose exchange keeps the two GPUs' larger
    even-split load smallest (``per [L, E+1]`` the load of one replica of each expert,
    the last column empty slots; ``expert [L, R]`` each slot's column). Near ties go to
    the partner whose load is closest. Returns ``(apply [L] bool, partner [L])``: the
    layers that swapped, and the slot each swapped with (meaningful where ``apply``)."""
    num_layers = out.shape[0]
    rows = torch.arange(num_layers, device=out.device)
    load = per.gather(1, expert).view(num_layers, num_gpus, -1).sum(2)  # [L, P]
    x_e = per[rows, expert[rows, moving]]
    x_f = per.gather(1, expert)  # [L, R] load of every candidate partner
    g = gpu_of_slot[moving]
    new_g = load[rows, g][:, None] - x_e[:, None] + x_f
    new_t = load.gather(1, gpu_of_slot[None].expand(num_layers, -1)) - x_f + x_e[:, None]
    score = torch.maximum(new_g, new_t) + 1e-9 * (x_f - x_e[:, None]).abs()
    score = torch.where(ok, score, torch.full_like(score, float("inf")))
    best, partner = score.min(1)
    apply = has & best.isfinite()
    if bool(apply.any()):
        r, a, b = rows[apply], moving[apply], partner[apply]
        out[r, a], out[r, b] = out[r, b].clone(), out[r, a].clone()
    return apply, partner


def polish_realised(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    num_nodes: int,
    live: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
    steps: int | None = None,
) -> torch.Tensor:
    """Heaviest-GPU swap polish on the loads the nearest rule realises → ``phy2log [L, R]``.

    Needed where tokens do not arise evenly over equal nodes (dead GPUs, a given
    ``source [P]``): a replica on a distinct node then serves its node's share, not
    ``1/c``. Only swaps that keep every replica's realised load are tried, so loads are
    updated exactly without re-running the rule: any two slots on one node (an expert's
    node pattern is unchanged), or two single-replica experts anywhere (they carry their
    whole load wherever they are). Each step swaps, per layer, the heaviest GPU's best
    item with the partner that lowers the pair's larger load most.
    """
    num_layers, num_slots = phy2log.shape
    num_experts = weight.shape[1]
    device = phy2log.device
    slots = num_slots // num_gpus
    per_node = num_gpus // num_nodes
    if live is None:
        live = torch.ones(num_gpus, dtype=torch.bool, device=device)
    x = realised_slot_loads(weight, phy2log, num_gpus, num_nodes, "nearest", source, live,
                            check=False)
    out = phy2log.clone()
    rows = torch.arange(num_layers, device=device)
    slot = torch.arange(num_slots, device=device)
    gpu_of_slot = slot // slots
    node_of_slot = gpu_of_slot // per_node
    dead_slot = ~live[gpu_of_slot]
    # swaps keep the replica counts; the GPU table follows them (_move_counts)
    single = (expert_counts(out, num_experts) == 1)
    single = torch.cat([single, single.new_zeros(num_layers, 1)], 1)  # [L, E+1]
    gpu_cnt = _tally(out, gpu_of_slot, num_gpus, num_experts)  # [L, P, E+1]
    for _ in range(2 * num_gpus if steps is None else steps):
        load = x.view(num_layers, num_gpus, slots).sum(2)
        load = torch.where(live, load, torch.full_like(load, -1.0))
        u = load.argmax(1)  # [L] heaviest live GPU
        expert = torch.where(out >= 0, out, num_experts)
        single_slot = single.gather(1, expert)  # [L, R]
        mine = u[:, None] * slots + torch.arange(slots, device=device)  # [L, S] slots on u
        xi = x.gather(1, mine)  # [L, S]
        ei = expert.gather(1, mine)
        same_node = node_of_slot[None] == (u // per_node)[:, None]  # [L, R]
        movable = same_node[:, None, :] | (single_slot.gather(1, mine)[:, :, None]
                                           & single_slot[:, None, :])
        # anti-affinity: f must not be on u already, e must not be on f's GPU
        f_on_u = gpu_cnt[rows, u].gather(1, expert) > 0  # [L, R]
        e_on_v = gpu_cnt[rows[:, None], :, ei].gather(
            2, gpu_of_slot[None, None].expand(num_layers, slots, -1)) > 0  # [L, S, R]
        ok = movable & ~f_on_u[:, None, :] & ~e_on_v & ~dead_slot[None, None]
        ok &= (gpu_of_slot[None] != u[:, None])[:, None, :]
        lu = load[rows, u][:, None, None]
        lv = load.gather(1, gpu_of_slot[None].expand(num_layers, -1))[:, None, :]
        delta = xi[:, :, None] - x[:, None, :]  # load leaving u
        new_peak = torch.maximum(lu - delta, lv + delta)
        new_peak = torch.where(ok & (delta > 0), new_peak, torch.full_like(new_peak, float("inf")))
        best, flat = new_peak.flatten(1).min(1)
        apply = best < load[rows, u] * (1 - 1e-9)
        if not bool(apply.any()):
            break
        i = mine[rows, flat // num_slots]
        j = flat % num_slots
        r, i, j = rows[apply], i[apply], j[apply]
        out[r, i], out[r, j] = out[r, j].clone(), out[r, i].clone()
        x[r, i], x[r, j] = x[r, j].clone(), x[r, i].clone()
        _move_counts(gpu_cnt, gpu_of_slot, out, r, i, j, num_experts)
    return out
