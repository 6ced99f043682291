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

Cadences (:data:`CADENCES`): ``"vllm"`` (window 1000, interval 3000), ``"sglang"``
(1000 / 1000) and ``"adrs"`` (the ADRS benchmark: 100-step windows, plan on window ``i``,
score on window ``i + 1``; that is window = interval = score window = 100). Until the
first rebalance every planner runs under the static :func:`eplb.online.trivial_placement`
(SGLang's ``init_trivial``: live slot ``i`` holds expert ``i % E``); those windows are
reported but left out of the summary.

Per-step scoring is one batched matrix product per plan tenure: with
``M[l, e, p] = (replicas of e on GPU p) / logcnt[l, e]`` the GPU loads of all steps are
``counts [T, L, E] @ M [L, E, P]``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from eplb.core.dispatch import realised_slot_loads
from eplb.core.inputs import as_gpu_speed, scale_free
from eplb.core.placement import Placement, ideal_and_peak
from eplb.core.planner import as_planned
from eplb.core.topology import Topology, positive_int
from eplb.core.trace import LoadTrace
from eplb.online import PlannerFn, Rebalancer, make_planner, trivial_placement
from eplb.online.estimate import Estimator, as_history, make_estimator

#: One DeepSeek-V3 routed expert in fp8: gate, up and down projections, each
#: 7168 x 2048 one-byte weights (block-scale factors, ~10 kB, are left out).
DEEPSEEK_V3_EXPERT_BYTES = 3 * 7168 * 2048 * 1
#: the most bytes one expert may be said to hold (1 TiB, far beyond any model's): the
#: bytes moved are int64, slots moved × this (attacker pass: 1e17 overflowed them into
#: wrong and negative figures)
MAX_EXPERT_BYTES = 1 << 40


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
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"cadence {name} must be a positive integer, got {value!r}")

    @property
    def scoring(self) -> int:
        return self.score_window or self.interval


CADENCES: dict[str, Cadence] = {
    "vllm": Cadence(1000, 3000),
    "sglang": Cadence(1000, 1000),
    "adrs": Cadence(100, 100, 100),
}


#: the largest ``[L, E, P]`` scoring matrix (float64: 1 GiB) the replay builds. A 15 MB
#: trace of 58 layers × 8,192 experts on 8,192 GPUs asked torch for 31 GB and failed (or
#: took the host's memory) after planning (attacker pass); refused up front instead
MAX_MATRIX_ENTRIES = 1 << 27
#: GPU loads are computed this many entries (``[steps, L, P]``) at a time, at most
_LOADS_PER_CHUNK = 1 << 24


def check_scoring_size(num_layers: int, num_experts: int, num_gpus: int) -> None:
    """``ValueError`` naming the sizes where the scoring matrix
    (:func:`gpu_load_matrix`) would pass :data:`MAX_MATRIX_ENTRIES`."""
    entries = num_layers * num_experts * num_gpus
    if entries > MAX_MATRIX_ENTRIES:
        raise ValueError(
            f"scoring {num_layers} layers × {num_experts} experts on {num_gpus} GPUs takes a "
            f"{entries * 8 / 2**30:.1f} GiB matrix; the replay scores at most "
            f"{MAX_MATRIX_ENTRIES:.3g} layer × expert × GPU entries (replay fewer layers)")


