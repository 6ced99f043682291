"""SGLang's ``rebalance_experts`` call answered by eplb (:func:`eplb_rebalance`), and the
options the plugin takes: what :mod:`eplb.integrations.sglang`'s hook runs on every rank.

SGLang's call is taken as it is: token counts ``[T, L, E]`` on the GPU, ``num_groups``
``None`` for models without groups, ``num_nodes`` 1 where SGLang asks for a flat
topology, and the algorithm it chose (``hierarchical``). Which rule the plan is made for
follows SGLang's ``--ep-dispatch-algorithm`` (option ``dispatch``, default ``auto``):
its ``static`` table (an all-to-all backend such as DeepEP) sends a token to the
expert's replica on its GPU, else on its node, else to one SGLang deals it; eplb plans
for that table (``dispatch="nearest"``), on one node for the table SGLang's runtime
rebalance builds (:mod:`eplb.core.rank_draws`). Otherwise tokens split evenly.
"""

from __future__ import annotations

import logging
import reprlib
from typing import Any

import torch

from eplb.api import rebalance_experts
from eplb.core.dispatch_plan import nearest_size_problem, nearest_work
from eplb.core.expert_ids import engine_old_map, require_integer_ids
from eplb.core.inputs import refuse_without_values
from eplb.core.policies import locality_problems
from eplb.core.topology import Topology, positive_int
from eplb.integrations.agreement import check_timeout_option
from eplb.integrations.sglang_counts import check_step_counts, sum_steps
from eplb.integrations.threads import check_threads_option
from eplb.online.budget import takes_budget
from eplb.online.settings import (
    INCREMENTAL_OPTIONS,
    check_engine_budget,
    check_option_values,
    options_from_json,
)

logger = logging.getLogger("eplb.integrations.sglang")

PLANNER_OPTIONS = frozenset(
    {"policy", "seed", "num_candidates", "refine_steps", "max_moves", "skip_threshold",
     "move_price", "drift", "group_share", "incremental", "dispatch", "slack"}
)
#: options the plugin itself consumes (not passed to the planner)
PLUGIN_OPTIONS = frozenset({"agree_timeout_s", "threads"})
#: the most :func:`~eplb.core.dispatch_plan.nearest_work` (``P · R² / E``, GPUs × all
#: slots × replicas per expert) ``dispatch: auto`` plans SGLang's nearest dispatch for
#: (see :func:`eplb_rebalance`): the plan's node relabelling grows about as P³ and with the
#: replicas per expert, and SGLang's scheduler waits while it plans. 58 generated
#: DeepSeek-V3 layers on one core took at most 2.6 s at or below it (128 GPUs × 8 slots,
#: 256 × 2), 4–31 s just above (128 × 9, 256 × 3, 256 × 9):
#: ``benchmarks/bench_nearest_scale.py``, BENCHMARKS.md §14. (A limit of 256 GPUs alone let
#: 256 × 9 stall each rebalance.)
AUTO_NEAREST_MAX_WORK = 1 << 19
#: ``dispatch`` values: ``auto`` plans for the rule SGLang runs (its ``static`` dispatch on
#: several nodes sends a token to the nearest replica; otherwise tokens spread evenly)
DISPATCH_CHOICES = ("auto", "even", "nearest")


def checked_options(text: str, source: str) -> dict[str, Any]:
    """Planner options from JSON ``text``; errors name ``source`` (where the text came from:
    the environment variable, or the launcher's ``--eplb-options``)."""
    options = options_from_json(source, text)
    # (a per-layer list would fail only at the first rebalance, which has no fallback)
    check_engine_budget(options, source)
    check_options(options, source, PLANNER_OPTIONS | PLUGIN_OPTIONS)
    check_timeout_option(options, source)
    check_threads_option(options, source)
    return options


