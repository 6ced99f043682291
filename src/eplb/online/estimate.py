"""Load estimators: turn the recent per-step history into the weight to plan the *next* window on.

Engines plan on the plain sum of the last ``W`` recorded steps and then serve the next
``I`` steps with that plan, so what matters is how well the estimate predicts the loads
still to come. Every estimator here takes the recent history ``[T, L, E]`` (oldest step
first) and the recording window ``W`` and returns an :class:`Estimate` whose ``weight``
is in *window-sum units* (for a history whose steps are all equal it equals the sum of
``W`` steps), so any estimator can stand in for the engines' window sum.

Estimators (spec strings for :func:`make_estimator`):

- ``"sum"`` (:class:`WindowSum`): the sum of the last ``W`` steps, exactly what vLLM and
  SGLang plan on.
- ``"ema:H"`` (:class:`ExponentialAverage`): recency-weighted mean of the last
  ``max(W, 5 H)`` steps, step age ``a`` weighted ``0.5 ** (a / H)`` (half-life ``H``
  steps), rescaled to ``W`` steps.
- ``"robust:Z[:N]"`` (:class:`RobustMean`): split the last ``W`` steps into ``N``
  sub-windows (default 4), per expert ``mean + Z * std`` of the sub-window rates. Experts
  whose load fluctuates get headroom (more replicas); ``Z = 0`` is the window sum.
- ``"multi:K[:M]"`` (:class:`MultiWindow`): plan against several recent windows at once.
  The last ``M`` recording windows (default 1) are split into ``K`` scenario windows
  ``[K, L, E]``; the estimate also carries candidate weights ``[C, L, E]`` (the last
  window's sum, the mean over the scenarios, an EMA with half-life span / 4 and
  mean + 0.5 std). A planner plans every
  candidate and :func:`select_per_layer` keeps, per layer, the candidate plan with the
  lowest *expected normalized max GPU load* over the scenarios (each scenario equally
  likely; a layer's time is set by its most loaded GPU). Its plain ``weight`` is the
  scenario mean, for planners that cannot use scenarios.
- ``"auto[:M[:F]]"`` (:class:`AdaptiveAverage`): per layer, the window sum or an EMA
  (half-life ``W/4 .. 2W`` over the last ``M`` windows, default 4), whichever best forecast
  each of the last ``F`` windows (default 3) from the steps before it (rolling-origin
  time-series cross-validation on expert shares).

Nothing here plans: the planner is applied by :mod:`eplb.online` and :mod:`eplb.tools.simulate`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from eplb.core.dispatch import realised_gpu_loads
from eplb.core.inputs import (
    as_counts,
    as_gpu_speed,
    as_weight,
    refuse_without_values,
    scale_free,
)
from eplb.core.map_tables import ideal_and_peak, ratio_or_one
from eplb.core.placement import Placement
from eplb.core.topology import int_at_least, is_name, real_number
from eplb.core.trace import LoadTrace

MAX_HALF_LIFE = 1e9  # steps: longer is a plain sum, and overflows the decay weights
MAX_ROBUST_Z = 10.0  # standard deviations: beyond it the estimate is the spread alone


def as_history(history: object, name: str = "history") -> torch.Tensor:
    """Per-step counts ``[T, L, E]`` from a :class:`~eplb.core.trace.LoadTrace`, a tensor,
    an array or a nested list (``[L, E]`` is one step), validated by
    :func:`eplb.core.inputs.as_counts`. Float32 when exact (long traces are large; no copy
    of float input is made); sums are taken in float64 downstream."""
    counts = history.counts if isinstance(history, LoadTrace) else history
    what = "a LoadTrace, or a tensor, array or nested list of counts [T, L, E]"
    return as_counts(counts, name, compact=True, what=what)


@dataclass(frozen=True, eq=False)
class Estimate:
    """What an estimator returns.

    Attributes:
        weight: ``[L, E]`` float64, the load to plan on (window-sum units).
        scenarios: ``[K, L, E]`` plausible next windows to evaluate plans on, or ``None``.
        candidates: ``[C, L, E]`` weights worth planning on (``weight`` first), or ``None``.
    """

    weight: torch.Tensor
    scenarios: torch.Tensor | None = None
    candidates: torch.Tensor | None = None


class Estimator(ABC):
    """Turns per-step history ``[T, L, E]`` into the weight ``[L, E]`` to plan on."""

    name: ClassVar[str]

    def lookback(self, window: int) -> int:
        """Steps of history this estimator reads when the recording window is ``window``."""
        return window

    @abstractmethod
    def estimate(self, history: object, window: int | None = None) -> Estimate:
        """Estimate from ``history [T, L, E]`` (oldest first).

        ``window`` defaults to ``T`` and is capped at ``T``; the weight is in units of a
        ``window``-step sum.
        """

    def __call__(self, history: object, window: int | None = None) -> torch.Tensor:
        """Shortcut for ``estimate(history, window).weight`` (``[L, E]`` float64)."""
        return self.estimate(history, window).weight

    @property
    def spec(self) -> str:
        """The spec string :func:`make_estimator` turns back into this estimator."""
        return self.name


def _window(history: torch.Tensor, window: int | None) -> int:
    if window is None:
        return history.shape[0]
    window = int_at_least("window (steps)", window, 1)
    # a history shorter than the window (right after start-up) is all there is
    return min(window, history.shape[0])


def sum_steps(counts: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``[L, E]`` float64 sum over the steps of ``counts [T, L, E]``.

    Float32 input is summed in float32 blocks of ``block`` steps and the blocks in
    float64: converting a whole window to float64 first costs ~30x more on a CPU. A
    block's float32 sum of (non-negative) integer counts is exact while it stays below
    2**24; a block whose sum reaches it (about 65,000 tokens per expert and step at the
    default, reachable when many ranks' passes are summed) is summed again in float64.
    """
    if counts.dtype == torch.float64:
        return counts.sum(0)
    total = torch.zeros(counts.shape[1:], dtype=torch.float64, device=counts.device)
    for start in range(0, counts.shape[0], block):
        part = counts[start:start + block].sum(0)
        if part.numel() and float(part.amax()) >= 2**24:  # it may have rounded
            part = counts[start:start + block].to(torch.float64).sum(0)
        total += part
    return total


