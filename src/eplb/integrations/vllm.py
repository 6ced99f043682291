"""vLLM plugin: run vLLM's expert-parallel load balancer (EPLB) on eplb's planner.

vLLM (0.33, 0.34) asks a *policy class* for a new placement every ``step_interval`` steps::

    policy.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_ranks,
                             old_global_expert_indices) -> phy2log [layers, num_replicas]

(``vllm/distributed/eplb/policy/abstract.py``), looking the class up in
``vllm.distributed.eplb.policy.EPLB_POLICIES`` under ``--eplb-config``'s ``policy``.
vLLM 0.33 and 0.34 accept only ``policy: "default"`` (``EPLBPolicyOption = Literal["default"]``
in ``vllm/config/parallel.py``, and async EPLB insists on it), so the plugin swaps the
class registered as ``"default"``: no vLLM edit and no config change.

**The switch.** Installing eplb declares the entry point ``vllm.general_plugins: eplb =
eplb.integrations.vllm:register``, which vLLM calls in every process (API server, engine
cores, workers). :func:`register` acts only when ``VLLM_EPLB_POLICY`` asks it to:

- ``VLLM_EPLB_POLICY=eplb``: add :class:`EplbPolicy` as ``"eplb"`` and make it the
  ``"default"`` policy, so ``--enable-eplb`` uses eplb.
- ``VLLM_EPLB_POLICY=register``: only add it as ``"eplb"`` (for vLLM versions whose
  config accepts ``{"policy": "eplb"}``; 0.33 and 0.34 reject that name).
- unset, empty, ``0``, ``off``: do nothing (vLLM keeps its own policy).

The name starts with ``VLLM_`` on purpose: with ``--data-parallel-backend ray`` vLLM
copies to its engine-core actors only registered variables and those with a prefix such
as ``VLLM_``/``NCCL_`` (``vllm/ray/ray_env.py``), so a ``VLLM_`` switch set where vLLM
is launched reaches every node. :func:`register` also registers both names in
``vllm.envs.environment_variables`` so vLLM does not report them as unknown. The older
names ``EPLB_VLLM_POLICY``/``EPLB_VLLM_OPTIONS`` still work on one node; across Ray
nodes they need ``VLLM_RAY_EXTRA_ENV_VARS_TO_COPY=EPLB_VLLM_POLICY,EPLB_VLLM_OPTIONS``.

``VLLM_EPLB_OPTIONS`` may hold a JSON object: planner options passed to
:func:`eplb.rebalance_experts` (:data:`PLANNER_OPTIONS`, e.g. ``{"max_moves": 64}``) and
``agree_timeout_s`` (:data:`PLUGIN_OPTIONS`). ``register`` never raises: when vLLM is
missing or a setting is bad it logs why and leaves vLLM untouched. Every process where
it acts logs one INFO line through vLLM's own logging (logger ``vllm.plugins.eplb``):
eplb's version, the switch and the options.

**One plan on every rank.** vLLM runs the policy on every EP rank and broadcasts
nothing. After planning, the ranks of vLLM's EP group agree through the
``torch.distributed`` store (:mod:`eplb.integrations.agreement`): unanimous plans are
used as they are; if a rank failed or diverged, every rank adopts the plan of the lowest
rank that succeeded, and says so at ERROR; if every rank failed, every rank falls back to
vLLM's default policy on the same input. A rank that never publishes (one that does not
run eplb: a half-switched cluster) makes the others raise :class:`AgreementError` after
``agree_timeout_s`` (default 120) instead of moving weights on mismatched plans.
``agree_timeout_s: 0`` turns the agreement off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from typing import Any, ClassVar

import numpy as np
import torch

from eplb._version import __version__
from eplb.api import rebalance_experts
from eplb.core.expert_ids import engine_old_map, require_integer_ids
from eplb.core.inputs import check_loads, refuse_without_values
from eplb.core.topology import Topology
from eplb.integrations.agreement import (
    DEFAULT_TIMEOUT_S,
    AgreementError,
    PlanAgreement,
    agree_and_log,
)
from eplb.integrations.threads import check_threads_option, planning_threads
from eplb.integrations.vllm_check import main as check_main
from eplb.integrations.vllm_settings import (
    ENV_VAR,
    LEGACY_ENV_VAR,
    LEGACY_OPTIONS_ENV_VAR,
    OPTIONS_ENV_VAR,
    PLANNER_OPTIONS,
    PLUGIN_OPTIONS,
    SWITCH_OFF,
    SWITCH_REGISTER,
    SWITCH_REPLACE,
    check_options,
    options_from_env,
    setting,
)
from eplb.online.settings import INCREMENTAL_OPTIONS, quoted_setting

__all__ = [
    "ENV_VAR",
    "LEGACY_ENV_VAR",
    "LEGACY_OPTIONS_ENV_VAR",
    "LOGGER_NAME",
    "OPTIONS_ENV_VAR",
    "PLANNER_OPTIONS",
    "PLUGIN_OPTIONS",
    "POLICY_NAME",
    "AgreementError",
    "EplbPolicy",
    "options_from_env",
    "register",
    "vllm_policy_class",
]

#: a child of vLLM's own "vllm" logger, so vLLM's handler and level apply to it
LOGGER_NAME = "vllm.plugins.eplb"
logger = logging.getLogger(LOGGER_NAME)

POLICY_NAME = "eplb"
DEFAULT_AGREE_TIMEOUT_S = DEFAULT_TIMEOUT_S
#: option sets EplbPolicy.rebalance_experts has checked (a set's repr)
_CHECKED_OPTIONS: set[str] = set()


class EplbPolicy:
    """vLLM EPLB policy computed by :func:`eplb.rebalance_experts`.

    Duck-compatible with vLLM's ``AbstractEplbPolicy``; :func:`vllm_policy_class`
    returns the subclass of vLLM's own abstract class that :func:`register` installs.
    ``options`` are planner options (:data:`PLANNER_OPTIONS`) and plugin options
    (:data:`PLUGIN_OPTIONS`).
    """

    options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def rebalance_experts(
        cls,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Plan a placement; returns ``phy2log [layers, num_replicas]`` int64 on the CPU.

        ``weight: [layers, experts]`` loads (any real dtype; vLLM passes its int32 load
        window on the CPU); ``old_global_expert_indices: [layers, num_replicas]`` the
        current ``phy2log``, used for incremental planning when its shape matches. Inside
        a vLLM deployment the EP ranks then agree on one plan (module docstring). If no
        rank could plan, vLLM's default policy answers instead and the error is logged.

        Raises:
            AgreementError: some EP rank never published its plan (it does not run eplb),
                or the EP ranks were called with other loads shapes, slots or GPU counts
                (every rank raises it: no one plan fits them all).
        """
        # one snapshot: the plan, the agreement and the tag it reports must use the same
        # options even if the class's dict is changed while this call runs
        options = dict(cls.options)
        for name, value in (("weight", weight),
                            ("old_global_expert_indices", old_global_expert_indices)):
            if not isinstance(value, torch.Tensor) and (value is not None or name == "weight"):
                # vLLM passes tensors; a direct caller with an array got an AttributeError
                raise TypeError(f"{name} must be a torch.Tensor, as vLLM passes it; got "
                                f"{type(value).__name__} (eplb.rebalance_experts takes arrays "
                                f"and lists)")
        # options set on the class by a script are checked as the environment's are (an
        # attacker pass: a typo was ignored, a bad value fell back to vLLM's policy on every
        # call with an ERROR line only); once per distinct set
        key = repr(sorted(options.items(), key=lambda item: str(item[0])))
        if key not in _CHECKED_OPTIONS:
            check_options(options, source=f"{cls.__name__}.options")
            _CHECKED_OPTIONS.add(key)
        # the caller's mistakes (the same on every rank) raise; what fails from here on is
        # reported to the other ranks, which then agree: an error raised before the
        # agreement (e.g. a MemoryError moving the loads) left this rank one round behind
        # the others, whose next rebalance then met this one's previous (new-user pass)
        if weight.is_quantized or weight.is_nested:  # (torch's own errors, after a fallback)
            raise TypeError(f"weight is a {'quantized' if weight.is_quantized else 'nested'} "
                            "tensor; expected [layers, experts] loads of a real dtype")
        refuse_without_values(weight, "weight")
        refuse_without_values(old_global_expert_indices, "old_global_expert_indices")
        if weight.dim() != 2:
            raise ValueError(f"weight must be [layers, experts], got shape {tuple(weight.shape)}")
        if weight.is_complex():  # (it fell back to vLLM's policy, which planned on it)
            raise TypeError(f"weight has complex dtype {weight.dtype}; expected a real or "
                            "integer dtype")
        if weight.layout != torch.strided:  # sparse loads and map: read as eplb.plan does
            weight = weight.to_dense()
        old = old_global_expert_indices
        if old is not None and old.layout != torch.strided:
            old_global_expert_indices = old.to_dense()
        old_shape = (weight.shape[0], num_replicas)
        if old_global_expert_indices is not None and (
                tuple(old_global_expert_indices.shape) == old_shape):  # (others: not used)
            require_integer_ids(old_global_expert_indices, "old_global_expert_indices")
        used = {"weight": weight}  # the loads as planned on (entries read as 0, on the host)
        plan, error = None, None
        try:
            plan = _plan_here(options, used, num_replicas, num_groups, num_nodes, num_ranks,
                              old_global_expert_indices)
        except Exception as exc:  # MemoryError too: the ranks must learn of it
            plan, error = None, exc
        weight = used["weight"]
        agreement = _agreement_for(options)
        if agreement is not None:
            # what an adopted plan must fit (groups and nodes only shape its quality)
            question = f"loads {list(weight.shape)}, {num_replicas} slots on {num_ranks} GPUs"
            outcome = agree_and_log(agreement, plan, error, tag=_tag(options),
                                    question=question, logger=logger, ranks="EP ranks")
            if outcome.plan is not None:
                return outcome.plan
            logger.error("eplb: no EP rank could plan (%s)", outcome.describe())
        if plan is not None:
            return plan
        return _fall_back(error, weight, num_replicas, num_groups, num_nodes, num_ranks,
                          old_global_expert_indices)