def check_options(options: dict[str, Any], source: str, allowed: frozenset[str]) -> None:
    """Refuse ``options`` with a key outside ``allowed`` or a planner option's bad value;
    errors name ``source`` (the environment variable, ``--eplb-options``, or the
    ``options`` argument of :func:`eplb_rebalance`)."""
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {reprlib.repr(unknown)}; allowed: "
                         f"{sorted(allowed)}")
    if options.get("dispatch", "auto") not in DISPATCH_CHOICES:
        raise ValueError(f"{source}: dispatch must be one of {DISPATCH_CHOICES}, got "
                         f"{reprlib.repr(options['dispatch'])}")
    if options.get("policy") == "locality" and options.get("dispatch", "auto") == "even":
        raise ValueError(f"{source}: policy 'locality' plans for SGLang's nearest-replica "
                         "dispatch (--ep-dispatch-algorithm static on several nodes), not "
                         "for dispatch 'even'")
    values = {k: v for k, v in options.items() if k in PLANNER_OPTIONS and k != "dispatch"}
    checks = [values]
    if options.get("policy") == "locality":
        values["dispatch"] = "nearest"  # (what it plans for: 'auto' resolves so per call)
        # skip_threshold: dropped with a warning where the locality policy plans (as under
        # dispatch 'nearest'), honoured where a rebalance falls back to an even split's
        # plan: its value alone is checked (attacker pass: it was refused as "not
        # supported with dispatch='nearest'", a dispatch the user had not set)
        if "skip_threshold" in values:
            checks.append({"skip_threshold": values.pop("skip_threshold")})
    try:  # the values too: a bad one must fail at start-up, not at the first rebalance
        for checked in checks:
            check_option_values(checked)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from None


