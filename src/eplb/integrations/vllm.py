"""vLLM plugin: run vLLM's expert-parallel load balancer (EPLB) on eplb's planner.

vLLM (0.33) asks a *policy class* for a new placement every ``step_interval`` steps::

    policy.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_ranks,
                             old_global_expert_indices) -> phy2log [layers, num_replicas]

(``vllm/distributed/eplb/policy/abstract.py``), looking the class up in
``vllm.distributed.eplb.policy.EPLB_POLICIES`` under ``--eplb-config``'s ``policy``.
vLLM 0.33 accepts only ``policy: "default"`` (``EPLBPolicyOption = Literal["default"]``
in ``vllm/config/parallel.py``, and async EPLB insists on it), so the plugin swaps the
class registered as ``"default"``: no vLLM edit and no config change.

How it is switched on: installing eplb declares the entry point
``vllm.general_plugins: eplb = eplb.integrations.vllm:register``, which vLLM calls in
every process (API server, engine core, workers). :func:`register` acts only when the
environment variable ``EPLB_VLLM_POLICY`` asks it to:

- ``EPLB_VLLM_POLICY=eplb``: add :class:`EplbPolicy` as ``"eplb"`` and make it the
  ``"default"`` policy, so ``--enable-eplb`` uses eplb.
- ``EPLB_VLLM_POLICY=register``: only add it as ``"eplb"`` (for vLLM versions whose
  config accepts ``{"policy": "eplb"}``; 0.33 rejects that name).
- unset, empty, ``0``, ``off``: do nothing (vLLM keeps its own policy).

``EPLB_VLLM_OPTIONS`` may hold a JSON object of planner options passed to
:func:`eplb.rebalance_experts`, e.g. ``{"policy": "global", "max_moves": 64}``; allowed
keys are in :data:`PLANNER_OPTIONS`. ``register`` never raises: when vLLM is missing or
a setting is bad it logs why and leaves vLLM untouched.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, ClassVar

import torch

from eplb.api import rebalance_experts

__all__ = [
    "ENV_VAR",
    "OPTIONS_ENV_VAR",
    "PLANNER_OPTIONS",
    "POLICY_NAME",
    "EplbPolicy",
    "options_from_env",
    "register",
    "vllm_policy_class",
]

logger = logging.getLogger(__name__)

ENV_VAR = "EPLB_VLLM_POLICY"
OPTIONS_ENV_VAR = "EPLB_VLLM_OPTIONS"
POLICY_NAME = "eplb"
PLANNER_OPTIONS = frozenset(
    {"policy", "seed", "num_candidates", "refine_steps", "max_moves", "skip_threshold"}
)
_OFF = frozenset({"", "0", "off", "false", "no", "none"})
_REPLACE_DEFAULT = frozenset({"eplb", "1", "on", "true", "yes", "default"})
_REGISTER_ONLY = frozenset({"register", "add"})


class EplbPolicy:
    """vLLM EPLB policy computed by :func:`eplb.rebalance_experts`.

    Duck-compatible with vLLM's ``AbstractEplbPolicy``; :func:`vllm_policy_class`
    returns the subclass of vLLM's own abstract class that :func:`register` installs.
    ``options`` are extra keyword options for the planner (see :data:`PLANNER_OPTIONS`).
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

        ``weight: [layers, experts]`` loads (any real dtype, vLLM passes its load
        window on the CPU); ``old_global_expert_indices: [layers, num_replicas]`` the
        current ``phy2log``, used for incremental planning (fewer expert moves) when its
        shape matches. If the planner fails, vLLM's default policy answers instead and
        the error is logged, so a planner bug never stops serving.
        """
        old = _usable_old_map(old_global_expert_indices, weight, num_replicas)
        try:
            phy2log, _, _ = rebalance_experts(
                weight, num_replicas, num_groups, num_nodes, num_ranks,
                old_phy2log=old, **cls.options,
            )
            phy2log = phy2log.to(device="cpu", dtype=torch.int64).contiguous()
            _check_phy2log(phy2log, weight.shape, num_replicas)
        except Exception:
            fallback = _vllm_default_policy()
            if fallback is None:
                raise
            logger.exception(
                "eplb failed to plan (weight %s, replicas=%d, groups=%d, nodes=%d, ranks=%d); "
                "using vLLM's default policy for this rebalance",
                tuple(weight.shape), num_replicas, num_groups, num_nodes, num_ranks,
            )
            return fallback.rebalance_experts(
                weight, num_replicas, num_groups, num_nodes, num_ranks,
                old_global_expert_indices,
            )
        return phy2log


def _usable_old_map(
    old: torch.Tensor | None, weight: torch.Tensor, num_replicas: int
) -> torch.Tensor | None:
    """The old map when it describes the same slots, else None (elastic scale, first use)."""
    if old is None or weight.dim() != 2:
        return None
    if tuple(old.shape) != (weight.shape[0], num_replicas):
        return None
    old = old.to(device="cpu", dtype=torch.int64)
    # vLLM marks slots of GPUs being added with -1; plan from scratch then.
    if bool((old < 0).any()) or bool((old >= weight.shape[1]).any()):
        return None
    return old


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
    counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
    counts.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    if bool((counts == 0).any()):
        raise ValueError("planner returned a phy2log in which some expert has no slot")


def _vllm_default_policy() -> Any:
    try:
        from vllm.distributed.eplb.policy import DefaultEplbPolicy
    except Exception:  # vLLM absent or broken: nothing to fall back to
        return None
    return DefaultEplbPolicy


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
    _check_options(options, source="options")
    key = (AbstractEplbPolicy, json.dumps(options, sort_keys=True))
    cls = _CLASS_CACHE.get(key)
    if cls is None:
        cls = type(
            "EplbVllmPolicy",
            (EplbPolicy, AbstractEplbPolicy),
            {"options": options, "__module__": __name__, "__doc__": EplbPolicy.__doc__},
        )
        _CLASS_CACHE[key] = cls
    return cls


def _check_options(options: dict[str, Any], source: str) -> None:
    unknown = sorted(set(options) - PLANNER_OPTIONS)
    if unknown:
        raise ValueError(
            f"{source}: unknown planner option(s) {unknown}; allowed: {sorted(PLANNER_OPTIONS)}"
        )


def options_from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Planner options from ``$EPLB_VLLM_OPTIONS`` (a JSON object), ``{}`` when unset."""
    env = os.environ if environ is None else environ
    raw = env.get(OPTIONS_ENV_VAR, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{OPTIONS_ENV_VAR} is not valid JSON ({exc}): {raw!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{OPTIONS_ENV_VAR} must be a JSON object, got {raw!r}")
    _check_options(options, source=OPTIONS_ENV_VAR)
    return options


def register() -> bool:
    """vLLM ``general_plugins`` hook: install eplb as vLLM's EPLB policy when asked.

    Returns True when ``EPLB_POLICIES`` was changed. Never raises; see the module
    docstring for ``EPLB_VLLM_POLICY`` and ``EPLB_VLLM_OPTIONS``.
    """
    try:
        mode = os.environ.get(ENV_VAR, "").strip().lower()
        if mode in _OFF:
            return False
        if mode not in _REPLACE_DEFAULT | _REGISTER_ONLY:
            logger.warning(
                "eplb: ignoring %s=%r; use 'eplb' (replace vLLM's default policy), "
                "'register' (add policy 'eplb' only) or unset it",
                ENV_VAR, os.environ.get(ENV_VAR),
            )
            return False
        options = options_from_env()
        try:
            from vllm.distributed.eplb import policy as vllm_policy
        except Exception as exc:
            logger.warning("eplb: %s is set but vLLM's EPLB policies cannot be imported (%s)",
                           ENV_VAR, exc)
            return False
        cls = vllm_policy_class(options)
        vllm_policy.EPLB_POLICIES[POLICY_NAME] = cls
        if mode in _REPLACE_DEFAULT:
            vllm_policy.EPLB_POLICIES["default"] = cls
        logger.info(
            "eplb: registered vLLM EPLB policy %r%s (options %s)",
            POLICY_NAME, " and made it the 'default' policy" if mode in _REPLACE_DEFAULT else "",
            options,
        )
        return True
    except Exception as exc:  # a plugin must never take vLLM down
        logger.warning("eplb: vLLM plugin not registered: %s", exc)
        return False