def _rates(chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[K, L, E]`` float64 mean load per step of each chunk ``[t_k, L, E]``."""
    return torch.stack([sum_steps(c) / c.shape[0] for c in chunks])


@dataclass(frozen=True)
class WindowSum(Estimator):
    """Sum of the last ``window`` steps (what vLLM and SGLang plan on)."""

    name: ClassVar[str] = "sum"

    def estimate(self, history: object, window: int | None = None) -> Estimate:
        counts = as_history(history)
        w = _window(counts, window)
        return Estimate(sum_steps(counts[-w:]))


@dataclass(frozen=True)
class ExponentialAverage(Estimator):
    """Recency-weighted mean of recent steps, rescaled to ``window`` steps.

    Step age ``a`` (0 = newest) has weight ``0.5 ** (a / half_life)`` over the last
    ``max(window, 5 * half_life)`` steps (:meth:`lookback`; older steps would weigh < 3%);
    the weighted mean per step is multiplied by ``window``, so a constant history gives
    the window sum. A half-life longer than the window reaches back past it (the
    Rebalancer keeps that much history).
    """

    half_life: float = 100.0
    name: ClassVar[str] = "ema"

    def __post_init__(self) -> None:
        half_life = real_number(self.half_life)
        if half_life is None or not 0 < half_life <= MAX_HALF_LIFE:
            raise ValueError(f"ema half-life must be a number of steps in (0, "
                             f"{MAX_HALF_LIFE:g}], got {self.half_life!r}")
        object.__setattr__(self, "half_life", half_life)

    @property
    def spec(self) -> str:
        return f"ema:{self.half_life:g}"

    def lookback(self, window: int) -> int:
        # five half-lives (older steps weigh < 3%), at least the window
        return max(window, math.ceil(5 * self.half_life))

    def weights(self, num_steps: int, device: torch.device | None = None) -> torch.Tensor:
        """``[num_steps]`` float64 step weights, oldest first, summing to ``num_steps``."""
        age = torch.arange(num_steps - 1, -1, -1, dtype=torch.float64, device=device)
        weight = torch.pow(0.5, age / self.half_life)
        return weight * (num_steps / weight.sum())

    def estimate(self, history: object, window: int | None = None) -> Estimate:
        counts = as_history(history)
        w = _window(counts, window)
        recent = counts[-self.lookback(w):]
        step_weight = self.weights(recent.shape[0], recent.device).to(recent.dtype)
        # weighted mean per step (one matrix-vector product), in units of `w` steps
        mean = torch.tensordot(step_weight, recent, dims=1).double() / recent.shape[0]
        return Estimate(mean * w)


@dataclass(frozen=True)
class RobustMean(Estimator):
    """``mean + z * std`` over ``num_chunks`` sub-windows of the last ``window`` steps.

    Sub-window rates (load per step) are compared per expert; the result is rescaled to
    ``window`` steps and clamped at 0. The std uses Bessel's correction (0 for one chunk).
    """

    z: float = 1.0
    num_chunks: int = 4
    name: ClassVar[str] = "robust"

    def __post_init__(self) -> None:
        z = real_number(self.z)
        if z is None or not abs(z) <= MAX_ROBUST_Z:
            raise ValueError(f"robust z must be a number in [-{MAX_ROBUST_Z:g}, "
                             f"{MAX_ROBUST_Z:g}] (standard deviations), got {self.z!r}")
        object.__setattr__(self, "z", z)
        object.__setattr__(self, "num_chunks",
                           int_at_least("robust sub-window count", self.num_chunks, 1))

    @property
    def spec(self) -> str:
        return f"robust:{self.z:g}:{self.num_chunks}"

    def estimate(self, history: object, window: int | None = None) -> Estimate:
        counts = as_history(history)
        w = _window(counts, window)
        recent = counts[-w:]
        chunks = torch.tensor_split(recent, min(self.num_chunks, recent.shape[0]))
        rates = _rates(chunks)
        spread = rates.std(0, correction=1) if rates.shape[0] > 1 else torch.zeros_like(rates[0])
        return Estimate(((rates.mean(0) + self.z * spread) * w).clamp(min=0))


@dataclass(frozen=True)
class MultiWindow(Estimator):
    """Scenarios from several recent windows, plus candidate weights to choose among per layer.

    The last ``num_spans * window`` steps are split into ``num_windows`` scenario windows,
    each rescaled to ``window`` steps: ``scenarios [K, L, E]``. Candidate weights
    ``[C, L, E]``: the scenario mean (also ``weight``), the last window's sum (the engine's
    estimate), an EMA with half-life span / 4 and the scenarios' mean + 0.5 std. Plan
    each candidate and keep, per layer, the one minimising the expected normalized max
    over the scenarios (:func:`select_per_layer`).
    """

    num_windows: int = 4
    num_spans: int = 1
    reduce: str = "mean"
    name: ClassVar[str] = "multi"

    def __post_init__(self) -> None:
        for field_name in ("num_windows", "num_spans"):
            object.__setattr__(self, field_name, int_at_least(
                f"multi {field_name}", getattr(self, field_name), 1))
        if not is_name(self.reduce, ("mean", "max")):
            raise ValueError(f"multi reduce must be 'mean' or 'max', got {self.reduce!r}")

    @property
    def spec(self) -> str:
        return f"multi:{self.num_windows}:{self.num_spans}"

    def lookback(self, window: int) -> int:
        return window * self.num_spans

    def estimate(self, history: object, window: int | None = None) -> Estimate:
        counts = as_history(history)
        w = _window(counts, window)
        recent = counts[-w * self.num_spans:]
        chunks = torch.tensor_split(recent, min(self.num_windows, recent.shape[0]))
        scenarios = _rates(chunks) * w  # [K, L, E], each in units of one window
        mean = scenarios.mean(0)
        spread = scenarios.std(0, correction=1) if len(chunks) > 1 else torch.zeros_like(mean)
        span = recent.shape[0]
        candidates = torch.stack([
            mean,
            sum_steps(counts[-w:]),
            ExponentialAverage(max(span / 4, 1.0)).estimate(recent, w).weight,
            mean + 0.5 * spread,
        ])
        return Estimate(mean, scenarios, candidates)


@dataclass(frozen=True)
class AdaptiveAverage(Estimator):
    """Per layer, the recency weighting that best forecast recent windows (backtest).

    Candidates: the window sum and EMAs with half-lives ``half_lives`` x ``window``, all
    over at most ``memory`` windows. Each candidate forecasts each of the last ``folds``
    windows from the steps before it; per layer, the candidate with the smallest total
    squared error on the expert *shares* is applied to the whole history. This is
    rolling-origin time-series cross-validation: a noisy workload (small windows) picks
    long memory, a drifting one short memory. History needed: ``memory + folds`` windows
    (vLLM's 1000-step window at DeepSeek-V3 size: 7000 x 58 x 256 float32 = 416 MB).
    """

    half_lives: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    memory: int = 4
    folds: int = 3
    name: ClassVar[str] = "auto"

    def __post_init__(self) -> None:
        given = self.half_lives
        half_lives = tuple(map(real_number, given)) if isinstance(given, Sequence) else ()
        if not half_lives or any(h is None or not 0 < h <= MAX_HALF_LIFE for h in half_lives):
            raise ValueError(f"auto half-lives must be numbers in (0, {MAX_HALF_LIFE:g}] "
                             f"(windows), got {given!r}")
        object.__setattr__(self, "half_lives", half_lives)  # plain floats: hashable
        for field_name in ("memory", "folds"):
            object.__setattr__(self, field_name, int_at_least(
                f"auto {field_name} (windows)", getattr(self, field_name), 1))

    @property
    def spec(self) -> str:
        return f"auto:{self.memory}:{self.folds}"

    def lookback(self, window: int) -> int:
        return window * (self.memory + self.folds)

    def _forecasts(self, counts: torch.Tensor, w: int) -> torch.Tensor:
        """``[C, L, E]`` every candidate's estimate from ``counts`` (last ``memory`` windows)."""
        recent = counts[-w * self.memory:]
        out = [sum_steps(recent[-w:]) * (w / min(w, recent.shape[0]))]
        # (a half-life in steps is capped where an EMA's is: past 1e9 steps its weights over
        # the history kept differ from a flat sum's by under 1e-5; uncapped, 1e9 windows
        # were accepted and then failed every rebalance: attacker pass)
        out += [ExponentialAverage(min(h * w, MAX_HALF_LIFE)).estimate(recent, w).weight
                for h in self.half_lives]
        return torch.stack(out)

    def estimate(self, history: object, window: int | None = None) -> Estimate:
        counts = as_history(history)
        w = _window(counts, window)
        now = self._forecasts(counts, w)

        def shares(x: torch.Tensor) -> torch.Tensor:
            return x / x.sum(-1, keepdim=True).clamp(min=1e-300)

        error = torch.zeros(now.shape[:2], dtype=torch.float64, device=now.device)  # [C, L]
        tested = 0
        for fold in range(1, self.folds + 1):
            end = counts.shape[0] - (fold - 1) * w  # forecast steps [end - w, end)
            if end - w < 1:  # nothing before this window to forecast from
                break
            before = self._forecasts(counts[:end - w], w)
            actual = sum_steps(counts[end - w:end])
            error += (shares(before) - shares(actual)[None]).square().sum(-1)
            tested += 1
        if tested == 0:
            return Estimate(now[0])
        best = error.argmin(0)  # ties: the window sum first
        layers = torch.arange(counts.shape[1], device=best.device)
        return Estimate(now[best, layers])


ESTIMATORS: dict[str, type[Estimator]] = {
    "sum": WindowSum,
    "ema": ExponentialAverage,
    "robust": RobustMean,
    "multi": MultiWindow,
    "auto": AdaptiveAverage,
}

_ACCEPTED = (
    "'sum', 'ema:HALF_LIFE', 'robust:Z[:SUBWINDOWS]', 'multi:K[:WINDOWS]', "
    "'auto[:MEMORY[:FOLDS]]'"
)


def _number(spec: str, text: str, kind: Callable[[str], float | int]) -> float | int:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(
            f"estimator spec {spec!r}: {text!r} is not a valid {kind.__name__}; accepted specs: "
            f"{_ACCEPTED}"
        ) from None


def make_estimator(spec: str | Estimator) -> Estimator:
    """Build an estimator from a spec string (an :class:`Estimator` passes through).

    Accepted: ``"sum"``, ``"ema:HALF_LIFE"`` (steps), ``"robust:Z"`` or
    ``"robust:Z:SUBWINDOWS"``, ``"multi:K"`` or ``"multi:K:WINDOWS"``, ``"auto"``,
    ``"auto:MEMORY"`` or ``"auto:MEMORY:FOLDS"`` (windows). Raises ``ValueError`` naming
    the accepted specs otherwise.
    """
    if isinstance(spec, Estimator):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"estimator must be a spec string or an Estimator, got {type(spec).__name__}"
        )
    name, *args = spec.strip().split(":")
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {spec!r}; accepted specs: {_ACCEPTED}")
    limits = {"sum": (0, 0), "ema": (1, 1), "robust": (1, 2), "multi": (1, 2), "auto": (0, 2)}
    low, high = limits[name]
    if not low <= len(args) <= high:
        raise ValueError(f"estimator spec {spec!r} has {len(args)} arguments; accepted specs: "
                         f"{_ACCEPTED}")
    if name == "sum":
        return WindowSum()
    if name == "ema":
        return ExponentialAverage(float(_number(spec, args[0], float)))
    if name == "auto":
        memory = int(_number(spec, args[0], int)) if args else 4
        folds = int(_number(spec, args[1], int)) if len(args) > 1 else 3
        return AdaptiveAverage(memory=memory, folds=folds)
    if name == "robust":
        chunks = int(_number(spec, args[1], int)) if len(args) > 1 else 4
        return RobustMean(float(_number(spec, args[0], float)), chunks)
    spans = int(_number(spec, args[1], int)) if len(args) > 1 else 1
    return MultiWindow(int(_number(spec, args[0], int)), spans)


