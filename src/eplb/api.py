"""Public planning API: :func:`plan` and the drop-in :func:`rebalance_experts`.

``rebalance_experts`` has DeepSeek's signature and return value, so it replaces
``eplb.rebalance_experts`` from DeepSeek's repository and the ports in vLLM and SGLang.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import re
import warnings
from typing import Any

import numpy as np
import torch

from eplb.core.device_path import caller_settings_off, plans_on_host, to_host
from eplb.core.options import PlanOptions, with_incremental
from eplb.core.placement import Placement
from eplb.core.planner import make_request, plan_fresh
from eplb.core.trace import LoadTrace
from eplb.online.budget import refuse_unscored
from eplb.online.incremental import plan_incremental


def plan(
    weight: torch.Tensor,
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
    active_gpus: torch.Tensor | None = None,
    gpu_speed: torch.Tensor | None = None,
    previous: Placement | torch.Tensor | None = None,
    max_moves: int | torch.Tensor | None = None,
    skip_threshold: float | None = None,
    move_price: float | None = None,
    drift: float | None = None,
    group_share: float | None = None,
    dispatch: str = "even",
    fair: str = "auto",
    source: torch.Tensor | None = None,
    routing: torch.Tensor | None = None,
    slack: float | None = None,
) -> Placement:
    """Plan an expert placement.

    Args:
        weight: ``[L, E]`` (or ``[E]``) expert loads, any real/integer dtype, CPU or CUDA.
        num_replicas: ``R`` physical slots, ``R >= E`` and a multiple of ``num_gpus``.
        num_gpus: ``P`` GPUs; slot ``s`` lives on GPU ``s // (R / P)``.
        num_nodes: ``N`` nodes (hierarchical policy). One that does not divide
            ``num_gpus`` is planned (and recorded) as one node with a ``RuntimeWarning``,
            as vLLM does; a forced hierarchical or locality policy or ``"nearest"``
            dispatch raises (the CLI refuses such a cluster).
        num_groups: ``G`` expert groups (hierarchical policy).
        policy: ``"auto"`` (DeepSeek's rule), ``"global"``, ``"hierarchical"`` or
            ``"locality"`` (with ``dispatch="nearest"``: the balance vs cross-node traffic
            curve, see ``slack``).
        seed: seed of the randomised packing starts; same input and seed → same output.
        num_candidates: packing starts per layer, all but the first randomised, the first
            too where a GPU has at most 3 slots (default: 1, 2 where a GPU has at most 3
            slots and there are at most as many GPUs as polish steps, e.g. 16).
        refine_steps: most swap-refinement steps in total, a third of them all-pairs L2
            steps (default: 8 heaviest-GPU polish steps, ``max(4, P/2)`` for problems of
            fewer GPUs, after 2 all-pairs steps per doubling of ``P/2`` over the polish
            steps: 10 steps for the DeepSeek-V3 shape, 4 for its 8-GPU nodes, 14 at
            P = 128; where a GPU has at most 4 slots both counts double, see
            :class:`~eplb.core.options.PackingOptions`); both stop early when converged.
        options: full :class:`PlanOptions` (replication portfolio, packing search).
        active_gpus: ``[P]`` bool; dead GPUs' slots get ``-1`` and hold nothing.
        gpu_speed: ``[P]`` relative speeds; the plan minimises the max of load / speed.
        previous: the placement in force (``Placement`` or ``phy2log [L, R]``); the new
            plan keeps as many of its slots as pays (incremental rebalancing).
        max_moves: with ``previous``, most slots allowed to change: an int (in total,
            shared among layers by their predicted gain) or one int per layer. Moves the
            new call makes unavoidable are made outside the budget: re-homing replicas of
            dead GPUs, filling the slots of GPUs live again (or passed as ``-1``),
            un-stacking replicas the contract no longer allows, and, under the
            hierarchical policy, re-planning layers whose groups straddle nodes.
            With ``dispatch="nearest"`` on several nodes refused but under the global
            and locality policies with every GPU live (the locality policy spends it on
            fewer remote nodes first: :mod:`eplb.online.locality`).
        skip_threshold: with ``previous``, leave a layer untouched when re-planning it
            would raise its expected next-window balancedness by less than this.
            Refused with ``dispatch="nearest"`` on several nodes.
        move_price: with ``previous``: the expected balancedness a layer must gain to
            move all its slots at 9 slots per GPU, with or without ``max_moves``
            (default 0.01); at ``S`` slots per GPU the price is ``move_price × S / 9``,
            as the weights each GPU receives (see
            :class:`~eplb.core.options.IncrementalOptions`).
        drift: with ``previous``: the log-std of an expert's load change between two
            rebalances that the next-window score assumes (default 0.2). It and
            ``move_price`` apply under the locality policy too; with
            ``dispatch="nearest"`` on several nodes the hierarchical policy scores no
            moves and refuses both.
        group_share: with ``previous`` and ``num_groups > 1``: the share of that drift
            an expert has in common with its group (default 0.09, measured on the real
            DeepSeek-V3 loads; see :class:`~eplb.core.options.IncrementalOptions`).
            Refused with ``dispatch="nearest"`` on several nodes but under the global
            policy: the locality policy values its moves with each expert drifting alone.
        dispatch: how the engine splits an expert's tokens over its replicas:
            ``"even"`` (vLLM, the default) or ``"nearest"`` (SGLang with an all-to-all
            backend: same GPU, else same node, else a fixed fair choice). With
            ``"nearest"`` and ``num_nodes > 1`` the plan minimises the max GPU load as
            that rule realises it (:mod:`eplb.core.dispatch`); on one node as the table
            SGLang's runtime rebalancing builds serves it (:mod:`eplb.core.rank_draws`).
        fair: under ``"nearest"``: ``"auto"`` (default; on one node with every GPU
            live, per layer the even split or ``"divide"``'s counts, whichever SGLang's
            runtime rebalancing table serves better, also from ``previous``; with dead
            GPUs or a ``source`` the even split), ``"divide"`` (one node, every GPU
            live, even sources: counts that divide the GPUs, which SGLang's runtime
            table splits exactly),
            ``"avoid"`` (hot experts on every node, on one node on every GPU, so no token
            of theirs needs the engine's random fair choice; on one node fresh plans
            only) or ``"expect"`` (best in expectation; on one node the even split). For
            an SGLang start-up file on one node see
            :func:`eplb.core.plan_for_start_up_file`.
        source: under ``"nearest"``: ``[P]`` where tokens arise (default: evenly); not
            with ``previous`` where every GPU is live (those plans assume even sources).
        routing: for ``policy="locality"``: ``[T, L, k]`` top-k expert ids of recorded
            tokens (co-selection statistics; default: estimated from loads and groups).
        slack: for ``policy="locality"`` only (another policy refuses it): node load
            allowed above the mean; it trades balance (≈ ``1 / (1 + slack)``) against
            cross-node traffic (default 0.03).

    Returns:
        A validated :class:`Placement` on the weight's device. Device (CUDA) input is
        planned on the CPU, so it gets the CPU input's plan bit for bit
        (:func:`eplb.core.device_path.plans_on_host`).
    """
    if isinstance(weight, LoadTrace):  # (new-user pass: what read_loads returns)
        raise TypeError(
            "weight must be [L, E] loads, got a LoadTrace (a file's steps): plan on "
            "trace.total(), its steps summed, and pass the trace to write_placement(..., "
            "weight=trace) to key the written rows by its model layers")
    # the planner is a few hundred small tensor operations: without autograd's
    # bookkeeping (inference mode) each costs less (7 % of a DeepSeek-V3 plan)
    with torch.inference_mode(), caller_settings_off():
        device = _host_planned(weight)
        if device is not None:  # planned on the CPU, returned on the weight's device
            weight, previous, max_moves = to_host(weight), to_host(previous), to_host(max_moves)
        placement = _plan(
            weight, num_replicas, num_gpus, num_nodes, num_groups, policy=policy, seed=seed,
            num_candidates=num_candidates, refine_steps=refine_steps, options=options,
            active_gpus=active_gpus, gpu_speed=gpu_speed, previous=previous,
            max_moves=max_moves, skip_threshold=skip_threshold, move_price=move_price,
            drift=drift, group_share=group_share, dispatch=dispatch, fair=fair, source=source,
            routing=routing, slack=slack,
        )
        if device is not None:
            placement = placement.to(device)
    if policy == "auto" and not _DROP_IN.get():  # (once the call is known to be good)
        _warn_groups_unused(num_gpus, num_nodes, num_groups)
    return _ordinary(placement)


#: set while :func:`rebalance_experts` plans: the drop-in plans globally without a word
#: where the groups do not divide over the nodes, as DeepSeek's function does (and the
#: engines' calls through it, whose shapes the user does not choose). A context variable:
#: threads and tasks each see their own
_DROP_IN = contextvars.ContextVar("eplb_drop_in", default=False)


def _warn_groups_unused(num_gpus: int, num_nodes: int, num_groups: int) -> None:
    """Warn where ``plan`` was given several nodes and groups whose groups do not divide
    over the nodes: ``policy="auto"`` then planned globally, which hid DeepSeek's argument
    order passed to ``plan`` (new-user pass: ``plan(w, 288, 32, 8, 4)`` meant 8 groups on
    4 nodes and planned globally without a word). Called after a plan, so the sizes are
    good integers (NumPy's too); not where the GPUs do not divide over the nodes, which
    are then one node (its own warning says so)."""
    num_gpus, num_nodes, num_groups = int(num_gpus), int(num_nodes), int(num_groups)
    if (num_nodes <= 1 or num_groups <= 1 or num_gpus % num_nodes
            or num_groups % num_nodes == 0):
        return
    warnings.warn(
        f"eplb: planning globally: num_groups ({num_groups}) is not a multiple of num_nodes "
        f"({num_nodes}), so the hierarchical policy cannot apply. eplb.plan takes num_nodes "
        "before num_groups (DeepSeek's rebalance_experts the groups first); pass "
        "policy='global' to plan globally without this warning",
        RuntimeWarning, stacklevel=3)


def _host_planned(weight: object) -> torch.device | None:
    """The weight's device where a problem given there is planned on the CPU
    (:func:`eplb.core.device_path.plans_on_host`: device input gives the CPU input's plan
    bit for bit), else ``None``. Malformed weights give ``None``: the checks name them."""
    if not isinstance(weight, torch.Tensor) or weight.is_nested or weight.is_quantized:
        return None  # refused by name by the input checks
    return weight.device if plans_on_host(weight) else None


def _ordinary(placement: Placement) -> Placement:
    """``placement`` with tensors the caller may use freely: those made in inference mode
    cannot be changed in place outside it (an engine writing into the map it was given
    would raise). On the CPU an ordinary tensor takes over the same memory; on a device
    the tensor is copied."""
    fields = {}
    for name in ("phy2log", "log2phy", "logcnt", "active_gpus"):
        tensor = getattr(placement, name)
        if isinstance(tensor, torch.Tensor) and tensor.is_inference():
            on_cpu = tensor.device.type == "cpu"
            fields[name] = torch.from_numpy(tensor.numpy()) if on_cpu else tensor.clone()
    return dataclasses.replace(placement, **fields) if fields else placement


def _plan(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int,
    num_groups: int,
    *,
    policy: str,
    seed: int,
    num_candidates: int | None,
    refine_steps: int | None,
    options: PlanOptions | None,
    active_gpus: torch.Tensor | None,
    gpu_speed: torch.Tensor | None,
    previous: Placement | torch.Tensor | None,
    max_moves: int | torch.Tensor | None,
    skip_threshold: float | None,
    move_price: float | None,
    drift: float | None,
    group_share: float | None,
    dispatch: str,
    fair: str,
    source: torch.Tensor | None,
    routing: torch.Tensor | None,
    slack: float | None,
) -> Placement:
    """:func:`plan`'s body (inference mode is on)."""
    if move_price is not None or drift is not None or group_share is not None:
        options = with_incremental(options, move_price=move_price, drift=drift,
                                   group_share=group_share)
    request = make_request(
        weight,
        num_replicas,
        num_gpus,
        num_nodes,
        num_groups,
        policy=policy,
        seed=seed,
        num_candidates=num_candidates,
        refine_steps=refine_steps,
        options=options,
        active_gpus=active_gpus,
        gpu_speed=gpu_speed,
        dispatch=dispatch,
        fair=fair,
        source=source,
        routing=routing,
        slack=slack,
        stacklevel=5,  # resolve_policy, make_request, _plan, plan, the caller
    )
    if previous is not None:  # (gpu_speed is refused there: see plan_incremental)
        refuse_unscored([name for name, value in (("move_price", move_price), ("drift", drift),
                         ("group_share", group_share)) if value is not None],
                        request.dispatch, request.topology.num_nodes, request.policy)
        return plan_incremental(
            request, previous, max_moves=max_moves, skip_threshold=skip_threshold
        )
    given = [name for name, value in (("max_moves", max_moves), ("skip_threshold",
             skip_threshold), ("move_price", move_price), ("drift", drift),
             ("group_share", group_share)) if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only for incremental plans, which need the previous "
                         "placement (previous=...)")
    return plan_fresh(request)


#: the keywords :func:`rebalance_experts` passes on to :func:`plan`
_PLAN_KEYWORDS = frozenset(name for name, parameter in inspect.signature(plan).parameters.items()
                           if parameter.kind is inspect.Parameter.KEYWORD_ONLY)


#: plan's words for its ``previous=`` and rebalance_experts' for them: the subject an
#: error begins with, and the mentions further on ("gpu_speed cannot be combined with
#: previous", "... (plan without previous=)" still said "previous": attacker pass). The
#: CLI's ``--previous`` is left as it is
_PREVIOUS_WORDS = (
    (re.compile(r"^previous placement's "), "old_phy2log's "),
    (re.compile(r"^previous (placement |phy2log )?"), "old_phy2log "),
    (re.compile(r"(?<![-\w])previous="), "old_phy2log="),
    (re.compile(r"\b(with|without) previous\b(?![-=])"), r"\1 old_phy2log"),
)


def _as_old_phy2log_error(exc: Exception) -> Exception | None:
    """``exc`` (a plain ``TypeError``/``ValueError`` of :func:`plan` about its
    ``previous=``) reworded for :func:`rebalance_experts`, whose caller passed
    ``old_phy2log=``; ``None`` for any other error."""
    if type(exc) not in (TypeError, ValueError):
        return None
    text = str(exc)
    for pattern, words in _PREVIOUS_WORDS:
        text = pattern.sub(words, text)
    return None if text == str(exc) else type(exc)(text)


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "auto",
    seed: int = 0,
    old_phy2log: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for DeepSeek's ``eplb.rebalance_experts``.

    Args:
        weight: ``[L, E]`` load statistics (or ``[E]``).
        num_replicas, num_groups, num_nodes, num_gpus: as in DeepSeek's function.
        old_phy2log: ``[L, R]`` placement in force; enables incremental planning.
        **kwargs: any other keyword of :func:`plan` (``previous`` is ``old_phy2log``
            here).

    Returns:
        ``(phy2log [L, R], log2phy [L, E, maxcnt], logcnt [L, E])``, int64, on the weight's
        device (without the layer dimension for a one-layer ``[E]`` tensor).
    """
    unknown = [name for name in kwargs if name not in _PLAN_KEYWORDS]
    if unknown:  # (plan's own TypeError named plan, a function the caller never called)
        raise TypeError(f"rebalance_experts() got an unexpected keyword argument "
                        f"{unknown[0]!r}; it takes eplb.plan's keywords")
    named_old = old_phy2log is not None  # errors about it then name it so
    if "previous" in kwargs:
        if old_phy2log is not None:
            raise TypeError("rebalance_experts: give the placement in force once, as "
                            "old_phy2log (previous= is its name in eplb.plan)")
        old_phy2log = kwargs.pop("previous")
    token = _DROP_IN.set(True)
    try:
        placement = plan(weight, num_replicas, num_gpus, num_nodes, num_groups, policy=policy,
                         seed=seed, previous=old_phy2log, **kwargs)
    except (TypeError, ValueError) as exc:
        renamed = _as_old_phy2log_error(exc) if named_old else None
        if renamed is None:
            raise
        raise renamed from None
    finally:
        _DROP_IN.reset(token)
    phy2log, log2phy, logcnt = placement.as_tuple()
    if np.ndim(weight) == 1:  # one layer in, one layer out (already validated by plan)
        return phy2log[0], log2phy[0], logcnt[0]
    return phy2log, log2phy, logcnt