def eplb_rebalance(
    tokens_per_expert: torch.Tensor,
    num_physical_experts: int,
    num_local_physical_experts: int,
    num_groups: int | None,
    num_nodes: int,
    hierarchical: bool,
    options: dict[str, Any] | None = None,
    old_phy2log: torch.Tensor | None = None,
    sglang_dispatch: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """eplb's answer to SGLang's ``rebalance_experts`` call.

    Args:
        tokens_per_expert: ``[T, L, E]`` (or ``[L, E]``) token counts, any device; summed
            over ``T`` as SGLang's ``deepseek`` algorithm does.
        num_physical_experts: ``R`` slots; ``num_local_physical_experts``: slots per GPU.
        num_groups: expert groups, ``None`` for models without groups.
        num_nodes: nodes (1 when SGLang asks for a flat topology).
        hierarchical: the algorithm SGLang chose is a ``*_hierarchical`` one.
        options: planner options (:data:`PLANNER_OPTIONS`); ``incremental: false``
            ignores ``old_phy2log``.
        old_phy2log: ``[L, R]`` placement in force, for fewer moved experts.
        sglang_dispatch: SGLang's ``--ep-dispatch-algorithm`` (``None``: unknown). With
            ``dispatch: auto`` (the default option), ``static`` plans for its
            nearest-replica rule (``dispatch="nearest"``, the global policy unless
            ``policy`` is set). On several nodes a hierarchical plan made for an even
            split scores 0.751–0.894 under that rule on the real DeepSeek-V3 loads, a
            global one planned for it 0.9966–0.9988 (BENCHMARKS.md §14); per layer the
            planner keeps its even-split plan where the rule serves that clearly better
            (BENCHMARKS.md §16). On one node the plan is made for the table SGLang's
            runtime rebalance builds (per layer the even split or counts that divide the
            GPUs, :func:`eplb.core.dispatch_plan.divisor_counts`; BENCHMARKS.md §14,
            forty-fifth session). Otherwise an even split, and also under ``auto`` on
            several nodes where ``P · R² / E`` passes :data:`AUTO_NEAREST_MAX_WORK` (the
            nearest plan's search would stall the rebalance: set ``dispatch: nearest`` to
            plan for it anyway).

    Returns:
        ``(phy2log [L, R], log2phy [L, E, maxcnt], logcnt [L, E])`` int64 on the CPU
        (SGLang moves them to its device). The loads are summed and planned on the CPU in
        integer-valued float64, so every rank computes the same plan.
    """
    options = dict(options or {})
    # the environment's checks and messages (attacker pass: an unknown key failed inside
    # eplb.plan with a raw TypeError, and policy 'locality' with dispatch 'nearest' was
    # told to pass dispatch='nearest')
    check_options(options, "options", PLANNER_OPTIONS)
    dispatch = options.pop("dispatch", "auto")
    incremental = options.pop("incremental", True)
    weight = check_step_counts(tokens_per_expert).detach()
    if weight.dim() == 3:
        weight = sum_steps(weight)
    weight = weight.to("cpu")
    # uint64 counts may pass int64's range (a cast would wrap them to negative loads):
    # as float64, as sum_steps and eplb.plan read them
    wide = weight.is_floating_point() or weight.dtype == torch.uint64
    weight = weight.to(torch.float64 if wide else torch.int64)
    for name, value in (("num_physical_experts", num_physical_experts),
                        ("num_local_physical_experts", num_local_physical_experts),
                        ("num_nodes", num_nodes)):
        positive_int(name, value)
    if num_physical_experts % num_local_physical_experts:
        raise ValueError(f"num_physical_experts ({num_physical_experts}) is not a multiple of "
                         f"num_local_physical_experts ({num_local_physical_experts})")
    num_gpus = num_physical_experts // num_local_physical_experts
    groups = 1 if num_groups is None else positive_int("num_groups", num_groups)
    if dispatch == "auto":
        # a move budget too: the nearest planner spends a total budget where it buys the
        # most realised balance (on real DeepSeek-V3 loads above the even-split planner's
        # at 100–3340 slots, as SGLang's static dispatch serves them; BENCHMARKS §14)
        dispatch = "nearest" if sglang_dispatch == "static" else "even"
        work = nearest_work(num_gpus, num_local_physical_experts, weight.shape[-1])
        if dispatch == "nearest" and num_nodes > 1 and work > AUTO_NEAREST_MAX_WORK:
            # SGLang's scheduler waits while it plans: the nearest plan's node relabelling
            # grows about as P³ and with the replicas per expert (AUTO_NEAREST_MAX_WORK),
            # so "auto" keeps the even split; "nearest" asks for it
            logger.warning("eplb: planning for SGLang's nearest dispatch on %d GPUs with %d "
                           "slots each would stall each rebalance for seconds to minutes; "
                           "planning for an even split (set the option dispatch to 'nearest' "
                           "to plan for it anyway)", num_gpus, num_local_physical_experts)
            dispatch = "even"
    if dispatch == "nearest" and num_nodes > 1 and num_gpus % num_nodes:
        # GPUs that do not divide over the nodes: the nearest model does not apply (and
        # must not fail SGLang's call). On one node eplb plans for the table SGLang's
        # runtime rebalance builds (counts that divide the GPUs, per layer where the table
        # serves them better: eplb.core.rank_draws)
        dispatch = "even"
    if dispatch == "nearest" and num_nodes <= 1:
        num_nodes = 1
    topology = Topology(num_physical_experts, num_gpus, num_nodes, groups)
    asked = options.pop("policy", None)
    if asked == "locality":
        asked = _locality_or_global(dispatch, sglang_dispatch, topology, weight.shape[-1])
        if asked != "locality":
            options.pop("slack", None)  # (the locality policy's knob: eplb.plan refuses it)
    policy = _policy(asked, dispatch, hierarchical, topology, weight.shape[-1])
    too_large = (nearest_size_problem(num_gpus, num_local_physical_experts,
                                     weight.shape[-1], weight.shape[0])
                 if dispatch == "nearest" and policy == "global" and num_nodes > 1 else None)
    if too_large:
        # beyond the global nearest planner's size (eplb.plan refuses it; a hierarchical
        # plan searches no relabelling): an even split's plan rather than a failed rebalance
        logger.warning("eplb: %s, beyond what the nearest-dispatch planner plans for; "
                       "planning for an even split", too_large)
        dispatch = "even"
        policy = _policy(asked, dispatch, hierarchical, topology, weight.shape[-1])
    old = None
    if incremental and old_phy2log is not None:
        old_phy2log = _engine_map(old_phy2log)
        require_integer_ids(old_phy2log, "old_phy2log")
        old = (engine_old_map(old_phy2log, weight.shape[1])
               if tuple(old_phy2log.shape) == (weight.shape[0], num_physical_experts)
               else None)
    if old is None:  # a fresh plan: the move knobs have nothing to act on
        options = {k: v for k, v in options.items() if k not in INCREMENTAL_OPTIONS}
    if dispatch == "nearest":
        options["dispatch"] = "nearest"
        # what eplb's nearest planner cannot honour would fail SGLang's rebalance: drop it
        # (on one node a skip threshold gives the even split's planner: it takes one)
        dropped = [k for k in ("skip_threshold",) if k in options and num_nodes > 1]
        if policy != "global" and old is not None:
            # nor does it score moves there (but under the locality policy, which prices
            # them and takes a budget: eplb.online.budget.takes_budget): the move knobs
            # would change nothing (a group's shared drift: the locality policy values its
            # moves with each expert drifting alone, refuse_unscored)
            unscored = num_nodes > 1 and not takes_budget("nearest", num_nodes, policy, False)
            local = policy == "locality" and num_nodes > 1
            dropped += [k for k in ("max_moves", "move_price", "drift", "group_share")
                        if k in options and ((k == "max_moves" and not local) or unscored
                                             or (k == "group_share" and local))]
        for key in dropped:
            options.pop(key)
        if dropped:
            logger.warning("eplb: %s not applied when planning for SGLang's nearest dispatch "
                           "(policy %s)", ", ".join(dropped), policy)
    if num_gpus % num_nodes and policy == "global":
        # nodes of unequal size: a global plan ignores them, so plan one node here, as
        # SGLang does. Passed on, eplb.plan's RuntimeWarning for an API caller's shape
        # would surface in the engine (and fail its rebalance under -W error)
        num_nodes = 1
    return rebalance_experts(weight, num_physical_experts, groups, num_nodes, num_gpus,
                             policy=policy, old_phy2log=old, **options)


def _locality_or_global(dispatch: str, sglang_dispatch: str | None, topology: Topology,
                        num_experts: int) -> str:
    """``"locality"`` where the locality policy can plan SGLang's call (its nearest-replica
    dispatch on several nodes, a shape the policy takes), else ``"global"``, logged with
    the reason: SGLang's rebalance has no fallback, so an impossible locality plan must
    not fail it (the start-up placement stays the one to keep traffic local)."""
    why = locality_problems(topology, num_experts)
    if not why and dispatch != "nearest":
        why = ["SGLang's --ep-dispatch-algorithm is not 'static' (tokens are not sent to the "
               "nearest replica)" if sglang_dispatch != "static" else
               "the nearest-dispatch plan would stall this rebalance (set the option "
               "dispatch to 'nearest' to plan for it anyway)"]
    if not why:
        return "locality"
    logger.warning("eplb: policy 'locality' cannot plan this rebalance (%s); planning "
                   "globally", "; ".join(why))
    return "global"


def _engine_map(old_phy2log: object) -> torch.Tensor:
    """The map in force as SGLang passes it (a tensor ``[L, R]``), dense; ``TypeError``
    naming ``old_phy2log`` for anything else (an array raised an ``AttributeError``, a
    meta or sparse tensor torch's own error: the vLLM policy names them and reads sparse
    maps dense)."""
    if not isinstance(old_phy2log, torch.Tensor):
        raise TypeError(f"old_phy2log must be a torch.Tensor [L, R], as SGLang passes it; "
                        f"got {type(old_phy2log).__name__}")
    refuse_without_values(old_phy2log, "old_phy2log")
    return old_phy2log.to_dense() if old_phy2log.layout != torch.strided else old_phy2log


def _policy(asked: str | None, dispatch: str, hierarchical: bool, topology: Topology,
            num_experts: int) -> str:
    """The policy eplb plans SGLang's call with: the ``policy`` option (``asked``), else
    global for the nearest dispatch and SGLang's own choice (``hierarchical``) otherwise.
    ``auto`` resolves as eplb.plan resolves it, but a shape hierarchical placement cannot
    take is logged, not warned (a warning would surface in the engine and fail its
    rebalance under -W error), and planned globally: SGLang's rebalance has no fallback."""
    policy = asked
    if policy is None:
        policy = "global" if dispatch == "nearest" or not hierarchical else "hierarchical"
    if policy == "auto":
        policy = "hierarchical" if topology.grouped else "global"
    if policy == "hierarchical" and asked is None and topology.num_nodes == 1:
        # SGLang's "auto" asks the hierarchical algorithm whenever the groups divide the
        # nodes, so on every one-node rebalance: one node is a global plan, said nowhere
        # (new-user pass: a warning naming "num_groups=8, num_nodes=1" on every rebalance)
        policy = "global"
    if policy == "hierarchical":
        nodes, groups = topology.num_nodes, topology.num_groups
        # (SGLang passes num_groups=None for a model without expert groups, read as one
        # group: "num_groups=1" named a value SGLang never passed; attacker pass)
        grouping = ("no expert groups (num_groups None or 1)" if groups <= 1
                    else f"num_groups={groups}")
        problems = ([] if topology.grouped and nodes > 1 else
                    [f"{grouping}, num_nodes={nodes}"])
        problems = problems or topology.hierarchy_problems(num_experts)
        if problems:
            who = "SGLang asked" if asked is None else f"policy {asked!r} asks"
            logger.warning("eplb: %s for hierarchical balancing but %s; planning globally",
                           who, "; ".join(problems))
            policy = "global"
    return policy