# --------------------------------------------------------------- scenario selection
def expected_max(
    placement: Placement,
    scenarios: torch.Tensor,
    reduce: str = "mean",
    *,
    gpu_speed: object = None,
    dispatch: str = "even",
    source: object = None,
) -> torch.Tensor:
    """``[L]`` expected normalized max GPU load of ``placement`` over ``scenarios [K, L, E]``.

    Per scenario and layer: max live-GPU load / mean live-GPU load (1 is perfect; an
    all-zero layer counts as 1). ``reduce`` = ``"mean"`` averages over scenarios (each
    equally likely), ``"max"`` takes the worst; anything else is a ``ValueError``.

    The loads are those the engine realises: with ``gpu_speed [P]`` a GPU's time (load /
    speed) over the ideal time (the total load over the live GPUs' total speed); with
    ``dispatch="nearest"`` (SGLang's static rule, tokens arising as ``source`` says,
    default evenly) the loads that rule sends to each GPU on the placement's nodes.
    """
    _check_reduce(reduce)
    if not is_name(dispatch, ("even", "nearest")):
        raise ValueError(f"dispatch must be 'even' or 'nearest', got {dispatch!r}")
    # (iterated below: a nested tensor raised torch's "NestedTensorImpl doesn't support
    # sizes"; review pass)
    refuse_without_values(scenarios, "scenarios")
    if len(scenarios) == 0:
        raise ValueError("expected_max needs at least one scenario ([K, L, E] with K >= 1)")
    live = placement.live_gpus()
    topo = placement.topology
    speed = None if gpu_speed is None else as_gpu_speed(gpu_speed, topo.num_gpus,
                                                        placement.phy2log.device)
    ratios = []
    for scenario in scenarios:
        if dispatch == "nearest" and topo.num_nodes > 1:
            weight = scale_free(as_weight(scenario)[0].to(placement.phy2log.device))
            loads = realised_gpu_loads(weight, placement.phy2log, topo.num_gpus, topo.num_nodes,
                                       "nearest", source, placement.active_gpus)
        else:  # one node: every replica is on the token's node, an even split
            loads = placement.scaled_gpu_loads(scenario)
        mean, peak = ideal_and_peak(loads, live.to(loads.device),
                                    None if speed is None else speed.to(loads.device))
        ratios.append(ratio_or_one(peak, mean))
    stacked = torch.stack(ratios)
    return stacked.mean(0) if reduce == "mean" else stacked.max(0).values


