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
   (:func:`eplb.core.node_labels.spread_over_nodes`, then
   :func:`eplb.core.node_repair.repair_node_pairs` for what it leaves): GPU loads
   under the even split are unchanged by a relabelling, and on a valid labelling the
   nearest rule realises exactly them;
4. with dead GPUs or a given token source, where replicas on distinct nodes no longer
   split evenly, polishes the realised loads (:func:`eplb.core.node_repair.polish_realised`).

An expert with more replicas than nodes cannot have them on distinct nodes: it splits
evenly only with all of them on one node, or on whole nodes. Where such experts exist
(Jefferson's counts uncapped for a hot expert, or more than ``N`` replicas per expert on
average, e.g. two nodes), a second plan keeps them together (:func:`node_attraction`;
:func:`whole_node_counts`; :func:`eplb.core.node_repair.gather_together`) and each layer
keeps whichever the rule serves better.

Two replicas split evenly in expectation whether they share a node or not, so under
``"expect"`` only experts with ``c >= 3`` constrain the labelling; under ``"avoid"`` the
covering experts (``c = N``) do. :func:`plan_nearest_incremental` re-plans from the map in
force within a move budget. Everything is a function over ``[L, ...]`` tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.dispatch import realised_gpu_loads
from eplb.core.map_tables import expert_counts
from eplb.core.node_labels import spread_over_nodes
from eplb.core.node_repair import gather_together, polish_realised, repair_node_pairs
from eplb.core.options import PlanOptions
from eplb.core.packing import make_items, max_load, pack, to_slots
from eplb.core.replication import (
    cap_counts,
    expand_replicas,
    repeated_allocations,
    replica_counts,
)
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


def divisor_counts(weight: torch.Tensor, num_replicas: int, num_gpus: int) -> torch.Tensor:
    """``[rows, E]`` replica counts that divide ``num_gpus`` (one node, SGLang's runtime table).

    At a runtime rebalance SGLang builds one static table from one random stream: the
    ranks holding a replica of an expert serve their own tokens of it, and the ``P − c``
    others are dealt over its ``c`` replicas as evenly as they divide, the remainder
    ``(P − c) mod c = P mod c`` to replicas drawn at random. With ``c`` dividing ``P``
    (on ``c`` distinct GPUs) nothing is left to draw: every replica serves ``P / c``
    ranks, exactly the even split's ``w / c``. A count that does not divide ``P`` gives
    some replicas a rank more than others (``c = 3`` on 32 GPUs: 11, 11 and 10 ranks'
    tokens against 10.67), and the random ones land where the plan did not expect them:
    eplb's even split, 0.9997 in its model, was served at 0.980–0.991 by SGLang's
    runtime table on real DeepSeek-V3 loads (BENCHMARKS.md §14, forty-fifth session).

    Jefferson's rule over the divisors: the expert with the largest load per replica
    goes up to the next divisor where the slots left allow it (else the next such
    expert), until no step fits. Slots still left (only where every step to the next
    divisor is wider than what is left: from one replica with an odd ``P``, or e.g.
    2 → 5 on 10 GPUs with two slots left) go one each to the experts with the least
    load per replica, which move next to nothing by their draw. Raises ``ValueError``
    if ``R > E · P``.
    """
    rows, num_experts = weight.shape
    extra = num_replicas - num_experts
    if extra > num_experts * (num_gpus - 1):
        raise ValueError(f"{num_replicas} slots exceed {num_gpus} replicas of each of "
                         f"{num_experts} experts")
    divisors = [d for d in range(1, num_gpus + 1) if num_gpus % d == 0]
    # next divisor above each count (0: none above); counts index it. On the host in
    # NumPy: a short loop of small array calls (2.7x faster than in torch at DeepSeek-V3's
    # shape, the same counts)
    above = np.zeros(num_gpus + 1, np.int64)
    above[divisors[:-1]] = divisors[1:]
    w = weight.detach().cpu().to(torch.float64).numpy()
    counts = np.ones((rows, num_experts), np.int64)
    left = np.full(rows, extra, np.int64)
    row = np.arange(rows)
    # each step raises one expert per row, by at least one slot: at most R − E steps
    for _ in range(max(extra, 0)):
        target = above[counts]
        fits = (target > 0) & (target - counts <= left[:, None])
        priority = np.where(fits, w / counts, -np.inf)
        expert = priority.argmax(1)  # the first among ties
        going = (left > 0) & (priority[row, expert] > -np.inf)
        if not going.any():
            break
        raised, at = row[going], expert[going]
        left[raised] -= target[raised, at] - counts[raised, at]
        counts[raised, at] = target[raised, at]
    while (left > 0).any():
        # the slots no divisor step fits: one each to the least loaded per replica below
        # a replica per GPU, round after round where they outnumber those experts (an
        # attacker pass: 2 experts on 5 GPUs × 1 slot, or 3 on 7 × 2, got counts summing
        # below R or above P, and the packing raised)
        open_ = counts < num_gpus
        room = np.where(open_, w / counts, np.inf)
        rank = room.argsort(1, kind="stable").argsort(1, kind="stable")
        step = ((rank < left[:, None]) & open_).astype(np.int64)
        counts = counts + step
        left = left - step.sum(1)
    return torch.from_numpy(counts).to(weight.device)


