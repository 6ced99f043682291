"""eplb: expert placement planning for Mixture-of-Experts expert-parallel inference."""

from eplb.api import plan, rebalance_experts
from eplb.placement import Placement, PlacementError, Topology

__version__ = "0.1.0"

__all__ = ["Placement", "PlacementError", "Topology", "__version__", "plan", "rebalance_experts"]
