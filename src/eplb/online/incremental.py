"""Incremental planning: rebalance a running deployment by moving few expert weights.

Every changed slot is one expert's weights crossing NVLink or the network while traffic
runs (a DeepSeek-V3 expert is 44 MB in FP8), and re-planning from scratch changes
almost every slot. Here the new plan starts from the placement in force:

1. **Forced moves** make the old placement valid for the new call, whatever the budget:
   slots of dead GPUs are emptied; every expert gets a live replica and every live slot
   an expert (a GPU that is live again is filled); replicas stacked on one GPU are
   spread; under the hierarchical policy a layer whose groups straddle nodes (vLLM's
   initial map ``slot i → expert i % E`` does) is replaced by a fresh hierarchical plan
   relabelled onto the old GPUs.
2. **A ladder of warm starts** (:func:`eplb.online.ladder.warm_ladder`): replica
   transfers toward Jefferson's counts (best first), then ``steps`` steps of the
   all-pairs swap search, each allowed ``quota`` more changed slots
   (:class:`~eplb.core.options.IncrementalOptions`), batched over layers in one
   refinement; with a move budget also the transfers alone (the cheapest moves) and a
   fine ladder of one-swap steps (:func:`eplb.online.budget.fine_layers`). Under
   the hierarchical policy the ladder runs inside the nodes that can set the layer's
   time (:mod:`eplb.online.hierarchy`).
3. **Bigger changes where the ladder cannot reach.** Global: a fresh plan relabelled
   onto the old GPUs (:mod:`eplb.online.align`) for the layers whose ladder still gains
   a move price at its end, whose replica counts are further from Jefferson's than one
   ladder step (the transfers spend the ladder's reach), or whose ladder ends further
   from balance in sample than the drift's own excess (an old packing it cannot undo);
   without a budget, a layer still holding the engines' static map takes it outright.
   Hierarchical: a *warm regroup* for the layers whose best group→node assignment
   differs from the one in force: only the groups that change node move, then the node
   ladder refines (:func:`eplb.online.hierarchy.candidates`); and a fresh hierarchical
   plan relabelled onto the old nodes and GPUs where the best of those ends further
   above the layer's bound than the drift's excess, or at <= 3 slots per GPU. At two slots
   per GPU also the count search's start (:func:`eplb.online.forced.fresh_candidates`).
4. **A choice per layer by the expected next-window peak**
   (:func:`eplb.online.score.expected_peak`): each candidate's max GPU load under the
   drift a rebalance interval brings (with expert groups named, part of it common to a
   group). A candidate's value is its expected balancedness minus the move price × the
   fraction of its slots that change, so moves that only pay in-sample are not made. The
   price is ``move_price`` at 9 slots per GPU and follows the slots per GPU (the weights
   each GPU receives; :meth:`~eplb.core.options.IncrementalOptions.layer_price`); the
   rules of step 3 that decide where a fresh plan is worth making compare with
   ``move_price`` itself.
   Without a budget a layer takes the candidate of the best value. ``max_moves`` caps
   the moves that pay and buys no others: a total (slots over all layers) goes to the
   layers where the moved slots save the most MoE time (load × expected peak), a list
   gives one cap per layer.
   (A budget also offers the transfers alone, and below the ladder's reach the fine
   ladder, so an ample budget's plan may differ from the one without a budget; it never
   moves what does not pay, nor more slots in a layer than that rule would.) No
   candidate whose in-sample peak exceeds the placement in force's is taken.
5. **Forced moves cost no balance** (:func:`eplb.online.forced.undo_forced_losses`):
   where they left a layer worse on the window at hand than the map in force (a greedy's
   stacked replicas spread), the cheapest candidate at least as good as that map is
   taken, else a fresh plan where it is better; under a budget or a skip threshold only
   where those allow it (:func:`eplb.online.forced.within_limits`).
"""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Callable

import numpy as np
import torch