def _plan_here(options: dict[str, Any], used: dict[str, torch.Tensor], num_replicas: int,
               num_groups: int, num_nodes: int, num_ranks: int,
               old_global_expert_indices: torch.Tensor | None) -> torch.Tensor:
    """This rank's plan of ``used["weight"]`` (``[layers, experts]``, replaced by the loads
    as planned on: on the host, entries that are not finite loads read as 0 where no whole
    map is in force), or the map in force where the loads are unusable; raises what
    fails (:meth:`EplbPolicy.rebalance_experts` reports it to the other ranks)."""
    planner = {k: v for k, v in options.items() if k in PLANNER_OPTIONS}
    # plan on the host whatever the input's device: the CPU path is the one measured
    # bit-identical across ranks (tests/test_determinism.py)
    weight = used["weight"] = used["weight"].detach().to("cpu")
    old = _usable_old_map(old_global_expert_indices, weight, num_replicas)
    try:
        check_loads(weight, "weight")
    except ValueError as exc:
        kept = _map_in_force(old_global_expert_indices, weight, num_replicas)
        if kept is not None:
            logger.error("eplb: %s; keeping the expert map in force for this rebalance", exc)
            return kept
        # no whole map to keep (vLLM adding or removing GPUs): a plan is needed, and
        # vLLM's default policy would plan on the bad entries themselves
        logger.error("eplb: %s; planning with such entries read as 0 (no whole expert "
                     "map in force to keep)", exc)
        if weight.is_floating_point():  # (float8 has no compare: float64 is exact)
            weight = weight.to(torch.float64)
        weight = used["weight"] = torch.where(
            weight.isfinite() & (weight > 0), weight,
            torch.zeros((), dtype=weight.dtype, device=weight.device))
    if old is None:  # a fresh plan: the move knobs have nothing to act on
        planner = {k: v for k, v in planner.items() if k not in INCREMENTAL_OPTIONS}
    planner = _hierarchy_or_global(planner, weight.shape[1], num_replicas, num_groups,
                                   num_nodes, num_ranks)
    with planning_threads(check_threads_option(options, "options")):
        phy2log, _, _ = rebalance_experts(weight, num_replicas, num_groups, num_nodes,
                                          num_ranks, old_phy2log=old, **planner)
    plan = phy2log.to(device="cpu", dtype=torch.int64).contiguous()
    _check_phy2log(plan, weight.shape, num_replicas)
    return plan


