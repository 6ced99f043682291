"""Replay a load trace under an engine's rebalancing cadence and score every step.

The simulator feeds a trace of per-step counts ``[T, L, E]`` to an
:class:`eplb.online.Rebalancer` in the chunks between rebalance points, and scores each
step with the placement in force at that step:

- **per-step balancedness**: ``Σ_l mean / Σ_l max`` GPU load of that step's counts;
- **per-window balancedness**: the same for the counts summed over consecutive scoring
  windows of ``score_window`` steps (GPU loads are linear in the counts, so windows
  spanning a plan switch are scored exactly);
- **oracle per window**: balancedness of the plan the same planner makes from the
  scored window itself (from scratch): what a clairvoyant engine would get with that
  planner (not a bound on every planner; :mod:`eplb.core.bounds` gives that);
- **per rebalance**: planning seconds, slots whose expert changed
  (:meth:`Placement.moved_slots`) and the bytes that moves (``expert_bytes`` per slot).
- **cross-node traffic per window** (nearest dispatch on several nodes; tokens arise on
  the live GPUs): the expected distinct remote nodes a token's experts reach per MoE layer, as
  the locality policy models them from the loads and the groups
  (:func:`eplb.tools.scoring.modelled_remote_nodes`: a model of the routing, not counted
  tokens; groups that do not divide the experts are modelled as no groups), or, given
  the trace's own top-k ids (``routing``), counted from its tokens as ``eplb eval
  --routing`` counts them (:func:`eplb.core.dispatch.remote_nodes_per_token`).

Cadences (:data:`CADENCES`): ``"vllm"`` (window 1000, interval 3000), ``"sglang"``
(1000 / 1000) and ``"adrs"`` (the ADRS benchmark: 100-step windows, plan on window ``i``,
score on window ``i + 1``; that is window = interval = score window = 100). Until the
first rebalance every planner runs under the static :func:`eplb.online.trivial_placement`
(SGLang's ``init_trivial``: live slot ``i`` holds expert ``i % E``); those windows are
reported but left out of the summary.

Per-step scoring is one batched matrix product per plan tenure (:mod:`eplb.tools.scoring`): with
``M[l, e, p] = (replicas of e on GPU p) / logcnt[l, e]`` the GPU loads of all steps are
``counts [T, L, E] @ M [L, E, P]``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from eplb.core.placement import Placement
from eplb.core.planner import as_planned
from eplb.core.topology import Topology, positive_int
from eplb.core.trace import LoadTrace
from eplb.online import PlannerFn, Rebalancer, make_planner, trivial_placement
from eplb.online.estimate import Estimator, as_history, make_estimator
from eplb.online.settings import SCORE_OPTIONS
from eplb.tools.scoring import (
    EVEN,
    Realised,
    add_window_traffic,
    check_scoring_size,
    gpu_load_matrix,
    gpu_loads,
    loads_balancedness,
    scored_loads,
    scoring_counts,
    step_routing,
    steps_per_chunk,
)

#: One DeepSeek-V3 routed expert in fp8: gate, up and down projections, each
#: 7168 x 2048 one-byte weights (block-scale factors, ~10 kB, are left out).
DEEPSEEK_V3_EXPERT_BYTES = 3 * 7168 * 2048 * 1
#: the most bytes one expert may be said to hold (1 TiB, far beyond any model's): the
#: bytes moved are int64, slots moved × this (attacker pass: 1e17 overflowed them into
#: wrong and negative figures)
MAX_EXPERT_BYTES = 1 << 40
#: the most slots (windows × layers × R) the oracle plans in one call of a built-in
#: planner: every window in one call passed the planner's own limit on a long replay
#: (2,400 DeepSeek-V3 steps at interval 1 replayed for 40 s, then failed with "139200
#: layers × 288 slots is beyond what eplb plans"), and a call holds its slots' state at
#: once (~200 bytes a slot in eplb's planner, ~70 in "none"'s maps and their scoring):
#: at 2**22, 251 DeepSeek-V3 windows a call, `eplb simulate` of 600 steps at interval 1
#: peaked at 1.7 GB RSS (0.4 GB without the oracle); at 2**18, 15 windows, 0.49 GB and
#: no slower (eplb's planner plans ~3,000 layers a second from a few hundred a call up)
ORACLE_SLOTS_PER_CALL = 1 << 18


@dataclass(frozen=True)
class Cadence:
    """Rebalance every ``interval`` steps on the last ``window`` steps; score windows of
    ``score_window`` steps (default: ``interval``)."""

    window: int
    interval: int
    score_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("window", "interval", "score_window"):
            value = getattr(self, name)
            if value is None and name == "score_window":
                continue
            # NumPy and 0-d tensor integers too, as the Rebalancer takes them, stored as
            # int (np.int64(100) was refused as "must be a positive integer": attacker pass)
            try:
                number = positive_int(name, value)
            except ValueError:
                raise ValueError(f"cadence {name} must be a positive integer, "
                                 f"got {value!r}") from None
            object.__setattr__(self, name, number)

    @property
    def scoring(self) -> int:
        return self.score_window or self.interval


CADENCES: dict[str, Cadence] = {
    "vllm": Cadence(1000, 3000),
    "sglang": Cadence(1000, 1000),
    "adrs": Cadence(100, 100, 100),
}


@dataclass(frozen=True, eq=False)
class SimulationResult:
    """Everything one replay measured.

    Attributes:
        planner, estimator: what planned (names / spec strings).
        topology: the cluster.
        cadence: window, interval and scoring window in steps.
        incremental: whether plans started from the placement in force.
        step_balancedness: ``[T]`` per step, under the placement in force at that step.
        window_starts: ``[n]`` first step of each full scoring window.
        window_balancedness: ``[n]`` balancedness of each window's summed counts.
        oracle_balancedness: ``[n]`` same planner, planned on the scored window itself
            (``None`` when the oracle was not run).
        planned: ``[n]`` bool, the window starts at or after the first rebalance (the
            summary averages over those of them that route a token: :attr:`scored`).
        rebalance_steps: ``[k]`` step at which each rebalance's plan took over.
        plan_seconds: ``[k]`` wall time of each plan (estimate + planner).
        moved_slots: ``[k, L]`` slots whose expert changed at each rebalance.
        moved_per_gpu: ``[k, P]`` the same slots on each GPU (``None``: not recorded).
        expert_bytes: bytes of one expert's weights (for ``moved_bytes``).
        remote_nodes: ``[n]`` remote nodes per token of each window (module docstring;
            NaN for a window without tokens), ``None`` where not measured (even dispatch,
            one node, or an empty slot in some plan).
        remote_counted: ``remote_nodes`` were counted from the trace's own tokens
            (``routing``), not modelled from its loads.
        idle_steps: ``[T]`` bool, steps that route no token (``None``: none). Their
            balancedness reads 1, but they take no MoE time: the summary leaves them, and
            windows of idle steps alone, out of its means.
    """

    planner: str
    estimator: str
    topology: Topology
    cadence: Cadence
    incremental: bool
    step_balancedness: torch.Tensor
    window_starts: torch.Tensor
    window_balancedness: torch.Tensor
    oracle_balancedness: torch.Tensor | None
    planned: torch.Tensor
    rebalance_steps: torch.Tensor
    plan_seconds: torch.Tensor
    moved_slots: torch.Tensor
    expert_bytes: int = DEEPSEEK_V3_EXPERT_BYTES
    meta: Mapping[str, Any] = field(default_factory=dict)
    idle_steps: torch.Tensor | None = None
    moved_per_gpu: torch.Tensor | None = None
    remote_nodes: torch.Tensor | None = None
    remote_counted: bool = False

    def __repr__(self) -> str:
        # as LoadTrace's: the per-step tensors (and the idle mask) run to tens of kB for a
        # 1000-step replay, so the repr gives the run and its headline figures;
        # summary() and to_dict() hold the rest
        figures = self.summary()
        shown = ", ".join(
            f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
            for key, value in figures.items()
            if key in ("steps", "rebalances", "window_balancedness", "oracle_balancedness"))
        return (f"SimulationResult(planner={self.planner!r}, estimator={self.estimator!r}, "
                f"incremental={self.incremental}, {self.topology!r}, {self.cadence!r}, "
                f"{shown})")

    @property
    def num_steps(self) -> int:
        return self.step_balancedness.shape[0]

    def _idle(self) -> torch.Tensor:
        if self.idle_steps is None:
            return torch.zeros(self.num_steps, dtype=torch.bool)
        return self.idle_steps.cpu()

    @property
    def idle_windows(self) -> torch.Tensor:
        """``[n]`` bool: windows of idle steps alone (they score 1 without any MoE time)."""
        num_windows, score = self.window_starts.numel(), self.cadence.scoring
        idle = self._idle()[: num_windows * score].view(num_windows, score).all(1)
        return idle.to(self.planned.device)

    @property
    def scored(self) -> torch.Tensor:
        """``[n]`` bool: the windows the summary averages, the ``planned`` ones that route
        some token (:attr:`idle_windows` left out)."""
        return self.planned & ~self.idle_windows

    @property
    def moved_bytes(self) -> torch.Tensor:
        """``[k]`` int64 bytes of expert weights copied at each rebalance."""
        return self.moved_slots.sum(1) * self.expert_bytes

    @property
    def busiest_gpu_bytes(self) -> torch.Tensor | None:
        """``[k]`` int64 bytes into the GPU that receives the most at each rebalance: all
        GPUs copy at once, so it sets how long the rebalance stalls (``None``: the
        per-GPU moves were not recorded)."""
        if self.moved_per_gpu is None:
            return None
        if not self.moved_per_gpu.numel():
            return torch.zeros(self.moved_per_gpu.shape[0], dtype=torch.int64)
        return self.moved_per_gpu.amax(1) * self.expert_bytes

    def summary(self) -> dict[str, Any]:
        """Scalar figures over the :attr:`scored` windows / the busy steps after the first
        rebalance."""
        scored = self.scored
        # the first rebalance point, the same for every planner ("none" never plans there)
        first = min(self.cadence.interval, self.num_steps)
        # an idle step (an engine step without tokens, a recorder's unfilled row) reads as
        # balanced: counted, it lifted the mean of the steps that took MoE time
        busy = ~self._idle()[first:]
        steps_after = self.step_balancedness[first:][busy.to(self.step_balancedness.device)]
        out: dict[str, Any] = {
            "planner": self.planner,
            "estimator": self.estimator,
            "incremental": self.incremental,
            "steps": self.num_steps,
            "idle_steps": int(self._idle().sum()),
            "windows_scored": int(scored.sum()),
            "window_balancedness": _mean(self.window_balancedness[scored]),
            "step_balancedness": _mean(steps_after),
            "oracle_balancedness": (None if self.oracle_balancedness is None
                                    else _mean(self.oracle_balancedness[scored])),
            "rebalances": int(self.rebalance_steps.numel()),
            "moved_slots_per_rebalance": _mean(self.moved_slots.sum(1).double()),
            "moved_fraction": (_mean(self.moved_slots.sum(1).double())
                               / (self.moved_slots.shape[1] * self.topology.num_replicas)
                               if self.moved_slots.numel() else None),
            "moved_gb_per_rebalance": _mean(self.moved_bytes.double() / 1e9),
            "busiest_gpu_gb_per_rebalance": (
                None if self.busiest_gpu_bytes is None
                else _mean(self.busiest_gpu_bytes.double() / 1e9)),
            "plan_ms_median": (statistics.median(self.plan_seconds.tolist()) * 1e3
                               if self.plan_seconds.numel() else None),
        }
        if self.remote_nodes is not None:
            out["remote_nodes_per_token"] = _mean(self.remote_nodes[scored])
            out["remote_nodes_counted"] = self.remote_counted
        if out["oracle_balancedness"] is not None and out["window_balancedness"] is not None:
            out["gap_to_oracle"] = out["oracle_balancedness"] - out["window_balancedness"]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the summary plus every per-step / per-window / per-rebalance list."""
        return {
            "summary": self.summary(),
            "topology": self.topology.as_dict(),
            "cadence": {"window": self.cadence.window, "interval": self.cadence.interval,
                        "score_window": self.cadence.scoring},
            "expert_bytes": self.expert_bytes,
            "step_balancedness": self.step_balancedness.tolist(),
            "windows": {
                "start": self.window_starts.tolist(),
                "balancedness": self.window_balancedness.tolist(),
                "oracle": (None if self.oracle_balancedness is None
                           else self.oracle_balancedness.tolist()),
                "planned": self.planned.tolist(),
                "remote_nodes": (None if self.remote_nodes is None
                                 else [None if v != v else v  # NaN: no token
                                       for v in self.remote_nodes.tolist()]),
            },
            "rebalances": {
                "step": self.rebalance_steps.tolist(),
                "plan_seconds": self.plan_seconds.tolist(),
                "moved_slots": self.moved_slots.sum(1).tolist(),
                "moved_bytes": self.moved_bytes.tolist(),
                "busiest_gpu_bytes": (None if self.busiest_gpu_bytes is None
                                      else self.busiest_gpu_bytes.tolist()),
            },
            "meta": dict(self.meta),
        }

    def format_summary(self) -> str:
        """One line per summary figure, for printing."""
        lines = []
        for key, value in self.summary().items():
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{key:>26}: {text}")
        return "\n".join(lines)


