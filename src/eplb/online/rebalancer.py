"""Online rebalancing: a stateful :class:`Rebalancer` fed step by step, as an engine would.

An engine records per-step expert counts ``[L, E]``; every ``interval`` steps it plans on
the last ``window`` recorded steps and switches to the new placement (vLLM: window 1000,
interval 3000; SGLang: 1000 / 1000). :class:`Rebalancer` reproduces that cadence with any
estimator (:mod:`eplb.online.estimate`) and any planner:

- ``"eplb"``: eplb's planner, as :func:`eplb.plan` runs it (with ``previous=`` the
  placement in force when ``incremental=True``, plus ``max_moves`` / ``skip_threshold``);
- ``"greedy"``: DeepSeek's reference greedy (:func:`eplb.core.baselines.plan_greedy`);
- ``"none"``: never rebalance: the static :func:`trivial_placement`;
- any callable ``(weight [L, E], previous: Placement | None) -> Placement``.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from eplb.core.baselines import plan_greedy
from eplb.core.device_path import plans_on_host, to_host
from eplb.core.inputs import as_live_mask
from eplb.core.options import with_incremental
from eplb.core.placement import Placement, PlacementError
from eplb.core.planner import make_request, plan_fresh
from eplb.core.topology import (
    Topology,
    check_total_slots,
    is_name,
    non_negative_int,
    positive_int,
)
from eplb.online.estimate import (
    Estimate,
    Estimator,
    as_history,
    expected_max,
    interchangeable,
    make_estimator,
    select_per_layer,
)
from eplb.online.incremental import check_budget, plan_incremental
from eplb.online.settings import SCORE_OPTIONS, check_option_values

PlannerFn = Callable[[torch.Tensor, "Placement | None"], Placement]
PLANNERS = ("eplb", "greedy", "none")


def trivial_placement(
    num_experts: int,
    num_layers: int,
    topology: Topology,
    active_gpus: object = None,
    device: torch.device | str | None = None,
) -> Placement:
    """The static placement engines start from: live slot ``i`` holds expert ``i % E``.

    This is SGLang's ``init_trivial`` layout: the first ``E`` slots hold experts
    ``0..E-1`` contiguously and the ``R - E`` redundant slots replicate experts
    ``0, 1, ...`` again. Slots of dead GPUs (``active_gpus`` False) hold ``-1``. The
    tensors are made on ``device`` (default CPU). Raises ``ValueError`` when there are
    fewer live slots than experts, or more slots over all layers than eplb plans.
    """
    if not isinstance(topology, Topology):
        raise TypeError(f"topology must be an eplb.Topology, got {type(topology).__name__}")
    num_experts = positive_int("num_experts", num_experts)
    num_layers = non_negative_int("num_layers", num_layers)
    # the planners' limit, before the [L, R] map exists: 2**40 layers failed in the
    # allocator, and a large enough shape short of that takes the host's memory
    check_total_slots(num_layers, topology)
    slots = topology.slots_per_gpu
    if active_gpus is None:
        live_slot = torch.ones(topology.num_replicas, dtype=torch.bool)
        active = None
    else:
        # the check every planner applies: a cast to bool read GPU ids [0, 1, 2, 3] as a
        # mask with GPU 0 dead, and 0.5 as live
        active = as_live_mask(active_gpus, topology.num_gpus, torch.device("cpu"))
        live_slot = active.repeat_interleave(slots)
    num_live = int(live_slot.sum())
    if num_live < num_experts:
        raise ValueError(
            f"{num_live} live slots cannot hold {num_experts} experts (num_replicas="
            f"{topology.num_replicas}, active GPUs {num_live // slots}/{topology.num_gpus})"
        )
    row = torch.full((topology.num_replicas,), -1, dtype=torch.int64)
    row[live_slot] = torch.arange(num_live) % num_experts
    if active is not None:
        active = active.to(device)
    return Placement.from_phy2log(row.repeat(num_layers, 1).to(device), num_experts, topology,
                                  "global", active)


#: the per-step history an engine keeps (float32 ring buffer) at most
MAX_HISTORY_BYTES = 8 << 30


def _check_plan_options(planner: str, plan_options: dict[str, Any]) -> None:
    """Refuse keyword arguments the built-in ``planner`` does not take, naming them."""
    takes: dict[str, Callable[..., Any] | None] = {
        "eplb": make_request, "greedy": plan_greedy, "none": None}
    accepts = takes[planner]
    known = [] if accepts is None else [
        name for name, param in inspect.signature(accepts).parameters.items()
        if param.kind is param.KEYWORD_ONLY and name != "stacklevel"]
    if planner == "eplb":
        known += list(SCORE_OPTIONS)
    unknown = sorted(set(plan_options) - set(known))
    if unknown:
        raise ValueError(f"planner {planner!r} does not take {', '.join(unknown)}; its "
                         f"options: {', '.join(known) or 'none'}")


def make_planner(
    planner: str | PlannerFn,
    topology: Topology,
    *,
    incremental: bool = False,
    max_moves: int | None = None,
    skip_threshold: float | None = None,
    active_gpus: object = None,
    **plan_options: Any,
) -> PlannerFn:
    """Resolve ``planner`` into a function ``(weight [L, E], previous) -> Placement``.

    ``incremental`` (``"eplb"`` only) forwards ``previous``, ``max_moves`` and
    ``skip_threshold`` to :func:`eplb.plan`; otherwise planning starts from scratch.
    A callable is returned unchanged (it receives ``previous`` and decides itself).
    """
    if callable(planner):
        return planner
    if not is_name(planner, PLANNERS):
        raise ValueError(f"unknown planner {planner!r}; accepted: {', '.join(PLANNERS)} or a "
                         "callable (weight [L, E], previous) -> Placement")
    topo = topology
    if planner != "eplb" and (incremental or max_moves is not None or skip_threshold is not None):
        raise ValueError(f"incremental/max_moves/skip_threshold need planner 'eplb', got "
                         f"{planner!r}")
    # every mistake surfaces here, at construction, not at the first rebalance hours later
    if not isinstance(incremental, bool):
        raise ValueError(f"incremental must be True or False, got {incremental!r}")
    if not incremental and (max_moves is not None or skip_threshold is not None):
        raise ValueError("max_moves and skip_threshold limit incremental plans; pass "
                         "incremental=True")
    max_moves = check_budget(max_moves, skip_threshold)
    if active_gpus is not None:
        as_live_mask(active_gpus, topo.num_gpus, torch.device("cpu"))
    _check_plan_options(planner, plan_options)
    if planner == "eplb":
        check_option_values({**plan_options, "active_gpus": active_gpus,
                             "skip_threshold": skip_threshold}, topo)
        if incremental and plan_options.get("gpu_speed") is not None:
            # plan_incremental plans for equal GPUs: from the second rebalance on the
            # speeds were dropped without a word, and the plans undid the fresh one's
            # speed-aware packing (eplb.plan refuses gpu_speed with previous= alike)
            raise ValueError("gpu_speed cannot be combined with incremental=True: plans "
                             "from the placement in force are made for equal GPUs; plan "
                             "every rebalance fresh (incremental=False) for GPU speeds")
        policy = plan_options.get("policy", "auto")
        concrete = ("hierarchical" if topo.grouped else "global") if policy == "auto" else policy
        if plan_options.get("dispatch") == "nearest" and concrete != "global" and (
            plan_options.get("fair", "auto") != "auto" or plan_options.get("source") is not None
        ):
            # eplb.plan refuses these too, but only at the first rebalance: a rebalancer
            # that cannot plan is refused when it is made
            raise ValueError(f"fair and source shape the global policy's plan for nearest "
                             f"dispatch; the {concrete} policy does not use them (pass "
                             f"policy='global')")
        if plan_options.get("dispatch") == "nearest" and max_moves is not None and (
            concrete != "global" or active_gpus is not None
        ):
            raise ValueError("max_moves with dispatch='nearest' needs the global policy with "
                             "every GPU live (other plans re-plan and relabel, unbudgeted)")
        if (plan_options.get("dispatch") == "nearest" and incremental
                and plan_options.get("source") is not None and concrete == "global"
                and active_gpus is None):
            raise ValueError("source is not used by incremental plans under dispatch='nearest' "
                             "with the global policy and every GPU live: leave source out, "
                             "or plan without incremental")

        incremental_knobs = {k: plan_options.pop(k, None) for k in SCORE_OPTIONS}
        if any(v is not None for v in incremental_knobs.values()):
            plan_options["options"] = with_incremental(plan_options.get("options"),
                                                       **incremental_knobs)

        def eplb_planner(weight: torch.Tensor, previous: Placement | None) -> Placement:
            if plans_on_host(weight):
                # as eplb.plan: the CPU's plan, bit for bit, returned on the loads' device
                return eplb_planner(weight.cpu(), to_host(previous)).to(weight.device)
            request = make_request(weight, topo.num_replicas, topo.num_gpus, topo.num_nodes,
                                   topo.num_groups, active_gpus=active_gpus, **plan_options)
            if incremental and previous is not None:
                return plan_incremental(request, previous, max_moves=max_moves,
                                        skip_threshold=skip_threshold)
            return plan_fresh(request)

        return eplb_planner
    if planner == "greedy":
        if active_gpus is not None:  # DeepSeek's greedy places on every GPU
            raise ValueError(f"planner {planner!r} does not support active_gpus; use 'eplb' "
                             "(or 'none' for the static layout over the live GPUs)")

        def greedy_planner(weight: torch.Tensor, previous: Placement | None) -> Placement:
            return plan_greedy(weight, topo.num_replicas, topo.num_gpus, topo.num_nodes,
                               topo.num_groups, **plan_options)

        return greedy_planner

    def static_planner(weight: torch.Tensor, previous: Placement | None) -> Placement:
        # the engines' start-up layout over the live GPUs: the baseline on a degraded
        # cluster too (it was refused, though trivial_placement takes dead GPUs)
        return trivial_placement(weight.shape[-1], weight.shape[0], topo, active_gpus,
                                 device=weight.device)

    return static_planner


def plan_estimate(
    estimate: Estimate,
    planner: PlannerFn,
    previous: Placement | None = None,
    *,
    keep: Placement | None = None,
    batch: bool = True,
    reduce: str = "mean",
    total_budget: bool = False,
    realised: dict[str, Any] | None = None,
) -> Placement:
    """Plan on an :class:`~eplb.online.estimate.Estimate`.

    Without scenarios this is ``planner(estimate.weight, previous)``. With scenarios every
    candidate weight is planned (one planner call on the candidates stacked as
    ``[C * L, E]`` when ``batch`` and there is no ``previous``; planners treat layers
    independently), ``keep`` (the placement in force; keeping a layer costs no moves)
    joins the candidates when it has their experts and live GPUs, and
    :func:`~eplb.online.estimate.select_per_layer` keeps the best per layer.

    ``total_budget``: the planner caps each plan's moves from ``previous`` by a total over
    all layers (``max_moves`` as an int). A per-layer choice among such plans may move more
    than any one of them, so where it moves more than the plan on ``estimate.weight`` the
    layers whose extra moves buy the least go back to that plan's, until it moves no more.

    ``realised``: how the engine realises the loads, the keywords ``gpu_speed``,
    ``dispatch`` and ``source`` of :func:`~eplb.online.estimate.expected_max` (the plans
    were made for them: scoring them as an even split on equal GPUs chose, per layer,
    what the engine serves worse).
    """
    if estimate.scenarios is None or estimate.candidates is None:
        return _placement_of(planner(estimate.weight, previous), estimate.weight.shape[0])
    cands = estimate.candidates
    num_cands, num_layers, num_experts = cands.shape
    if batch and previous is None:
        stacked = _placement_of(planner(cands.reshape(num_cands * num_layers, num_experts), None),
                                num_cands * num_layers)
        rows = stacked.phy2log.view(num_cands, num_layers, -1)
        plans = [Placement.from_phy2log(r, num_experts, stacked.topology, stacked.policy,
                                        stacked.active_gpus) for r in rows]
    else:
        plans = [_placement_of(planner(c, previous), num_layers) for c in cands]
    # the placement in force is a candidate only where it could stay: not when a GPU it
    # uses has died (or one it leaves empty is live again), nor for other experts
    if keep is not None and interchangeable(keep, plans[0]):
        plans.append(keep)
    realised = dict(realised or {})
    chosen = select_per_layer(plans, estimate.scenarios, reduce, **realised)
    if total_budget and previous is not None:
        chosen = _within_moves(chosen, plans[0], previous, estimate.scenarios, reduce,
                               realised)
    return chosen


def _within_moves(chosen: Placement, first: Placement, previous: Placement,
                  scenarios: torch.Tensor, reduce: str,
                  realised: dict[str, Any] | None = None) -> Placement:
    """``chosen`` with layers of ``first`` put back, cheapest gain per extra move first,
    until it moves no more slots from ``previous`` than ``first`` does (which kept the
    budget)."""
    moves = chosen.moved_slots(previous).cpu()
    allowed = first.moved_slots(previous).cpu()
    excess = int(moves.sum() - allowed.sum())
    if excess <= 0:
        return chosen
    realised = dict(realised or {})
    gain = (expected_max(first, scenarios, reduce, **realised)
            - expected_max(chosen, scenarios, reduce, **realised))
    extra = moves - allowed
    layers = (extra > 0).nonzero().flatten()
    # the least expected gain per extra slot first; ties by layer
    order = sorted(layers.tolist(), key=lambda layer: (float(gain[layer]) / int(extra[layer]),
                                                        layer))
    phy2log = chosen.phy2log.clone()
    for layer in order:
        if excess <= 0:
            break
        phy2log[layer] = first.phy2log[layer].to(phy2log.device)
        excess -= int(extra[layer])
    return Placement.from_phy2log(phy2log, chosen.num_experts, chosen.topology, chosen.policy,
                                  chosen.active_gpus)


def _placement_of(result: object, layers: int) -> Placement:
    """A planner's result, which must be a :class:`Placement` of ``layers`` layers."""
    if not isinstance(result, Placement):
        raise TypeError(f"the planner must return an eplb.Placement, got "
                        f"{type(result).__name__} (wrap a phy2log tensor with "
                        "Placement.from_phy2log)")
    if result.num_layers != layers:
        raise ValueError(f"the planner returned a placement of {result.num_layers} layers "
                         f"for loads of {layers}")
    return result