def _hierarchy_or_global(planner: dict[str, Any], num_experts: int, num_replicas: int,
                         num_groups: int, num_nodes: int, num_ranks: int) -> dict[str, Any]:
    """``planner`` with a forced ``policy: hierarchical`` turned global, with a warning,
    where this call's shape cannot take it (groups or GPUs that do not divide): eplb.plan
    would raise, and vLLM's own policy would answer every rebalance with an error in the
    log, as SGLang's hook plans globally instead. (One node or one group is no problem:
    eplb.plan plans it.)"""
    if planner.get("policy") != "hierarchical":
        return planner
    problems = Topology(num_replicas, num_ranks, num_nodes,
                        num_groups).hierarchy_problems(num_experts)
    if not problems:
        return planner
    logger.warning("eplb: the option policy 'hierarchical' does not fit this call (%s); "
                   "planning globally", "; ".join(problems))
    return {**planner, "policy": "global"}


def _fall_back(error: BaseException | None, weight: torch.Tensor, *args: Any) -> torch.Tensor:
    """vLLM's default policy on the same input (the same answer on every rank)."""
    fallback = _vllm_default_policy()
    if fallback is None:
        if error is None:
            raise RuntimeError("eplb: no EP rank could plan, and vLLM's default policy "
                               "cannot be imported to answer instead")
        raise error
    logger.error(
        "eplb failed to plan (weight %s, replicas=%d, groups=%d, nodes=%d, ranks=%d); "
        "using vLLM's default policy for this rebalance",
        tuple(weight.shape), *args[:4], exc_info=error,
    )
    try:
        answer = fallback.rebalance_experts(weight, *args)
        # the same guard as eplb's own plans before vLLM moves weights by it
        answer = torch.as_tensor(answer).to(device="cpu", dtype=torch.int64)
        _check_phy2log(answer, weight.shape, args[0])
        return answer
    except Exception as fallback_error:
        if error is None:
            raise
        # the caller's mistake is eplb's error (it names it); vLLM's is the context
        raise error from fallback_error