from eplb.core.options import COARSE_SLOTS, DEFAULT_INCREMENTAL_STEPS, with_incremental
from eplb.core.placement import Placement, validate_planned
from eplb.core.planner import fresh_phy2log
from eplb.core.request import PlanRequest
from eplb.core.topology import Topology
from eplb.online import hierarchy, ladder, moves
from eplb.online.align import align_to_previous, relabel_size_problem
from eplb.online.budget import (
    FINE_QUOTA,
    as_threshold,
    check_budget,
    fine_layers,
    layer_loads,
    load_shares,
    paying_candidates,
    spend_budget,
    takes_budget,
)
from eplb.online.forced import (
    Offered,
    forced_base,
    fresh_candidates,
    fresh_plans_per_layer,
    previous_map,
    undo_forced_losses,
    within_limits,
)
from eplb.online.locality import plan_locality_incremental
from eplb.online.nearest import choose_paying, plan_nearest_incremental, plan_table_incremental
from eplb.online.score import exact_peak, expected_peak, far_from_bound, units_of


def _host_weight(request: PlanRequest) -> np.ndarray:
    """The request's loads ``[L, E]`` as a contiguous float64 host array."""
    return np.ascontiguousarray(request.weight.detach().cpu().to(torch.float64).numpy())


def _refine_rows(
    weight: np.ndarray, base: np.ndarray, request: PlanRequest, quota: np.ndarray,
    budgeted: bool, drop_first_rung: bool = False, fine_quota: np.ndarray | None = None,
    target: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray | None]:
    """``[C, L, R]`` warm-start candidates of global layers ``base`` (candidate 0 is
    ``base``) with a per-step quota of ``quota [L]`` slots (0: the layer keeps ``base``),
    ``[L]`` the replica transfers, and the candidates' replica counts as
    :func:`eplb.online.score.expected_peak` takes them (``counts``, ``block``; empty when
    not known). ``budgeted`` adds the transfer-only candidates, which only a small budget
    picks: without one, none of them was chosen in 2784 steady-state layer plans
    (BENCHMARKS.md §3 protocol). ``drop_first_rung`` leaves out the first swap step's
    candidate (and its entry in ``block``).

    ``fine_quota [L]`` (with ``budgeted``): the fine ladder's quota too, searched in the
    same batched call (rows are independent: the same candidates as a call of its own,
    at about the fixed cost of one); its candidates but the first (``base``) are the last
    item returned, ``None`` without it. ``target [L, E]``: the counts the replica
    transfers go toward instead of Jefferson's (not with ``fine_quota``).
    """
    topo = request.topology
    packing = request.options.packing
    steps = request.options.incremental.steps_for(topo.slots_per_gpu, request.dispatch,
                                                  topo.num_nodes)
    live_slot = request.live.cpu().numpy().repeat(topo.slots_per_gpu)
    num_live = int(request.live.sum())
    live_base = base if request.active_gpus is None else base[:, live_slot]
    # the forced moves spread every stacked replica (moves.fill_and_spread)
    # (the dead GPUs' slots are empty: the live slots hold every replica of the base)
    base_counts = moves.counts_of(live_base, weight.shape[1])
    layers = base.shape[0]
    fine = False
    if fine_quota is not None:  # the fine ladder's rows after the default one's
        weight, live_base = np.concatenate([weight, weight]), np.concatenate([live_base] * 2)
        base_counts = np.concatenate([base_counts, base_counts])
        quota = np.concatenate([quota, fine_quota])
        fine = np.arange(2 * layers) >= layers
    inner, transfers, counts = ladder.warm_ladder(weight, live_base, num_live, quota, steps,
                                                 packing, budgeted, spread=True,
                                                 base_counts=base_counts, fine=fine,
                                                 target=target)
    fine_inner = None
    if fine_quota is not None:
        inner, fine_inner = inner[:, :layers], inner[1:, layers:]
        transfers, counts = transfers[:layers], counts[:layers]
    known = {}
    if not budgeted:  # the base's counts, then the swap steps' (swaps keep them)
        known = {"counts": np.stack([base_counts, counts]),
                 "block": np.minimum(np.arange(inner.shape[0]), 1)}
    if drop_first_rung:  # candidate 1: the first swap step (no transfer-only ones here)
        inner = np.delete(inner, 1, 0)
        if known:
            known["block"] = np.delete(known["block"], 1)
    if request.active_gpus is None:
        return inner, transfers, known, fine_inner
    # dead GPUs: the live GPUs' slots were refined
    out = np.repeat(base[None], inner.shape[0], 0)
    out[:, :, live_slot] = inner
    if fine_inner is not None:
        fine_out = np.repeat(base[None], fine_inner.shape[0], 0)
        fine_out[:, :, live_slot] = fine_inner
        fine_inner = fine_out
    return out, transfers, known, fine_inner


