"""Planners of online rebalancing: what a :class:`~eplb.online.rebalancer.Rebalancer`
calls every ``interval`` steps, and how it plans on a multi-window estimate.

- :func:`make_planner` builds a planner function ``(weight [L, E], previous) ->
  Placement`` from a name (``"eplb"``, ``"greedy"``, ``"none"``) or checks a callable;
- :func:`plan_estimate` plans on an :class:`~eplb.online.estimate.Estimate` (per layer,
  the best of the plans for its scenarios);
- :func:`trivial_placement` is the static placement of ``"none"``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from eplb.core.baselines import plan_greedy
from eplb.core.device_path import plans_on_host, to_host
from eplb.core.expert_ids import as_routing
from eplb.core.inputs import as_live_mask
from eplb.core.options import with_incremental
from eplb.core.placement import Placement, PlacementError
from eplb.core.planner import make_request, plan_fresh
from eplb.core.policies import resolve_policy
from eplb.core.topology import (
    Topology,
    check_total_slots,
    is_name,
    non_negative_int,
    positive_int,
)
from eplb.online.budget import check_budget, refuse_unscored, takes_budget
from eplb.online.estimate import Estimate, expected_max, interchangeable, select_per_layer
from eplb.online.incremental import plan_incremental
from eplb.online.settings import SCORE_OPTIONS, check_option_values, speeds_differ

#: a planner: ``(weight [L, E], the placement in force or None) -> Placement``
PlannerFn = Callable[[torch.Tensor, "Placement | None"], Placement]
#: the built-in planners :func:`make_planner` knows by name
PLANNERS = ("eplb", "greedy", "none")


def trivial_placement(
    num_experts: int,
    num_layers: int,
    topology: Topology,
    active_gpus: object = None,
    device: torch.device | str | None = None,
) -> Placement:
    """The static placement engines start from: live slot ``i`` holds expert ``i % E``.

    This is SGLang's ``init_trivial`` layout: the first ``E`` slots hold experts
    ``0..E-1`` contiguously and the ``R - E`` redundant slots replicate experts
    ``0, 1, ...`` again. Slots of dead GPUs (``active_gpus`` False) hold ``-1``. The
    tensors are made on ``device`` (default CPU). Raises ``ValueError`` when there are
    fewer live slots than experts, or more slots over all layers than eplb plans.
    """
    if not isinstance(topology, Topology):
        raise TypeError(f"topology must be an eplb.Topology, got {type(topology).__name__}")
    num_experts = positive_int("num_experts", num_experts)
    num_layers = non_negative_int("num_layers", num_layers)
    # the planners' limit, before the [L, R] map exists: 2**40 layers failed in the
    # allocator, and a large enough shape short of that takes the host's memory
    check_total_slots(num_layers, topology)
    slots = topology.slots_per_gpu
    if active_gpus is None:
        live_slot = torch.ones(topology.num_replicas, dtype=torch.bool)
        active = None
    else:
        # the check every planner applies: a cast to bool read GPU ids [0, 1, 2, 3] as a
        # mask with GPU 0 dead, and 0.5 as live
        active = as_live_mask(active_gpus, topology.num_gpus, torch.device("cpu"))
        live_slot = active.repeat_interleave(slots)
    num_live = int(live_slot.sum())
    if num_live < num_experts:
        raise ValueError(
            f"{num_live} live slots cannot hold {num_experts} experts (num_replicas="
            f"{topology.num_replicas}, active GPUs {num_live // slots}/{topology.num_gpus})"
        )
    row = torch.full((topology.num_replicas,), -1, dtype=torch.int64)
    row[live_slot] = torch.arange(num_live) % num_experts
    if active is not None:
        active = active.to(device)
    return Placement.from_phy2log(row.repeat(num_layers, 1).to(device), num_experts, topology,
                                  "global", active)


def _check_plan_options(planner: str, plan_options: dict[str, Any]) -> None:
    """Refuse keyword arguments the built-in ``planner`` does not take, naming them."""
    takes: dict[str, Callable[..., Any] | None] = {
        "eplb": make_request, "greedy": plan_greedy, "none": None}
    accepts = takes[planner]
    known = [] if accepts is None else [
        name for name, param in inspect.signature(accepts).parameters.items()
        if param.kind is param.KEYWORD_ONLY and name != "stacklevel"]
    if planner == "eplb":
        known += list(SCORE_OPTIONS)
    unknown = sorted(set(plan_options) - set(known))
    if unknown:
        raise ValueError(f"planner {planner!r} does not take {', '.join(unknown)}; its "
                         f"options: {', '.join(known) or 'none'}")


def _check_planner_signature(planner: Callable[..., Any]) -> None:
    """Refuse a callable that cannot be called as ``planner(weight, previous)``, before any
    replay (new-user pass: ``lambda w, R, P: eplb.plan(w, R, P)`` failed with a raw
    ``TypeError`` at the first rebalance). Callables whose signature Python cannot read
    (some builtins) are taken as they are."""
    try:
        # (not a functools.wraps target's: the wrapper is what is called)
        signature = inspect.signature(planner, follow_wrapped=False)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None)
    except TypeError:
        name = getattr(planner, "__name__", type(planner).__name__)
        raise ValueError(
            f"a planner callable is called as planner(weight [L, E], previous: Placement | "
            f"None) -> Placement; {name}{signature} cannot be (the cluster's sizes are the "
            "simulation's or the Rebalancer's: close over them, e.g. lambda w, prev: "
            "eplb.plan(w, 288, 32, previous=prev))") from None


def make_planner(
    planner: str | PlannerFn,
    topology: Topology,
    *,
    incremental: bool = False,
    max_moves: int | None = None,
    skip_threshold: float | None = None,
    active_gpus: object = None,
    **plan_options: Any,
) -> PlannerFn:
    """Resolve ``planner`` into a function ``(weight [L, E], previous) -> Placement``.

    ``incremental`` (``"eplb"`` only) forwards ``previous``, ``max_moves`` and
    ``skip_threshold`` to :func:`eplb.plan`; otherwise planning starts from scratch.
    A callable is returned unchanged (it receives ``previous`` and decides itself); the
    options of the built-in planners (``max_moves``, ``skip_threshold``, ``active_gpus``,
    ``plan_options``) cannot reach it and are refused.
    """
    if not isinstance(topology, Topology):  # (an AttributeError from deep inside before)
        raise TypeError(f"topology must be an eplb.Topology, got {type(topology).__name__}")
    if callable(planner):
        _check_planner_signature(planner)
        if not isinstance(incremental, bool):
            raise ValueError(f"incremental must be True or False, got {incremental!r}")
        # a callable plans by itself: these were accepted and dropped, so a replay scored
        # a GPU given as dead as serving, and moves beyond max_moves (attacker pass)
        unused = [name for name, value in (("max_moves", max_moves),
                                           ("skip_threshold", skip_threshold),
                                           ("active_gpus", active_gpus)) if value is not None]
        unused += sorted(plan_options)
        if unused:
            raise ValueError(
                f"the planner is a callable, which plans by itself: {', '.join(unused)} "
                f"(options of eplb's built-in planners) would not reach it; apply them "
                f"inside the callable, e.g. eplb.plan(weight, ..., previous=previous, "
                f"max_moves=...)")
        return planner
    if not is_name(planner, PLANNERS):
        raise ValueError(f"unknown planner {planner!r}; accepted: {', '.join(PLANNERS)} or a "
                         "callable (weight [L, E], previous) -> Placement")
    topo = topology
    if planner != "eplb" and (incremental or max_moves is not None or skip_threshold is not None):
        raise ValueError(f"incremental/max_moves/skip_threshold need planner 'eplb', got "
                         f"{planner!r}")
    # every mistake surfaces here, at construction, not at the first rebalance hours later
    if not isinstance(incremental, bool):
        raise ValueError(f"incremental must be True or False, got {incremental!r}")
    if not incremental and (max_moves is not None or skip_threshold is not None):
        raise ValueError("max_moves and skip_threshold limit incremental plans; pass "
                         "incremental=True")
    max_moves = check_budget(max_moves, skip_threshold)
    dead = False
    if active_gpus is not None:
        dead = not bool(as_live_mask(active_gpus, topo.num_gpus, torch.device("cpu")).all())
    _check_plan_options(planner, plan_options)
    if planner == "eplb":
        check_option_values({**plan_options, "active_gpus": active_gpus,
                             "skip_threshold": skip_threshold}, topo)
        scored = [k for k in SCORE_OPTIONS if plan_options.get(k) is not None]
        if scored and not incremental:
            # (as eplb.plan refuses them without previous=: a fresh plan scores no moves,
            # and they were taken and changed nothing)
            raise ValueError(f"{', '.join(scored)}: only for incremental plans, which score "
                             "moves from the placement in force; pass incremental=True")
        differ = speeds_differ(plan_options.get("gpu_speed"), active_gpus, topo)
        if incremental and differ:
            # plan_incremental plans for equal GPUs: from the second rebalance on the
            # speeds were dropped without a word, and the plans undid the fresh one's
            # speed-aware packing (eplb.plan refuses gpu_speed with previous= alike)
            raise ValueError("gpu_speed cannot be combined with incremental=True: plans "
                             "from the placement in force are made for equal GPUs; plan "
                             "every rebalance fresh (incremental=False) for GPU speeds")
        # the policy the plans will take, as far as the cluster decides it: "auto" is
        # global with dead GPUs or GPU speeds, as eplb.plan resolves it (a grouped
        # cluster whose groups do not split the experts, known only from the counts, is
        # global too: refused here all the same, and policy="global" says it)
        # (quiet: eplb.plan warns when it plans; a catch_warnings block here, made from
        # several threads at once, left an "ignore" filter behind; attacker pass)
        concrete = resolve_policy(plan_options.get("policy", "auto"), topo, None,
                                  has_dead_gpus=dead, quiet=True,
                                  has_speeds=differ)
        if plan_options.get("dispatch") == "nearest" and concrete != "global" and (
            plan_options.get("fair", "auto") != "auto" or plan_options.get("source") is not None
        ):
            # eplb.plan refuses these too, but only at the first rebalance: a rebalancer
            # that cannot plan is refused when it is made
            raise ValueError(f"fair and source shape the global policy's plan for nearest "
                             f"dispatch; the {concrete} policy does not use them (pass "
                             f"policy='global')")
        if plan_options.get("dispatch") == "nearest" and max_moves is not None and not (
            takes_budget("nearest", topo.num_nodes, concrete, active_gpus is not None)
        ):
            # (as eplb.plan: on one node every plan takes the budget)
            raise ValueError("max_moves with dispatch='nearest' on several nodes needs the "
                             "global or locality policy with every GPU live (other plans "
                             "re-plan and relabel, unbudgeted)")
        if incremental:  # as eplb.plan refuses them where no move is scored
            refuse_unscored(scored, plan_options.get("dispatch") or "even", topo.num_nodes,
                            concrete)
        if (plan_options.get("dispatch") == "nearest" and incremental
                and plan_options.get("fair") == "avoid" and topo.num_nodes == 1):
            # planned fresh only (eplb.plan refuses previous=): every rebalance after the
            # first failed (review pass)
            raise ValueError("fair='avoid' on one node is planned fresh (the hot experts on "
                             "every GPU): leave incremental out, or leave fair out")
        if (plan_options.get("dispatch") == "nearest" and incremental
                and plan_options.get("source") is not None and concrete == "global"
                and active_gpus is None):
            raise ValueError("source is not used by incremental plans under dispatch='nearest' "
                             "with the global policy and every GPU live: leave source out, "
                             "or plan without incremental")

        incremental_knobs = {k: plan_options.pop(k, None) for k in SCORE_OPTIONS}
        if any(v is not None for v in incremental_knobs.values()):
            plan_options["options"] = with_incremental(plan_options.get("options"),
                                                       **incremental_knobs)

        def eplb_planner(weight: torch.Tensor, previous: Placement | None) -> Placement:
            if plans_on_host(weight):
                # as eplb.plan: the CPU's plan, bit for bit, returned on the loads' device
                return eplb_planner(weight.cpu(), to_host(previous)).to(weight.device)
            request = make_request(weight, topo.num_replicas, topo.num_gpus, topo.num_nodes,
                                   topo.num_groups, active_gpus=active_gpus, **plan_options)
            if incremental and previous is not None:
                return plan_incremental(request, previous, max_moves=max_moves,
                                        skip_threshold=skip_threshold)
            return plan_fresh(request)

        def check_shape(num_layers: int, num_experts: int) -> None:
            # what the counts' shape decides, checked quietly (eplb.plan warns when it
            # plans) at a Rebalancer's first step, not its first rebalance thousands of
            # steps on
            _enough_slots(topo, num_experts, active_gpus)
            resolve_policy(plan_options.get("policy", "auto"), topo, num_experts,
                           has_dead_gpus=dead, quiet=True, has_speeds=differ)
            if plan_options.get("routing") is not None:
                as_routing(plan_options["routing"], num_layers, num_experts)
            if isinstance(max_moves, np.ndarray) and max_moves.shape != (num_layers,):
                # a per-layer budget of another length failed only at the first plan from
                # a placement in force: the second rebalance without ``initial``, 2 x
                # interval steps on, and every one after it (attacker pass)
                raise ValueError(f"max_moves per layer needs one int per layer, {num_layers}; "
                                 f"got {max_moves.size}")

        eplb_planner.check_shape = check_shape  # type: ignore[attr-defined]
        return eplb_planner
    if planner == "greedy":
        if active_gpus is not None:  # DeepSeek's greedy places on every GPU
            raise ValueError(f"planner {planner!r} does not support active_gpus; use 'eplb' "
                             "(or 'none' for the static layout over the live GPUs)")

        def greedy_planner(weight: torch.Tensor, previous: Placement | None) -> Placement:
            return plan_greedy(weight, topo.num_replicas, topo.num_gpus, topo.num_nodes,
                               topo.num_groups, **plan_options)

        def greedy_shape(num_layers: int, num_experts: int) -> None:
            _enough_slots(topo, num_experts)  # and DeepSeek's own choice of policy:
            resolve_policy(plan_options.get("policy", "auto"), topo, num_experts,
                           rule="deepseek", quiet=True)

        greedy_planner.check_shape = greedy_shape  # type: ignore[attr-defined]
        return greedy_planner

    def static_shape(num_layers: int, num_experts: int) -> None:
        _enough_slots(topo, num_experts, active_gpus)

    def static_planner(weight: torch.Tensor, previous: Placement | None) -> Placement:
        # the engines' start-up layout over the live GPUs: the baseline on a degraded
        # cluster too (it was refused, though trivial_placement takes dead GPUs)
        return trivial_placement(weight.shape[-1], weight.shape[0], topo, active_gpus,
                                 device=weight.device)

    static_planner.check_shape = static_shape  # type: ignore[attr-defined]
    return static_planner


def _enough_slots(topology: Topology, num_experts: int, active_gpus: object = None) -> None:
    """Every expert a slot (on a live GPU), as eplb.plan and the static layout need."""
    if topology.num_replicas < num_experts:
        raise ValueError(f"num_replicas ({topology.num_replicas}) must be at least the number "
                         f"of experts ({num_experts}): every expert needs a slot")
    if active_gpus is not None:
        live = int(as_live_mask(active_gpus, topology.num_gpus, torch.device("cpu")).sum())
        if live * topology.slots_per_gpu < num_experts:
            raise ValueError(f"only {live} of {topology.num_gpus} GPUs are live: "
                             f"{live * topology.slots_per_gpu} slots cannot hold "
                             f"{num_experts} experts")


def plan_estimate(
    estimate: Estimate,
    planner: PlannerFn,
    previous: Placement | None = None,
    *,
    keep: Placement | None = None,
    batch: bool = True,
    reduce: str = "mean",
    total_budget: bool = False,
    realised: dict[str, Any] | None = None,
) -> Placement:
    """Plan on an :class:`~eplb.online.estimate.Estimate`.

    Without scenarios this is ``planner(estimate.weight, previous)``. With scenarios every
    candidate weight is planned (one planner call on the candidates stacked as
    ``[C * L, E]`` when ``batch`` and there is no ``previous``; planners treat layers
    independently), ``keep`` (the placement in force; keeping a layer costs no moves)
    joins the candidates when it has their experts and live GPUs, and
    :func:`~eplb.online.estimate.select_per_layer` keeps the best per layer.

    ``total_budget``: the planner caps each plan's moves from ``previous`` by a total over
    all layers (``max_moves`` as an int). A per-layer choice among such plans may move more
    than any one of them, so where it moves more than the plan on ``estimate.weight`` the
    layers whose extra moves buy the least go back to that plan's, until it moves no more.

    ``realised``: how the engine realises the loads, the keywords ``gpu_speed``,
    ``dispatch`` and ``source`` of :func:`~eplb.online.estimate.expected_max` (the plans
    were made for them: scoring them as an even split on equal GPUs chose, per layer,
    what the engine serves worse).
    """
    if estimate.scenarios is None or estimate.candidates is None:
        return _placement_of(planner(estimate.weight, previous), estimate.weight.shape[0])
    cands = estimate.candidates
    num_cands, num_layers, num_experts = cands.shape
    if batch and previous is None:
        stacked = _placement_of(planner(cands.reshape(num_cands * num_layers, num_experts), None),
                                num_cands * num_layers)
        rows = stacked.phy2log.view(num_cands, num_layers, -1)
        plans = [Placement.from_phy2log(r, num_experts, stacked.topology, stacked.policy,
                                        stacked.active_gpus) for r in rows]
    else:
        plans = [_placement_of(planner(c, previous), num_layers) for c in cands]
    # the placement in force is a candidate only where it could stay: not when a GPU it
    # uses has died (or one it leaves empty is live again), nor for other experts, and
    # only in its layers that keep the plans' contract
    # the contract the plans keep: anti-affinity only where every plan keeps it (DeepSeek's
    # greedy and a user's planner may stack replicas in some candidates' plans and not in
    # others': a mix of them was refused; review pass)
    anti_affinity = all(_passes(plan, True) for plan in plans)
    kept = None if keep is None else _keepable(keep, plans[0], anti_affinity)
    if kept is not None:
        plans.append(kept)
    realised = dict(realised or {})
    chosen = select_per_layer(plans, estimate.scenarios, reduce, **realised)
    if total_budget and previous is not None:
        chosen = _within_moves(chosen, plans[0], previous, estimate.scenarios, reduce,
                               realised)
    # layers of valid candidates make a valid placement: checked all the same, as every
    # placement eplb returns is (a planner's invalid plan is named as the Rebalancer names it)
    try:
        return chosen.validate(anti_affinity=anti_affinity)
    except PlacementError as exc:
        raise PlacementError(f"the planner returned a placement that breaks the contract: "
                             f"{exc}") from None


def _keepable(keep: Placement, plan: Placement, anti_affinity: bool) -> Placement | None:
    """The placement in force ``keep`` as a candidate beside ``plan`` (one of the call's
    plans): under ``plan``'s policy and live GPUs, with each layer that would break the
    contract ``plan`` keeps replaced by ``plan``'s own (where it then ties, the plan wins);
    ``None`` where it cannot stand beside the plans at all (other experts, shape or live
    GPUs).

    The contract is ``plan``'s: its policy (a map whose groups straddle nodes is no
    hierarchical layer) and, with ``anti_affinity`` (where the plans keep it: DeepSeek's
    greedy stacks replicas, eplb's plans do not), no needlessly stacked replicas.
    Offered unchecked, a map in force that a greedy left stacked, or vLLM's initial map
    under the hierarchical policy, was kept in the layers it scored best, and the
    ``Rebalancer`` returned a placement that failed ``validate()``, or broke a forced
    hierarchical policy and was labelled ``"global"`` (attacker pass).
    """
    if keep.phy2log.shape != plan.phy2log.shape or not interchangeable(keep, plan):
        return None
    device = plan.phy2log.device

    def as_plan(rows: torch.Tensor) -> Placement:
        return Placement.from_phy2log(rows.to(device), plan.num_experts, plan.topology,
                                      plan.policy, plan.active_gpus)

    whole = as_plan(keep.phy2log)
    if _passes(whole, anti_affinity):  # the common case: one check
        return whole
    rows = keep.phy2log.to(device).clone()
    for layer in range(rows.shape[0]):  # the layers that break it take the plan's
        if not _passes(as_plan(rows[layer:layer + 1]), anti_affinity):
            rows[layer] = plan.phy2log[layer]
    return as_plan(rows)


def _passes(placement: Placement, anti_affinity: bool) -> bool:
    try:
        placement.validate(anti_affinity=anti_affinity)
    except PlacementError:
        return False
    return True


def _within_moves(chosen: Placement, first: Placement, previous: Placement,
                  scenarios: torch.Tensor, reduce: str,
                  realised: dict[str, Any] | None = None) -> Placement:
    """``chosen`` with layers of ``first`` put back, cheapest gain per extra move first,
    until it moves no more slots from ``previous`` than ``first`` does (which kept the
    budget)."""
    moves = chosen.moved_slots(previous).cpu()
    allowed = first.moved_slots(previous).cpu()
    excess = int(moves.sum() - allowed.sum())
    if excess <= 0:
        return chosen
    realised = dict(realised or {})
    gain = (expected_max(first, scenarios, reduce, **realised)
            - expected_max(chosen, scenarios, reduce, **realised))
    extra = moves - allowed
    layers = (extra > 0).nonzero().flatten()
    # the least expected gain per extra slot first; ties by layer
    order = sorted(layers.tolist(), key=lambda layer: (float(gain[layer]) / int(extra[layer]),
                                                        layer))
    phy2log = chosen.phy2log.clone()
    for layer in order:
        if excess <= 0:
            break
        phy2log[layer] = first.phy2log[layer].to(phy2log.device)
        excess -= int(extra[layer])
    return Placement.from_phy2log(phy2log, chosen.num_experts, chosen.topology, chosen.policy,
                                  chosen.active_gpus)


def _placement_of(result: object, layers: int) -> Placement:
    """A planner's result, which must be a :class:`Placement` of ``layers`` layers."""
    if not isinstance(result, Placement):
        raise TypeError(f"the planner must return an eplb.Placement, got "
                        f"{type(result).__name__} (wrap a phy2log tensor with "
                        "Placement.from_phy2log)")
    if result.num_layers != layers:
        raise ValueError(f"the planner returned a placement of {result.num_layers} layers "
                         f"for loads of {layers}")
    return result
