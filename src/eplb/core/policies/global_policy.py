"""The global policy: every replica may go to any GPU."""

from __future__ import annotations

import torch

from eplb.core.policies.base import PlacementPolicy, plan_rows
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
        )