def _steps_per_chunk(num_layers: int, num_gpus: int) -> int:
    """Steps whose ``[steps, L, P]`` GPU loads are computed at once: 1024, fewer where
    those would pass :data:`_LOADS_PER_CHUNK` entries."""
    return max(1, min(1024, _LOADS_PER_CHUNK // max(1, num_layers * num_gpus)))


@dataclass(frozen=True)
class Realised:
    """How the engine realises a placement's loads, as the plans were made for them
    (:func:`eplb.plan`'s ``dispatch``, ``source`` and ``gpu_speed``): the replay scores
    every plan so. Scored as an even split on equal GPUs, a plan for SGLang's nearest
    rule read 0.9347 where the rule realises 0.9178, and one for GPUs of two speeds read
    its load balance, 0.7154, where its time balance is 0.8221 (attacker pass).

    Attributes:
        dispatch: ``"even"`` (vLLM's split over an expert's replicas) or another rule of
            :func:`eplb.core.realised_slot_loads` (``"nearest"``: SGLang's).
        source: ``[P]`` where tokens arise (``None``: evenly over the live GPUs).
        gpu_speed: ``[P]`` relative GPU speeds (``None``: equal): a GPU's time is its
            load over its speed, and balancedness the ideal time over the slowest's.
    """

    dispatch: str = "even"
    source: Any = None
    gpu_speed: Any = None

    @classmethod
    def of(cls, plan_options: Mapping[str, Any], dispatch: str | None = None) -> Realised:
        """The realisation the plan options name (the rest of them are the planner's), by
        the rule ``dispatch`` where one is named (:func:`simulate`'s ``score_dispatch``)."""
        if dispatch not in (None, "even", "nearest"):
            raise ValueError(f"score_dispatch must be 'even', 'nearest' or None, got "
                             f"{dispatch!r}")
        if dispatch == "nearest" and plan_options.get("gpu_speed") is not None:
            raise ValueError("gpu_speed cannot be combined with nearest dispatch (as in eplb.plan)")
        return cls(dispatch or plan_options.get("dispatch") or "even",
                   plan_options.get("source"), plan_options.get("gpu_speed"))

    def speed(self, num_gpus: int) -> torch.Tensor | None:
        """``[P]`` float64 GPU speeds, or ``None`` for equal GPUs."""
        if self.gpu_speed is None:
            return None
        return as_gpu_speed(self.gpu_speed, num_gpus, torch.device("cpu")).to(torch.float64)


EVEN = Realised()


def gpu_load_matrix(placement: Placement, realised: Realised = EVEN) -> torch.Tensor:
    """``[L, E, P]`` float64: share of expert ``e``'s load that lands on GPU ``p`` (split
    evenly over its replicas, or as ``realised.dispatch`` routes it)."""
    topo = placement.topology
    num_layers, num_experts = placement.logcnt.shape
    phy2log = placement.phy2log
    live = phy2log >= 0
    gpu = (torch.arange(topo.num_replicas, device=phy2log.device) // topo.slots_per_gpu)
    layer = torch.arange(num_layers, device=phy2log.device)[:, None].expand_as(phy2log)
    expert = phy2log.clamp(min=0)
    if realised.dispatch == "even":
        share = 1.0 / placement.logcnt.clamp(min=1).to(torch.float64)  # [L, E]
        values = torch.where(live, share.gather(1, expert),
                             torch.zeros((), dtype=torch.float64))
    else:
        # a slot serves its expert's load times a share that depends on the map only, so
        # the rule's loads are linear in the counts: the shares of unit loads are the matrix
        values = realised_slot_loads(
            torch.ones(num_layers, num_experts, dtype=torch.float64, device=phy2log.device),
            phy2log, topo.num_gpus, topo.num_nodes, realised.dispatch, realised.source,
            placement.active_gpus, check=False)
    matrix = torch.zeros(num_layers * num_experts * topo.num_gpus, dtype=torch.float64,
                         device=phy2log.device)
    flat = (layer * num_experts + expert) * topo.num_gpus + gpu[None]
    matrix.index_add_(0, flat.reshape(-1), values.reshape(-1))
    return matrix.view(num_layers, num_experts, topo.num_gpus)


def _gpu_loads(counts: torch.Tensor, matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``counts [T, L, E]`` x ``matrix [L, E, P]`` -> ``[T, L, P]`` (one batched matmul)."""
    out = torch.bmm(counts.transpose(0, 1).to(dtype), matrix.to(dtype))  # [L, T, P]
    return out.transpose(0, 1)


def scoring_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """``(counts, dtype)`` for the batched product that scores GPU loads: the counts as
    they are in float32 where their largest entry lies in [1e-30, 1e30] (or is 0), else
    in float64, times a power of two where that entry is beyond 2**±900
    (:func:`eplb.core.inputs.scale_free`: exact, ratios unchanged). float32 sums
    overflowed or rounded to 0, and every step scored 1.0 (attacker pass: counts × 1e40
    and × 1e-50); dividing the whole trace by its largest entry instead rounded the
    ordinary steps beside one huge step to 0 (a later pass)."""
    top = float(counts.max()) if counts.numel() else 0.0
    if top == 0 or 1e-30 <= top <= 1e30:
        return counts, torch.float32
    return scale_free(counts), torch.float64


def _balancedness(loads: torch.Tensor, live: torch.Tensor,
                  speed: torch.Tensor | None = None) -> torch.Tensor:
    """``loads [..., L, P]`` -> ``[...]`` Σ_l mean / Σ_l max over live GPUs (1 when all
    zero); with ``speed [P]``, in time: Σ_l total / live speed over Σ_l max load / speed."""
    ideal, peak = ideal_and_peak(loads, live.to(loads.device),
                                 None if speed is None else speed.to(loads.device))
    mean, peak = ideal.sum(-1), peak.sum(-1)
    # (a positive peak divides as it is: a floor of 1e-300 bent steps scaled near float64's
    # smallest numbers; a later attacker pass)
    return torch.where(peak > 0, mean / torch.where(peak > 0, peak, 1.0), torch.ones_like(peak))


def step_balancedness(counts: object, placement: Placement, *,
                      chunk: int | None = None, realised: Realised = EVEN) -> torch.Tensor:
    """``[T]`` float64 balancedness of every step of ``counts [T, L, E]`` under
    ``placement`` (realised as ``realised`` says: by default an even split on equal GPUs),
    ``chunk`` steps at a time (default: :func:`_steps_per_chunk`)."""
    steps = as_history(counts, "counts")
    if steps.shape[1:] != placement.logcnt.shape:
        raise ValueError(f"counts have layers x experts {tuple(steps.shape[1:])}, the placement "
                         f"has {tuple(placement.logcnt.shape)}")
    num_gpus = placement.topology.num_gpus
    check_scoring_size(steps.shape[1], steps.shape[2], num_gpus)
    chunk = (_steps_per_chunk(steps.shape[1], num_gpus) if chunk is None
             else positive_int("chunk", chunk))
    matrix = gpu_load_matrix(placement, realised)
    live = placement.live_gpus()
    speed = realised.speed(num_gpus)
    steps, dtype = scoring_counts(steps)
    parts = [
        _balancedness(_gpu_loads(steps[a:a + chunk], matrix, dtype).double(), live, speed)
        for a in range(0, steps.shape[0], chunk)
    ]
    return torch.cat(parts)


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
    window_counts: torch.Tensor,
    planner: PlannerFn,
    builtin: bool,
    realised: Realised = EVEN,
) -> torch.Tensor:
    """``[n]`` balancedness of ``planner(window_counts[i])`` on ``window_counts[i] [L, E]``
    (realised as ``realised`` says)."""
    num_windows, num_layers, num_experts = window_counts.shape
    if num_windows == 0:
        return torch.zeros(0, dtype=torch.float64)
    if builtin:
        # built-in planners treat layers independently: plan every window in one call
        flat = window_counts.reshape(-1, num_experts)
        stacked = planner(flat, None)
        loads = _scored(stacked, flat, realised).view(num_windows, num_layers, -1)
        return _balancedness(loads, stacked.live_gpus(),
                             realised.speed(stacked.topology.num_gpus))
    out = []
    for w in window_counts:
        plan = planner(w, None)
        out.append(_balancedness(_scored(plan, w, realised), plan.live_gpus(),
                                 realised.speed(plan.topology.num_gpus)))
    return torch.stack(out).to(torch.float64)


def _scored(placement: Placement, weight: torch.Tensor, realised: Realised) -> torch.Tensor:
    """``[L, P]`` GPU loads of ``weight [L, E]`` under ``placement``, realised as
    ``realised`` says (scaled by a power of two where the counts are near float64's ends:
    ratios unchanged)."""
    if realised.dispatch == "even":
        return placement.scaled_gpu_loads(weight)
    # the slots' loads summed per GPU: no [L, E, P] matrix (over many windows it took GBs)
    topo = placement.topology
    slots = realised_slot_loads(scale_free(weight.to(torch.float64)), placement.phy2log,
                                topo.num_gpus, topo.num_nodes, realised.dispatch,
                                realised.source, placement.active_gpus, check=False)
    return slots.view(slots.shape[0], topo.num_gpus, -1).sum(2)


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
            eplb planning for even) as that engine serves its plans.
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
    # (an expert of no bytes would report every rebalance as free: refused as a slip)
    if (isinstance(expert_bytes, bool) or not isinstance(expert_bytes, int)
            or not 1 <= expert_bytes <= MAX_EXPERT_BYTES):
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
        initial=initial, **plan_options,
    )

    if num_steps < cad.interval + cad.scoring:
        # fewer steps would score nothing after the first rebalance: every figure empty
        raise ValueError(f"trace has {num_steps} steps; the first rebalance is at step "
                         f"{cad.interval} and a scoring window is {cad.scoring} steps, so the "
                         f"simulation needs at least {cad.interval + cad.scoring} steps")
    score = cad.scoring
    speed = realised.speed(num_gpus)
    chunk = _steps_per_chunk(num_layers, num_gpus)
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
    for end in boundaries:
        if placement is None:  # a planner that returned nothing usable cannot happen here
            raise RuntimeError("no placement in force")
        matrix = gpu_load_matrix(placement, realised)
        live = placement.live_gpus()
        for a in range(start, end, chunk):
            b = min(a + chunk, end)
            loads = _gpu_loads(scored[a:b], matrix, dtype).double()  # [t, L, P]
            step_bal[a:b] = _balancedness(loads, live, speed)
            win = torch.arange(a, b) // score
            keep = win < num_windows
            window_loads.index_add_(0, win[keep], loads[keep])
            window_live[win[keep]] |= live
        if end < num_steps and planner != "none":  # "none" never rebalances
            rebalancer.record(counts[start:end])
            placement = rebalancer.placement
        start = end

    window_bal = torch.zeros(num_windows, dtype=torch.float64)
    for live in torch.unique(window_live, dim=0):  # one or two live sets, not one per window
        rows = (window_live == live).all(1)
        window_bal[rows] = _balancedness(window_loads[rows], live, speed)
    window_starts = torch.arange(num_windows, dtype=torch.int64) * score
    events = rebalancer.events
    # windows from the first rebalance point on, for every planner alike
    planned = window_starts >= min(cad.interval, num_steps)
    idle = ~counts.flatten(1).any(1).cpu()  # counts are >= 0: no token at all
    oracle_bal = None
    if oracle:
        wsum = counts[: num_windows * score].view(num_windows, score, num_layers,
                                                  num_experts).sum(1)
        plan_fn = make_planner(planner, topo, active_gpus=active_gpus, **plan_options)
        oracle_bal = _oracle(wsum, plan_fn, builtin=isinstance(planner, str),
                             realised=realised)
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
    )