def _map_in_force(old: torch.Tensor | None, weight: torch.Tensor,
                  num_replicas: int) -> torch.Tensor | None:
    """``old [L, R]`` as int64 where it is a whole placement for ``weight [L, E]`` (every
    slot an expert, every expert a slot), else ``None``. For a load window with a NaN,
    infinite or negative entry: a corrupt window is the same on every EP rank (vLLM
    all-reduces it), so every rank keeps that map and moves nothing. (vLLM's default
    policy, the fallback for eplb's own failures, made a map of NaN loads with one expert
    on 17 of 32 slots, and vLLM moved nearly every weight by it: attacker pass.)"""
    if old is None or old.dim() != 2 or old.is_floating_point() or old.dtype == torch.bool:
        return None
    kept = old.detach().to(device="cpu", dtype=torch.int64).contiguous()
    try:
        _check_phy2log(kept, weight.shape, num_replicas)
    except ValueError:
        return None
    return kept


def _usable_old_map(
    old: torch.Tensor | None, weight: torch.Tensor, num_replicas: int
) -> torch.Tensor | None:
    """The old map when it describes the same slots, else None (a changed slot count,
    first use); entries outside the experts' ids read as empty slots."""
    if old is None or weight.dim() != 2:
        return None
    if tuple(old.shape) != (weight.shape[0], num_replicas):
        return None
    require_integer_ids(old, "old_global_expert_indices")
    # vLLM marks slots of GPUs being added with -1: empty slots, filled by the forced moves;
    # other ids outside the experts' are read so too, but said (attacker pass: silent)
    ids = old.detach().to("cpu", torch.int64)
    stray = ((ids < -1) | (ids >= weight.shape[1])).nonzero()
    if len(stray):
        layer, slot = (int(i) for i in stray[0])
        logger.warning("eplb: the map in force holds %d id(s) outside [-1, %d), e.g. %d in "
                       "layer %d slot %d: read as empty slots, which the plan fills",
                       len(stray), weight.shape[1], int(ids[layer, slot]), layer, slot)
    return engine_old_map(ids, weight.shape[1])


def _check_phy2log(phy2log: torch.Tensor, weight_shape: torch.Size, num_replicas: int) -> None:
    """Cheap guard before vLLM moves weights: shape, range, every expert has a slot."""
    num_layers, num_experts = int(weight_shape[0]), int(weight_shape[1])
    if tuple(phy2log.shape) != (num_layers, num_replicas):
        raise ValueError(
            f"planner returned phy2log of shape {tuple(phy2log.shape)}, "
            f"expected {(num_layers, num_replicas)}"
        )
    if bool((phy2log < 0).any()) or bool((phy2log >= num_experts).any()):
        raise ValueError(f"planner returned expert ids outside [0, {num_experts})")
    counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=phy2log.device)
    counts.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    if bool((counts == 0).any()):
        raise ValueError("planner returned a phy2log in which some expert has no slot")


