"""The planning pipeline's two ends: :func:`make_request` (every argument check) and
:func:`plan_fresh` (the one entry for a plan from scratch).

The pipeline, top to bottom::

    make_request            inputs, topology, policy resolution → PlanRequest
    plan_fresh              dead GPUs → global plan over the live ones; else the policy
      policy.place            (policies/) groups → nodes, then rows of global problems
        plan_rows             replication portfolio → packing, per row
      refine_assignment       GPU speeds: swaps that weigh each GPU's speed
    Placement.validate      the whole contract, before anything is returned

Incremental planning (:mod:`eplb.online.incremental`) calls :func:`plan_fresh` for its
fresh candidate and :func:`eplb.core.packing.refine_assignment` for its warm start.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import torch

from eplb.core.dispatch import check_dispatch
from eplb.core.dispatch_plan import FAIR_MODES, NEAREST_TIMES, nearest_size_problem
from eplb.core.expert_ids import as_routing, require_distinct_topk
from eplb.core.inputs import (
    as_gpu_speed,
    as_live_mask,
    as_seed,
    as_weight,
    planning_rows,
)
from eplb.core.map_tables import slot_gpu_loads
from eplb.core.options import LADDER_GAP, SECOND_LOOK_GAP, PackingOptions, PlanOptions
from eplb.core.packing import MAX_SWAPS_PER_ROW, refine_assignment
from eplb.core.packing.speed_start import keep_faster, speed_greedy
from eplb.core.placement import Placement, validate_planned
from eplb.core.policies import POLICIES, plan_rows, resolve_policy
from eplb.core.policies.global_policy import plan_for_nearest
from eplb.core.request import DEFAULT_SLACK, PlanRequest
from eplb.core.topology import Topology, check_total_slots, is_name, real_number


@functools.lru_cache(maxsize=1)
def _default_options() -> PlanOptions:
    """One shared ``PlanOptions()``: it is frozen, and building it (with its nested
    options and their checks) is a noticeable part of a small plan's fixed cost."""
    return PlanOptions()


def resolve_options(
    options: PlanOptions | None, num_candidates: int | None, refine_steps: int | None
) -> PlanOptions:
    """``options`` with the two shortcut knobs folded in."""
    if options is None:
        options = _default_options()
    elif not isinstance(options, PlanOptions):
        raise TypeError(f"options must be an eplb.PlanOptions, got {type(options).__name__}")
    if num_candidates is None and refine_steps is None:
        return options
    p = options.packing
    kwargs = {
        "num_candidates": p.num_candidates if num_candidates is None else num_candidates,
        "construction": p.construction,
        "noise": p.noise,
        "perturb_first": p.perturb_first,
    }
    if refine_steps is None:
        packing = PackingOptions(pair_steps=p.pair_steps, max_steps=p.max_steps, **kwargs)
    else:
        packing = PackingOptions.with_budget(refine_steps, **kwargs)
    return dataclasses.replace(options, packing=packing)


def as_slack(slack: object) -> float:
    """``slack`` as a finite float >= 0 (Python, NumPy and 0-d tensor numbers), else
    ``ValueError``. (``float(10**400)`` raised OverflowError here: real_number reads it.)"""
    number = real_number(slack)
    if number is None or not (math.isfinite(number) and number >= 0):
        raise ValueError(f"slack must be a finite number >= 0, got {slack!r}")
    return number


def check_dispatch_options(
    dispatch: str, policy: str, fair: str, has_source: bool, has_routing: bool,
    has_slack: bool = False,
) -> str:
    """``dispatch`` once it and the options that describe SGLang's nearest dispatch
    (``fair``, ``source``, ``routing``, the locality policy and its ``slack``) agree, else
    ``ValueError``."""
    dispatch = check_dispatch(dispatch)
    if has_slack and not is_name(policy, ("locality",)):
        # only the locality policy reads it: a slack given to another policy would be
        # dropped without a word, and the caller would think balance had been traded
        raise ValueError(f"slack is the locality policy's knob (node load allowed above the "
                         f"mean); policy {policy!r} does not use it: pass policy='locality' "
                         "(with dispatch='nearest'), or leave slack out")
    if not is_name(fair, FAIR_MODES):
        raise ValueError(f"fair must be one of {', '.join(FAIR_MODES)}, got {fair!r}")
    nearest_only = [name for name, given in (
        ("policy='locality'", is_name(policy, ("locality",))), ("fair", fair != "auto"),
        ("source", has_source), ("routing", has_routing)) if given]
    if nearest_only and dispatch != "nearest":
        verb = "describe" if len(nearest_only) > 1 else "describes"
        raise ValueError(f"{', '.join(nearest_only)} {verb} SGLang's nearest dispatch: "
                         "pass dispatch='nearest'")
    return dispatch


