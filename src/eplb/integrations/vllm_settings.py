"""The vLLM plugin's settings: its switch and options variables, and their checks.

:mod:`eplb.integrations.vllm` reads these in every vLLM process (:func:`options_from_env`,
:func:`setting`) and checks an options dict wherever it comes from
(:func:`check_options`): the environment, a policy class's ``options``, or
:func:`eplb.integrations.vllm.vllm_policy_class`. See that module's docstring for what
each variable does.
"""

from __future__ import annotations

import json
import os
import reprlib
from typing import Any

from eplb.core.topology import is_name
from eplb.integrations.agreement import check_timeout_option
from eplb.integrations.threads import check_threads_option
from eplb.online.settings import (
    check_engine_budget,
    check_option_values,
    options_from_json,
    quoted_setting,
)

__all__ = [
    "ENV_VAR",
    "LEGACY_ENV_VAR",
    "LEGACY_OPTIONS_ENV_VAR",
    "OPTIONS_ENV_VAR",
    "PLANNER_OPTIONS",
    "PLUGIN_OPTIONS",
    "SWITCH_OFF",
    "SWITCH_REGISTER",
    "SWITCH_REPLACE",
    "VLLM_POLICIES",
    "check_options",
    "options_from_env",
    "setting",
]

ENV_VAR = "VLLM_EPLB_POLICY"
OPTIONS_ENV_VAR = "VLLM_EPLB_OPTIONS"
LEGACY_ENV_VAR = "EPLB_VLLM_POLICY"  # not copied to Ray nodes by default
LEGACY_OPTIONS_ENV_VAR = "EPLB_VLLM_OPTIONS"
PLANNER_OPTIONS = frozenset(
    {"policy", "seed", "num_candidates", "refine_steps", "max_moves", "skip_threshold",
     "move_price", "drift", "group_share"}
)
#: options the plugin itself consumes (not passed to the planner)
PLUGIN_OPTIONS = frozenset({"agree_timeout_s", "threads"})
#: the planner's policies for vLLM's even split ('locality' plans for SGLang's rule)
VLLM_POLICIES = ("auto", "global", "hierarchical")
#: the switch's values, lower-cased and stripped: off, replace vLLM's default, add only
SWITCH_OFF = frozenset({"", "0", "off", "false", "no", "none"})
SWITCH_REPLACE = frozenset({"eplb", "1", "on", "true", "yes", "default"})
SWITCH_REGISTER = frozenset({"register", "add"})


def check_options(options: dict[str, Any], source: str) -> None:
    """Raise ``ValueError`` naming ``source`` (where the options came from) when
    ``options`` holds an unknown name or a value the planner or the plugin refuses: at
    start-up, not at the first rebalance."""
    allowed = PLANNER_OPTIONS | PLUGIN_OPTIONS
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"{source}: unknown option(s) {reprlib.repr(unknown)}; allowed: {sorted(allowed)}"
        )
    check_timeout_option(options, source)
    check_threads_option(options, source)
    # before the planner's own check, whose list names 'locality' too
    if "policy" in options and not is_name(options["policy"], VLLM_POLICIES):
        why = (" ('locality' plans for SGLang's nearest dispatch; vLLM splits tokens evenly)"
               if options["policy"] == "locality" else "")
        raise ValueError(f"{source}: policy must be one of {', '.join(VLLM_POLICIES)} for "
                         f"vLLM, got {reprlib.repr(options['policy'])}{why}")
    # (a per-layer list would fail at each rebalance, on every EP rank, and fall back to
    # vLLM's policy every time)
    check_engine_budget(options, source)
    try:  # the values too: a bad one must fail at start-up, not at the first rebalance
        check_option_values({k: v for k, v in options.items() if k in PLANNER_OPTIONS})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from None


def _meaning(name: str, raw: str) -> Any:
    """What setting ``name`` holding ``raw`` asks for: the switch's mode, the options'
    JSON value; the text itself where it means nothing (refused later, under its name)."""
    text = raw.strip()
    if name in (ENV_VAR, LEGACY_ENV_VAR):
        mode = text.lower()
        for kind in (SWITCH_OFF, SWITCH_REPLACE, SWITCH_REGISTER):
            if mode in kind:
                return kind
        return text
    try:
        return json.loads(text) if text else {}
    except (ValueError, RecursionError):  # (deep nesting: refused later, under its name)
        return text


def setting(environ: Any, name: str, legacy: str) -> tuple[str, str]:
    """``(variable name, value)`` of a setting given under its name or its legacy name.

    Raises ``ValueError`` when both are set and ask for different things (``eplb`` and
    ``1``, or the same JSON spaced differently, are one request: a cluster migrating
    to the new name may set both).
    """
    new, old = environ.get(name), environ.get(legacy)
    if new is not None and old is not None and _meaning(name, new) != _meaning(legacy, old):
        raise ValueError(f"{name}={quoted_setting(new)} and {legacy}={quoted_setting(old)} "
                         f"disagree; set only {name}")
    if new is not None:
        return name, new
    if old is not None:
        return legacy, old
    return name, ""


def options_from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Options from ``$VLLM_EPLB_OPTIONS`` (or ``$EPLB_VLLM_OPTIONS``), ``{}`` when unset."""
    env = os.environ if environ is None else environ
    name, raw = setting(env, OPTIONS_ENV_VAR, LEGACY_OPTIONS_ENV_VAR)
    options = options_from_json(name, raw)
    check_options(options, source=name)
    return options
