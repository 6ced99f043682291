"""The global policy: every replica may go to any GPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

from eplb.core.dispatch_plan import keep_better_served, plan_nearest_global
from eplb.core.policies.base import PlacementPolicy, plan_rows
from eplb.core.rank_draws import choose_for_split_draws
from eplb.core.request import PlanRequest


class GlobalPolicy(PlacementPolicy):
    """All replicas onto all GPUs."""

    name = "global"

    def place(self, request: PlanRequest) -> torch.Tensor:
        topology = request.topology
        return plan_rows(
            request.weight,
            topology.num_replicas,
            topology.num_gpus,
            request.options,
            request.generator(),
            idle=request.idle,
            count_search=request.gpu_speed is None,
        )


def plan_for_nearest(request: PlanRequest, even: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``[L, R]``: the global plan for SGLang's nearest rule as the planner makes it (the
    max GPU load as the rule will realise it, dead GPUs included): the dispatch-aware plan
    (:func:`eplb.core.dispatch_plan.plan_nearest_global`), and with ``fair="auto"`` eplb's
    even-split plan ``even()`` in the layers the rule serves better with it. The locality
    policy's balance corner is this plan too.

    Where the request plans for SGLang's runtime table on one node
    (:attr:`~eplb.core.request.PlanRequest.plans_runtime_table`) the even split is the
    rule's expectation, and ``fair="divide"`` plans counts that divide the GPUs, which
    that table splits exactly (:func:`eplb.core.dispatch_plan.divisor_counts`); with
    ``fair="auto"`` each layer keeps whichever of ``even()`` and that plan the table
    serves better (:func:`eplb.core.rank_draws.split_draw_peaks`, the same draws for
    both; the even split on ties)."""
    topology = request.topology
    if request.plans_runtime_table:
        divided = plan_nearest_global(request.weight, topology, request.options,
                                      request.generator(), None, None, "divide")
        if request.fair == "divide":
            return divided
        return choose_for_split_draws(request.weight, [even(), divided], topology.num_gpus)
    phy2log = plan_nearest_global(request.weight, topology, request.options,
                                  request.generator(), request.active_gpus, request.source,
                                  request.fair)
    if request.fair == "auto":
        phy2log = keep_better_served(request.weight, phy2log, even(), topology,
                                     request.source, request.active_gpus)
    return phy2log