MAX_GPUS = 1 << 16  # the packing sorts (value, GPU) pairs packed with a 16-bit GPU index


def check_plan_size(num_layers: int, topology: Topology, num_experts: int) -> None:
    """Refuse, before anything is allocated, a problem beyond what eplb plans: more than
    65,536 GPUs, more than 2**25 slots over all layers (``L·R``), or a swap search of one
    layer beyond ``MAX_SWAPS_PER_ROW`` (``P/2 · S²``, where a GPU has more than 2 slots).
    Raises ``ValueError`` naming the limit."""
    slots, gpus = topology.slots_per_gpu, topology.num_gpus
    beyond = f"{slots} slots per GPU on {gpus} GPUs is beyond what eplb plans"
    if gpus > MAX_GPUS:
        raise ValueError(f"{beyond}: at most {MAX_GPUS} GPUs")
    check_total_slots(num_layers, topology)
    swaps = gpus // 2 * slots * slots  # (one GPU: no pair, no search)
    if slots > 2 and swaps > MAX_SWAPS_PER_ROW:
        raise ValueError(
            f"{beyond}: the swap search of one layer would score {swaps:,} swaps at once "
            f"(about {swaps * 32 / 2**30:.0f} GiB); at most {MAX_SWAPS_PER_ROW:,} (P/2 · S²)"
        )


