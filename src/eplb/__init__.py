"""eplb: expert placement planning for Mixture-of-Experts expert-parallel inference.

The public entry points are :func:`plan` (returns a :class:`Placement`) and the drop-in
:func:`rebalance_experts` (DeepSeek's signature and return value). Online rebalancing
lives in :mod:`eplb.online`, engine formats in :mod:`eplb.formats`, engine plugins in
:mod:`eplb.integrations`.
"""

from eplb._version import __version__
from eplb.api import plan, rebalance_experts
from eplb.core.options import IncrementalOptions, PackingOptions, PlanOptions
from eplb.core.placement import Placement, PlacementError
from eplb.core.topology import Topology

__all__ = [
    "IncrementalOptions",
    "PackingOptions",
    "Placement",
    "PlacementError",
    "PlanOptions",
    "Topology",
    "__version__",
    "plan",
    "rebalance_experts",
]