def _vllm_default_policy() -> Any:
    try:
        from vllm.distributed.eplb.policy import DefaultEplbPolicy
    except Exception:  # vLLM absent or broken: nothing to fall back to
        return None
    return DefaultEplbPolicy


# -- the rank agreement inside vLLM ----------------------------------------------------------

# one agreement per vLLM group coordinator (its round counter); the group is kept so
# its id is never reused while the entry lives
_AGREEMENTS: dict[int, tuple[Any, PlanAgreement]] = {}
_AGREEMENTS_LOCK = threading.Lock()


def _agreement_for(options: dict[str, Any]) -> PlanAgreement | None:
    """The agreement of this process's vLLM EP group, or None outside a multi-rank run."""
    timeout = float(options.get("agree_timeout_s", DEFAULT_AGREE_TIMEOUT_S))
    if timeout <= 0:
        return None
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        from vllm.distributed.parallel_state import get_ep_group

        group = get_ep_group()
    except Exception:  # not inside a vLLM worker (tests, offline use)
        return None
    if group.world_size <= 1:
        return None
    with _AGREEMENTS_LOCK:
        entry = _AGREEMENTS.get(id(group))
        if entry is not None and entry[0] is group:
            entry[1].timeout_s = timeout  # the calling class's options decide
            return entry[1]
        store = _group_store(group)
        if store is None:
            logger.warning("eplb: no torch.distributed store reachable; EP ranks cannot "
                           "check that their plans agree")
            return None
        agreement = PlanAgreement(store, group.rank_in_group, group.world_size, _namespace(group),
                                  timeout)
        _AGREEMENTS[id(group)] = (group, agreement)
        logger.info("eplb: EP rank %d of %d plans with eplb %s; plans are agreed through "
                    "the torch.distributed store (timeout %g s)",
                    group.rank_in_group, group.world_size, __version__, timeout)
        return agreement


def _namespace(group: Any) -> str:
    """The agreement's key prefix for ``group``: the same on every rank of the group, and
    apart from other groups that share its store.

    A group on the default store is named by its ``unique_name`` (``ep:0``: every process
    creates its groups in the same order at start-up) and its ranks. An elastic
    (stateless) group has a store of its own, so its ranks suffice, and ``unique_name``
    must be left out: vLLM numbers it per process (``_get_unique_name``), and after an
    elastic scale-up the processes that were running build their second ``ep`` group
    (``ep:1``, ``create_standby_groups``) while the ones just started build their first
    (``ep:0``); with the name in the key they would wait for each other's plans in vain
    (read from vLLM 0.34's ``stateless_coordinator.py`` and ``elastic_ep/``)."""
    if _stateless_store(group) is not None:
        return f"eplb/vllm/stateless/{_ranks_key(group.ranks)}"
    return f"eplb/vllm/{group.unique_name}/{_ranks_key(group.ranks)}"


def _stateless_store(group: Any) -> Any:
    stateless = getattr(group, "tcp_store_group", None)
    return None if stateless is None else getattr(stateless, "store", None)


def _group_store(group: Any) -> Any:
    """The store all ranks of ``group`` share: an elastic (stateless) group's own store,
    else the default process group's."""
    store = _stateless_store(group)
    if store is not None:
        return store
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:
        return None


def _ranks_key(ranks: list[int]) -> str:
    text = ",".join(str(int(r)) for r in ranks)
    if len(text) <= 64:
        return text
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tag(options: dict[str, Any]) -> str:
    # (default=str: NumPy scalars the options check accepts raised TypeError here, on a
    # multi-rank run only: attacker pass)
    # the planner options only, as SGLang's tag: ranks differing in the plugin's own
    # (``threads``: plans are bit-identical on any thread count, test_determinism;
    # ``agree_timeout_s``: how long to wait) or spelling a number as NumPy's (``default=str``
    # read np.int64(1) as "1") hold the same settings, and warned of "different eplb
    # settings" at every rebalance (attacker passes)
    shown = {k: v.item() if isinstance(v, np.generic) else v
             for k, v in options.items() if k in PLANNER_OPTIONS}
    return f"eplb {__version__} {json.dumps(shown, sort_keys=True, default=str)}"