def _choose(
    peak: np.ndarray,
    cost: np.ndarray,
    slots: int,
    max_moves: object,
    skip_threshold: float | None,
    price: float,
    layer_load: np.ndarray | None = None,
    usual: np.ndarray | None = None,
) -> np.ndarray:
    """``[L]`` candidate index per layer from expected peaks and costs ``[C, L]``
    (candidate 0 is the forced base, cost 0), a layer's moved slots priced at ``price``
    × their fraction of its slots (:meth:`~eplb.core.options.IncrementalOptions.layer_price`);
    ``layer_load [L]``: each layer's total
    load, which weighs the layers a total budget is shared between; ``usual [C]``: the
    candidates the rule without a budget has (``None``: all), whose choice bounds each
    layer's moves under a budget."""
    layers = peak.shape[1]
    balance = 1.0 / peak  # expected next-window balancedness of each candidate
    # a moved slot is priced with or without a budget: the budget caps the moves that
    # pay, it does not buy the ones that do not (attacker pass: spent on expected gains
    # alone, a total above what no budget moves moved 3,430 slots where no budget moved
    # 3,056 on real DeepSeek-V3 loads; BENCHMARKS.md §3, "Thirtieth session")
    value = balance - price * cost / slots
    if max_moves is None:
        pick = np.argmax(value, 0)  # first on ties: fewer moves
    elif isinstance(max_moves, (int, np.integer)) and not isinstance(max_moves, bool):
        # a total goes where it saves the most MoE time among the moves that pay: a
        # layer's time is its load times its peak over the mean, so a unit of peak is
        # worth more in a heavy layer and as much in a badly balanced one as in a good
        # one (spent on the sum of the layers' balancedness, 1 / peak, it undervalued
        # the worst layers, which set most of the time: a budget of 11 left a layer at
        # 0.221 that 8 had lifted to 0.335, and balancedness() fell; attacker pass).
        # The moves that pay are the candidates that beat the placement in force by the
        # rule without a budget, moving no more slots than that rule's choice: a budget
        # is never a reason for more moves in a layer
        share = load_shares(layer_load)
        pays = paying_candidates(value, cost, usual, balance, skip_threshold)
        with np.errstate(invalid="ignore"):
            saved = -share[None] * peak - price * cost / slots
        pick = spend_budget(np.where(pays, saved, -np.inf), cost, int(max_moves))
    else:
        budget = np.asarray(max_moves)
        if budget.shape != (layers,) or budget.dtype.kind not in "iu" or (budget < 0).any():
            raise ValueError(
                f"max_moves must be a non-negative int (slots in total) or {layers} "
                f"non-negative ints (slots per layer); got {reprlib.repr(max_moves)}"
            )
        affordable = (cost <= budget[None]) & paying_candidates(value, cost, usual, balance,
                                                                skip_threshold)
        pick = np.argmax(np.where(affordable, value, -np.inf), 0)
    if skip_threshold is not None:
        gain = balance[pick, np.arange(layers)] - balance[0]
        pick = np.where(gain < skip_threshold, 0, pick)
    return pick


