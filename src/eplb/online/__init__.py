"""Planning against a running deployment: incremental plans, load estimators, and the
stateful :class:`Rebalancer` an engine (or the simulator) feeds step by step.

Public here on purpose (the rest is internal and may change):
"""

from eplb.online.estimate import (
    ESTIMATORS,
    AdaptiveAverage,
    Estimate,
    Estimator,
    ExponentialAverage,
    MultiWindow,
    RobustMean,
    WindowSum,
    expected_max,
    make_estimator,
    select_per_layer,
)
from eplb.online.incremental import plan_incremental
from eplb.online.planners import (
    PLANNERS,
    PlannerFn,
    make_planner,
    plan_estimate,
    trivial_placement,
)
from eplb.online.rebalancer import RebalanceEvent, Rebalancer

__all__ = [
    "ESTIMATORS",
    "PLANNERS",
    "AdaptiveAverage",
    "Estimate",
    "Estimator",
    "ExponentialAverage",
    "MultiWindow",
    "PlannerFn",
    "RebalanceEvent",
    "Rebalancer",
    "RobustMean",
    "WindowSum",
    "expected_max",
    "make_estimator",
    "make_planner",
    "plan_estimate",
    "plan_incremental",
    "select_per_layer",
    "trivial_placement",
]