def _check_reduce(reduce: object) -> None:
    # any other word used to mean "max" ("Mean" and "avg" too): a silent worst case
    if not is_name(reduce, ("mean", "max")):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")


def interchangeable(a: Placement, b: Placement) -> bool:
    """Whether layers of ``a`` and ``b`` may be mixed: the same experts and the same live
    GPUs (shapes and topology are :func:`select_per_layer`'s first check)."""
    return a.num_experts == b.num_experts and bool(
        (a.live_gpus().cpu() == b.live_gpus().cpu()).all())


def select_per_layer(
    candidates: Sequence[Placement],
    scenarios: torch.Tensor,
    reduce: str = "mean",
    *,
    gpu_speed: object = None,
    dispatch: str = "even",
    source: object = None,
) -> Placement:
    """Per layer, keep the candidate plan with the lowest :func:`expected_max` over ``scenarios``.

    Args:
        candidates: placements of the same shape, topology, policy and dead GPUs.
        scenarios: ``[K, L, E]`` loads to evaluate every candidate on.
        reduce: ``"mean"`` (expected max) or ``"max"`` (worst case).
        gpu_speed, dispatch, source: how the engine realises the loads, as in
            :func:`expected_max` (the plans were made for them).

    Returns:
        A placement whose layer ``l`` is layer ``l`` of the winning candidate (ties go to the
        earliest candidate). Each layer of a valid placement is valid on its own, so the
        result is valid whenever the candidates are.
    """
    _check_reduce(reduce)  # also where one candidate leaves nothing to score
    if not candidates:
        raise ValueError("select_per_layer needs at least one candidate placement")
    first = candidates[0]
    for i, cand in enumerate(candidates):
        if cand.phy2log.shape != first.phy2log.shape or cand.topology != first.topology:
            raise ValueError(
                f"candidate {i} has phy2log {tuple(cand.phy2log.shape)} on {cand.topology}; "
                f"candidate 0 has {tuple(first.phy2log.shape)} on {first.topology}"
            )
        # a layer of one candidate under another's dead GPUs would break the contract
        if not interchangeable(cand, first):
            raise ValueError(
                f"candidate {i} has {cand.num_experts} experts and live GPUs "
                f"{cand.live_gpus().cpu().nonzero().flatten().tolist()}; candidate 0 has "
                f"{first.num_experts} and {first.live_gpus().cpu().nonzero().flatten().tolist()}"
            )
    if len(candidates) == 1:
        return first
    # the placement in force may sit on another device than fresh plans (CPU vs CUDA)
    device = first.phy2log.device
    candidates = [c if c.phy2log.device == device else c.to(device) for c in candidates]
    scores = torch.stack([expected_max(c, scenarios, reduce, gpu_speed=gpu_speed,
                                       dispatch=dispatch, source=source)
                          for c in candidates])  # [C, L]
    best = scores.argmin(0)  # first minimum on ties
    phy2log = torch.stack([c.phy2log for c in candidates])  # [C, L, R]
    layers = torch.arange(first.num_layers, device=best.device)
    chosen = phy2log[best, layers]
    policies = {c.policy for c in candidates}
    policy = first.policy if len(policies) == 1 else "global"
    return Placement.from_phy2log(chosen, first.num_experts, first.topology, policy,
                                  first.active_gpus)