def plan_incremental(
    request: PlanRequest,
    previous: Placement | torch.Tensor,
    *,
    max_moves: int | torch.Tensor | None = None,
    skip_threshold: float | None = None,
) -> Placement:
    """Re-plan ``request`` from the placement in force ``previous`` (``[L, R]`` or a
    :class:`Placement`); see the module docstring. Returns a validated placement.

    ``max_moves``: ``None`` (decide by expected next-window gain), an int (slots in total
    over all layers, beyond forced moves) or ``[L]`` ints (per layer).
    ``skip_threshold``: leave a layer as it is (after forced moves) when its expected
    next-window balancedness would rise by less than this.
    """
    if request.gpu_speed is not None:
        # every candidate here is built and scored for equal GPUs
        raise ValueError("gpu_speed cannot be combined with previous (incremental planning)")
    given = max_moves  # as the caller wrote it, for the message
    max_moves = check_budget(max_moves, skip_threshold)
    if isinstance(max_moves, np.ndarray) and max_moves.shape != (request.num_layers,):
        # before any work, by the count (a whole list of thousands in the message did
        # not say what was wrong: new-user pass)
        raise ValueError(f"max_moves per layer needs one int per layer, {request.num_layers}; "
                         f"got {max_moves.size}: {reprlib.repr(given)}")
    skip_threshold = as_threshold(skip_threshold)
    options = request.options.incremental
    topo = request.topology
    # the price of moving all of a layer's slots, in the choice of candidates (the rules
    # that offer a fresh plan keep ``move_price``: scaled down at 5 slots per GPU they
    # offered more fresh plans, 1.5x the call's time, for no better next window;
    # BENCHMARKS.md §3)
    price = options.layer_price(topo.slots_per_gpu)
    # fresh plans are relabelled onto the old GPUs (an assignment problem per layer, over
    # the GPUs, or over the nodes and the GPUs of a node under the hierarchical policy):
    # refused before any work where that alone would take minutes (attacker pass: 58
    # layers on 8,192 GPUs asked for 14.5 GiB, 16,384 GPUs killed the process)
    block = (max(topo.num_nodes, topo.gpus_per_node) if request.policy == "hierarchical"
             else topo.num_gpus)
    too_large = relabel_size_problem(request.num_layers, block, fresh_plans_per_layer(request))
    if too_large:
        raise ValueError(f"{too_large}; plan without previous (the CLI: without --previous) "
                         f"for a fresh plan")
    old = previous_map(previous, request)
    # (on one node SGLang's runtime table, but under a skip threshold with fair="auto":
    # the even split's planner, which takes one)
    if request.dispatch == "nearest" and (topo.num_nodes > 1 or (
            request.plans_runtime_table
            and (skip_threshold is None or request.fair == "divide"))):
        return _plan_nearest(request, old, max_moves, skip_threshold)
    if request.dispatch == "nearest" and request.fair == "avoid":  # one node: fresh only
        raise ValueError("fair='avoid' on one node is planned fresh (the hot experts on every "
                         "GPU): plan without previous (CLI: --previous), or leave fair out "
                         "(--fair) to plan from it")
    weight = _host_weight(request)
    base, replanned, node_of_group = forced_base(request, old, weight)
    quota = max(2, round(options.quota * topo.num_replicas))
    # a layer re-planned from scratch by the forced moves is searched already: its
    # ladder was taken in 3 layers of 232 on vLLM's first call (BENCHMARKS.md §3)
    layer_quota = np.where(replanned, 0, quota)
    # under a budget below the ladder's reach, a fine ladder too: the reach of the steps
    # the caller set, else of the default 4 (where the line was measured: more steps at
    # 4-8 slots per GPU moved it to half the slots at 4, and a 20 % budget took 2.2x the
    # time hierarchical; BENCHMARKS.md §3 "Forty-ninth session")
    steps = options.steps_for(topo.slots_per_gpu, request.dispatch, topo.num_nodes)
    line = DEFAULT_INCREMENTAL_STEPS if options.steps is None else options.steps
    small = fine_layers(max_moves, quota * line, request.num_layers)
    fine_quota = None if small is None else np.where(small & ~replanned, FINE_QUOTA, 0)
    if fine_quota is not None and not fine_quota.any():
        fine_quota = None
    live_gpus = request.live.cpu().numpy()
    num_live = int(live_gpus.sum())

    units = units_of(weight)  # [L, E] integer loads, as every score takes them
    # (draws go by rank inside each node where node rows are scored too: the same numbers)
    nodes = topo.num_nodes if request.policy == "hierarchical" else 1

    def score(chosen: np.ndarray, **known) -> tuple[np.ndarray, np.ndarray]:
        return expected_peak(weight, chosen, num_live, options.drift,
                             groups=topo.num_groups, group_share=options.group_share,
                             units=units, nodes=nodes, **known)

    if request.policy == "hierarchical":
        # node ladders, and warm regroups where the best group→node assignment differs
        # (and the fine ladder's, in the same batched search)
        scored = hierarchy.candidates(weight, base, request, layer_quota, max_moves is not None,
                                      node_of_group, units, fine_quota)
        # the candidates the rule without a budget has (a budget adds the transfer-only
        # ones, 1-3 of the ladder and of the regroups' ladder, and the fine ladder's)
        rungs = scored.rungs
        usual = np.arange(len(scored.peak)) < 2 * rungs
        if max_moves is not None:
            usual[np.r_[1:4, rungs + 1:rungs + 4]] = False
        peak, now, cost, take = scored.peak, scored.now, scored.cost, scored.take
        # a fresh hierarchical plan, relabelled onto the old nodes and GPUs, where the
        # ladders end far above the bound: the ladder refines inside nodes and a regroup
        # only moves groups, so neither undoes an old packing within an assignment that
        # stays (attacker pass: 3×16 loads on 8 GPUs whose workload changed kept 0.85
        # where a fresh plan gave 0.99, in 54 of 240 small layers)
        # (the best candidate's peaks: expected, and in sample among those offered)
        offered = np.isfinite(peak) & usual[:, None]
        best_now = np.where(offered, now, np.inf).min(0)
        need = far_from_bound(np.where(offered, peak, np.inf).min(0), best_now, scored.bound,
                               options.move_price)
        need &= ~replanned
        if topo.slots_per_gpu <= COARSE_SLOTS:  # little room for swaps, as under global
            need |= ~replanned
        if need.any() and request.active_gpus is None:
            extra = fresh_candidates(request, base, np.nonzero(need)[0])
            extra_peak, extra_now = score(extra)
            take = _with_candidates(take, extra, len(peak))
            peak = np.concatenate([peak, np.where(need[None], extra_peak, np.inf)])
            now = np.concatenate([now, extra_now])
            cost = np.concatenate([cost, (extra != base[None]).sum(2)])
            usual = np.append(usual, [True] * len(extra))
    else:
        back = max(1, round(1 / 16 / options.quota))
        # the ladder's first rung is not scored where the rule below compares later ones:
        # it was picked in 2 of 1392 steady layer plans, and dropping it left the next
        # window and the moves unchanged (BENCHMARKS.md §3)
        drop_first_rung = steps - back >= 2
        candidates, transfers, known, fine = _refine_rows(
            weight, base, request, layer_quota, max_moves is not None,
            drop_first_rung=max_moves is None and drop_first_rung, fine_quota=fine_quota)
        if fine is None:
            peak, now = score(_live_only(candidates, live_gpus, topo), **known)
        else:  # both ladders scored at once (no known counts under a budget)
            both = np.concatenate([candidates, fine])
            peak, now = score(_live_only(both, live_gpus, topo))
            split = len(candidates)
            (peak, fine_peak), (now, fine_now) = np.split(peak, [split]), np.split(now, [split])
        # the candidates the rule without a budget has (a budget adds the transfer-only
        # ones, 1-3, the first rung where that rule drops it, and the fine ladder's)
        usual = np.ones(len(candidates), bool)
        if max_moves is not None:
            usual[1:4] = False
            usual[4:5] = not drop_first_rung
        # a fresh plan, relabelled onto the old GPUs, for the layers whose ladder:
        # - still gains a move price over its last 1/16 of the slots (the last step at
        #   the default quota; at least one step): its reach ran out;
        # - starts from replica counts further from Jefferson's than one step's quota
        #   (vLLM's initial map, a changed workload): the transfers spend its reach and
        #   its end keeps the old packing;
        # - ends further from balance in sample than the drift's own excess over it,
        #   where a perfect balance would beat it by a move price: an old packing the
        #   ladder cannot undo (e.g. hot replicas stacked on few GPUs, with the right
        #   counts). Below that excess the noise decides the next window, and that bound
        #   overstates what a fresh plan gains: in steady state the fresh plans it asked
        #   for were taken in 1 layer of 36, at a fresh plan's fixed cost per call
        #   (BENCHMARKS.md §3)
        # (on the rule without a budget's own rungs: at 0-1 swap steps a budget's
        # transfer-only rungs stood in their place here, offering fresh plans that rule
        # lacks, and it let a budget move more slots in a layer; attacker pass)
        rungs = np.nonzero(usual)[0]
        balance = 1.0 / peak[rungs]
        gaining = balance[-1] - balance[max(0, len(balance) - 1 - back)] > options.move_price
        end = rungs[-1]  # the ladder's end
        far = far_from_bound(peak[end], now[end], 1.0, options.move_price)
        # with at most 3 slots per GPU the swap search has little room and the ladder
        # ends short of a fresh plan in most layers (at 2–3 slots on synthetic loads the
        # next window fell 0.009–0.011 below a fresh plan's): every layer is offered one
        coarse = topo.slots_per_gpu <= COARSE_SLOTS
        # a layer still holding the engines' static map (slot i holds expert i % E) was
        # never planned: nothing in it is worth keeping, and a ladder from it keeps a
        # packing that later rebalances never undo (from vLLM's first call on generated
        # traces: 0.002-0.012 below vLLM's greedy on the next windows; BENCHMARKS.md §4)
        static = ((base == np.arange(topo.num_replicas) % weight.shape[1]).all(1)
                  if max_moves is None and skip_threshold is None
                  else np.zeros(request.num_layers, bool))
        need = gaining | (transfers > layer_quota) | far | coarse | static
        if need.any():
            extra = fresh_candidates(request, base, np.nonzero(need)[0])
            extra_peak, extra_now = score(_live_only(extra, live_gpus, topo))
            peak[:, static] = np.inf  # only the fresh plans are left there
            candidates = np.concatenate([candidates, extra])
            peak = np.concatenate([peak, np.where(need[None], extra_peak, np.inf)])
            now = np.concatenate([now, extra_now])
            usual = np.append(usual, [True] * len(extra))
        if fine is not None:
            candidates = np.concatenate([candidates, fine])
            peak, now = np.concatenate([peak, fine_peak]), np.concatenate([now, fine_now])
            usual = np.concatenate([usual, np.zeros(len(fine), bool)])
        cost = (candidates != base[None]).sum(2)

        def take(pick: np.ndarray) -> np.ndarray:
            return candidates[pick, np.arange(request.num_layers)]

    # never worse than the placement in force on the window at hand: a candidate whose
    # in-sample peak exceeds the base's is not taken, whatever its expected next window
    peak = np.where(now <= now[0][None] * (1 + 1e-12), peak, np.inf)
    if request.idle is not None:
        # a layer that carried no load (a dense layer of a dump, vLLM's profile run) is
        # balanced whatever is where: moving its weights would buy nothing
        peak[1:, request.idle.cpu().numpy()] = np.inf
    layer_load = layer_loads(request, weight) if isinstance(max_moves, int) else None
    pick = _choose(peak, cost, topo.num_replicas, max_moves, skip_threshold, price,
                   layer_load, usual)
    best = take(pick)
    # the guard above compares integer units (score.units_of), which round small experts
    # beside a huge one: a layer whose exact peak came out above the placement in
    # force's keeps the latter. A GPU's units are off by less than 1.5·S, so only layers
    # whose two unit peaks are closer than twice that are checked on exact loads
    error = 3.0 * topo.slots_per_gpu * num_live / np.maximum(units.sum(1), 1e-300)
    layer = np.arange(request.num_layers)
    close = now[pick, layer] > now[0] - error
    changed = np.nonzero((best != base).any(1) & close)[0]
    if len(changed):
        worse = exact_peak(weight[changed], best[changed], topo.num_gpus) > (
            exact_peak(weight[changed], base[changed], topo.num_gpus))
        best[changed[worse]] = base[changed[worse]]
    if topo.slots_per_gpu == 1:
        # with one slot per GPU a GPU's load is its replica's: a plan with the placement
        # in force's replica counts has its GPU loads, on other GPUs, and no drift tells
        # them apart. The score's draws go by rank inside each node (node rows are scored
        # apart), so moving experts between nodes still changes a hierarchical score
        # (review pass: 910 slots moved at 256 experts on 256 GPUs, 4 nodes, for
        # nothing; 1,472 with the rank draws and without this rule). Global plans no
        # longer need it; it costs two counts at one slot per GPU only
        same = (moves.counts_of(best, request.num_experts)
                == moves.counts_of(base, request.num_experts)).all(1)
        best[same] = base[same]
    undone = undo_forced_losses(request, weight, old, base, best, replanned,
                                Offered(now, cost, take), lambda chosen: score(chosen)[1])
    if max_moves is None and skip_threshold is None:
        best = undone
    else:  # where a limit the user set allows it
        best = within_limits(undone, best, base, old, max_moves, skip_threshold,
                             lambda rows: 1.0 / score(undone[None])[0][0, rows]
                             - 1.0 / peak[0, rows])
    phy2log = torch.from_numpy(best).to(request.weight.device)
    placement = Placement.from_phy2log(
        phy2log, request.num_experts, topo, request.policy, request.active_gpus
    )
    return validate_planned(placement)



