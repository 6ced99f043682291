"""Dispatch-aware planning: minimise the max GPU load as SGLang's nearest rule realises it.

Why the even-split planner loses under ``dispatch="nearest"`` (see
:mod:`eplb.core.dispatch`): with tokens arising evenly on the GPUs, an expert whose
``c`` replicas sit on ``c`` *distinct nodes* splits evenly in expectation (each replica
serves its own node's tokens, ``1/N`` each, and the fair choice spreads the nodes without
a replica evenly: ``1/N + (N − c)/(N·c) = 1/c``); so does an expert whose replicas all
share *one* node (every other rank falls to the fair choice). Every other pattern is
uneven: two replicas on one node while a third lives elsewhere leaves the node's other
GPUs all on the *first* replica there. A global plan scatters replicas at random, and
Jefferson gives the hottest experts 5-8 replicas on 4 nodes, so many experts split badly.

Two things decide what SGLang's table realises: the node pattern of every expert, and
whether a rank falls to the fair choice at all (SGLang draws it from a seeded stream; on
the ``--init-expert-location`` path every rank draws from its own point of the stream,
which moved a plan at 0.9992 expected to 0.9387 realised on ``prefill_in2048``,
``benchmarks/bench_dispatch.py``). :func:`plan_nearest_global` therefore

1. picks replica counts: ``fair="avoid"`` gives the hottest experts one replica
   on *every* node and everyone else one (:func:`coverage_counts`), so no rank ever needs
   the fair choice for an expert that matters; ``fair="expect"`` caps Jefferson's counts
   at ``N`` (:func:`capped_counts`), best in expectation (SGLang's per-token ``dynamic``
   dispatch); ``"auto"`` (default) plans both and keeps ``"avoid"`` per layer unless it
   is clearly worse;
2. packs globally as eplb does (the ``plan_rows`` search on these counts,
   :func:`plan_rows_capped`);
3. relabels GPUs so that every constrained expert has its replicas on distinct nodes
   (:func:`eplb.core.node_labels.spread_over_nodes`, then :func:`repair_node_pairs` for
   what it leaves): GPU loads
   under the even split are unchanged by a relabelling, and on a valid labelling the
   nearest rule realises exactly them;
4. with dead GPUs or a given token source, where replicas on distinct nodes no longer
   split evenly, polishes the realised loads (:func:`polish_realised`).

Two replicas split evenly in expectation whether they share a node or not, so under
``"expect"`` only experts with ``c >= 3`` constrain the labelling; under ``"avoid"`` the
covering experts (``c = N``) do. :func:`plan_nearest_incremental` re-plans from the map in
force within a move budget. Everything is a function over ``[L, ...]`` tensors.
"""

from __future__ import annotations

import torch

from eplb.core.dispatch import realised_gpu_loads, realised_slot_loads
from eplb.core.node_labels import spread_over_nodes
from eplb.core.options import PlanOptions
from eplb.core.packing import make_items, max_load, pack, to_slots
from eplb.core.placement import expert_counts
from eplb.core.replication import cap_counts, expand_replicas, replica_counts
from eplb.core.topology import Topology, is_name


def capped_counts(
    weight: torch.Tensor, num_replicas: int, cap: int, rules: tuple[float | str, ...] = (0.0,)
) -> torch.Tensor:
    """``[len(rules), rows, E]`` replica counts of eplb's rules, none above ``cap``.

    Counts above ``cap`` are cut to it and the freed replicas granted by Jefferson's
    priority (:func:`eplb.core.replication.cap_counts`, which the even-split planner uses
    with one replica per GPU as the cap). Raises ``ValueError`` if ``cap · E < R``.
    """
    num_experts = weight.shape[1]
    if cap * num_experts < num_replicas:
        raise ValueError(
            f"{num_replicas} slots cannot hold at most {cap} replicas of each of "
            f"{num_experts} experts"
        )
    return cap_counts(weight, replica_counts(weight, num_replicas, rules), cap)


