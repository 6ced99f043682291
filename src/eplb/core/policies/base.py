"""The policy interface, and the step every policy is built from.

:class:`PlacementPolicy` is the interface (register a subclass in
:data:`eplb.core.policies.POLICIES` to add one). :func:`plan_rows` solves a batch of
independent global problems ("rows": layers, or layers × nodes): a portfolio of replica
allocations (:mod:`eplb.core.replication`), each scored by a cheap packing, then the best
one packed with randomised starts and swap refinement (:mod:`eplb.core.packing`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar

import numpy as np
import torch

from eplb.core.count_bounds import bound_is_mean, packing_bound, rank_allocations
from eplb.core.count_fillers import (
    filler_counts,
    hot_counts,
    ladder_counts,
    layer_bound,
    layer_counts,
)
from eplb.core.inputs import uniform_where_empty
from eplb.core.options import (
    FEW_SLOT_SHIFTS,
    FEW_SLOTS,
    LADDER_GAP,
    LADDER_MAX_GPUS,
    LADDER_RUNGS,
    SECOND_LOOK_GAP,
    PackingOptions,
    PlanOptions,
)
from eplb.core.packing import make_items, max_load, pack, to_slots
from eplb.core.replication import (
    cap_counts,
    expand_replicas,
    repeated_allocations,
    replica_bound,
    replica_counts,
    replica_items,
)
from eplb.core.request import PlanRequest
from eplb.core.small_slots import plan_one_slot, plan_two_slots
from eplb.core.tiny_counts import (
    TINY_EXPERTS,
    TINY_GAP,
    TINY_MAX_WORK,
    best_neighbours,
    tiny_look_work,
)


def plan_rows(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    options: PlanOptions,
    generator: torch.Generator | None = None,
    floor: torch.Tensor | None = None,
    idle: torch.Tensor | None = None,
    count_search: bool = True,
) -> torch.Tensor:
    """Solve ``rows`` independent global problems.

    Args:
        weight: ``[rows, E]`` non-negative loads, float64 (a request's: the shortcut for
            rows whose Jefferson bound is the mean relies on exact means).
        num_replicas: ``R >= E`` slots per row, a multiple of ``num_gpus``.
        floor: ``[rows]`` max GPU load that needs no improving (e.g. the bound of the
            row's layer when rows are nodes of one layer): rows packed at or below it
            skip the swap search.
        idle: ``[rows]`` bool, the rows that carried no load (a request's idle layers,
            planned as uniform loads, ``PlanRequest.idle``): their replicas are spread
            evenly, as those of all-zero rows are. ``None``: no such rows.
        count_search: where a row of few slots (or of 2-4 GPUs) packs far above its
            bound, also pack other replica counts (:func:`_second_look`,
            :func:`_filler_ladder`). ``False`` for a plan that GPU speeds refine next:
            those counts are chosen for equal GPUs, and with speeds their fewer, larger
            hot replicas served 0.76 where Jefferson's served 0.91 (attacker pass).

    Returns:
        ``[rows, R]`` logical expert per slot; slot ``s`` is on GPU ``s // (R / P)``.
    """
    rows, num_experts = weight.shape
    zero = weight.sum(1) <= 0  # e.g. a node whose experts saw no tokens
    if bool(zero.any()):  # (a request's layers never are: skip the copy)
        weight = uniform_where_empty(weight, zero)
    weight, floor = _unit_scale_tiny_rows(weight, floor)
    if num_replicas >= num_experts * num_gpus:
        # a GPU has a slot for every expert: the balance is perfect (see the function).
        # Idle rows keep the even counts below instead (the contract spreads a layer
        # without load evenly; perfect balance needs counts that are multiples of P).
        # Rows of real equal loads are not idle: [5, 5, 5] on 4 GPUs of 7 slots was
        # packed at 3.78 with the even counts 10/9/9, where the mean is 3.75
        even = zero if idle is None else zero | idle.to(zero.device)
        if num_gpus == 1:
            # one GPU holds everything: any counts balance it, and a row without load
            # (uniform here) gets even ones from Jefferson's rule, without the packing's
            # S² search (a 327,680-slot idle row took a minute: attacker pass)
            return _every_expert_on_every_gpu(weight, num_replicas, num_gpus)
        if not bool(even.all()):
            out = _every_expert_on_every_gpu(weight, num_replicas, num_gpus)
            if bool(even.any()):
                rows_even = even.nonzero()[:, 0]
                out[rows_even] = plan_rows(
                    weight[rows_even], num_replicas, num_gpus, options, generator,
                    None if floor is None else floor[rows_even], idle=even[rows_even])
            return out
    # one or two slots per GPU have dedicated planners
    if num_replicas == num_gpus:
        return plan_one_slot(weight, num_replicas)
    if num_replicas == 2 * num_gpus:
        return plan_two_slots(weight, num_replicas, options.packing.two_slot_iterations())
    rules = options.rules
    # [rows, E]; no expert above one replica per GPU (cap_counts: more only stack)
    counts = cap_counts(weight, replica_counts(weight, num_replicas, rules[:1])[0], num_gpus)
    # the portfolio only matters where replicas are coarse next to a GPU's mean load;
    # elsewhere every allocation packs alike and the first rule's (Jefferson's) is kept
    extra = torch.empty(0, dtype=torch.int64)
    # pack only the allocations with the smallest packing bound per row (one by default
    # where a GPU has few slots; every one of them elsewhere)
    keep = options.packed_allocations
    if keep is None and num_replicas <= FEW_SLOTS * num_gpus:
        keep = 1
    if len(rules) > 1:
        largest = (weight / counts).amax(1)
        cut = options.portfolio_cut(each_packed=keep != 1)
        extra = (largest > cut * weight.sum(1) / num_gpus).nonzero()[:, 0]
    first = None  # every row's items under the first rule, where expanded early
    if len(extra) and keep == 1:
        # the bound picks Jefferson's allocation wherever its bound is the mean GPU load
        # (no allocation's is lower; ties keep Jefferson's): those rows need no other
        # allocation. On real DeepSeek-V3 loads at S = 3 that is 272 of 290 coarse rows.
        # (float64 loads: in float32 the allocations' means differ by rounding, ~1e-7,
        # above rank_allocations' tie tolerance, and the pick would follow it)
        # Every row is expanded here, once: the expansion is row by row, so these are
        # the items the packing needs for the first rule too
        first = expand_replicas(weight, counts)
        extra = extra[~bound_is_mean(first[0].index_select(0, extra), num_gpus)]
    weight_all = weight
    if floor is not None:
        # in item units: make_items scales every row to a mean replica load of 1
        floor = torch.where(zero, 0.0, floor * num_replicas / weight.sum(1))
    if len(extra):
        coarse = weight.index_select(0, extra)
        others = cap_counts(coarse, replica_counts(coarse, num_replicas, rules[1:]), num_gpus)
        # a row whose every rule gives the first rule's counts has one allocation to pack,
        # not len(rules) copies of it (every expert once, R = E, is such a row: 58 layers
        # on 32 GPUs packed 4 copies; the copies pack alike, and the first wins a tie)
        distinct = (others != counts.index_select(0, extra)[None]).any(2).any(0)
        if not bool(distinct.all()):
            extra, coarse, others = extra[distinct], coarse[distinct], others[:, distinct]
    if len(extra):
        # rows × the first rule, then the coarse rows × every other rule (index_select and
        # a broadcast copy: advanced indexing and ``repeat`` cost several times more here)
        counts = torch.cat([counts, others.reshape(-1, num_experts)])
        weight_all = torch.cat(
            [weight, coarse.expand(len(rules) - 1, -1, -1).reshape(-1, num_experts)])
        if floor is not None:
            floor = torch.cat([floor, floor[extra].repeat(len(rules) - 1)])
    if first is None:
        load, expert = expand_replicas(weight_all, counts)
    elif len(extra):  # the other rules' rows after the first rule's
        others = expand_replicas(weight_all[rows:], counts[rows:])
        load, expert = (torch.cat([a, b]) for a, b in zip(first, others, strict=True))
    else:
        load, expert = first
    num_alloc = len(rules)
    if len(extra) and keep is not None:
        device = weight.device
        others = torch.arange((num_alloc - 1) * len(extra), device=device)
        groups = torch.cat([extra[None], rows + others.view(num_alloc - 1, -1)])
        groups = rank_allocations(load, num_gpus, groups, keep)
        num_alloc = groups.shape[0]
        used = torch.arange(rows, device=device).index_put((extra,), groups[0])
        used = torch.cat([used, groups[1:].reshape(-1)])
        load, expert, counts = load[used], expert[used], counts[used]
        if floor is not None:
            floor = floor[used]
        if num_alloc == 1:
            extra = extra[:0]  # one allocation left per row: nothing to choose after packing
    items = make_items(load, expert)  # [2, rows', R]; rows of one layer share a scale
    allow_shared = counts.amax(1) > num_gpus
    # the replica packing resolves the automatic number of starts (more where GPUs hold
    # few slots), whether the first start is perturbed too, and how much; pack() itself
    # takes one exact start unless told
    slots = num_replicas // num_gpus
    packing = replace(options.packing,
                      num_candidates=options.packing.candidates_for(slots, num_gpus),
                      perturb_first=options.packing.perturbs_first(slots),
                      noise=options.packing.noise_for(slots))
    state = pack(items, num_gpus, packing, allow_shared, generator, floor=floor)
    if count_search and keep == 1 and options.packed_allocations is None and len(rules) > 1:
        # few slots: the bound picked one allocation per row; where its packing ends far
        # above that bound the bound did not see what packs well, so pack the others too
        state = _second_look(weight, num_replicas, num_gpus, rules, counts, items, state,
                             packing, generator, floor)
    if len(extra):
        # keep, per coarse row, the allocation whose refined packing has the smallest peak
        peak = max_load(state)
        candidates = torch.cat(
            [peak.index_select(0, extra)[None], peak[rows:].view(num_alloc - 1, -1)])
        best = candidates.min(0).indices  # first on ties: Jefferson
        choice = torch.where(
            best == 0,
            extra,
            rows + (best - 1) * len(extra) + torch.arange(len(extra), device=weight.device),
        )
        pick = torch.arange(rows, device=weight.device).index_put((extra,), choice)
        state = state.index_select(2, pick)
        counts = counts.index_select(0, pick)
    if count_search and len(rules) > 1:
        state = _filler_look(weight, num_replicas, num_gpus, counts[:rows], state, packing,
                             generator, None if floor is None else floor[:rows])
    if (count_search and 1 < num_gpus <= LADDER_MAX_GPUS
            and num_replicas < num_gpus * num_experts and len(rules) > 1):
        # rows of few GPUs: the counts decide the fit, so try more of them (one GPU: nothing
        # to balance; a slot per expert on every GPU: no count fits better; one rule
        # asked: its counts are kept, as the portfolio is)
        state = _filler_ladder(weight, num_replicas, num_gpus, state, packing, generator,
                               None if floor is None else floor[:rows])
    if (count_search and num_experts <= TINY_EXPERTS and num_gpus > 1
            and num_experts < num_replicas < num_gpus * num_experts and len(rules) > 1
            and tiny_look_work(num_experts, num_replicas, num_gpus) <= TINY_MAX_WORK):
        # (every expert once: no other counts; a slot per expert on every GPU: no need;
        # a row whose greedy packings would take seconds: not looked at)
        state = _tiny_count_look(weight, num_replicas, num_gpus, rules, state, packing,
                                 generator, None if floor is None else floor[:rows])
    return to_slots(state)


#: rows whose largest load is below this are scaled up by a power of two first
_TINY_ROW = 2.0**-500


def _unit_scale_tiny_rows(
    weight: torch.Tensor, floor: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight [rows, E]`` (and ``floor [rows]`` alike) with every row whose largest load
    is below :data:`_TINY_ROW` scaled by a power of two to a largest load in ``[1, 2)``.

    A request's layers are scaled so already (:func:`eplb.core.inputs.planning_rows`), but
    a hierarchical node of a layer whose other nodes are 1e300 times hotter keeps loads
    that are subnormal: their sums and quotients lose exactness, and Hamilton's counts came
    out 5 replicas short of the slots, an internal reshape error (attacker pass). A power
    of two changes no ratio, so rows above the threshold are left as they are (bit for
    bit) and scaled rows plan as the same loads would at a normal scale.
    """
    tiny = weight.amax(1) < _TINY_ROW
    if not bool(tiny.any()):
        return weight, floor
    # as scale_rows_to_unit, with integer exponents (exact up to 2**1074, where a float
    # exponent would overflow 2**shift), on the tiny rows only
    _, exponent = torch.frexp(weight.amax(1))
    shift = torch.where(tiny, 1 - exponent, 0)
    weight = torch.ldexp(weight, shift[:, None])
    if floor is not None:  # in the row's units (a floor of inf stays inf)
        floor = torch.ldexp(floor.to(weight.dtype), shift)
    return weight, floor


def _second_look(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    rules: tuple[float | str, ...],
    counts: torch.Tensor,
    items: torch.Tensor,
    state: torch.Tensor,
    packing: PackingOptions,
    generator: torch.Generator | None,
    floor: torch.Tensor | None,
) -> torch.Tensor:
    """``state [2, S, rows, P]`` with, in the rows packed far above their bound, the best
    packing of every allocation of the portfolio, of :data:`FEW_SLOT_SHIFTS` and of
    :func:`filler_counts` (each packed once, ties keep the packing already there).

    With few slots per GPU the packing bound (:func:`packing_bound`) ranks allocations
    well only where it is tight. Under heavy skew or many idle experts it is often just
    the mean GPU load for every allocation, while Jefferson's counts pack far worse than
    others: too many replicas above half a GPU's mean load, so pairs of them share GPUs
    (DeepSeek's greedy stacks two replicas of one expert on a GPU instead, which eplb
    may not, and beat eplb on such layers). A packing that ends within
    :data:`SECOND_LOOK_GAP` of its allocation's bound cannot be beaten by more than that,
    so only the other rows pay for packing more allocations: on real DeepSeek-V3 loads
    at S = 3-4 few rows do.

    ``weight [rows, E]``; ``counts [rows, E]`` and ``items [2, rows, R]`` the packed
    allocation's counts and items; ``floor [rows]`` (item units) as in :func:`plan_rows`.
    """
    peak = max_load(state)
    bound = torch.from_numpy(packing_bound(items[0].double().cpu().numpy(), num_gpus))
    target = bound.to(peak.device, peak.dtype)
    if floor is not None:
        target = torch.maximum(target, floor.to(peak.dtype))
    rows = (peak > target * (1 + SECOND_LOOK_GAP)).nonzero()[:, 0]
    if not len(rows):
        return state
    sub = weight.index_select(0, rows)
    # [K, n, E] every allocation of those rows
    rules = rules + tuple(d for d in FEW_SLOT_SHIFTS if d not in rules)
    others = cap_counts(sub, replica_counts(sub, num_replicas, rules), num_gpus)
    # and the first rule's (Jefferson's) with no more than P replicas above half the mean
    others = torch.cat([others, filler_counts(sub, others[0], num_gpus)[None]])
    # [K, n] allocations to pack: not the one packed, nor one an earlier rule gave
    new = (others != counts.index_select(0, rows)).any(2) & ~repeated_allocations(others)
    rule_of, row_of = new.nonzero().unbind(1)
    if not len(row_of):
        return state
    return _keep_lowest(state, peak, rows, sub.index_select(0, row_of), row_of,
                        others[rule_of, row_of], num_gpus, packing, generator)


def _keep_lowest(
    state: torch.Tensor, peak: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
    row_of: torch.Tensor, tried: torch.Tensor, num_gpus: int, packing: PackingOptions,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``state [2, S, rows', P]`` with row ``rows[i]`` replaced by the first of its other
    allocations ``tried [m, E]`` (those with ``row_of == i``; ``weight [m, E]`` their
    row's loads), each packed once, at their lowest peak, where that is below
    ``peak [rows']``, the row's own (ties keep the row's packing).

    Every allocation of a row has the same total, so make_items scales them alike and
    the peaks compare.
    """
    load, expert = expand_replicas(weight, tried)
    extra = pack(make_items(load, expert), num_gpus, packing, tried.amax(1) > num_gpus,
                 generator)
    extra_peak = max_load(extra).to(peak.dtype)  # [m]
    now = peak.index_select(0, rows)
    best_peak = now.scatter_reduce(0, row_of, extra_peak, "amin")
    # the first (by rule) of each row's packings at its best peak, where that beats the
    # packing already there (ties keep it)
    position = torch.arange(len(row_of), device=peak.device)
    at_best = torch.where(extra_peak == best_peak[row_of], position, len(row_of))
    pick = torch.full_like(rows, len(row_of)).scatter_reduce(0, row_of, at_best, "amin")
    better = (best_peak < now).nonzero()[:, 0]
    if len(better):
        state = state.clone()
        state[:, :, rows[better]] = extra[:, :, pick[better]]
    return state


def _filler_look(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    counts: torch.Tensor,
    state: torch.Tensor,
    packing: PackingOptions,
    generator: torch.Generator | None,
    floor: torch.Tensor | None,
) -> torch.Tensor:
    """``state [2, S, rows, P]`` with, in the rows packed more than
    :data:`SECOND_LOOK_GAP` above the row's bound ``max(W / P, T_rep)`` (whatever the
    counts), the packing of :func:`filler_counts` where it is lower.

    Jefferson's rule gives every spare slot to the hot experts, and where a few of them
    carry nearly all of a layer's load that can leave more of their replicas above half
    a GPU's mean load than there are GPUs: two equally hot experts among 254 idle ones
    on 32 GPUs of 9 slots got 17 replicas each, 34 on 32 GPUs, and two GPUs carried two
    (0.531 of the ceiling, as DeepSeek's greedy; 16 each and the two spare slots to idle
    experts balance it exactly: attacker pass). Neither the portfolio's divisor rules
    nor the packing bound of those counts (which the packing meets) sees it; the bound
    over all counts does. Rows within the gap of it pay one vectorised check.
    ``weight [rows, E]``; ``counts [rows, E]`` the allocation the portfolio picked,
    which every look here starts from, even where the second look packed another
    (starting from the counts held instead cost 3 hot experts of 4,096 at 3 slots their
    layer look: 0.9995 → 0.962); ``floor [rows]`` (item units) as in :func:`plan_rows`.
    """
    peak, rows = _above_count_bound(weight, num_replicas, num_gpus, state, floor,
                                    SECOND_LOOK_GAP)
    if not len(rows):
        return state
    sub = weight.index_select(0, rows)
    packed = counts.index_select(0, rows)
    tried = filler_counts(sub, packed, num_gpus)
    new = (tried != packed).any(1).nonzero()[:, 0]
    if len(new):
        state = _keep_lowest(state, peak, rows.index_select(0, new), sub.index_select(0, new),
                             torch.arange(len(new), device=weight.device),
                             tried.index_select(0, new), num_gpus, packing, generator)
    state = _layer_look(sub, rows, packed, num_gpus, state, packing, generator)
    return _hot_look(sub, rows, packed, num_gpus, state, packing, generator)


def _layer_look(
    weight: torch.Tensor, rows: torch.Tensor, packed: torch.Tensor, num_gpus: int,
    state: torch.Tensor, packing: PackingOptions, generator: torch.Generator | None,
) -> torch.Tensor:
    """``state [2, S, rows', P]`` with, in those of ``rows [n]`` (the rows
    :func:`_filler_look` looks at again) where :func:`layer_counts` of their packed counts
    ``packed [n, E]`` has a lower pigeonhole bound (:func:`layer_bound`) than those
    counts, and more than :data:`SECOND_LOOK_GAP` below the row's packing now, its
    packing where that is lower.

    :func:`filler_counts` keeps at most ``P`` replicas above half the mean GPU load; with
    more slots a GPU can take ``j + 1`` replicas above ``1 / (j + 1)`` of it: four experts
    carrying nearly all the load on 4,096 GPUs of 3 slots got 2,049 replicas each, 8,196
    pieces just below half the mean, and four GPUs carried three (0.668 of the ideal
    balance; 2,048 each fill two layers of GPUs exactly: 1.0). Rows whose trimmed counts
    bound no lower (every ordinary one seen: plans stay as they were) pack nothing more.
    ``weight [n, E]`` the rows' loads.
    """
    layered = layer_counts(weight, packed, num_gpus)
    new = (layered != packed).any(1).nonzero()[:, 0]
    return _pack_if_promising(weight, rows, packed, new, layered.index_select(0, new),
                              num_gpus, state, packing, generator,
                              lambda items: layer_bound(items, num_gpus))


def _hot_look(
    weight: torch.Tensor, rows: torch.Tensor, packed: torch.Tensor, num_gpus: int,
    state: torch.Tensor, packing: PackingOptions, generator: torch.Generator | None,
) -> torch.Tensor:
    """``state [2, S, rows', P]`` with, in those of ``rows [n]`` (the rows
    :func:`_filler_look` looks at again) whose experts above the mean GPU load hold fewer
    than ``P`` of the packed counts ``packed [n, E]``, the packing of
    :func:`hot_counts` (exactly ``P`` hot replicas) where it is lower.

    A GPU without a hot piece must reach the mean from cold pieces alone: one expert of
    100 among 4,095 of load 1 on 4,096 GPUs of 3 slots packed at 0.878 of the ideal
    balance with Jefferson's 201 hot replicas (halves and thirds of cold experts on the
    other GPUs), 0.9998 with 4,096. ``weight [n, E]`` the rows' loads.
    """
    tried, new = hot_counts(weight, packed, num_gpus)
    # besides layer_bound's pigeonholes, the GPU holding the largest piece holds S − 1
    # more, each at least the smallest (the 4 node rows of 8 GPUs that plan_hashes tries
    # otherwise packed no better)
    slots = int(packed[0].sum()) // num_gpus
    return _pack_if_promising(
        weight, rows, packed, new, tried, num_gpus, state, packing, generator,
        lambda items: np.maximum(layer_bound(items, num_gpus),
                                 items[:, 0] + (slots - 1) * items[:, -1]))


def _pack_if_promising(
    weight: torch.Tensor, rows: torch.Tensor, packed: torch.Tensor, new: torch.Tensor,
    tried: torch.Tensor, num_gpus: int, state: torch.Tensor, packing: PackingOptions,
    generator: torch.Generator | None, bound: Callable[[np.ndarray], np.ndarray],
) -> torch.Tensor:
    """``state`` with rows ``rows[new]`` packed with counts ``tried [m, E]`` where that is
    lower, packed only where ``bound`` (of a row's items ``[m, R]``, heaviest first, in
    load units) is lower for ``tried`` than for the packed counts ``packed[new]`` and more
    than :data:`SECOND_LOOK_GAP` below the row's packing now: a bound that promises less
    than the other looks' gap is not worth a packing. ``weight [n, E]`` the rows' loads."""
    if not len(new):
        return state
    w = weight.index_select(0, new).to(torch.float64).cpu().numpy()
    before = bound(replica_items(w, packed.index_select(0, new).cpu().numpy())[0])
    after = bound(replica_items(w, tried.cpu().numpy())[0])
    # the packing now, in load units (items are scaled to a mean replica load of 1)
    num_replicas = int(packed[0].sum())  # every row's counts sum to R
    peak = max_load(state)
    now = (peak.index_select(0, rows.index_select(0, new)).double().cpu().numpy()
           * w.sum(1) / num_replicas)
    promise = torch.from_numpy((after < before) & (after * (1 + SECOND_LOOK_GAP) < now))
    new, tried = new[promise.to(new.device)], tried[promise.to(tried.device)]
    if not len(new):
        return state
    return _keep_lowest(state, peak, rows.index_select(0, new), weight.index_select(0, new),
                        torch.arange(len(new), device=rows.device), tried, num_gpus,
                        packing, generator)


def _above_count_bound(
    weight: torch.Tensor, num_replicas: int, num_gpus: int, state: torch.Tensor,
    floor: torch.Tensor | None, gap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(peak [rows], rows [n])``: the max GPU load of every row of ``state [2, S, rows,
    P]`` (item units), and the rows packed more than ``gap`` above their bound over all
    counts, ``max(W / P, T_rep)`` (``floor [rows]``, item units, where higher), which
    no allocation packs below. ``weight [rows, E]``.

    In item units (make_items scales every row to a mean replica load of 1) a GPU's mean
    load is S and the bound is at least that, so only rows above ``S · (1 + gap)`` need
    the bound: most rows end within the gap of the mean (one compare, no T_rep)."""
    peak = max_load(state)
    rows = (peak > num_replicas / num_gpus * (1 + gap)).nonzero()[:, 0]
    if not len(rows):
        return peak, rows
    # float64: in a half-precision row the bound would round by more than the gap
    w = weight.index_select(0, rows).to(torch.float64)
    total = w.sum(1)  # > 0: plan_rows planned all-zero rows as uniform
    target = replica_bound(w, num_replicas, total / num_gpus) * num_replicas / total
    if floor is not None:
        target = torch.maximum(target, floor.index_select(0, rows).to(target.dtype))
    return peak, rows[peak.index_select(0, rows) > target.to(peak.dtype) * (1 + gap)]


def _filler_ladder(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    state: torch.Tensor,
    packing: PackingOptions,
    generator: torch.Generator | None,
    floor: torch.Tensor | None,
) -> torch.Tensor:
    """``state [2, S, rows, P]`` with, in the rows packed more than :data:`LADDER_GAP`
    above the row's bound ``max(W / P, T_rep)``, the best packing of the rungs of
    :func:`ladder_counts` where one beats the packing there.

    On a few GPUs (a hierarchical policy's node of 2-4) a GPU's mean load is a few
    experts' loads, and whether a row packs near its mean depends on which experts are
    split, which no divisor rule (nor the packing bound that ranks them) sees: a cold
    expert's second replica is what lets the replicas of a GPU add up to the mean
    (0.78, 0.55, 0.50, 0.11, 0.05, 0.01 of the mean on 2 GPUs of 4 slots: 1.18 of the
    mean with Jefferson's counts, 1.001 with the coldest expert twice). DeepSeek's greedy
    splits such experts unevenly by stacking two replicas on a GPU, which eplb may not,
    and beat eplb there. Rows packed within the gap of their bound cannot gain more than
    it and pay nothing. ``weight [rows, E]``; ``floor [rows]`` (item units) as in
    :func:`plan_rows`.
    """
    peak, rows = _above_count_bound(weight, num_replicas, num_gpus, state, floor, LADDER_GAP)
    if not len(rows):
        return state
    sub = weight.index_select(0, rows)
    tried = ladder_counts(sub, num_replicas, num_gpus, LADDER_RUNGS)  # [K, n, E]
    row_of = torch.arange(len(rows), device=weight.device).repeat(tried.shape[0])
    return _keep_lowest(state, peak, rows, sub.index_select(0, row_of), row_of,
                        tried.reshape(-1, tried.shape[2]), num_gpus, packing, generator)


def _tiny_count_look(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    rules: tuple[float | str, ...],
    state: torch.Tensor,
    packing: PackingOptions,
    generator: torch.Generator | None,
    floor: torch.Tensor | None,
) -> torch.Tensor:
    """``state [2, S, rows, P]`` with, in the rows of at most
    :data:`~eplb.core.tiny_counts.TINY_EXPERTS` experts packed more than
    :data:`~eplb.core.tiny_counts.TINY_GAP` above their bound, the best packing of the
    count vectors one replica from the first rule's counts in each expert that the greedy
    packs best (:func:`eplb.core.tiny_counts.best_neighbours`), where one beats the
    packing there.

    Mixtral's 8 experts on 4 GPUs of 6 slots: every rule gives 3 replicas each, packed at
    0.983, below DeepSeek's greedy's 0.990, where splits of 4 and 2 pack at 0.99997; on
    the real Mixtral counts 10 of 15 layers ended below the greedy at 24 slots on 4 GPUs
    and 5 at 20 (new-user pass; BENCHMARKS.md §12, thirty-fifth session).
    ``weight [rows, E]``; ``floor [rows]`` (item units) as in :func:`plan_rows`."""
    peak, rows = _above_count_bound(weight, num_replicas, num_gpus, state, floor, TINY_GAP)
    if not len(rows):
        return state
    picked = weight.index_select(0, rows)
    sub = picked.to(torch.float64)
    first = cap_counts(sub, replica_counts(sub, num_replicas, rules[:1])[0], num_gpus)
    # the rows' busiest GPUs in load units (items are scaled to a mean replica load of 1)
    now = peak.index_select(0, rows).to(torch.float64) * sub.sum(1) / num_replicas
    tried, row_of = best_neighbours(sub.cpu().numpy(), first.cpu().numpy(), num_gpus,
                                    now.cpu().numpy())
    if not len(row_of):
        return state
    tried_t = torch.from_numpy(tried).to(weight.device)
    row_of_t = torch.from_numpy(row_of).to(weight.device)
    return _keep_lowest(state, peak, rows, picked.index_select(0, row_of_t), row_of_t,
                        tried_t, num_gpus, packing, generator)


def _every_expert_on_every_gpu(
    weight: torch.Tensor, num_replicas: int, num_gpus: int
) -> torch.Tensor:
    """``[rows, R]`` for rows whose GPUs have at least one slot per expert (``S >= E``):
    every GPU holds the same ``S`` slots, ``k_e >= 1`` replicas of each expert ``e``
    (Jefferson's counts of ``S`` over ``weight [rows, E]``). An expert then has ``P·k_e``
    replicas and each GPU carries ``k_e`` of them, ``w_e / P``, so every GPU carries the
    mean load, whatever ``k``. Jefferson's counts of ``R`` here exceed one replica per GPU
    (``cap_counts`` cannot cap them), and packing them stacked a replica count that is
    not a multiple of ``P`` on some GPUs: 29.4 for ``[100, 1, 1, 1]`` on 4 GPUs with 5
    slots each, where every GPU can carry 25.75 (found by the quality hunt, more slots
    per GPU scoring worse than fewer)."""
    rows, _ = weight.shape
    slots = num_replicas // num_gpus
    per_gpu = replica_counts(weight, slots)[0]  # [rows, E], each row sums to S
    ends = per_gpu.cumsum(1)
    position = torch.arange(slots, device=weight.device).expand(rows, -1).contiguous()
    # slot j of a GPU holds the expert whose run of k_e slots covers j
    experts = torch.searchsorted(ends, position, right=True)  # [rows, S]
    return experts.repeat(1, num_gpus)


class PlacementPolicy(ABC):
    """A way to place replicas; subclasses register in :data:`POLICIES` by ``name``."""

    name: ClassVar[str]

    @abstractmethod
    def place(self, request: PlanRequest) -> torch.Tensor:
        """``request.weight [L, E]`` on every GPU of ``request.topology`` → ``phy2log [L, R]``.

        Dead GPUs are handled by the planner (it plans globally over the live ones), so a
        policy sees a full cluster. The result need not be validated: the planner does.
        """
