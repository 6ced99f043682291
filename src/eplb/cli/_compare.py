"""Side-by-side comparison of planners on one load matrix (used by bench and demo)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eplb.api import plan
from eplb.cli._common import Ceiling, ceiling, static_gpu_loads, timed
from eplb.cli._inputs import cli_policy
from eplb.core import plan_greedy
from eplb.core.map_tables import load_balance
from eplb.core.messages import counted
from eplb.tools.report import Report, plot_gpu_heatmaps, plot_layer_balancedness

NONE, GREEDY, EPLB = "no rebalancing", "reference greedy", "eplb"


@dataclass
class PlannerResult:
    """One planner's outcome on one scenario.

    ``per_layer [L]`` balancedness per layer, ``gpu_loads [L, P]`` load per GPU.
    """

    name: str
    balancedness: float
    worst: float  # the worst layer's max / mean GPU load
    seconds: float | None
    per_layer: torch.Tensor
    gpu_loads: torch.Tensor

    def as_dict(self) -> dict:
        return {
            "planner": self.name,
            "balancedness": self.balancedness,
            "worst_layer_max_over_mean": self.worst,
            "plan_seconds": self.seconds,
        }


@dataclass
class Comparison:
    """Every planner on one scenario, plus the ceiling."""

    name: str
    shape: dict
    results: list[PlannerResult]
    ceiling: Ceiling
    layer_ids: list[int] = field(default_factory=list)

    def result(self, name: str) -> PlannerResult:
        return next(r for r in self.results if r.name == name)

    def rows(self) -> list[list[object]]:
        rows = [
            [r.name, r.balancedness, r.worst,
             None if r.seconds is None else f"{r.seconds * 1e3:.1f}"]
            for r in self.results
        ]
        rows.append(["ceiling (upper bound)", self.ceiling.overall,
                     self.ceiling.worst, None])
        return rows

    def as_dict(self) -> dict:
        return {
            "scenario": self.name,
            **self.shape,
            "results": [r.as_dict() for r in self.results],
            "ceiling": self.ceiling.overall,
            "ceiling_per_layer": None if self.ceiling.per_layer is None
            else [float(x) for x in self.ceiling.per_layer],
            "layer_ids": self.layer_ids,
        }


HEADERS = ["planner", "balancedness", "worst max/mean", "plan ms"]


def compare(
    name: str,
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    *,
    policy: str = "auto",
    seed: int = 0,
    repeats: int = 3,
    layer_ids: list[int] | None = None,
    include_greedy: bool = True,
) -> Comparison:
    """Plan ``weight [L, E]`` with eplb and the reference greedy; score both and no rebalancing.

    Planning time is the median of ``repeats`` runs (the first run is included, so a cold
    start counts when ``repeats`` is 1).
    """

    weight = torch.as_tensor(weight, dtype=torch.float64)
    num_layers, num_experts = weight.shape
    policy = cli_policy(policy, num_replicas, num_gpus, num_nodes, num_groups, num_experts)
    results = []
    static = static_gpu_loads(weight, num_gpus)
    per, total, worst = load_balance(static)
    results.append(PlannerResult(NONE, total, worst, None, per, static))
    if include_greedy:
        greedy, secs = timed(lambda: plan_greedy(weight, num_replicas, num_gpus, num_nodes,
                                                 num_groups, policy=policy), repeats)
        greedy.validate(anti_affinity=False)
        loads = greedy.scaled_gpu_loads(weight)
        per, total, worst = load_balance(loads)
        results.append(PlannerResult(GREEDY, total, worst, secs, per, loads))
    placement, secs = timed(lambda: plan(weight, num_replicas, num_gpus, num_nodes, num_groups,
                                              policy=policy, seed=seed), repeats)
    placement.validate()
    loads = placement.scaled_gpu_loads(weight)
    per, total, worst = load_balance(loads)
    results.append(PlannerResult(EPLB, total, worst, secs, per, loads))
    shape = {
        "layers": num_layers, "experts": num_experts, "replicas": num_replicas,
        "gpus": num_gpus, "nodes": num_nodes, "groups": num_groups, "policy": policy,
    }
    ceil = ceiling(weight, num_replicas, num_gpus, num_nodes, num_groups, policy)
    return Comparison(name, shape, results, ceil, list(layer_ids or range(num_layers)))


def describe(c: Comparison) -> str:
    s = c.shape
    text = (f"{c.name}: {counted(s['layers'], 'layer')} × {s['experts']} experts, "
            f"{s['replicas']} slots on {s['gpus']} GPUs")
    if s["policy"] == "hierarchical":
        text += f" in {s['nodes']} nodes, {s['groups']} expert groups"
    return text + f", {s['policy']} policy"


def add_to_report(report: Report, c: Comparison, stem: str) -> None:
    """Append a scenario's table and pictures to an :class:`eplb.tools.report.Report`."""

    report.heading(describe(c))
    report.table(["planner", "balancedness", "worst layer max/mean", "plan time (ms)"],
                 [[f"{x:.4f}" if isinstance(x, float) else ("n/a" if x is None else x)
                   for x in row] for row in c.rows()])
    none, best = c.result(NONE), c.result(EPLB)
    panels = [(f"{NONE} (static, 1 copy each)", none.gpu_loads)]
    if any(r.name == GREEDY for r in c.results):
        panels.append((GREEDY, c.result(GREEDY).gpu_loads))
    panels.append((EPLB, best.gpu_loads))
    report.figure(
        f"{stem}_heatmap.png",
        f"{c.name}: load of every GPU in every MoE layer, divided by the layer's mean load "
        "(white = fair share, red = overloaded). The most loaded GPU sets each layer's time.",
        lambda path: plot_gpu_heatmaps(panels, path, layer_ids=c.layer_ids,
                                       title=f"{c.name}: per-GPU load / layer mean"),
    )
    series = {r.name: r.per_layer for r in c.results}
    report.figure(
        f"{stem}_layers.png",
        f"{c.name}: balancedness (mean / max GPU load) of each MoE layer; the dashed line "
        "is the ceiling, a bound no placement can pass (not always reachable).",
        # the legend gives each planner's overall figure, the table's (the plain mean of
        # the layers' values differed from it: new-user pass)
        lambda path: plot_layer_balancedness(series, path, ceiling=c.ceiling.per_layer,
                                             layer_ids=c.layer_ids,
                                             title=f"{c.name}: balancedness per layer",
                                             overall={r.name: r.balancedness for r in c.results}),
    )