# -- registration ----------------------------------------------------------------------------

# Keyed by vLLM's abstract class object itself (not its id) so a re-imported vLLM never
# receives a subclass of a stale base.
_CLASS_CACHE: dict[tuple[type, str], type] = {}


def vllm_policy_class(options: dict[str, Any] | None = None) -> type:
    """A subclass of vLLM's ``AbstractEplbPolicy`` running eplb with ``options``.

    Imports vLLM (raises ``ImportError`` without it). The class is cached per options
    so repeated registration installs the same object.
    """
    from vllm.distributed.eplb.policy import AbstractEplbPolicy

    options = dict(options or {})
    check_options(options, source="options")
    key = (AbstractEplbPolicy, json.dumps(options, sort_keys=True, default=str))
    cls = _CLASS_CACHE.get(key)
    if cls is None:
        cls = type(
            "EplbVllmPolicy",
            (EplbPolicy, AbstractEplbPolicy),
            {"options": options, "__module__": __name__, "__doc__": EplbPolicy.__doc__},
        )
        _CLASS_CACHE[key] = cls
    return cls


def _declare_env_vars() -> None:
    """Add the switch names to ``vllm.envs.environment_variables``: vLLM's start-up check
    then does not call them unknown, and Ray copies them as registered variables."""
    try:
        import vllm.envs as vllm_envs

        known = vllm_envs.environment_variables
    except Exception:
        return
    for name in (ENV_VAR, OPTIONS_ENV_VAR):
        if name not in known:
            known[name] = lambda name=name: os.environ.get(name)


def register() -> bool:
    """vLLM ``general_plugins`` hook: install eplb as vLLM's EPLB policy when asked.

    Returns True when ``EPLB_POLICIES`` was changed. Never raises; see the module
    docstring for ``VLLM_EPLB_POLICY`` and ``VLLM_EPLB_OPTIONS``.
    """
    try:
        _declare_env_vars()
        name, raw = setting(os.environ, ENV_VAR, LEGACY_ENV_VAR)
        mode = raw.strip().lower()
        if mode in SWITCH_OFF:
            return False
        if mode not in SWITCH_REPLACE | SWITCH_REGISTER:
            logger.warning(
                "eplb: ignoring %s=%s; use 'eplb' (replace vLLM's default policy), "
                "'register' (add policy 'eplb' only) or unset it", name, quoted_setting(raw),
            )
            return False
        options = options_from_env()
        try:
            from vllm.distributed.eplb import policy as vllm_policy
        except Exception as exc:
            logger.warning("eplb: %s is set but vLLM's EPLB policies cannot be imported (%s)",
                           name, exc)
            return False
        cls = vllm_policy_class(options)
        vllm_policy.EPLB_POLICIES[POLICY_NAME] = cls
        if mode in SWITCH_REPLACE:
            vllm_policy.EPLB_POLICIES["default"] = cls
        logger.info(
            "eplb %s active: vLLM EPLB policy %s (%s=%s; options %s)",
            __version__,
            "'default' and 'eplb' run eplb" if mode in SWITCH_REPLACE else "'eplb' added",
            name, raw.strip(), json.dumps(options, sort_keys=True),
        )
        if name == LEGACY_ENV_VAR:
            logger.warning("eplb: %s is the old switch name; Ray does not copy it to other "
                           "nodes. Use %s.", LEGACY_ENV_VAR, ENV_VAR)
        options_name, options_raw = setting(os.environ, OPTIONS_ENV_VAR, LEGACY_OPTIONS_ENV_VAR)
        if options_name == LEGACY_OPTIONS_ENV_VAR and options_raw.strip():
            # with the new switch the plugin reaches every Ray node but these options do
            # not: ranks there would plan with other options, every rebalance repaired
            logger.warning("eplb: %s is the old options name; Ray does not copy it to other "
                           "nodes, whose ranks would plan without these options. Use %s.",
                           LEGACY_OPTIONS_ENV_VAR, OPTIONS_ENV_VAR)
        return True
    except Exception as exc:  # a plugin must never take vLLM down
        logger.warning("eplb: vLLM plugin not registered: %s", exc)
        return False


if __name__ == "__main__":  # python -m eplb.integrations.vllm: the set-up check
    sys.exit(check_main())
