"""The core planner: one planning problem in, one validated placement out.

Layers inside, bottom to top (each imports only those before it;
``tests/test_architecture.py`` holds the same list): ``messages`` (message text; it
imports nothing) → ``topology`` → ``inputs`` → ``expert_ids`` → ``map_tables`` →
``placement`` → ``trace`` → ``options`` → ``request`` → ``ordering`` → ``device_path`` →
``replication`` → ``count_fillers`` → ``count_bounds`` → ``companion_bound`` →
``tiny_counts`` → ``packing/`` → ``small_slots`` → ``bounds`` → ``dispatch`` →
``node_labels`` → ``node_repair`` →
``dispatch_plan`` → ``rank_draws`` → ``locality`` → ``policies/`` → ``planner`` →
``baselines``.

Public here on purpose (the rest is internal and may change):
"""

from eplb.core.baselines import plan_greedy, rebalance_experts_greedy
from eplb.core.bounds import (
    balancedness_ceiling,
    layer_ceiling,
    layer_lower_bound,
    placement_scores,
)
from eplb.core.dispatch import realised_gpu_loads, remote_nodes_per_token
from eplb.core.options import IncrementalOptions, PackingOptions, PlanOptions
from eplb.core.placement import Placement, PlacementError
from eplb.core.planner import make_request, plan_fresh
from eplb.core.policies import POLICIES, PlacementPolicy, resolve_policy
from eplb.core.rank_draws import plan_for_start_up_file
from eplb.core.request import PlanRequest
from eplb.core.topology import Topology
from eplb.core.trace import LoadTrace

__all__ = [
    "POLICIES",
    "IncrementalOptions",
    "LoadTrace",
    "PackingOptions",
    "Placement",
    "PlacementError",
    "PlacementPolicy",
    "PlanOptions",
    "PlanRequest",
    "Topology",
    "balancedness_ceiling",
    "layer_ceiling",
    "layer_lower_bound",
    "make_request",
    "placement_scores",
    "plan_for_start_up_file",
    "plan_fresh",
    "plan_greedy",
    "realised_gpu_loads",
    "rebalance_experts_greedy",
    "remote_nodes_per_token",
    "resolve_policy",
]