def make_request(
    weight: object,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    *,
    policy: str = "auto",
    seed: int = 0,
    num_candidates: int | None = None,
    refine_steps: int | None = None,
    options: PlanOptions | None = None,
    active_gpus: object = None,
    gpu_speed: object = None,
    dispatch: str = "even",
    fair: str = "auto",
    source: object = None,
    routing: object = None,
    slack: float | None = None,
    stacklevel: int = 4,
) -> PlanRequest:
    """Check every planning argument and build the :class:`PlanRequest` (see
    :func:`eplb.plan` for the arguments: ``weight [L, E]`` or ``[E]``, ``active_gpus`` and
    ``gpu_speed`` ``[P]``). Raises ``TypeError``/``ValueError`` naming the
    problem; ``stacklevel`` points policy warnings at the user's call."""
    w, _ = as_weight(weight)  # float64 whatever the input's dtype (exact)
    topology = Topology(num_replicas, num_gpus, num_nodes, num_groups)
    num_experts = w.shape[1]
    if topology.num_replicas < num_experts:
        raise ValueError(
            f"num_replicas ({topology.num_replicas}) must be at least the number of experts "
            f"({num_experts}): every expert needs a slot"
        )
    check_plan_size(w.shape[0], topology, num_experts)
    seed = as_seed(seed)
    opts = resolve_options(options, num_candidates, refine_steps)
    live = None
    if active_gpus is not None:
        live = as_live_mask(active_gpus, topology.num_gpus, w.device)
        num_live_slots = int(live.sum()) * topology.slots_per_gpu
        if num_live_slots < num_experts:
            raise ValueError(
                f"only {int(live.sum())} of {topology.num_gpus} GPUs "
                f"{'is' if int(live.sum()) == 1 else 'are'} live: {num_live_slots} "
                f"slots cannot hold {num_experts} experts (each needs a replica on a live GPU)"
            )
        if bool(live.all()):
            live = None
    speed = None if gpu_speed is None else as_gpu_speed(gpu_speed, topology.num_gpus, w.device)
    if speed is not None:
        speed = planning_speeds(speed, live)
    if speed is not None:
        speed = relative_speeds(speed, live)
    dispatch = check_dispatch_options(dispatch, policy, fair, source is not None,
                                      routing is not None, slack is not None)
    if dispatch == "nearest" and speed is not None:
        raise ValueError("gpu_speed cannot be combined with dispatch='nearest'")
    topology = as_planned(topology, policy, stacklevel, dispatch)  # frames: resolve_policy's
    slack = DEFAULT_SLACK if slack is None else as_slack(slack)
    src = None
    if source is not None:
        src = as_gpu_speed(source, topology.num_gpus, w.device, name="source", allow_zero=True)
    ids = None
    if routing is not None:
        ids = as_routing(routing, w.shape[0], num_experts)
    chosen = resolve_policy(
        policy,
        topology,
        num_experts,
        has_dead_gpus=live is not None,
        has_speeds=speed is not None,
        stacklevel=stacklevel,
    )
    too_large = (nearest_size_problem(topology.num_gpus, topology.slots_per_gpu, num_experts,
                                     w.shape[0])
                 if dispatch == "nearest" and chosen == "global" and topology.num_nodes > 1
                 else None)
    if too_large:  # refused before minutes of search
        raise ValueError(
            f"dispatch='nearest' with the global policy over {topology.num_nodes} nodes is "
            f"beyond what eplb plans: {too_large} (its node-aware relabelling grows about as "
            f"GPUs³ and with the slots: {NEAREST_TIMES}). Plan with dispatch='even' (or "
            "policy='hierarchical')")
    if ids is not None and chosen != "locality":
        raise ValueError(f"routing gives the locality policy its co-selection statistics; the "
                         f"{chosen} policy does not use it (pass policy='locality')")
    if ids is not None:
        require_distinct_topk(ids, "routing")
    if fair == "divide" and (topology.num_nodes > 1 or live is not None or src is not None):
        raise ValueError("fair='divide' plans for SGLang's runtime table on one node with "
                         "every GPU live and tokens arising evenly (counts that divide the "
                         "GPUs); this call has "
                         + ("several nodes" if topology.num_nodes > 1 else
                            "dead GPUs" if live is not None else "a source"))
    if dispatch == "nearest" and chosen != "global" and (fair != "auto" or src is not None):
        raise ValueError(f"fair and source shape the global policy's plan for nearest "
                         f"dispatch; the {chosen} policy does not use them (pass "
                         f"policy='global')")
    if dispatch == "nearest" and policy == "auto" and chosen == "hierarchical":
        # auto follows DeepSeek's rule (groups on several nodes → hierarchical), which
        # balances far worse under the nearest rule than a global plan made for it
        warnings.warn(
            "eplb: policy 'auto' chose the hierarchical policy (groups on several nodes); "
            "under dispatch='nearest' it keeps each group on one node but balances far "
            "worse than policy='global' (0.75-0.89 against 0.997 on real DeepSeek-V3 loads, "
            "BENCHMARKS.md §14): pass policy='global' for balance, or "
            "policy='hierarchical' to keep the groups together",
            RuntimeWarning,
            stacklevel=stacklevel - 1,
        )
    planning, idle, shift = planning_rows(w)
    return PlanRequest(planning, topology, chosen, opts, seed, live, speed, dispatch, fair,
                       src, ids, slack, idle, shift)


def as_planned(topology: Topology, policy: str = "auto", stacklevel: int = 2,
               dispatch: str | None = None) -> Topology:
    """The cluster ``topology`` as eplb plans it under ``policy`` and ``dispatch``: itself,
    or one node, with a warning, where its GPUs do not divide over its nodes (the
    hierarchical and locality policies keep it and refuse it later; nearest dispatch,
    which serves a token from its own node first, is refused here).
    A ``Rebalancer`` records the same topology as its plans (attacker pass: it kept three
    nodes of 8 GPUs, then refused its own planner's one-node plan at every rebalance)."""
    if topology.num_gpus % topology.num_nodes and dispatch == "nearest":
        # refused where the plans are asked for (a Rebalancer or a replay failed only at
        # their first plan or score)
        raise ValueError(f"dispatch='nearest' serves a token from its own node first, so it "
                         f"needs nodes of equal size: num_gpus ({topology.num_gpus}) is not a "
                         f"multiple of num_nodes ({topology.num_nodes})")
    if topology.num_gpus % topology.num_nodes and not is_name(policy,
                                                              ("hierarchical", "locality")):
        return _one_node(topology, stacklevel + 1)
    return topology