def coverage_counts(weight: torch.Tensor, num_replicas: int, num_nodes: int) -> torch.Tensor:
    """``[rows, E]`` counts in ``{1, N}``: the hottest experts get one replica per node.

    With a replica on every node, every rank resolves an expert by SGLang's same-GPU or
    same-node tier, so the static table involves no fair (seeded random) choice and the
    loads it realises are exactly the modelled ones. ``k = (R − E) // (N − 1)`` hottest
    experts get ``N``; the ``(R − E) mod (N − 1)`` replicas left go to the coldest experts
    (two replicas each), whose fair choice moves next to nothing. Without nodes or extra
    slots it falls back to :func:`capped_counts` (Jefferson, at most ``ceil(R / E)``).
    """
    rows, num_experts = weight.shape
    extra = num_replicas - num_experts
    if num_nodes <= 1 or extra <= 0:
        return capped_counts(weight, num_replicas, max(1, -(-num_replicas // num_experts)))[0]
    per = num_nodes - 1
    hot, left = divmod(extra, per)
    if hot > num_experts or (hot == num_experts and left):
        raise ValueError(f"{num_replicas} slots exceed {num_nodes} replicas of each of "
                         f"{num_experts} experts")
    order = weight.argsort(dim=1, descending=True, stable=True)
    counts = torch.ones_like(weight, dtype=torch.int64)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(num_experts, device=weight.device).expand(rows, -1))
    counts = torch.where(rank < hot, num_nodes, counts)
    counts = torch.where(rank >= num_experts - left, counts + 1, counts)
    return counts


def plan_rows_capped(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    cap: int,
    options: PlanOptions,
    generator: torch.Generator | None = None,
    coverage_nodes: int = 0,
) -> torch.Tensor:
    """``plan_rows`` of :mod:`eplb.policies` with replica counts capped at ``cap``.

    ``coverage_nodes > 0`` uses :func:`coverage_counts` for that many nodes instead.

    Every rule of the portfolio is packed and scored where the largest replica is coarse
    (as ``plan_rows`` does); ``[rows, E]`` → ``[rows, R]`` expert per slot.
    """
    rows, num_experts = weight.shape
    zero = weight.sum(1, keepdim=True) <= 0
    weight = torch.where(zero, torch.ones_like(weight), weight)
    rules = options.rules
    if coverage_nodes:
        counts = coverage_counts(weight, num_replicas, coverage_nodes)[None]
        rules = rules[:1]
    else:
        counts = capped_counts(weight, num_replicas, cap, rules)  # [K, rows, E]
    largest = (weight / counts[0]).amax(1)
    # every allocation is packed here, but the nearest rule's candidates were measured
    # with the ranked threshold (the packed one's next-window study was for even dispatch)
    coarse = largest > options.portfolio_cut(each_packed=False) * weight.sum(1) / num_gpus
    use = rules if bool(coarse.any()) else rules[:1]
    flat_counts = counts[: len(use)].reshape(-1, num_experts)
    flat_weight = weight.repeat(len(use), 1)
    load, expert = expand_replicas(flat_weight, flat_counts)
    state = pack(make_items(load, expert), num_gpus, options.packing,
                 flat_counts.amax(1) > num_gpus, generator)
    if len(use) > 1:
        peak = max_load(state).view(len(use), rows)
        best = peak.argmin(0)  # first on ties: Jefferson
        pick = best * rows + torch.arange(rows, device=weight.device)
        state = state[:, :, pick]
    return to_slots(state)


#: the most GPUs the global nearest-dispatch plan relabels over several nodes: where the
#: greedy start leaves conflicts its search makes one swap per step over every GPU pair, up
#: to about P/3 steps of P² cells per layer and start, so time grows up to L·P³ with the
#: experts of 3+ replicas (58 generated DeepSeek-V3 layers, 8 GPUs a node, one core: 0.4 s
#: at 64 GPUs, 1.3 s at 256, 52 s at 512, 98 s at 1024; before the greedy start 27 s at
#: 256 and 2.7 min at 512; one layer on 2048 GPUs ran past 120 s; BENCHMARKS.md §15)
MAX_NEAREST_GPUS = 1024


FAIR_MODES = ("auto", "avoid", "expect")
#: "auto" keeps a layer's "avoid" plan unless its realised peak exceeds the "expect" plan's
#: by more than this: on SGLang's map start-up path the expect plan's fair choices cost it
#: several percent (prefill_in2048: 0.9992 modelled, 0.9387 realised; with a 1% tolerance
#: three layers switched and the plan fell from 0.9971 to 0.9932 realised)
_AUTO_TOLERANCE = 0.05


def plan_nearest_global(
    weight: torch.Tensor,
    topology: Topology,
    options: PlanOptions,
    generator: torch.Generator | None = None,
    active_gpus: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
    fair: str = "auto",
) -> torch.Tensor:
    """Global plan for SGLang's nearest dispatch → ``phy2log [L, R]`` (``-1`` on dead GPUs).

    Args:
        weight: ``[L, E]`` loads; topology: its ``num_nodes`` is the rule's node count.
        active_gpus: ``[P]`` bool, dead GPUs get ``-1`` and originate no tokens.
        source: ``[P]`` where tokens arise (default: evenly over the live GPUs).
        fair: ``"avoid"``: counts in ``{1, N}`` (:func:`coverage_counts`), so the static
            table needs no fair choice for any expert that matters and the engine realises
            the modelled loads whatever its random stream (SGLang's map start-up path draws
            it per rank). ``"expect"``: Jefferson counts capped at ``N``
            (:func:`capped_counts`): best in expectation (SGLang ``dynamic`` dispatch), but
            a static table's fair choices move each replica's share. ``"auto"`` (default):
            both, and per layer ``"avoid"`` unless its realised peak is more than 5% above
            ``"expect"``'s (few spare slots, e.g. with dead GPUs, leave ``"avoid"`` only
            one or two covering experts).

    Steps: counts, eplb's global packing over the live GPUs, :func:`spread_over_nodes`
    (with :func:`repair_node_pairs` for what it leaves), and with dead GPUs or a given
    source :func:`polish_realised`.
    """
    if not is_name(fair, FAIR_MODES):
        raise ValueError(f"fair must be one of {FAIR_MODES}, got {fair!r}")
    if generator is None:  # the relabelling's random starts: same input → same plan
        generator = torch.Generator().manual_seed(0)
    if fair != "auto":
        return _plan_nearest(weight, topology, options, generator, active_gpus, source, fair)
    avoid = _plan_nearest(weight, topology, options, generator, active_gpus, source, "avoid")
    expect = _plan_nearest(weight, topology, options, generator, active_gpus, source, "expect")
    args = (topology.num_gpus, topology.num_nodes, "nearest", source, active_gpus)
    peak_avoid = realised_gpu_loads(weight, avoid, *args, check=False).amax(1)
    peak_expect = realised_gpu_loads(weight, expect, *args, check=False).amax(1)
    worse = peak_avoid > peak_expect * (1 + _AUTO_TOLERANCE)
    chosen = torch.where(worse[:, None], expect, avoid)
    peak = torch.where(worse, peak_expect, peak_avoid)
    # both cap an expert's replicas near the node count; an expert hotter than that share
    # needs more (on a one-hot layer the capped plans served 0.25 where Jefferson's counts
    # served 0.89 under SGLang's table): Jefferson's counts uncapped, where clearly better
    live = topology.num_gpus if active_gpus is None else int(active_gpus.sum())
    cap = max(topology.num_nodes, -(-topology.num_replicas // weight.shape[1]))
    # layers whose hottest expert, at the capped count, outweighs a GPU's mean load
    hot = weight.amax(1) * live > weight.sum(1) * cap * (1 + _AUTO_TOLERANCE)
    if bool(hot.any()):
        rows = hot.nonzero()[:, 0]
        free = _plan_nearest(weight[rows], topology, options, generator, active_gpus,
                             source, "uncapped")
        peak_free = realised_gpu_loads(weight[rows], free, *args, check=False).amax(1)
        better = peak[rows] > peak_free * (1 + _AUTO_TOLERANCE)
        chosen[rows[better]] = free[better]
    return chosen


def keep_better_served(
    weight: torch.Tensor,
    planned: torch.Tensor,
    other: torch.Tensor,
    topology: Topology,
    source: torch.Tensor | None = None,
    active_gpus: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[L, R]``: per layer ``other`` where the nearest rule serves it with a busiest GPU
    more than 5 % lower than ``planned``'s, else ``planned``. The planner offers eplb's
    even-split plan this way (``fair="auto"``): with few experts per GPU the relabelling
    for the rule can cost more than it buys (``benchmarks/bench_nearest_few.py``:
    Mixtral's 8 experts on 16 GPUs in 2 nodes)."""
    args = (topology.num_gpus, topology.num_nodes, "nearest", source, active_gpus)
    peak = realised_gpu_loads(weight, planned, *args, check=False).amax(1)
    peak_other = realised_gpu_loads(weight, other, *args, check=False).amax(1)
    better = peak > peak_other * (1 + _AUTO_TOLERANCE)
    return torch.where(better[:, None], other, planned)


def _plan_nearest(
    weight: torch.Tensor,
    topology: Topology,
    options: PlanOptions,
    generator: torch.Generator,
    active_gpus: torch.Tensor | None,
    source: torch.Tensor | None,
    fair: str,
) -> torch.Tensor:
    """:func:`plan_nearest_global` for one of ``"avoid"``, ``"expect"`` and
    ``"uncapped"`` (Jefferson's counts, up to a replica per live GPU)."""
    num_layers, num_experts = weight.shape
    nodes = topology.num_nodes
    live = active_gpus
    if live is None:
        live = torch.ones(topology.num_gpus, dtype=torch.bool, device=weight.device)
    num_live = int(live.sum())
    slots = topology.slots_per_gpu
    if num_live * slots < num_experts:
        raise ValueError(f"{num_live} live GPUs hold {num_live * slots} slots, fewer than "
                         f"the {num_experts} experts")
    live_nodes = int(live.view(nodes, -1).any(1).sum()) if nodes > 1 else 1
    cap = max(live_nodes, -(-num_live * slots // num_experts))
    if fair == "uncapped":
        cap = num_live
    cover = live_nodes if fair == "avoid" and live_nodes > 1 else 0
    if cover and (num_live * slots - num_experts) > num_experts * (cover - 1):
        cover = 0  # more slots than one replica per node of every expert: cap instead
    if cover and (num_live * slots - num_experts) % (cover - 1) > num_experts:
        cover = 0  # more leftover replicas than experts (more nodes than experts): cap
    planned = plan_rows_capped(weight, num_live * slots, num_live, cap, options, generator,
                               coverage_nodes=cover)
    phy2log = torch.full((num_layers, topology.num_replicas), -1, dtype=torch.int64,
                         device=weight.device)
    phy2log[:, live.repeat_interleave(slots)] = planned
    if nodes > 1:
        # "avoid": a covering expert (c = live nodes) needs a replica on every node
        least = min(3, cover) if cover else 3
        phy2log, left = spread_over_nodes(phy2log, topology.num_gpus, nodes, num_experts, live,
                                          generator=generator, min_count=least)
        if bool((left > 0).any()):
            phy2log, _ = repair_node_pairs(weight, phy2log, topology.num_gpus, nodes,
                                           min_count=least)
    if active_gpus is not None or source is not None:
        phy2log = polish_realised(weight, phy2log, topology.num_gpus, nodes, live, source)
    return phy2log


def _tally(phy2log: torch.Tensor, unit_of_slot: torch.Tensor, units: int, num_experts: int
           ) -> torch.Tensor:
    """``[L, units, E + 1]`` replicas of every expert per unit (GPU or node)."""
    num_layers = phy2log.shape[0]
    expert = torch.where(phy2log >= 0, phy2log, num_experts)
    cnt = torch.zeros(num_layers, units * (num_experts + 1), dtype=torch.int64,
                      device=phy2log.device)
    cnt.scatter_add_(1, unit_of_slot[None] * (num_experts + 1) + expert, torch.ones_like(expert))
    return cnt.view(num_layers, units, num_experts + 1)


def repair_node_pairs(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    num_nodes: int,
    budget: torch.Tensor | None = None,
    max_swaps: int | None = None,
    min_count: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap replicas so that experts with ``c >= min_count`` have at most one replica per
    node.

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
    num_layers, num_slots = phy2log.shape
    num_experts = weight.shape[1]
    device = phy2log.device
    slots = num_slots // num_gpus
    gpus_per_node = num_gpus // num_nodes
    slot = torch.arange(num_slots, device=device)
    gpu_of_slot, node_of_slot = slot // slots, slot // (slots * gpus_per_node)
    rows = torch.arange(num_layers, device=device)
    out = phy2log.clone()
    done = torch.zeros(num_layers, dtype=torch.int64, device=device)
    w = torch.cat([weight.to(torch.float64), weight.new_zeros(num_layers, 1, dtype=torch.float64)
                   ], 1)
    steps = None if max_swaps is None else max_swaps
    while steps is None or steps > 0:
        expert = torch.where(out >= 0, out, num_experts)
        count = expert_counts(out, num_experts)
        count = torch.cat([count, count.new_zeros(num_layers, 1)], 1)
        node_cnt = _tally(out, node_of_slot, num_nodes, num_experts)  # [L, N, E+1]
        gpu_cnt = _tally(out, gpu_of_slot, num_gpus, num_experts)
        c = count.gather(1, expert)  # [L, R]
        here = node_cnt.gather(2, expert[:, None, :].expand(-1, num_nodes, -1))  # [L, N, R]
        on_node = here.gather(1, node_of_slot[None, None].expand(num_layers, 1, -1))[:, 0]
        # the later replica of a pair on one node is the one to move
        bad = (c >= min_count) & (on_node >= 2) & (out >= 0)
        if budget is not None:
            bad &= (budget - 2 * done >= 2)[:, None]
        has = bad.any(1)
        if not bool(has.any()):
            break
        s = torch.where(has, bad.to(torch.int64).argmax(1), 0)  # [L] slot to move
        e = expert[rows, s]
        g, n = gpu_of_slot[s], node_of_slot[s]
        per = w / count.clamp(min=1)  # [L, E+1] even-split replica load
        load = per.gather(1, expert).view(num_layers, num_gpus, slots).sum(2)  # [L, P]
        x_e = per[rows, e]
        x_f = per.gather(1, expert)  # [L, R] load of every candidate partner
        # partner t: on another node without e, live, its expert f stays valid on node n
        no_e_there = node_cnt[rows, :, e].gather(1, node_of_slot[None].expand(num_layers, -1)) == 0
        f_at_n = node_cnt[rows, n].gather(1, expert)  # [L, R] replicas of f on node n
        f_at_g = gpu_cnt[rows, g].gather(1, expert)
        ok = no_e_there & (out >= 0) & (f_at_g == 0) & ((c < min_count) | (f_at_n == 0))
        ok &= node_of_slot[None] != n[:, None]
        new_g = load[rows, g][:, None] - x_e[:, None] + x_f
        new_h = load.gather(1, gpu_of_slot[None].expand(num_layers, -1)) - x_f + x_e[:, None]
        score = torch.maximum(new_g, new_h) + 1e-9 * (x_f - x_e[:, None]).abs()
        score = torch.where(ok, score, torch.full_like(score, float("inf")))
        best, t = score.min(1)
        apply = has & best.isfinite()
        if not bool(apply.any()):
            break
        r = rows[apply]
        fe, te = out[r, s[apply]].clone(), out[r, t[apply]].clone()
        out[r, s[apply]], out[r, t[apply]] = te, fe
        done += apply.to(torch.int64)
        if steps is not None:
            steps -= 1
    return out, done


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
    for _ in range(2 * num_gpus if steps is None else steps):
        load = x.view(num_layers, num_gpus, slots).sum(2)
        load = torch.where(live, load, torch.full_like(load, -1.0))
        u = load.argmax(1)  # [L] heaviest live GPU
        expert = torch.where(out >= 0, out, num_experts)
        single = (expert_counts(out, num_experts) == 1)
        single = torch.cat([single, single.new_zeros(num_layers, 1)], 1).gather(1, expert)
        gpu_cnt = _tally(out, gpu_of_slot, num_gpus, num_experts)  # [L, P, E+1]
        mine = u[:, None] * slots + torch.arange(slots, device=device)  # [L, S] slots on u
        xi = x.gather(1, mine)  # [L, S]
        ei = expert.gather(1, mine)
        same_node = node_of_slot[None] == (u // per_node)[:, None]  # [L, R]
        movable = same_node[:, None, :] | (single.gather(1, mine)[:, :, None] & single[:, None, :])
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
    return out
