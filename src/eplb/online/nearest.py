"""Incremental planning for SGLang's nearest dispatch (``dispatch="nearest"``).

Two candidates per layer (below), each valued by what it pays (:func:`paying_values`):
its balancedness gain over the placement in force, the smaller of the gain realised on
the window at hand and the gain expected on the next window, minus the move price
(:meth:`~eplb.core.options.IncrementalOptions.layer_price`) × the share of its slots
that change. Without a budget a layer takes the candidate (or keeps
its placement) that pays best; with a budget per layer, the one that pays best within
it; with a budget in total over all layers, the total goes where the moved slots pay
the most (:func:`eplb.online.budget.spend_budget`; the warm start before its node
repair, the warm start on the whole total, and each layer's own warm start within the
whole total are offered too, so a small budget still buys the best swaps). A budget
caps the moves that pay; it buys none that do not:

1. the fresh dispatch-aware plan (:func:`eplb.core.planner.fresh_phy2log`: the nearest
   plan, or per layer eplb's even-split plan where the rule serves that better)
   relabelled onto the old map, whole nodes first (which keeps every expert's node
   pattern; it moves most slots);
2. the even-split incremental plan within most of the budget, then
   :func:`eplb.core.node_repair.repair_node_pairs` with the moves left, so that experts
   with three or more replicas end on distinct nodes where the budget allows.

On one node (``fair="divide"``, or ``"auto"`` with every GPU live) the rule is SGLang's
runtime table (:func:`plan_table_incremental`): the candidates are the even split's
warm-start ladder toward counts that divide the GPUs and the fresh plan relabelled (made,
without a budget, only for the layers the ladder may not reach), and the values are the
means over sampled draws of the table
(:func:`eplb.core.rank_draws.split_draw_shares`): the even split's expectation would
value a count that does not divide the GPUs at what the table does not serve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from eplb.core.dispatch import realised_slot_loads
from eplb.core.dispatch_plan import divisor_counts
from eplb.core.node_repair import repair_node_pairs
from eplb.core.options import COARSE_SLOTS
from eplb.core.planner import fresh_phy2log
from eplb.core.rank_draws import split_draw_slot_loads
from eplb.core.request import PlanRequest
from eplb.online.align import align_to_previous
from eplb.online.budget import layer_loads, load_shares, spend_budget
from eplb.online.score import far_from_bound, peak_of

#: of an incremental budget, the part the even-split warm start may use
WARM_SHARE = 0.85


def plan_nearest_incremental(
    request: PlanRequest,
    previous: torch.Tensor,
    max_moves: torch.Tensor | int | None,
    warm_even: Callable[[torch.Tensor, torch.Tensor | int | None], torch.Tensor],
) -> torch.Tensor:
    """``phy2log [L, R]`` re-planned for the nearest rule from ``previous [L, R]`` (all GPUs
    live), with at most ``max_moves`` changed slots: ``[L]`` per layer, an int in total
    over the layers, ``None`` for no limit. ``warm_even(old, budget)`` is the even-split
    incremental planner (it takes the same three kinds of budget)."""
    weight, topology = request.weight, request.topology
    fair = request.fair
    old = previous.to(torch.int64)
    gpus, nodes = topology.num_gpus, topology.num_nodes
    # tokens arising evenly, as the candidates below are scored
    fresh = fresh_phy2log(dataclasses.replace(request, source=None))
    fresh = align_to_previous(fresh, old, gpus, topology.gpus_per_node)
    if isinstance(max_moves, int):
        return _within_total(request, old, fresh, max_moves, warm_even)
    # a share of the budget is kept for the repair: moves that fix same-node pairs pay
    # more under the rule than the last even-split swaps
    first = None if max_moves is None else (max_moves * WARM_SHARE).to(torch.int64)
    warm = warm_even(old, first)
    left = None if max_moves is None else (max_moves - (warm != old).sum(1)).clamp(min=0)
    least = 3 if fair == "expect" else min(3, nodes)
    warm, _ = repair_node_pairs(weight, warm, gpus, nodes, budget=left, min_count=least)
    if max_moves is None:
        return choose_paying(request, torch.stack([old, warm, fresh]))
    # and the warm start on the whole budget: a layer's share of a few slots may afford no
    # step (attacker pass: per-layer budgets of 1 moved nothing, where 1 slot paid)
    candidates = torch.stack([old, warm, fresh, warm_even(old, max_moves)])
    # per layer the candidate that pays best within the layer's budget (the warm start
    # was made within it; the fresh plan may not fit)
    values = paying_values(request, candidates)
    affordable = (candidates != old[None]).sum(2) <= max_moves[None].to(old.device)
    pick = torch.where(affordable, values, -torch.inf).argmax(0)  # first on ties: old map
    return candidates[pick, torch.arange(old.shape[0], device=old.device)]


def plan_table_incremental(
    request: PlanRequest,
    base: torch.Tensor,
    max_moves: torch.Tensor | int | None,
    rungs: Callable[[np.ndarray | None], tuple[np.ndarray, np.ndarray]],
    warm_even: Callable[[torch.Tensor, torch.Tensor | int | None], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``phy2log [L, R]`` re-planned on one node for SGLang's runtime table (module
    docstring) from ``base [L, R]``, the map in force made valid for the call, with at
    most ``max_moves`` changed slots (as :func:`plan_nearest_incremental` takes them).

    ``rungs(target)`` is the warm-start ladder of the even split's planner from ``base``
    (``[C, L, R]``, ``base`` first) with its replica transfers going toward ``target
    [L, E]`` counts (``None``: Jefferson's), and ``[L]`` the layers whose counts are
    further from the target than one ladder step's quota. Candidates: the ladder toward
    counts that divide the GPUs (:func:`eplb.core.dispatch_plan.divisor_counts`: the
    table splits them exactly), and the fresh plan (under ``fair="auto"`` per layer the
    even split or those counts) relabelled onto ``base``; per layer the one that pays
    best under the table (:func:`paying_values`), within the budget. (A ladder toward
    Jefferson's counts as well doubled the call's time for no better next window:
    BENCHMARKS.md §14, forty-fifth session.) Without a budget the fresh plan is made
    only for the layers the ladder may not reach: counts further from the target than a
    step's quota, a last step that still gains a quarter of the move price, an end
    further from the layer's bound than the drift's excess, or at most 3 slots per GPU
    (the global ladder's rules, :func:`eplb.online.incremental.plan_incremental`). It is half
    the call's time, and in steady calls from eplb's own maps it was taken in 0 of 2,088
    layer plans on 8 GPUs and 2 of 2,088 on 32 (BENCHMARKS.md §14, forty-seventh
    session). Under a budget, ``warm_even(base, max_moves)``, the even
    split's incremental plan within it, is offered too: toward divided counts a few
    slots buy little, and on real DeepSeek-V3 loads the table served the even split's
    plan better at every budget tried (attacker pass: 8 GPUs, 2 slots per layer, 0.8771
    against 0.9045 under eplb's model of the table); the fresh plan only where the plan
    without a budget makes it, and no layer moves more slots than in that plan. A budget
    that does not bind returns that plan itself, before the even split's is made."""
    weight, topology = request.weight, request.topology
    gpus = topology.num_gpus
    # (more slots than a replica of every expert on every GPU: nothing to divide)
    divide = topology.num_replicas <= weight.shape[1] * gpus
    target = divisor_counts(weight, topology.num_replicas, gpus).cpu().numpy() if divide else None
    ladder, far = rungs(target)
    ladder = torch.from_numpy(ladder)
    layers = torch.arange(base.shape[0])
    # the plan without a budget: with a budget, from its own rungs (not the transfer-only
    # rungs 1-3 a budget adds: warm_ladder), so that the two choose alike
    own = torch.ones(ladder.shape[0], dtype=torch.bool)
    if max_moves is not None:
        own[1:4] = False
    candidates, balance, unbudgeted = _plan_without_budget(request, base, ladder, far, own)
    if max_moves is None:
        return candidates[unbudgeted, layers]
    cost = (candidates != base[None]).sum(2)
    # a budget buys no candidate that moves a layer more slots than the plan without a
    # budget does, as the README promises under either rule (the stateful sequence
    # tests: warm_even, offered under a budget only, moved a layer 4 slots under a budget
    # of 100 where no budget moved 2; a budget of 10**6 moved more slots than none in 20
    # of 60 random one-node cases)
    most = cost[unbudgeted, layers]  # [L] slots the plan without a budget moves
    spent = most.clone()
    if request.idle is not None:  # (rows without load keep the map in force)
        spent[request.idle.cpu()] = 0
    if (int(spent.sum()) <= max_moves if isinstance(max_moves, int)
            else bool((most <= max_moves.cpu()).all())):
        # a cap that does not bind changes nothing: the plan without a budget (a total
        # spent by MoE time among the budget's own candidates planned otherwise: 0.8911
        # against its 0.8920 on the next window at 32 GPUs, BENCHMARKS.md §14), and no
        # even-split plan to make
        return candidates[unbudgeted, layers]
    if warm_even is not None:
        # the even split's own plan within the budget: toward divided counts a few slots
        # buy little
        candidates, balance = _with(request, candidates, balance,
                                    warm_even(base, max_moves).cpu())
        cost = (candidates != base[None]).sum(2)
    value = paying_values(request, candidates, balance=balance)  # [C, L]
    within = cost <= most[None]  # [C, L]
    if isinstance(max_moves, int):
        values = paying_values(request, candidates, by_time=True, balance=balance).cpu().numpy()
        values[~within.cpu().numpy()] = -np.inf
        if request.idle is not None:  # (as _within_total: no load, nothing to buy)
            values[1:, request.idle.cpu().numpy()] = -np.inf
        pick = torch.from_numpy(spend_budget(values, cost.numpy(), max_moves))
        return candidates[pick, layers]
    affordable = (cost <= max_moves[None].cpu()) & within
    pick = torch.where(affordable, value.cpu(), -torch.inf).argmax(0)
    # a layer whose cap does not bind takes the plan without a budget's choice
    pick = torch.where(most <= max_moves.cpu(), unbudgeted, pick)
    return candidates[pick, layers]