def _one_node(topology: Topology, stacklevel: int) -> Topology:
    """``topology`` as one node, with a warning, for GPUs that do not divide over its nodes.

    Nodes of unequal size are not modelled, so only a global plan (which ignores nodes)
    fits such a cluster. The engines take the shape: vLLM resets ``num_nodes`` to 1 with a
    warning before its policy runs, and SGLang passes its node count unchecked and plans
    globally unless asked for hierarchical balancing, which eplb's hook then plans
    globally too (as one node itself: a warning inside the engine would be noise, or
    fail its rebalance under ``-W error``). Refusing would fail their rebalance, so the
    API warns and plans (and records) one node; the CLI, where the shape is a typo in
    ``-g``/``--nodes``, refuses it. A forced hierarchical or locality policy, or nearest
    dispatch (checked before), still raise: they need whole nodes."""
    warnings.warn(
        f"eplb: num_gpus ({topology.num_gpus}) is not a multiple of num_nodes "
        f"({topology.num_nodes}), so nodes cannot hold equal shares of the GPUs: planned "
        "globally as one node (num_nodes=1, as vLLM does for such a cluster)",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
    return dataclasses.replace(topology, num_nodes=1)


#: the most a live GPU may be slower than the fastest in ``gpu_speed`` when planning
MAX_SPEED_RATIO = 1e6


def equal_speeds(speed: object, live: torch.Tensor | None = None) -> bool:
    """Whether the speeds ``speed [P]`` (a tensor or a list) of the GPUs ``live [P]``
    marks (every GPU: ``None``) are all equal: such GPUs are equal GPUs, planned and
    scored as without speeds."""
    speed = torch.as_tensor(speed)
    if live is not None:
        speed = speed[live]
    return bool((speed == speed.max()).all())


def planning_speeds(speed: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor | None:
    """``speed [P]`` as planning takes it: ``None`` where the live GPUs' speeds are equal
    (they are equal GPUs: the same plan, and every path open to equal GPUs, such as the
    hierarchical policy and ``previous=``; attacker pass: ``[1, 1]`` planned 0.672 where
    no speeds planned 0.990). A live GPU more than :data:`MAX_SPEED_RATIO` times slower
    than the fastest is refused: with ``R / P`` replicas it sets every layer's time
    whatever it holds (0.0000 at 1e-9), and at 1e-310 the speed-aware packing overflowed.
    Dead GPUs' speeds are not read."""
    if equal_speeds(speed, live):
        return None
    live_speed = speed if live is None else speed[live]
    fastest, slowest = float(live_speed.max()), float(live_speed.min())
    if fastest > MAX_SPEED_RATIO * slowest * (1 + 1e-9):  # (a decimal 1e6 may round over)
        gpu = int((speed if live is None else torch.where(live, speed, torch.inf)).argmin())
        ratio = fastest / slowest  # (inf where the slowest is subnormal: said in words)
        times = f"{ratio:.6g}" if ratio < float("inf") else "more than 1e308"
        raise ValueError(f"gpu_speed: GPU {gpu} is {times} times slower than "
                         f"the fastest live GPU, more than the {MAX_SPEED_RATIO:.0e} eplb plans "
                         "for: it would set every layer's time whatever it holds; plan "
                         "without it (active_gpus / --dead-gpus)")
    return speed


def relative_speeds(speed: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
    """``speed [P]`` scaled by the power of two that puts the fastest live GPU's in
    ``[0.5, 1)``; dead GPUs' speeds (not read) become 1. Only the ratios matter, and the
    swap search keeps speeds in float32: speeds beyond its range (1e45, 1e-100) became inf
    or zero there and planned as if lost (0.3 against 0.9; attacker pass). A power of two
    is exact, so speeds within that range plan as given, bit for bit."""
    live_speed = speed if live is None else speed[live]
    _, exponent = torch.frexp(live_speed.max())
    scaled = torch.ldexp(speed, -exponent)
    return scaled if live is None else torch.where(live, scaled, torch.ones_like(scaled))


def _plan_live(request: PlanRequest) -> torch.Tensor:
    """Global plan over the live GPUs only; dead GPUs' slots get ``-1``. → ``[L, R]``."""
    topology, live = request.topology, request.live
    slots = topology.slots_per_gpu
    num_live = int(live.sum())
    planned = plan_rows(
        request.weight, num_live * slots, num_live, request.options, request.generator(),
        idle=request.idle, count_search=request.gpu_speed is None,
    )
    phy2log = torch.full(
        (request.num_layers, topology.num_replicas), -1, dtype=torch.int64, device=live.device
    )
    phy2log[:, live.repeat_interleave(slots)] = planned
    return phy2log


def plan_fresh(request: PlanRequest) -> Placement:
    """Plan ``request`` from scratch; returns a validated :class:`Placement`."""
    placement = Placement.from_phy2log(
        fresh_phy2log(request), request.num_experts, request.topology, request.policy,
        request.active_gpus
    )
    return validate_planned(placement)


def fresh_phy2log(request: PlanRequest) -> torch.Tensor:
    """``[L, R]``: the map of :func:`plan_fresh`, before the record is built and checked.
    For callers that make candidates and validate the placement they return (incremental
    planning): the record and its check cost about a tenth of a DeepSeek-V3 plan."""
    topology = request.topology
    # (on one node the even split is the rule's expectation; fair="avoid" puts the hot
    # experts on every GPU, and SGLang's runtime table is planned for where
    # PlanRequest.plans_runtime_table says: plan_for_nearest)
    if request.dispatch == "nearest" and request.policy == "global" and (
            topology.num_nodes > 1 or request.fair == "avoid" or request.plans_runtime_table):
        phy2log = plan_for_nearest(request, lambda: fresh_phy2log(dataclasses.replace(
            request, dispatch="even", fair="auto", source=None, routing=None)))
    elif request.active_gpus is not None:
        phy2log = _plan_live(request)
    else:
        phy2log = POLICIES[request.policy]().place(request)
    if request.gpu_speed is not None:
        phy2log = _for_speeds(request, phy2log)
    return phy2log


def _for_speeds(request: PlanRequest, phy2log: torch.Tensor) -> torch.Tensor:
    """``[L, R]``: ``phy2log``, the plan for equal GPUs made without the count search,
    refined for ``request.gpu_speed``: swaps from it and from a speed-aware greedy
    packing of the same replicas (:mod:`eplb.core.packing.speed_start`), and, in the
    layers where the count search changes the equal-GPU plan, swaps from that plan too;
    per layer the fastest is kept.

    The count search is left out of the first: with speeds far apart its fewer, larger
    hot replicas served 0.76 where Jefferson's served 0.91. With close speeds its counts
    serve best (1 and 1.01 planned below the equal-GPU plan in 26 of 30 small cases:
    attacker pass), so they are offered too. The search acts only on layers packed above
    their mean GPU load by its gap (:mod:`eplb.core.policies.base`; half of it here,
    against rounding), so only those are planned again (a layer's plan does not depend on
    the other layers of the call).
    """
    speed, live, packing = request.gpu_speed, request.live, request.options.packing
    weight = request.weight
    start = speed_greedy(weight, phy2log, live, speed)
    refined = keep_faster(
        weight,
        refine_assignment(weight, phy2log, live, packing, speed=speed),
        refine_assignment(weight, start, live, packing, speed=speed),
        speed,
    )
    mean = weight.sum(1) / int(live.sum())
    peak = slot_gpu_loads(weight, phy2log, request.topology.num_gpus).amax(1)
    above = (peak > mean * (1 + min(LADDER_GAP, SECOND_LOOK_GAP) / 2)).nonzero()[:, 0]
    if not len(above):
        return refined
    searched = fresh_phy2log(dataclasses.replace(request.layers(above), gpu_speed=None))
    changed = (searched != phy2log.index_select(0, above)).any(1)
    rows, searched = above[changed], searched[changed]
    if len(rows):
        sub = weight.index_select(0, rows)
        refined[rows] = keep_faster(
            sub, refined.index_select(0, rows),
            refine_assignment(sub, searched, live, packing, speed=speed), speed)
    return refined