def whole_node_counts(
    weight: torch.Tensor, counts: torch.Tensor, gpus_per_node: int, num_nodes: int
) -> torch.Tensor:
    """``counts [K, rows, E]`` with every count above ``gpus_per_node`` rounded to whole
    nodes (a multiple of it, at most ``num_nodes`` nodes), the other experts giving or
    taking the difference one replica at a time: the next replica to the expert with the
    largest load per replica, a replica back from the one whose load per replica stays
    smallest without it. Rows that cannot settle the difference keep their counts.

    Why: under the nearest rule replicas on a node that holds some but not all of an
    expert's replicas serve unevenly (:func:`node_attraction`), so an expert with more
    replicas than a node has GPUs splits evenly only on whole nodes.
    """
    big = counts > gpus_per_node
    if not bool(big.any()):
        return counts
    shape = counts.shape
    flat = counts.reshape(-1, shape[-1]).clone()
    big = big.reshape(flat.shape)
    w = weight.to(torch.float64).repeat(shape[0], 1)
    nodes = torch.div(flat + gpus_per_node // 2, gpus_per_node, rounding_mode="floor")
    target = torch.where(big, nodes.clamp(1, num_nodes) * gpus_per_node, flat)
    owed = (target - flat).sum(1)  # > 0: the others give back; < 0: they take more
    out = target
    inf = torch.full_like(w, float("inf"))
    for _ in range(int(owed.abs().max())):
        giving, taking = owed > 0, owed < 0
        if not bool((giving | taking).any()):
            break
        # give back: the smallest w / (c − 1) among experts with c >= 2 (not rounded)
        back = torch.where(~big & (out >= 2), w / (out - 1).clamp(min=1), inf).argmin(1)
        # take more: the largest w / c among experts not rounded, up to one per GPU
        more = torch.where(~big & (out < gpus_per_node * num_nodes), w / out, -inf).argmax(1)
        rows = torch.arange(len(out), device=out.device)
        out[rows[giving], back[giving]] -= 1
        out[rows[taking], more[taking]] += 1
        owed = owed - giving.to(owed.dtype) + taking.to(owed.dtype)
    settled = (out >= 1).all(1) & (out.sum(1) == flat.sum(1))
    out = torch.where(settled[:, None], out, flat)
    return out.view(shape)


def plan_rows_capped(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    cap: int,
    options: PlanOptions,
    generator: torch.Generator | None = None,
    coverage_nodes: int = 0,
    node_size: int = 0,
    divide: bool = False,
) -> torch.Tensor:
    """``plan_rows`` of :mod:`eplb.core.policies.base` with replica counts capped at ``cap``.

    ``coverage_nodes > 0`` uses :func:`coverage_counts` for that many nodes instead;
    ``divide`` :func:`divisor_counts` of ``num_gpus``;
    ``node_size > 0`` (GPUs per node) rounds counts above it to whole nodes
    (:func:`whole_node_counts`).

    Every distinct allocation of the portfolio is packed, and each row keeps its lowest
    peak (the earlier rule on ties); ``[rows, E]`` → ``[rows, R]`` expert per slot.
    """
    rows = weight.shape[0]
    zero = weight.sum(1, keepdim=True) <= 0
    weight = torch.where(zero, torch.ones_like(weight), weight)
    rules = options.rules
    if coverage_nodes:
        counts = coverage_counts(weight, num_replicas, coverage_nodes)[None]
    elif divide:
        counts = divisor_counts(weight, num_replicas, num_gpus)[None]
    else:
        counts = capped_counts(weight, num_replicas, cap, rules)  # [K, rows, E]
        if node_size:
            counts = whole_node_counts(weight, counts, node_size, num_gpus // node_size)
    # every row packs every allocation of the portfolio that differs from the earlier
    # rules' (a repeat packs alike: rows are independent, so it would only tie, and ties
    # keep the earlier rule). Packing them only where some row was coarse made a row's
    # plan depend on the other rows of the call, and packing them everywhere measured
    # no worse (BENCHMARKS.md §14, twenty-fifth session)
    rule_of, row_of = (~repeated_allocations(counts)).nonzero().unbind(1)  # [m] rule-major
    flat_counts = counts[rule_of, row_of]  # [m, E]
    load, expert = expand_replicas(weight.index_select(0, row_of), flat_counts)
    state = pack(make_items(load, expert), num_gpus, options.packing,
                 flat_counts.amax(1) > num_gpus, generator)
    if len(row_of) > rows:
        peak = max_load(state)  # [m]
        best = torch.full((rows,), float("inf"), dtype=peak.dtype, device=peak.device)
        best = best.scatter_reduce(0, row_of, peak, "amin")
        # the first (by rule) packing at each row's lowest peak: Jefferson's on ties
        position = torch.arange(len(row_of), device=peak.device)
        at_best = torch.where(peak == best[row_of], position, len(row_of))
        pick = torch.full((rows,), len(row_of), device=peak.device).scatter_reduce(
            0, row_of, at_best, "amin")
        state = state.index_select(2, pick)
    return to_slots(state)


#: the most ``P · R² / E`` (GPUs × all slots × replicas per expert) the global
#: nearest-dispatch plan relabels over several nodes: where the greedy start leaves
#: conflicts (experts with more replicas than fit apart) its search makes one swap per step
#: over every GPU pair, up to about P/3 steps of P² cells per layer and start, so time grows
#: about as L·P³ and with the replicas per expert. Per layer, one core
#: (``benchmarks/bench_nearest_scale.py``, BENCHMARKS.md §14): DeepSeek-V3's 256 experts at
#: 512 GPUs × 4 slots (8.4e6) 2 s on the real loads, at 1024 × 2 (1.7e7, the limit) 3.7 s,
#: at 512 × 8 (3.4e7) 4–7 s, at 1024 × 4 (6.7e7) 36 s; 2048 experts at 512 × 8 (4.2e6) 2.6 s
MAX_NEAREST_WORK = 1 << 24


def nearest_work(num_gpus: int, slots_per_gpu: int, num_experts: int) -> int:
    """``P · R² / E``, what the global nearest plan's relabelling costs grow with (see
    :data:`MAX_NEAREST_WORK`; SGLang's hook bounds it lower for its automatic choice)."""
    replicas = num_gpus * slots_per_gpu
    return num_gpus * replicas * replicas // max(1, num_experts)


#: the most ``L · P³ · E`` (layers × GPUs³ × experts) the global nearest-dispatch plan
#: takes on over several nodes: :data:`MAX_NEAREST_WORK` bounds one layer's relabelling by
#: the replicas per expert, and this bounds the whole call, whose time grows with the
#: layers, the cube of the GPUs and the experts (one core, one layer: 1024 GPUs × 2 slots
#: with 256 experts 3.7 s, with 1024 experts 18 s; 2048 × 2 with 2048 experts 266 s,
#: attacker pass, thirty-eighth session). The limit is the largest call measured, 58
#: DeepSeek-V3 layers on 1024 GPUs (about 3.6 minutes, :data:`NEAREST_TIMES`). Slots per
#: GPU are left to :data:`MAX_NEAREST_WORK`, which bounds them with the replicas per expert
_CALL_LIMIT_CASE = (58, 1024, 256)  # layers, GPUs, experts
MAX_NEAREST_CALL_WORK = _CALL_LIMIT_CASE[0] * _CALL_LIMIT_CASE[1] ** 3 * _CALL_LIMIT_CASE[2]


def nearest_size_problem(num_gpus: int, slots_per_gpu: int, num_experts: int,
                         num_layers: int) -> str | None:
    """Why a global plan for the nearest dispatch over several nodes is beyond what eplb
    plans (:data:`MAX_NEAREST_WORK`, :data:`MAX_NEAREST_CALL_WORK`), or ``None``."""
    work = nearest_work(num_gpus, slots_per_gpu, num_experts)
    if work > MAX_NEAREST_WORK:
        return (f"{num_gpus} GPUs with {slots_per_gpu} slot{'s' * (slots_per_gpu > 1)} each "
                f"for {num_experts} experts (GPUs × all slots × replicas per expert "
                f"{work:,}) is more than it plans for ({MAX_NEAREST_WORK:,})")
    call = num_layers * num_gpus**3 * num_experts
    if call > MAX_NEAREST_CALL_WORK:
        return (f"{num_layers} layer{'s' * (num_layers != 1)} of {num_experts} experts on "
                f"{num_gpus} GPUs (layers × GPUs³ × experts {call:,}) is more than it plans "
                f"for ({MAX_NEAREST_CALL_WORK:,}: {_CALL_LIMIT_CASE[0]} layers of "
                f"{_CALL_LIMIT_CASE[2]} experts on {_CALL_LIMIT_CASE[1]:,} GPUs)")
    return None


#: what the size limit costs, for the messages that name it
NEAREST_TIMES = ("58 real DeepSeek-V3 layers take about 2 minutes on 512 GPUs × 4 slots, "
                 "3.6 on 1024 × 2 and 4–7 on 512 × 8, on one core")


FAIR_MODES = ("auto", "avoid", "expect", "divide")
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
            one or two covering experts). ``"divide"`` (one node): counts that divide the
            GPUs (:func:`divisor_counts`), which SGLang's runtime table splits exactly.

    Steps: counts, eplb's global packing over the live GPUs, :func:`spread_over_nodes`
    (with ``repair_node_pairs`` for what it leaves, or ``gather_together`` where experts
    are kept together, :mod:`eplb.core.node_repair`), and with dead GPUs or a given
    source ``polish_realised``.
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
    # layers whose hottest expert, at the capped count, outweighs a GPU's mean load, or
    # whose capped plans the rule serves more than 5 % above it (two nodes with three
    # replicas per expert: 0.64, where Jefferson's counts on whole nodes serve 0.85)
    mean = weight.sum(1) / live
    hot = (weight.amax(1) > mean * cap * (1 + _AUTO_TOLERANCE)) | (
        peak > mean * (1 + _AUTO_TOLERANCE))
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


#: a layer whose plan for the rule is served more than this above its mean GPU load also
#: gets a plan keeping together the experts with more replicas than nodes. 1 % served the
#: random one-hot family of ``benchmarks/bench_nearest_hot.py`` 0.0001-0.0011 better on
#: average (one case fewer below the greedy), but planned a useless second plan for
#: uniform layers on large clusters of few nodes (58 layers, 512 slots on 256 GPUs in 2
#: nodes, served 0.976 either way: 3.8 s against 0.8 s; attacker pass)
_TOGETHER_GAP = _AUTO_TOLERANCE


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
    ``"uncapped"`` (Jefferson's counts, up to a replica per live GPU).

    Where some expert has more replicas than there are nodes, a second plan keeps such
    experts together (:func:`node_attraction`; with ``"uncapped"`` its counts on whole
    nodes), and each layer keeps the plan the rule serves with the lower busiest GPU
    (ties: the first). Kept together they split evenly where the labelling manages it;
    where many experts need it at once it cannot (``tests/test_dispatch_together.py``:
    128 experts with 4.5 replicas each on 4 nodes), hence both."""
    # the second plan draws its random starts from a copy of the stream: the first plan,
    # and every later one, draw what they drew without it
    fork = torch.Generator(device=generator.device).set_state(generator.get_state())
    apart = _plan_nodes(weight, topology, options, generator, active_gpus, source, fair,
                        together=False)
    nodes = topology.num_nodes
    if nodes == 1:
        return apart
    live = active_gpus
    live_nodes = nodes if live is None else int(live.view(nodes, -1).any(1).sum())
    attract = node_attraction(apart, live_nodes, weight.shape[1])
    if fair != "uncapped" and attract is None:
        return apart
    # only layers the rule serves more than _TOGETHER_GAP above the mean GPU load (the
    # second plan's labelling searches every GPU pair: at 256 GPUs it cost more than the
    # first)
    args = (topology.num_gpus, nodes, "nearest", source, active_gpus)
    peak = realised_gpu_loads(weight, apart, *args, check=False).amax(1)
    num_live = topology.num_gpus if live is None else int(live.sum())
    far = peak > weight.sum(1) / num_live * (1 + _TOGETHER_GAP)
    if attract is not None and fair != "uncapped":
        far &= attract.any(1)
    rows = far.nonzero()[:, 0]
    if not len(rows):
        return apart
    together = _plan_nodes(weight[rows], topology, options, fork, active_gpus, source, fair,
                           together=True)
    lower = realised_gpu_loads(weight[rows], together, *args, check=False).amax(1) < peak[rows]
    out = apart.clone()
    out[rows[lower]] = together[lower]
    return out


def _plan_nodes(
    weight: torch.Tensor,
    topology: Topology,
    options: PlanOptions,
    generator: torch.Generator,
    active_gpus: torch.Tensor | None,
    source: torch.Tensor | None,
    fair: str,
    together: bool,
) -> torch.Tensor:
    """One plan of :func:`_plan_nearest`: counts, packing, labelling (``together``: with
    experts of more replicas than nodes kept together, and on whole nodes under
    ``"uncapped"``), repair, polish."""
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
    # "avoid" covers every node, or on one node every live GPU: there each rank without a
    # replica on its GPU takes SGLang's random fair choice, which an --init-expert-location
    # file draws per rank (0.905-0.947 where the even split's model reads 1.0; a replica on
    # every GPU of the hot experts realised 0.968-0.999: BENCHMARKS.md §14)
    cover = (live_nodes if nodes > 1 else num_live) if fair == "avoid" else 0
    cover = cover if cover > 1 else 0
    if cover and (num_live * slots - num_experts) > num_experts * (cover - 1):
        cover = 0  # more slots than one replica per node of every expert: cap instead
    if cover and sum(divmod(num_live * slots - num_experts, cover - 1)) > num_experts:
        # the leftover replicas would reach the covering experts (on one node P + 1 on P
        # GPUs: two on one; review pass), or outnumber the experts: cap
        cover = 0
    # Jefferson's counts uncapped, kept together: on whole nodes where an expert outgrows
    # one (equal nodes only: with dead GPUs a node's live GPUs vary)
    whole = topology.gpus_per_node if (together and fair == "uncapped" and nodes > 1
                                       and num_live == topology.num_gpus) else 0
    planned = plan_rows_capped(weight, num_live * slots, num_live, cap, options, generator,
                               coverage_nodes=cover, node_size=whole,
                               # (an expert on every GPU and more: nothing to divide)
                               divide=fair == "divide" and nodes == 1
                               and slots < num_experts)
    phy2log = torch.full((num_layers, topology.num_replicas), -1, dtype=torch.int64,
                         device=weight.device)
    phy2log[:, live.repeat_interleave(slots)] = planned
    if nodes > 1:
        # "avoid": a covering expert (c = live nodes) needs a replica on every node
        least = min(3, cover) if cover else 3
        attract = node_attraction(phy2log, live_nodes, num_experts) if together else None
        phy2log, _ = spread_over_nodes(phy2log, topology.num_gpus, nodes, num_experts, live,
                                       generator=generator, min_count=least,
                                       attract=attract)
        # every layer, whatever the labelling left elsewhere: a layer's plan does not
        # depend on the other layers in the call (the repair's own conflicts may remain
        # where the labelling counts none)
        phy2log, _ = repair_node_pairs(weight, phy2log, topology.num_gpus, nodes,
                                       min_count=least, keep_together=together)
        if attract is not None:
            # the labelling moves whole GPUs; single replicas it left off their node move
            # home one by one
            phy2log, _ = gather_together(weight, phy2log, topology.num_gpus, nodes, attract)
    if active_gpus is not None or source is not None:
        phy2log = polish_realised(weight, phy2log, topology.num_gpus, nodes, live, source)
    return phy2log


def node_attraction(phy2log: torch.Tensor, num_nodes: int, num_experts: int
                    ) -> torch.Tensor | None:
    """``[L, E]`` bool: experts with more replicas than nodes, ``None`` where there are none.

    Such replicas cannot sit on distinct nodes, and a node holding some but not all of
    them sends its other GPUs' tokens to its *first* one (one hot expert with 22 replicas
    spread 6/6/5/5 over 4 nodes of 8 GPUs served 0.63). Kept together they split evenly
    in expectation: all on one node (every other rank takes the fair choice), or filling
    whole nodes (each covered GPU serves itself, the rest take the fair choice):
    ``1/P + (P − c)/(P·c) = 1/c`` each. The labelling therefore pulls them together
    (:func:`eplb.core.node_labels.node_conflicts`)."""
    attract = expert_counts(phy2log, num_experts) > num_nodes
    return attract if bool(attract.any()) else None