def _mean(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def _oracle(
    counts: torch.Tensor,
    score: int,
    planner: PlannerFn,
    builtin: bool,
    realised: Realised = EVEN,
    num_slots: int = 1,
) -> torch.Tensor:
    """``[n]`` balancedness of ``planner(w_i)`` on ``w_i [L, E]``, the sum of the ``i``-th
    ``score`` steps of ``counts [T, L, E]`` (``n = T // score``), realised as ``realised``
    says; ``num_slots``: the planner's R."""
    num_layers, num_experts = counts.shape[1:]
    num_windows = counts.shape[0] // score
    if num_windows == 0:
        return torch.zeros(0, dtype=torch.float64)
    # built-in planners treat layers independently: plan many windows in one call, as
    # many as ORACLE_SLOTS_PER_CALL holds (at least one); a callable, one window a call.
    # The windows are summed a call's worth at a time: summed all at once they were a
    # second copy of the trace at interval 1 ([T, L, E], 35 MB per 600 DeepSeek-V3 steps)
    per_call = max(1, ORACLE_SLOTS_PER_CALL // (num_layers * num_slots)) if builtin else 1
    parts = []
    for first in range(0, num_windows, per_call):
        count = min(per_call, num_windows - first)
        part = counts[first * score:(first + count) * score].view(
            count, score, num_layers, num_experts).sum(1)
        if not builtin:
            plan = planner(part[0], None)
            parts.append(loads_balancedness(scored_loads(plan, part[0], realised),
                                            plan.live_gpus(),
                                            realised.speed(plan.topology.num_gpus))[None])
            continue
        flat = part.reshape(-1, num_experts)
        stacked = planner(flat, None)
        loads = scored_loads(stacked, flat, realised).view(count, num_layers, -1)
        parts.append(loads_balancedness(loads, stacked.live_gpus(),
                                        realised.speed(stacked.topology.num_gpus)))
    return torch.cat(parts).to(torch.float64)


def simulate(
    trace: object,
    planner: str | PlannerFn = "eplb",
    *,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    cadence: str | Cadence = "vllm",
    window: int | None = None,
    interval: int | None = None,
    score_window: int | None = None,
    estimator: str | Estimator = "sum",
    incremental: bool = False,
    max_moves: int | None = None,
    skip_threshold: float | None = None,
    active_gpus: object = None,
    initial: Placement | None = None,
    oracle: bool = True,
    expert_bytes: int = DEEPSEEK_V3_EXPERT_BYTES,
    score_dispatch: str | None = None,
    routing: Sequence[torch.Tensor] | None = None,
    **plan_options: Any,
) -> SimulationResult:
    """Replay ``trace`` under a rebalancing cadence and score it.

    Args:
        trace: ``eplb.formats.LoadTrace`` or per-step counts ``[T, L, E]``.
        planner: ``"eplb"``, ``"greedy"``, ``"none"`` or a callable
            ``(weight [L, E], previous: Placement | None) -> Placement``.
        num_replicas, num_gpus, num_nodes, num_groups: the cluster.
        cadence: ``"vllm"``, ``"sglang"``, ``"adrs"`` or a :class:`Cadence`;
            ``window`` / ``interval`` / ``score_window`` override its fields.
        estimator: spec or :class:`~eplb.online.estimate.Estimator` (default the window sum).
        incremental, max_moves, skip_threshold: forwarded to :func:`eplb.plan` (planner
            ``"eplb"``) through :class:`~eplb.online.Rebalancer`.
        active_gpus: ``[P]`` bool of live GPUs (planner ``"eplb"`` only).
        initial: placement before the first rebalance (default: the trivial placement).
        oracle: also plan every scoring window on itself (one extra planner call).
        expert_bytes: bytes per expert copy (default DeepSeek-V3 fp8, 44 MB).
        score_dispatch: how the engine sends an expert's tokens to its replicas when
            every plan is scored: ``"even"`` (vLLM) or ``"nearest"`` (SGLang with DeepEP).
            Default: the rule the planner's ``dispatch`` option plans for, else even. Give
            it to score a planner that does not plan for the engine's rule (the greedy, or
            eplb planning for even) as that engine serves its plans. On one node with
            every GPU live and no ``source``, ``"nearest"`` is scored by the table SGLang
            builds at a runtime rebalance, one draw of it per plan
            (:meth:`~eplb.tools.scoring.Realised.runtime_table`).
        routing: the trace's own top-k ids, one ``[tokens, L, k]`` array per step (whose
            ids count to that step's counts exactly; ids below 0 are padding, counted
            nowhere), to count the remote nodes per token from rather than model them
            (nearest dispatch on several nodes only).
        plan_options: extra keyword arguments for the planner.

    Returns:
        A :class:`SimulationResult`. Raises ``ValueError`` on a bad trace, cadence or
        topology, ``TypeError`` on a trace of the wrong type.
    """
    counts = as_history(trace, "trace")
    num_steps, num_layers, num_experts = counts.shape
    base = CADENCES.get(cadence) if isinstance(cadence, str) else cadence
    if not isinstance(base, Cadence):
        raise ValueError(f"unknown cadence {cadence!r}; accepted: {', '.join(CADENCES)} or a "
                         "Cadence(window, interval, score_window)")
    cad = Cadence(
        base.window if window is None else window,
        base.interval if interval is None else interval,
        base.score_window if score_window is None else score_window,
    )
    # (an expert of no bytes would report every rebalance as free: refused as a slip;
    # NumPy and 0-d tensor integers are integers, taken as Python ints)
    try:
        expert_bytes = positive_int("expert_bytes", expert_bytes)
    except ValueError:
        expert_bytes_ok = False
    else:
        expert_bytes_ok = expert_bytes <= MAX_EXPERT_BYTES
    if not expert_bytes_ok:
        raise ValueError(f"expert_bytes must be an integer in 1..{MAX_EXPERT_BYTES} (1 TiB), "
                         f"got {expert_bytes!r}")
    if not isinstance(oracle, bool):  # "no" would be true
        raise ValueError(f"oracle must be True or False, got {oracle!r}")
    # every plan is scored as the engine realises it: as the plans were made for it, or
    # by the rule named (a planner that plans for another rule, e.g. the greedy)
    realised = Realised.of(plan_options, score_dispatch)
    # the cluster as the plans record it (one node, with eplb.plan's warning, where the GPUs
    # do not divide over the nodes), for the initial placement and the result alike
    asked = Topology(num_replicas, num_gpus, num_nodes, num_groups)
    topo = as_planned(asked, plan_options.get("policy", "auto"), stacklevel=3,
                      dispatch="nearest" if "nearest" in (plan_options.get("dispatch"),
                                                          realised.dispatch) else None)
    check_scoring_size(num_layers, num_experts, num_gpus)  # before any planning
    if initial is None:
        initial = trivial_placement(num_experts, num_layers, topo, active_gpus)
    elif not isinstance(initial, Placement):
        raise TypeError(f"initial must be an eplb.Placement or None, got "
                        f"{type(initial).__name__}")
    elif initial.logcnt.shape != (num_layers, num_experts):
        raise ValueError(f"initial placement has layers x experts {tuple(initial.logcnt.shape)}, "
                         f"the trace {(num_layers, num_experts)}")
    elif initial.topology == asked != topo:  # made for the cluster as asked: the plans' now
        initial = Placement.from_phy2log(initial.phy2log, num_experts, topo, initial.policy,
                                         initial.active_gpus)
    est = make_estimator(estimator)
    rebalancer = Rebalancer(
        num_replicas, num_gpus, topo.num_nodes, num_groups, window=cad.window,
        interval=cad.interval, estimator=est, planner=planner, incremental=incremental,
        max_moves=max_moves, skip_threshold=skip_threshold, active_gpus=active_gpus,
        initial=initial, max_steps=num_steps, **plan_options,
    )

    score = cad.scoring
    # scoring windows start at multiples of their length: the first one scored starts at
    # or after the first rebalance (interval 20 and windows of 100: at step 100, so 192
    # steps scored nothing and every figure came back empty, without a word)
    first_scored = -(-cad.interval // score) * score
    if num_steps < first_scored + score:
        # fewer steps would score nothing after the first rebalance: every figure empty
        where = ("" if first_scored == cad.interval else
                 f", the first scoring window after it starts at step {first_scored}")
        raise ValueError(f"trace has {num_steps} steps; the first rebalance is at step "
                         f"{cad.interval} and a scoring window is {score} steps{where}, so "
                         f"the simulation needs at least {first_scored + score} steps")
    speed = realised.speed(num_gpus)
    chunk = steps_per_chunk(num_layers, num_gpus)
    scored, dtype = scoring_counts(counts)  # (the planners take the counts as they are)
    num_windows = num_steps // score
    window_loads = torch.zeros(num_windows, num_layers, num_gpus, dtype=torch.float64)
    # the GPUs live in some plan of each window: the initial placement's live set may
    # differ from the rebalancer's (a GPU that died or came back before the replay)
    window_live = torch.zeros(num_windows, num_gpus, dtype=torch.bool)
    step_bal = torch.empty(num_steps, dtype=torch.float64)
    boundaries = [*range(cad.interval, num_steps, cad.interval), num_steps]
    start = 0
    placement = rebalancer.placement
    tables = 0  # the maps put in force by a rebalance so far: the runtime table's draw
    # cross-node traffic, where the engine's dispatch makes it (module docstring):
    # token-weighted sums per window, a window's share of each plan's tenure apart
    traffic = realised.dispatch == "nearest" and topo.num_nodes > 1
    steps_ids = None if routing is None else step_routing(routing, counts, traffic)
    remote_sum = torch.zeros(num_windows, dtype=torch.float64)
    remote_tokens = torch.zeros(num_windows, dtype=torch.float64)
    for end in boundaries:
        if placement is None:  # a planner that returned nothing usable cannot happen here
            raise RuntimeError("no placement in force")
        # (on one node under nearest dispatch, SGLang's runtime table: a new draw of it
        # where a rebalance changed the map, the engine's table rebuilt; a map kept, as a
        # skipped rebalance or "none" keeps it, keeps its table: SGLang builds the table
        # from the map with a fixed seed, and a new draw moved the scores of steps whose
        # map and counts were the same: 0.951, 0.957, 0.960, attacker pass)
        matrix = gpu_load_matrix(placement, realised, draw=tables)
        live = placement.live_gpus()
        for a in range(start, end, chunk):
            b = min(a + chunk, end)
            loads = gpu_loads(scored[a:b], matrix, dtype).double()  # [t, L, P]
            step_bal[a:b] = loads_balancedness(loads, live, speed)
            win = torch.arange(a, b) // score
            keep = win < num_windows
            window_loads.index_add_(0, win[keep], loads[keep])
            window_live[win[keep]] |= live
        if traffic:
            # (the scoring counts: scaled beyond 2**±900, so their window sums stay finite)
            add_window_traffic(scored, start, end, score, placement, remote_sum,
                               remote_tokens, steps_ids)
        if end < num_steps and planner != "none":  # "none" never rebalances
            before = len(rebalancer.events)
            rebalancer.record(counts[start:end])
            tables += sum(event.changed for event in rebalancer.events[before:])
            placement = rebalancer.placement
        start = end

    window_bal = torch.zeros(num_windows, dtype=torch.float64)
    for live in torch.unique(window_live, dim=0):  # one or two live sets, not one per window
        rows = (window_live == live).all(1)
        window_bal[rows] = loads_balancedness(window_loads[rows], live, speed)
    window_starts = torch.arange(num_windows, dtype=torch.int64) * score
    events = rebalancer.events
    # windows from the first rebalance point on, for every planner alike
    planned = window_starts >= min(cad.interval, num_steps)
    idle = ~counts.flatten(1).any(1).cpu()  # counts are >= 0: no token at all
    oracle_bal = None
    if oracle and planner == "none":
        # no rebalancing is its own foresight: the placement in force, which an initial
        # placement given sets (its oracle read SGLang's trivial map instead: 0.41 beside
        # the replay's 0.49 of a start-up file)
        oracle_bal = window_bal.clone()
    elif oracle:
        # the oracle plans each window fresh: the knobs that score moves from a map in
        # force have nothing to score there (make_planner refuses them without incremental)
        fresh_options = {k: v for k, v in plan_options.items() if k not in SCORE_OPTIONS}
        plan_fn = make_planner(planner, topo, active_gpus=active_gpus, **fresh_options)
        oracle_bal = _oracle(counts, score, plan_fn, builtin=isinstance(planner, str),
                             realised=realised, num_slots=topo.num_replicas)
    name = planner if isinstance(planner, str) else getattr(planner, "__name__", "callable")
    return SimulationResult(
        planner=name,
        estimator=est.spec,
        topology=topo,
        cadence=cad,
        incremental=incremental,
        step_balancedness=step_bal,
        window_starts=window_starts,
        window_balancedness=window_bal,
        oracle_balancedness=oracle_bal,
        planned=planned,
        rebalance_steps=torch.tensor([e.step for e in events], dtype=torch.int64),
        plan_seconds=torch.tensor([e.plan_seconds for e in events], dtype=torch.float64),
        moved_slots=(torch.stack([e.moved_slots for e in events]) if events
                     else torch.zeros(0, num_layers, dtype=torch.int64)),
        moved_per_gpu=(torch.stack([e.moved_per_gpu for e in events]) if events
                       else torch.zeros(0, topo.num_gpus, dtype=torch.int64)),
        expert_bytes=expert_bytes,
        meta={"source": trace.source if isinstance(trace, LoadTrace) else None,
              "trace_steps": num_steps},
        idle_steps=idle,
        remote_nodes=remote_sum / remote_tokens if traffic else None,
        remote_counted=traffic and steps_ids is not None,
    )