def _with(request: PlanRequest, candidates: torch.Tensor,
          balance: tuple[torch.Tensor, torch.Tensor], offer: torch.Tensor
          ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``candidates [C, L, R]`` with ``offer [L, R]`` after them, and their
    :func:`expected_balance` ``balance`` with the offer's (a candidate scores alone, the
    same numbers as scored with the others: the means over the draws are NumPy's)."""
    more = _balance(request, offer[None])
    return (torch.cat([candidates, offer[None]]),
            tuple(torch.cat([b, m]) for b, m in zip(balance, more, strict=True)))


def _plan_without_budget(request: PlanRequest, base: torch.Tensor, ladder: torch.Tensor,
                         far: np.ndarray, own: torch.Tensor
                         ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor],
                                    torch.Tensor]:
    """The plan without a budget from ``ladder [K, L, R]`` (``base`` first): per layer the
    best paying of the rungs ``own [K]`` marks, and of the fresh plan relabelled onto
    ``base`` where the ladder may not reach (:func:`_fresh_needed`; ``far [L]`` as
    ``rungs`` returns it). Returns ``(candidates [C, L, R], their expected_balance,
    pick [L])``: the ladder, then the fresh plan where one was made (``C = K + 1``;
    ``base`` in the other layers), and each layer's choice among them (first on ties:
    the map in force)."""
    balance = _balance(request, ladder)  # (scored once: the values, the bound rule)
    value = paying_values(request, ladder, balance=balance)  # [K, L]
    need = _fresh_needed(request, ladder[own], far, value[own],
                         (balance[0][own], balance[1][own]))
    value = torch.where(own[:, None].to(value.device), value, -torch.inf)
    if not bool(need.any()):  # (most steady calls: no fresh plan to make or score)
        return ladder, balance, value.argmax(0).cpu()
    candidates, balance = _with(request, ladder, balance,
                                _fresh_where(request, base, need.cpu()))
    fresh_value = paying_values(request, candidates[[0, -1]],
                                balance=tuple(b[[0, -1]] for b in balance))[1]
    value = torch.cat([value, torch.where(need, fresh_value, -torch.inf)[None]])
    return candidates, balance, value.argmax(0).cpu()


