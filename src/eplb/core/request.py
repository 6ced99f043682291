"""``PlanRequest``: one planning problem, validated, as every planning step receives it.

:func:`eplb.core.planner.make_request` builds it from user arguments (every check lives
there); policies, packing and the incremental planner only read it. It replaces the loose
``(weight, num_replicas, num_gpus, num_nodes, num_groups, policy, active_gpus, ...)``
tuple that used to travel through every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from eplb.core.options import PlanOptions
from eplb.core.topology import Topology

#: the locality policy's node-load slack when the caller gives none (balancedness about
#: ``1 / 1.03``; BENCHMARKS §14 has the curve)
DEFAULT_SLACK = 0.03


@dataclass(frozen=True, eq=False)
class PlanRequest:
    """A validated planning problem.

    Attributes:
        weight: ``[L, E]`` planning loads, float64 (any input dtype converts exactly), on
            the caller's device. Every row carries load (a layer with none is planned as
            uniform) and is scaled by a power of two so that its largest entry lies in
            ``[1, 2)``: exact, so no decision changes, and no sum over- or underflows.
        topology: the cluster shape.
        policy: a resolved policy name (a key of :data:`eplb.core.policies.POLICIES`).
        options: every knob of the search.
        seed: seed of the randomised packing starts.
        active_gpus: ``[P]`` bool live GPUs, or ``None`` when every GPU is live.
        gpu_speed: ``[P]`` float64 relative speeds, or ``None`` for equal GPUs.
        dispatch: how the engine sends an expert's tokens to its replicas: ``"even"``
            (vLLM: a token hash picks a replica) or ``"nearest"`` (SGLang's static rule:
            same GPU, else same node, else a fixed fair choice; :mod:`eplb.core.dispatch`).
        fair: under ``"nearest"``: ``"auto"``, ``"avoid"``, ``"expect"`` or ``"divide"`` (see
            :func:`eplb.core.dispatch_plan.plan_nearest_global`).
        source: ``[P]`` where tokens arise under ``"nearest"`` (``None``: evenly).
        routing: ``[T, L, k]`` top-k expert ids of recorded tokens, for the locality
            policy's co-selection statistics (``None``: estimated from loads and groups).
        slack: the locality policy's knob: node load allowed above the mean node load.
        idle: ``[L]`` bool rows of ``weight`` that carried no load (planned as uniform
            loads), or ``None`` when every row did; incremental planning moves nothing
            in them.
        row_shift: ``[L]`` int64 on the host: row ``l`` of ``weight`` is the caller's
            loads times ``2**row_shift[l]``, so the layers' loads compare (a total move
            budget is shared by them); ``None``: taken as equal.
    """

    weight: torch.Tensor
    topology: Topology
    policy: str
    options: PlanOptions
    seed: int = 0
    active_gpus: torch.Tensor | None = None
    gpu_speed: torch.Tensor | None = None
    dispatch: str = "even"
    fair: str = "auto"
    source: torch.Tensor | None = None
    routing: torch.Tensor | None = None
    slack: float = DEFAULT_SLACK
    idle: torch.Tensor | None = None
    row_shift: torch.Tensor | None = None

    def layers(self, index: torch.Tensor) -> PlanRequest:
        """The same request for the layers ``index`` only (``[k]`` row indices; their loads,
        idle flags and scales)."""
        idle = None if self.idle is None else self.idle[index]
        shift = None if self.row_shift is None else self.row_shift[index.cpu()]
        return replace(self, weight=self.weight[index],
                       idle=idle if idle is not None and bool(idle.any()) else None,
                       row_shift=shift)

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def num_experts(self) -> int:
        return self.weight.shape[1]

    @property
    def live(self) -> torch.Tensor:
        """``[P]`` bool live-GPU mask (all True when every GPU is live)."""
        if self.active_gpus is None:
            return torch.ones(self.topology.num_gpus, dtype=torch.bool, device=self.weight.device)
        return self.active_gpus

    @property
    def plans_runtime_table(self) -> bool:
        """Whether this request plans for SGLang's runtime table on one node: the global
        policy under ``dispatch="nearest"`` on one node with ``fair="divide"``, or
        ``"auto"`` with every GPU live and tokens arising evenly
        (:mod:`eplb.core.rank_draws`; elsewhere on one node the even split, the rule's
        expectation, or ``"avoid"``)."""
        return (self.dispatch == "nearest" and self.policy == "global"
                and self.topology.num_nodes == 1
                and (self.fair == "divide" or (self.fair == "auto" and self.active_gpus is None
                                               and self.source is None)))

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with :attr:`seed`: the same request plans alike."""
        return torch.Generator().manual_seed(self.seed)
