"""Tools around the planner: the synthetic load generator (:mod:`.generator`), the replay
simulator (:mod:`.simulate`, scored by :mod:`.scoring`) and the report pictures
(:mod:`.report`, needs ``eplb[plot]``).

Public here on purpose (the rest is internal and may change):
"""

from eplb.tools.generator import generate_loads, generate_trace
from eplb.tools.routing import Router, fit_router, sample_group_limited
from eplb.tools.scoring import step_balancedness
from eplb.tools.simulate import CADENCES, Cadence, SimulationResult, simulate

__all__ = [
    "CADENCES",
    "Cadence",
    "Router",
    "SimulationResult",
    "fit_router",
    "generate_loads",
    "generate_trace",
    "sample_group_limited",
    "simulate",
    "step_balancedness",
]