def _fresh_needed(request: PlanRequest, ladder: torch.Tensor, far: np.ndarray,
                  values: torch.Tensor, balance: tuple[torch.Tensor, torch.Tensor]
                  ) -> torch.Tensor:
    """``[L]`` the layers where the plan without a budget offers the fresh plan beside
    the ladder ``ladder [K, L, R]`` (``values [K, L]`` its :func:`paying_values`,
    ``balance`` its :func:`expected_balance`; ``far [L]`` counts further from the target
    than a step's quota): where the ladder may not reach it."""
    # (the global ladder's rule: its last step still gains; here a quarter of the
    # move price, as the values are net of the moves: at R = E, 8 GPUs, a last step
    # gaining 0.003-0.009 ended 0.004-0.009 of the next window short of the fresh
    # plan, attacker pass; with no swap step, IncrementalOptions(steps=0), the fresh
    # plan is the only move offered)
    gaining = (values[-1] - values[-2] > request.options.incremental.move_price / 4
               if len(values) > 1 else torch.ones_like(values[0], dtype=torch.bool))
    # or, as the global ladder's rules too: at <= 3 slots per GPU, or where its end
    # is further from the layer's bound in sample than the drift's own excess (an
    # old packing its swaps cannot undo: at R = E, 8 GPUs, it ended 0.01-0.02 of the
    # next window short of the fresh plan, moves paid; attacker pass)
    return (torch.from_numpy(far).to(values.device) | gaining
            | _short_of_bound(request, ladder[-1], balance[0][-1], balance[1][-1]
                              ).to(values.device)
            | (request.topology.slots_per_gpu <= COARSE_SLOTS))