def _with_candidates(take: Callable[[np.ndarray], np.ndarray], extra: np.ndarray,
                     first: int) -> Callable[[np.ndarray], np.ndarray]:
    """``take`` with the last candidates, ``first`` on, read from ``extra [F, L, R]``."""
    def taken(pick: np.ndarray) -> np.ndarray:
        layer = np.nonzero(pick >= first)[0]
        out = take(np.where(pick >= first, 0, pick))
        out[layer] = extra[pick[layer] - first, layer]
        return out
    return taken


def _plan_nearest(
    request: PlanRequest, old: np.ndarray, max_moves: object, skip_threshold: float | None
) -> Placement:
    """Incremental planning under SGLang's nearest dispatch (:mod:`eplb.online.nearest`).

    The global policy with every GPU live has a budgeted planner (a total ``max_moves``
    goes where the moved slots pay the most, :mod:`eplb.online.nearest`). The locality
    policy and dead GPUs get a fresh dispatch-aware plan relabelled onto the old GPUs (no
    budget). The locality policy then keeps, per layer, the map in force or re-packs
    inside its nodes where that plan does not pay (:mod:`eplb.online.locality`); with dead
    GPUs under the global policy a layer takes it only where it pays against the map in
    force made valid for the call (:func:`eplb.online.nearest.choose_paying`), as every
    layer does with every GPU live."""
    topo = request.topology
    if skip_threshold is not None:
        raise ValueError("skip_threshold is not supported with dispatch='nearest'")
    # the even split's planner inside keeps nearest dispatch's steps (IncrementalOptions.
    # steps_for: 4 on one node, for the table's ladder and the budget's even-split offer)
    steps = request.options.incremental.steps_for(topo.slots_per_gpu, "nearest",
                                                  topo.num_nodes)
    even = dataclasses.replace(request, dispatch="even", fair="auto", source=None, options=(
        request.options if topo.num_nodes > 1 else with_incremental(request.options,
                                                                     steps=steps)))
    locality = request.policy == "locality" and request.active_gpus is None
    if locality or not takes_budget(request.dispatch, topo.num_nodes, request.policy,
                                    request.active_gpus is not None):
        if max_moves is not None and not locality:
            raise ValueError("max_moves with dispatch='nearest' is supported for the global "
                             "and locality policies with every GPU live; here eplb re-plans "
                             "and relabels onto the old GPUs")
        fresh = fresh_phy2log(request).cpu()
        live = request.live.cpu().numpy()
        out = fresh.clone()
        # GPUs are relabelled only inside their node: the rule serves a token from its
        # node first, so a plan relabelled across nodes is another plan (with a dead GPU,
        # relabelling over all live GPUs turned 0.9997 into 0.90 on a real DeepSeek-V3 dump)
        node_of_gpu = np.arange(topo.num_gpus) // topo.gpus_per_node
        per_node = [live] if request.active_gpus is None else [
            live & (node_of_gpu == node) for node in range(topo.num_nodes)]
        for gpus in per_node:
            if not gpus.any():
                continue
            slot = gpus.repeat(topo.slots_per_gpu)
            out[:, torch.from_numpy(slot)] = align_to_previous(
                fresh[:, slot], torch.from_numpy(old[:, slot]), int(gpus.sum()),
                topo.gpus_per_node if request.active_gpus is None else None)
        if locality:  # per layer the map, re-packed in its nodes, or this plan
            out = plan_locality_incremental(request, old, out, max_moves)
        if request.policy == "global" and request.active_gpus is not None:
            # the relabelled fresh plan moves most slots of every layer: a layer whose map
            # in force (dead GPUs emptied, their experts re-homed) is served as well on
            # the window at hand or the next keeps it (found by the property tests: a
            # layer went from 0.667 to 0.660 on the window at hand)
            base = torch.from_numpy(forced_base(even, old, _host_weight(request))[0])
            host = dataclasses.replace(request, weight=request.weight.cpu(),
                                       active_gpus=request.active_gpus.cpu())
            out = choose_paying(host, torch.stack([base, out]))
            if request.idle is not None:
                out[request.idle.cpu()] = base[request.idle.cpu()]  # no load: nothing to gain
        placement = Placement.from_phy2log(out.to(request.weight.device), request.num_experts,
                                           topo, request.policy, request.active_gpus)
        return validate_planned(placement)
    if request.source is not None:
        # the candidates below are built and scored with tokens arising evenly: a source
        # given here was silently ignored
        raise ValueError("source is not used by incremental plans under dispatch='nearest' "
                         "with the global policy and every GPU live (their candidates assume "
                         "tokens arising evenly): leave source out, or plan without previous")
    weight = _host_weight(request)
    base_map, replanned, _ = forced_base(even, old, weight)
    base = torch.from_numpy(base_map)
    budget = None
    if max_moves is not None:
        layers = request.num_layers
        if isinstance(max_moves, (int, np.integer)) and not isinstance(max_moves, bool):
            if max_moves < 0:
                raise ValueError(f"max_moves must be >= 0 (slots in total), got {max_moves}")
            budget = int(max_moves)  # in total: spent where it pays (online/nearest.py)
        else:
            per_layer = np.asarray(max_moves)
            if (per_layer.shape != (layers,) or per_layer.dtype.kind not in "iu"
                    or bool((per_layer < 0).any())):
                raise ValueError(
                    f"max_moves must be a non-negative int (slots in total) or {layers} "
                    f"non-negative ints (slots per layer); got {reprlib.repr(max_moves)}"
                )
            # int64 (torch compares no unsigned type wider than 8 bits), capped to fit it
            budget = torch.tensor([min(int(v), 1 << 62) for v in per_layer], dtype=torch.int64)

    def warm_even(start: torch.Tensor, layer_budget: torch.Tensor | int | None) -> torch.Tensor:
        planned = plan_incremental(even, start, max_moves=layer_budget)
        return planned.phy2log.cpu()

    # the nearest candidates are built and scored on the host (their maps are host arrays;
    # SGLang's plugin passes host tensors anyway), the result goes back to the weight's
    # device
    host = dataclasses.replace(
        request, weight=request.weight.cpu(),
        source=None if request.source is None else request.source.cpu(),
        idle=None if request.idle is None else request.idle.cpu())
    if topo.num_nodes == 1:  # SGLang's runtime table: the ladder's rungs scored under it
        quota = max(2, round(request.options.incremental.quota * topo.num_replicas))
        layer_quota = np.where(replanned, 0, quota)

        def rungs(target: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            ladder, transfers, _, _ = _refine_rows(weight, base_map, even, layer_quota,
                                                   budget is not None, target=target)
            return ladder, transfers > layer_quota

        out = plan_table_incremental(host, base, budget, rungs, warm_even)
    else:
        out = plan_nearest_incremental(host, base, budget, warm_even)
    if request.idle is not None:
        out[request.idle.cpu()] = base[request.idle.cpu()]  # no load: nothing to gain
    placement = Placement.from_phy2log(out.to(request.weight.device), request.num_experts,
                                       topo, request.policy, request.active_gpus)
    return validate_planned(placement)


def _live_only(candidates: np.ndarray, live_gpus: np.ndarray, topo: Topology) -> np.ndarray:
    """``candidates [..., R]`` cut to the slots of the live GPUs ``live_gpus [P]`` (the
    next-window score sees only GPUs that serve)."""
    if live_gpus.all():
        return candidates
    return candidates[..., live_gpus.repeat(topo.slots_per_gpu)]
