"""Planner options checked before any loads are seen.

An engine reads eplb's options at start-up and plans for the first time minutes or hours
later; a :class:`~eplb.online.rebalancer.Rebalancer` is built long before its first
rebalance. A bad value must fail then, naming the option, not at the first rebalance on
every rank. :func:`check_option_values` checks every option whose validity does not
depend on the loads' shape (the rest is checked by :func:`eplb.plan` as usual).
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from eplb.core.expert_ids import as_routing
from eplb.core.inputs import (
    RepeatedKeyError,
    as_gpu_speed,
    as_live_mask,
    as_seed,
    unique_keys,
)
from eplb.core.options import IncrementalOptions
from eplb.core.planner import as_slack, check_dispatch_options, equal_speeds, resolve_options
from eplb.core.policies import POLICY_NAMES, resolve_policy
from eplb.core.topology import Topology, is_name
from eplb.online.budget import check_budget

#: the :class:`~eplb.core.options.IncrementalOptions` fields that are also keyword options
#: of :func:`eplb.plan` (the next-window score and the price of a move)
SCORE_OPTIONS = ("move_price", "drift", "group_share")
#: options that only shape incremental plans (an engine drops them on a call without a
#: usable old map)
INCREMENTAL_OPTIONS = frozenset({"max_moves", "skip_threshold", *SCORE_OPTIONS})


def options_from_json(name: str, raw: str) -> dict[str, Any]:
    """The JSON object in setting ``name`` (an environment variable), ``{}`` when blank;
    ``ValueError`` naming the setting otherwise (also for a key given twice)."""
    raw = raw.strip()
    if not raw:
        return {}
    quoted = quoted_setting(raw)
    try:
        options = json.loads(raw, object_pairs_hook=unique_keys)
    except RepeatedKeyError as exc:
        raise ValueError(f"{name} gives option {exc.key!r} twice: {quoted}") from None
    except ValueError as exc:
        raise ValueError(f"{name} is not valid JSON ({exc}): {quoted}") from None
    except RecursionError:  # Python's decoder recurses per nesting level (attacker pass)
        raise ValueError(f"{name} nests too deeply to be options: {quoted}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{name} must be a JSON object, got {quoted}")
    return options


def quoted_setting(raw: str) -> str:
    """``raw`` (a setting's text) for a message: whole while short, else its first 200
    characters and its length (10**5 brackets filled a screen)."""
    return repr(raw) if len(raw) <= 200 else f"{raw[:200]!r}... ({len(raw)} characters)"


def check_engine_budget(options: Mapping[str, Any], source: str) -> None:
    """``ValueError`` naming ``source`` (where an engine's options came from) unless
    ``max_moves`` is absent, null or one non-negative int. An engine plugin takes a total
    only: a per-layer list's length (the model's MoE layers) would be checked only at the
    first rebalance, which would fail on every rank; and the planner's own message offers
    such lists (attacker pass: SGLang's said so, then refused one)."""
    budget = options.get("max_moves")
    if isinstance(budget, list):
        raise ValueError(f"{source}: max_moves must be one int (slots in total over all "
                         "layers) here; per-layer lists are for the Python API")
    # (a NumPy integer too, as eplb.plan and every other option here take NumPy scalars:
    # EplbPolicy.options set by a script refused max_moves=np.int64(64) alone)
    if budget is not None and (isinstance(budget, bool)
                               or not isinstance(budget, int | np.integer) or budget < 0):
        raise ValueError(f"{source}: max_moves must be a non-negative int (slots in total "
                         f"over all layers) or null, got {reprlib.repr(budget)}")


def check_option_values(options: Mapping[str, Any], topology: Topology | None = None) -> None:
    """Check the values of planner options (the keyword arguments of :func:`eplb.plan`,
    plus :data:`SCORE_OPTIONS` and ``incremental``). With ``topology`` also those whose
    length is the GPU count (``active_gpus``, ``gpu_speed``, ``source``), and a forced
    hierarchical or locality policy against the cluster. Raises ``ValueError``/``TypeError``
    naming the option."""
    policy = options.get("policy", "auto")
    if not is_name(policy, POLICY_NAMES):
        raise ValueError(f"unknown policy {reprlib.repr(policy)}; choose one of "
                         f"{', '.join(POLICY_NAMES)}")
    as_seed(options.get("seed", 0))
    resolve_options(options.get("options"), options.get("num_candidates"),
                    options.get("refine_steps"))
    check_budget(options.get("max_moves"), options.get("skip_threshold"))
    knobs = {k: options[k] for k in SCORE_OPTIONS if options.get(k) is not None}
    IncrementalOptions(**knobs)
    if not isinstance(options.get("incremental", True), bool):
        raise ValueError(f"incremental must be true or false, got "
                         f"{reprlib.repr(options['incremental'])}")
    dispatch = check_dispatch_options(options.get("dispatch", "even"), policy,
                                      options.get("fair", "auto"),
                                      options.get("source") is not None,
                                      options.get("routing") is not None,
                                      options.get("slack") is not None)
    nearest = dispatch == "nearest"
    # where eplb.plan refuses it: on several nodes, or under fair="divide" (elsewhere on
    # one node the even split's planner takes it; the Rebalancer refused it there too,
    # where eplb.plan honours it: attacker pass)
    if nearest and options.get("skip_threshold") is not None and (
            topology is None or topology.num_nodes > 1
            or is_name(options.get("fair", "auto"), ("divide",))):
        raise ValueError("skip_threshold is not supported with dispatch='nearest'")
    if nearest and options.get("gpu_speed") is not None and topology is None:
        raise ValueError("gpu_speed cannot be combined with dispatch='nearest'")
    if options.get("slack") is not None:
        as_slack(options["slack"])
    if options.get("routing") is not None:  # the layer and expert counts come later
        as_routing(options["routing"], None, None)
    if topology is None:
        return
    differ = speeds_differ(options.get("gpu_speed"), options.get("active_gpus"), topology)
    if nearest and differ:
        raise ValueError("gpu_speed cannot be combined with dispatch='nearest'")
    cpu = torch.device("cpu")
    dead = False
    if options.get("active_gpus") is not None:
        dead = not bool(as_live_mask(options["active_gpus"], topology.num_gpus, cpu).all())
    if options.get("source") is not None:
        as_gpu_speed(options["source"], topology.num_gpus, cpu, name="source", allow_zero=True)
    if is_name(policy, ("hierarchical", "locality")):
        # a forced policy the cluster, its dead GPUs or its speeds rule out (what the
        # experts decide waits for the loads)
        resolve_policy(policy, topology, None, has_dead_gpus=dead, has_speeds=differ)


def speeds_differ(gpu_speed: object, active_gpus: object, topology: Topology) -> bool:
    """Whether ``gpu_speed [P]`` (checked here; ``None``: no speeds) differs between the
    GPUs ``active_gpus [P]`` keeps live. Equal live speeds plan as equal GPUs in
    :func:`eplb.plan` (``previous=``, the hierarchical policy and nearest dispatch stay
    open), so the checks made before any loads take them alike: a Rebalancer refused them
    there, hierarchical ones as "GPU speeds differ" (attacker pass)."""
    if gpu_speed is None:
        return False
    cpu = torch.device("cpu")
    speed = as_gpu_speed(gpu_speed, topology.num_gpus, cpu)
    live = None if active_gpus is None else as_live_mask(active_gpus, topology.num_gpus, cpu)
    return not equal_speeds(speed, live)