@dataclass(frozen=True, eq=False)
class RebalanceEvent:
    """One rebalance: at ``step`` (steps recorded so far) the plan took ``plan_seconds``.

    ``moved_slots [L]``: slots whose expert changed versus the placement before (all
    zero when there was none before or nothing changed). ``changed``: the map differs
    from the one before (or there was none), also when no weights move: a slot of a
    GPU that died since is emptied, and the engine must stop sending tokens there.
    """

    step: int
    plan_seconds: float
    moved_slots: torch.Tensor
    changed: bool


class Rebalancer:
    """Record per-step counts and rebalance on the engine's cadence.

    Args:
        num_replicas, num_gpus, num_nodes, num_groups: the cluster (see :class:`Topology`).
        window: recording window ``W``: plans use the last ``W`` steps.
        interval: rebalance every ``I`` recorded steps (after steps ``I, 2I, ...``).
        estimator: spec string or :class:`~eplb.online.estimate.Estimator` (default ``"sum"``).
        planner: ``"eplb"``, ``"greedy"``, ``"none"`` or a callable ``(weight, previous)``
            (a callable always receives the placement in force, ``None`` before the first).
        incremental: pass the placement in force to :func:`eplb.plan` (``previous=``) with
            ``max_moves`` and ``skip_threshold``.
        active_gpus: ``[P]`` bool of live GPUs (``"eplb"`` planner only).
        initial: the placement in force before the first rebalance (default ``None``:
            ``placement`` is ``None`` until then).
        plan_options: extra keyword arguments for the planner (e.g. ``policy``, ``seed``).

    The history is a ring buffer holding the last ``max(window, estimator.lookback(window))``
    steps (``window`` for every estimator except ``multi:K:M``), stored as float32
    (per-step counts are integers; sums are taken in float64).

    **Threads.** :meth:`record`, :meth:`rebalance_now` and the ``placement``/``history``
    views are serialised by one re-entrant lock, so engine threads may call ``record``
    concurrently: every step is counted once and rebalances happen exactly after steps
    ``I, 2I, ...`` (a thread that triggers a rebalance holds the lock while planning;
    the others wait). **Failures.** A call to ``record`` or ``rebalance_now`` that
    raises (e.g. the planner fails on the second rebalance of a chunk) leaves the
    rebalancer exactly as before the call: no step of the chunk is recorded, and no
    rebalance event or placement of it is kept. **Copies** (``copy``, ``pickle``) go on
    alone: each has its own ring, events and lock (a callable planner must pickle).
    """

    def __init__(
        self,
        num_replicas: int,
        num_gpus: int,
        num_nodes: int = 1,
        num_groups: int = 1,
        *,
        window: int = 1000,
        interval: int = 3000,
        estimator: str | Estimator = "sum",
        planner: str | PlannerFn = "eplb",
        incremental: bool = False,
        max_moves: int | None = None,
        skip_threshold: float | None = None,
        active_gpus: object = None,
        initial: Placement | None = None,
        **plan_options: Any,
    ) -> None:
        self.topology = Topology(num_replicas, num_gpus, num_nodes, num_groups)
        for name, value in (("window", window), ("interval", interval)):
            try:  # NumPy and 0-d tensor integers too, as the cluster's counts
                setattr(self, name, positive_int(name, value))
            except ValueError:
                raise ValueError(f"{name} must be a positive integer number of steps, "
                                 f"got {value!r}") from None
        self.estimator = make_estimator(estimator)
        self.planner_name = planner if isinstance(planner, str) else getattr(
            planner, "__name__", "callable")
        # what builds the planner, kept so that a copy or an unpickled rebalancer can
        # rebuild it (a built-in planner is a closure, which pickle cannot save)
        self._planner_args = (planner, dict(
            incremental=incremental, max_moves=max_moves, skip_threshold=skip_threshold,
            active_gpus=active_gpus, **plan_options))
        # a multi-window estimate picks per layer among plans made for these: score them
        # as the engine realises the loads (GPU speeds, SGLang's nearest dispatch)
        self._realised = {k: plan_options[k] for k in ("gpu_speed", "dispatch", "source")
                          if plan_options.get(k) is not None and not callable(planner)}
        self.planner = make_planner(planner, self.topology, **self._planner_args[1])
        self.incremental = incremental
        # a total move budget must hold for the per-layer mix of a multi-window estimate too
        self._total_budget = incremental and isinstance(
            check_budget(max_moves, skip_threshold), int)
        # a user's callable always sees the placement in force; built-ins only when incremental
        self._user_planner = callable(planner)
        self._pass_previous = incremental or self._user_planner
        self.capacity = max(window, self.estimator.lookback(window))
        if initial is not None and not isinstance(initial, Placement):
            raise TypeError(f"initial must be an eplb.Placement (the placement in force) or "
                            f"None, got {type(initial).__name__}")
        if initial is not None and initial.topology != self.topology:
            raise ValueError(f"initial placement is for {initial.topology}, the rebalancer "
                             f"for {self.topology}")
        self._placement = initial
        self._buffer: torch.Tensor | None = None  # [capacity, L, E] float32 ring
        self._next = 0  # ring write position
        self.steps = 0  # steps recorded so far
        self.events: list[RebalanceEvent] = []
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ state
    def __getstate__(self) -> dict[str, Any]:
        """State for ``copy`` and ``pickle``: taken under the lock, with the ring and the
        events copied (a shallow copy shared the ring, so recording into one rewrote the
        other's history); the lock and a built-in planner are made anew on restore."""
        with self._lock:
            state = dict(self.__dict__)
            state["_buffer"] = None if self._buffer is None else self._buffer.clone()
            state["events"] = list(self.events)
        del state["_lock"]
        if not self._user_planner:
            del state["planner"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        if "planner" not in state:
            planner, kwargs = self._planner_args
            self.planner = make_planner(planner, self.topology, **kwargs)

    @property
    def placement(self) -> Placement | None:
        """The placement in force (``None`` before the first rebalance without ``initial``)."""
        with self._lock:
            return self._placement

    @property
    def history(self) -> torch.Tensor:
        """``[T, L, E]`` float32 copy of the buffered steps, oldest first (``T <= capacity``)."""
        with self._lock:
            if self._buffer is None:
                raise ValueError("no steps recorded yet")
            filled = min(self.steps, self.capacity)
            if filled < self.capacity:
                return self._buffer[:filled].clone()
            return torch.roll(self._buffer, -self._next, dims=0)

    # ------------------------------------------------------------------ input
    def _append(self, counts: torch.Tensor) -> None:
        """Write ``counts [t, L, E]`` (``t <= capacity``) into the ring (allocated by record)."""
        buffer = self._buffer
        if buffer is None:
            raise RuntimeError("ring buffer not allocated; call record()")
        t = counts.shape[0]
        end = self._next + t
        if end <= self.capacity:
            buffer[self._next:end] = counts
        else:
            head = self.capacity - self._next
            buffer[self._next:] = counts[:head]
            buffer[: t - head] = counts[head:]
        self._next = end % self.capacity
        self.steps += t

    def record(self, counts: object) -> Placement | None:
        """Record one step ``[L, E]`` or several ``[T, L, E]``; rebalance when due.

        Rebalances after every ``interval``-th recorded step, also inside a multi-step
        chunk (the steps after a rebalance point are recorded after it). Returns the new
        placement when a rebalance changed it (the last one, for a chunk), else ``None``.
        Thread-safe; all or nothing when it raises (see the class docstring).
        """
        steps = as_history(counts, "counts")
        # the ring is float32: a count it cannot hold (or whose window sum overflows it)
        # would turn into inf and fail every rebalance after it
        limit = torch.finfo(torch.float32).max / self.capacity
        if steps.numel() and float(steps.amax()) > limit:
            raise ValueError(f"counts hold {float(steps.amax()):.3g}, beyond what the history "
                             f"keeps ({limit:.3g}: float32 over {self.capacity} steps); "
                             "scale the counts down")
        with self._lock:
            saved = self._snapshot(steps.shape[0])
            try:
                return self._record(steps)
            except BaseException:
                self._restore(saved)
                raise

    def _snapshot(self, num_steps: int) -> tuple:
        """What :meth:`_record` of ``num_steps`` steps may change: the counters, the events,
        the placement and the ring rows it will overwrite (a copy of at most the chunk)."""
        rows = None
        if self._buffer is not None:
            touched = min(num_steps, self.capacity)
            index = (self._next + torch.arange(touched, device=self._buffer.device)) \
                % self.capacity
            rows = (index, self._buffer[index].clone())
        return (self._buffer is None, rows, self._next, self.steps, len(self.events),
                self._placement)

    def _restore(self, saved: tuple) -> None:
        was_empty, rows, self._next, self.steps, num_events, self._placement = saved
        if was_empty:
            self._buffer = None
        elif rows is not None and self._buffer is not None:
            self._buffer[rows[0]] = rows[1]
        del self.events[num_events:]

    def _record(self, steps: torch.Tensor) -> Placement | None:
        if self._buffer is None:
            _, num_layers, num_experts = steps.shape
            initial = self._placement
            if initial is not None and (initial.num_layers, initial.num_experts) != (
                    num_layers, num_experts):
                # found at the first step, not at the first rebalance (interval steps on)
                raise ValueError(
                    f"counts have {num_layers} layers x {num_experts} experts; the initial "
                    f"placement has {initial.num_layers} layers x {initial.num_experts} experts")
            need = self.capacity * num_layers * num_experts * 4
            if need > MAX_HISTORY_BYTES:
                raise ValueError(
                    f"the history of {self.capacity} steps × {num_layers} layers × "
                    f"{num_experts} experts would take {need / 2**30:.1f} GiB (float32), "
                    f"beyond {MAX_HISTORY_BYTES / 2**30:.0f} GiB: the window and the estimator's "
                    "history set the steps kept; use a shorter window or an estimator that "
                    "looks back fewer steps")
            # the ring lives where the counts do: an engine's CUDA counts never leave the GPU
            self._buffer = torch.zeros(self.capacity, num_layers, num_experts,
                                       dtype=torch.float32, device=steps.device)
        elif steps.shape[1:] != self._buffer.shape[1:]:
            raise ValueError(
                f"counts have layers x experts {tuple(steps.shape[1:])}, earlier steps had "
                f"{tuple(self._buffer.shape[1:])}"
            )
        result = None
        start = 0
        total = steps.shape[0]
        while start < total:
            until_due = self.interval - self.steps % self.interval
            take = min(until_due, total - start)
            chunk = steps[start:start + take]
            start += take
            # only the last `capacity` steps of a long chunk can matter
            self._append_tail(chunk)
            if self.steps % self.interval == 0:
                new = self._rebalance()
                result = new if new is not None else result
        return result

    def _append_tail(self, chunk: torch.Tensor) -> None:
        skipped = max(chunk.shape[0] - self.capacity, 0)
        if skipped:
            self.steps += skipped
            chunk = chunk[skipped:]
        self._append(chunk.to(torch.float32))

    # ------------------------------------------------------------------ planning
    def estimate(self) -> Estimate:
        """The estimator's output on the current history."""
        with self._lock:
            return self.estimator.estimate(self.history, min(self.window, self.steps))

    def rebalance_now(self) -> Placement | None:
        """Plan on the current history now; return the new placement if it changed.

        Thread-safe; when planning raises, nothing changes."""
        with self._lock:
            return self._rebalance()

    def _rebalance(self) -> Placement | None:
        estimate = self.estimate()
        previous = self._placement
        start = time.perf_counter()
        new = plan_estimate(estimate, self.planner, previous if self._pass_previous else None,
                            keep=previous, total_budget=self._total_budget,
                            realised=self._realised)
        seconds = time.perf_counter() - start
        # (plan_estimate checked that it is a Placement of the estimate's layers)
        if new.topology != self.topology or new.num_experts != estimate.weight.shape[1]:
            raise ValueError(f"the planner returned a placement of {new.num_experts} experts "
                             f"for {new.topology}; expected {estimate.weight.shape[1]} for "
                             f"{self.topology}")
        if self._user_planner:
            # a user's map that leaves an expert unserved would score as balanced: refuse it
            # (replicas sharing a GPU are allowed, as DeepSeek's greedy makes them)
            try:
                new.validate(anti_affinity=False)
            except PlacementError as exc:
                raise PlacementError(f"the planner returned a placement that breaks the "
                                     f"contract: {exc}") from None
        if previous is None:
            moved = torch.zeros(new.num_layers, dtype=torch.int64)
            changed = True
        else:
            moved = new.moved_slots(previous).cpu()
            # emptying a dead GPU's slots moves no weights but changes the map in force
            changed = bool(moved.any()) or not torch.equal(
                new.phy2log, previous.phy2log.to(new.phy2log.device))
        self.events.append(RebalanceEvent(self.steps, seconds, moved, changed))
        self._placement = new
        return new if changed else None
