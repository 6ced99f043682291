"""Planner options checked before any loads are seen.

An engine reads eplb's options at start-up and plans for the first time minutes or hours
later; a :class:`~eplb.online.rebalancer.Rebalancer` is built long before its first
rebalance. A bad value must fail then, naming the option, not at the first rebalance on
every rank. :func:`check_option_values` checks every option whose validity does not
depend on the loads' shape (the rest is checked by :func:`eplb.plan` as usual).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from eplb.core.dispatch import check_dispatch
from eplb.core.dispatch_plan import FAIR_MODES
from eplb.core.inputs import as_gpu_speed, as_live_mask
from eplb.core.options import IncrementalOptions
from eplb.core.planner import as_slack, resolve_options
from eplb.core.policies import POLICY_NAMES
from eplb.core.topology import Topology
from eplb.online.incremental import check_budget


def check_option_values(options: Mapping[str, Any], topology: Topology | None = None) -> None:
    """Check the values of planner options (the keyword arguments of :func:`eplb.plan`,
    plus ``move_price``, ``drift`` and ``incremental``). With ``topology`` also those whose
    length is the GPU count (``active_gpus``, ``gpu_speed``, ``source``). Raises
    ``ValueError``/``TypeError`` naming the option."""
    policy = options.get("policy", "auto")
    if policy not in POLICY_NAMES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICY_NAMES)}")
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    resolve_options(options.get("options"), options.get("num_candidates"),
                    options.get("refine_steps"))
    check_budget(options.get("max_moves"), options.get("skip_threshold"))
    knobs = {k: options[k] for k in ("move_price", "drift") if options.get(k) is not None}
    IncrementalOptions(**knobs)
    if not isinstance(options.get("incremental", True), bool):
        raise ValueError(f"incremental must be true or false, got {options['incremental']!r}")
    dispatch = check_dispatch(options.get("dispatch", "even"))
    if options.get("fair", "auto") not in FAIR_MODES:
        raise ValueError(f"fair must be one of {', '.join(FAIR_MODES)}, got {options['fair']!r}")
    as_slack(options.get("slack", 0.03))
    routing = options.get("routing")
    nearest_only = [name for name, given in (
        ("policy='locality'", policy == "locality"),
        ("fair", options.get("fair", "auto") != "auto"),
        ("source", options.get("source") is not None), ("routing", routing is not None))
        if given]
    if nearest_only and dispatch != "nearest":
        verb = "describe" if len(nearest_only) > 1 else "describes"
        raise ValueError(f"{', '.join(nearest_only)} {verb} SGLang's nearest dispatch: "
                         "pass dispatch='nearest'")
    if routing is not None:
        try:
            ids = torch.as_tensor(routing)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"routing must be top-k ids [T, L, k], got {type(routing).__name__}"
                             f": {exc}") from None
        if ids.dim() != 3 or ids.is_floating_point() or ids.is_complex() or \
                ids.dtype == torch.bool:
            raise ValueError(f"routing must be integer top-k ids [T, L, k], got shape "
                             f"{tuple(ids.shape)} of {ids.dtype}")
    if topology is None:
        return
    cpu = torch.device("cpu")
    if options.get("active_gpus") is not None:
        as_live_mask(options["active_gpus"], topology.num_gpus, cpu)
    if options.get("gpu_speed") is not None:
        as_gpu_speed(options["gpu_speed"], topology.num_gpus, cpu)
    if options.get("source") is not None:
        as_gpu_speed(options["source"], topology.num_gpus, cpu, name="source", allow_zero=True)
