"""Online planning."""
from eplb.online.rebalancer import *  # noqa: F403
from eplb.online.rebalancer import (  # noqa: F401
    PLANNERS,
    PlannerFn,
    RebalanceEvent,
    Rebalancer,
    make_planner,
    plan_estimate,
    trivial_placement,
)