def _balance(request: PlanRequest, candidates: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`expected_balance` of ``candidates [C, L, R]`` under ``request``."""
    topology = request.topology
    return expected_balance(request.weight, candidates, topology.num_gpus,
                            topology.num_nodes, request.options.incremental.drift,
                            request.active_gpus)


def _short_of_bound(request: PlanRequest, end: torch.Tensor, expected: torch.Tensor,
                    peak: torch.Tensor) -> torch.Tensor:
    """``[L]``: the layers whose ladder end ``end [L, R]`` (its :func:`expected_balance`
    ``expected [L]`` and ``peak [L]``) is further above the layer's bound (perfect
    balance, or its heaviest slot's share of the expert) in sample than the drift's own
    excess, where a placement at the bound with that excess would beat it on the next
    window by more than the move price (:func:`eplb.online.score.far_from_bound`, under
    the table)."""
    weight = request.weight.cpu().to(torch.float64)
    mean = weight.sum(1) / int(request.live.sum())
    counts = torch.zeros_like(weight).scatter_add_(
        1, end.long(), torch.ones(end.shape, dtype=weight.dtype))
    heaviest = (weight / counts.clamp(min=1)).amax(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        now = (peak.cpu().to(torch.float64) / mean).numpy()
        ahead = (1.0 / expected.cpu().to(torch.float64)).numpy()
        bound = np.maximum(1.0, (heaviest / mean).numpy())
    return torch.from_numpy(far_from_bound(ahead, now, bound,
                                           request.options.incremental.move_price))


def _fresh_where(request: PlanRequest, base: torch.Tensor,
                 need: torch.Tensor | None = None) -> torch.Tensor:
    """``[L, R]``: the fresh plan (tokens arising evenly) relabelled onto ``base`` in the
    layers ``need [L]`` marks (default: all), ``base`` elsewhere."""
    gpus = request.topology.num_gpus
    plain = dataclasses.replace(request, source=None)
    if need is None:
        return align_to_previous(fresh_phy2log(plain).cpu(), base, gpus, gpus)
    out = base.clone()
    rows = need.nonzero()[:, 0]
    if len(rows):
        fresh = fresh_phy2log(plain.layers(rows.to(request.weight.device))).cpu()
        out[rows] = align_to_previous(fresh, base[rows], gpus, gpus)
    return out


def choose_paying(request: PlanRequest, candidates: torch.Tensor) -> torch.Tensor:
    """``[L, R]``: per layer, the candidate of ``candidates [C, L, R]`` (candidate 0 the
    map in force, made valid for the call) that pays best under the nearest rule
    (:func:`paying_values`)."""
    pick = paying_values(request, candidates).argmax(0)  # first on ties: the map in force
    return candidates[pick, torch.arange(candidates.shape[1], device=candidates.device)]


def paying_values(request: PlanRequest, candidates: torch.Tensor,
                  by_time: bool = False,
                  balance: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``[C, L]``: what each candidate of ``candidates [C, L, R]`` (candidate 0 the map in
    force, made valid for the call) pays under the nearest rule: its balancedness gain
    over candidate 0, the smaller of the gain on the window at hand (realised under the
    rule; so an unchanged workload keeps its map) and on the next window expected under
    the drift (so moves that only pay in sample are not made: on six real workloads half
    the slots moved for an equal next window), minus the move price (``move_price`` at 9
    slots per GPU, following the slots per GPU) × the share of the layer's slots that
    change. A budget caps these moves; it does not buy unpaid ones.
    Tokens arise on the live GPUs only.

    ``by_time``: for a total budget shared by the layers, each paying gain in MoE time to
    first order instead (a layer's time is its load times 1 / balancedness: the gain
    times the layer's load share over candidate 0's balancedness squared); unpaid
    candidates ``-inf``. Balancedness gains alone gave slots to layers of a millionth
    of the load (attacker pass). ``balance``: :func:`expected_balance` of the candidates
    under the request, when the caller has it."""
    weight, topology = request.weight, request.topology
    old = candidates[0]
    options = request.options.incremental
    price = options.layer_price(topology.slots_per_gpu) / old.shape[1]  # per slot
    mean = weight.sum(1) / int(request.live.sum())
    expected, peak = _balance(request, candidates) if balance is None else balance
    in_sample = mean / peak.clamp(min=1e-300)
    gain = torch.minimum(in_sample - in_sample[:1], expected - expected[:1])
    value = gain - price * (candidates != old[None]).sum(2)
    if not by_time:
        return value
    host = request.weight.detach().cpu().to(torch.float64).numpy()
    share = torch.from_numpy(load_shares(layer_loads(request, host))).to(value)
    # (a loaded layer's balancedness is at least 1 / P; the floor only keeps 1 / now²
    # finite)
    now = torch.minimum(in_sample[0], expected[0]).clamp(min=1e-12)
    timed = gain * (share / now**2) - price * (candidates != old[None]).sum(2)
    timed[0] = 0.0
    return torch.where((value > 0) | (torch.arange(len(value)) == 0)[:, None].to(value.device),
                       timed, -torch.inf)


def _within_total(
    request: PlanRequest,
    old: torch.Tensor,
    fresh: torch.Tensor,
    total: int,
    warm_even: Callable[[torch.Tensor, torch.Tensor | int | None], torch.Tensor],
) -> torch.Tensor:
    """``[L, R]``: the candidates of :func:`plan_nearest_incremental` chosen per layer so
    that at most ``total`` slots change over all layers, where the moved slots pay the
    most (:func:`paying_values`, :func:`eplb.online.budget.spend_budget`). The even-split
    warm start spends its share of the total where the even split gains most; the node
    repair may use what it left in any layer; the warm start without the repair, and on
    the whole total, are offered too, so a layer the total cannot afford the repair in
    still gets the swaps, and a total of a few slots per layer still buys some; and each
    layer's own warm start within the whole total, repaired, so the rule's best small
    move in one layer is on offer where the even split would spend elsewhere."""
    weight, topology = request.weight, request.topology
    gpus, nodes = topology.num_gpus, topology.num_nodes
    warm = warm_even(old, int(total * WARM_SHARE))
    left = max(0, total - int((warm != old).sum()))
    least = 3 if request.fair == "expect" else min(3, nodes)
    repaired, _ = repair_node_pairs(weight, warm, gpus, nodes,
                                    budget=torch.full((old.shape[0],), left), min_count=least)
    # the warm start on the whole total too: below a few slots per layer its share may
    # afford no step at all, where the whole total affords one
    whole = warm_even(old, total)
    # and every layer's own warm start within the whole total, with its node repair: the
    # even split spends a total where the even split gains most, which need not be where
    # the rule does (second attacker pass: a total of 3 moved nothing on 2 layers where
    # 3 slots for one layer bought 0.468 → 0.513 under the rule)
    each_budget = torch.full((old.shape[0],), total, dtype=torch.int64)
    each = warm_even(old, each_budget)
    each_repaired, _ = repair_node_pairs(weight, each, gpus, nodes, min_count=least,
                                         budget=(each_budget - (each != old).sum(1)).clamp(min=0))
    options = torch.stack([old, warm, repaired, whole, each, each_repaired, fresh])  # [C, L, R]
    values = paying_values(request, options, by_time=True).cpu().numpy()
    if request.idle is not None:
        # a layer that carried no load is scored on uniform loads, and its moves are undone
        # by the caller: slots spent on it would be taken from the layers that gain
        values[1:, request.idle.cpu().numpy()] = -np.inf
    cost = (options != old[None]).sum(2).cpu().numpy()
    pick = torch.from_numpy(spend_budget(values, cost, total)).to(old.device)
    return options[pick, torch.arange(old.shape[0], device=old.device)]


def expected_balance(
    weight: torch.Tensor, candidates: torch.Tensor, num_gpus: int, num_nodes: int,
    drift: float, active_gpus: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expected [C, L], peak [C, L])``: the expected next-window balancedness of the
    candidates ``[C, L, R]`` under the nearest rule, and their max GPU load on the window
    at hand as the rule realises it (:func:`eplb.core.dispatch.realised_gpu_loads`; with
    ``active_gpus [P]`` tokens arise on the live GPUs only).
    Each slot serves a fixed share of its expert's tokens, so a GPU's load moves with its
    slots' loads ``x`` (each expert drifting by ``exp(drift·Z)``), and
    :func:`eplb.online.score.peak_of` takes the expected max over GPUs of normals with
    the GPUs' loads and spreads ``d·sqrt(Σ x²)``."""
    device = weight.device
    weight, candidates = weight.cpu(), candidates.cpu()  # peak_of runs on the host
    live = None if active_gpus is None else active_gpus.cpu()
    if num_nodes == 1 and live is None:
        # SGLang's runtime table: every sampled draw of it is scored, then averaged
        return _split_balance(weight, candidates, num_gpus, drift, device)
    slot = torch.stack([realised_slot_loads(weight, c, num_gpus, num_nodes,
                                            active_gpus=live, check=False)
                        for c in candidates])
    grid = slot.view(len(candidates), weight.shape[0], num_gpus, -1)
    load, square = grid.sum(3), (grid * grid).sum(3)
    # over the live GPUs' mean, as the in-sample balancedness (the dead ones carry nothing;
    # over all P the expected gain was understated by live / P: attacker pass)
    expected, _ = peak_of(load, square.numpy(), weight.sum(1).numpy(), drift,
                          live=None if live is None else int(live.sum()))
    return torch.from_numpy(1.0 / expected).to(device), load.amax(2).to(device)


def _split_balance(weight: torch.Tensor, candidates: torch.Tensor, num_gpus: int,
                   drift: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`expected_balance` on one node under SGLang's runtime table: each candidate's
    slots serve the ranks a sampled draw of the table deals them
    (:func:`eplb.core.rank_draws.split_draw_slot_loads`, the same draws for every
    candidate);
    the expected next-window balancedness and the peak are the means over the draws."""
    count, layers = candidates.shape[:2]
    # one candidate's [D, L, R] slot loads at a time (all at once held [D, C, L, R]: 1.9 GB
    # at 4,000 layers, attacker pass); its GPUs' moments [D, C, L, P] are kept
    moments = []
    for candidate in candidates:
        slot = split_draw_slot_loads(weight, candidate, num_gpus)  # [D, L, R]
        grid = torch.from_numpy(slot.reshape(*slot.shape[:2], num_gpus, -1))
        moments.append((grid.sum(3), (grid * grid).sum(3)))
    draws = moments[0][0].shape[0]
    load = torch.stack([m[0] for m in moments], 1).reshape(draws * count, layers, num_gpus)
    square = torch.stack([m[1] for m in moments], 1).reshape(draws * count, layers, num_gpus)
    expected, _ = peak_of(load, square.numpy(), weight.sum(1).numpy(), drift)
    expected = (1.0 / expected).reshape(draws, count, layers).mean(0)
    # (NumPy's mean over the draws, as the expected balance's: torch's mean(0) of the
    # same numbers differed by an ulp with the number of candidates scored at once, and
    # a budget that does not bind then chose otherwise than the plan without one)
    peak = torch.from_numpy(load.amax(2).view(draws, count, layers).numpy().mean(0))
    return torch.from_numpy(expected).to(device), peak.to(device)
