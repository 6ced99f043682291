"""Online rebalancing: a stateful :class:`Rebalancer` fed step by step, as an engine would.

An engine records per-step expert counts ``[L, E]``; every ``interval`` steps it plans on
the last ``window`` recorded steps and switches to the new placement (vLLM: window 1000,
interval 3000; SGLang: 1000 / 1000). :class:`Rebalancer` reproduces that cadence with any
estimator (:mod:`eplb.online.estimate`) and any planner:

- ``"eplb"``: eplb's planner, as :func:`eplb.plan` runs it (with ``previous=`` the
  placement in force when ``incremental=True``, plus ``max_moves`` / ``skip_threshold``);
- ``"greedy"``: DeepSeek's reference greedy (:func:`eplb.core.baselines.plan_greedy`);
- ``"none"``: never rebalance: the static
  :func:`~eplb.online.planners.trivial_placement`;
- any callable ``(weight [L, E], previous: Placement | None) -> Placement``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import FrozenInstanceError
from typing import Any

import numpy as np
import torch

from eplb.core.device_path import caller_settings_off
from eplb.core.placement import Placement, PlacementError
from eplb.core.planner import as_planned
from eplb.core.topology import Topology, positive_int
from eplb.online.budget import check_budget
from eplb.online.estimate import Estimate, Estimator, as_history, make_estimator
from eplb.online.planners import PlannerFn, make_planner, plan_estimate

#: the per-step history an engine keeps (float32 ring buffer) at most
MAX_HISTORY_BYTES = 8 << 30


class RebalanceEvent:
    """One rebalance: at ``step`` (steps recorded so far) the plan took ``plan_seconds``.

    ``moved_slots [L]``: slots whose expert changed versus the placement before (all
    zero when there was none before or nothing changed); ``moved_per_gpu [P]``: the
    same slots counted on each GPU over every layer (``None`` where not recorded).
    ``changed``: the map differs from the one before (or there was none), also when no
    weights move: a slot of a GPU that died since is emptied, and the engine must stop
    sending tokens there.

    Read-only. The slot counts are kept as Python integers, and each read of
    ``moved_slots`` / ``moved_per_gpu`` returns a new int64 tensor of them: two small
    tensors kept for every rebalance sat in the C heap between the plans' large
    temporaries, which could then not reuse the space around them, so a process's
    memory grew by about 50 KB a rebalance (58 × 256 on 32 GPUs: 283 → 462 MB over
    3,000 rebalances of ``interval=1``, where it reaches 321 MB with integers;
    ``benchmarks/bench_rebalancer_memory.py``).
    """

    __slots__ = ("_moved_per_gpu", "_moved_slots", "changed", "plan_seconds", "step")

    def __init__(self, step: int, plan_seconds: float, moved_slots: torch.Tensor | Sequence[int],
                 changed: bool, moved_per_gpu: torch.Tensor | Sequence[int] | None = None
                 ) -> None:
        fields = {"step": int(step), "plan_seconds": float(plan_seconds),
                  "changed": bool(changed), "_moved_slots": _integers(moved_slots),
                  "_moved_per_gpu": None if moved_per_gpu is None else _integers(moved_per_gpu)}
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def moved_slots(self) -> torch.Tensor:
        """``[L]`` int64: the slots of each layer whose expert changed."""
        # (on the host whatever the caller's default device: the counts are host numbers)
        return torch.tensor(self._moved_slots, dtype=torch.int64, device="cpu")

    @property
    def moved_per_gpu(self) -> torch.Tensor | None:
        """``[P]`` int64: the changed slots on each GPU over every layer (``None``: not
        recorded)."""
        return (None if self._moved_per_gpu is None
                else torch.tensor(self._moved_per_gpu, dtype=torch.int64, device="cpu"))

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}: a RebalanceEvent is read-only")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}: a RebalanceEvent is read-only")

    def __reduce__(self) -> tuple[type[RebalanceEvent], tuple[Any, ...]]:
        # (pickle and copy would set the slots one by one, which __setattr__ refuses)
        return (RebalanceEvent, (self.step, self.plan_seconds, self._moved_slots, self.changed,
                                 self._moved_per_gpu))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # an event pickled when RebalanceEvent was a dataclass (a Rebalancer saved by an
        # eplb before the integer counts): its __dict__ of fields, tensors included, which
        # pickle could not set on an instance without a __dict__ (AttributeError)
        RebalanceEvent.__init__(self, **state)

    def __repr__(self) -> str:
        per_gpu = None if self._moved_per_gpu is None else list(self._moved_per_gpu)
        return (f"RebalanceEvent(step={self.step}, plan_seconds={self.plan_seconds!r}, "
                f"moved_slots={list(self._moved_slots)}, changed={self.changed}, "
                f"moved_per_gpu={per_gpu})")


def _integers(counts: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    """``counts`` (a 1-D tensor or a sequence) as a tuple of Python integers (a float or
    bool tensor too: its repr showed ``[1.5]`` where ``moved_slots`` read 1)."""
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().reshape(-1).tolist()
    return tuple(int(count) for count in counts)


class Rebalancer:
    """Record per-step counts and rebalance on the engine's cadence.

    Args:
        num_replicas, num_gpus, num_nodes, num_groups: the cluster (see :class:`Topology`).
        window: recording window ``W``: plans use the last ``W`` steps (default 1000).
        interval: rebalance every ``I`` recorded steps (after steps ``I, 2I, ...``;
            default 3000).
        estimator: spec string or :class:`~eplb.online.estimate.Estimator` (default ``"sum"``).
        planner: ``"eplb"``, ``"greedy"``, ``"none"`` or a callable ``(weight, previous)``
            (a callable always receives the placement in force, ``None`` before the first,
            and one window of the model's layers per call; the options below but
            ``incremental`` are for the built-in planners and refused beside a callable).
        incremental: pass the placement in force to :func:`eplb.plan` (``previous=``) with
            ``max_moves`` and ``skip_threshold`` (default ``False``: every rebalance plans
            from scratch).
        max_moves: with ``incremental``, most slots a rebalance may change beyond the
            forced moves, in total over the layers (default ``None``: no cap); see
            :func:`eplb.plan`.
        skip_threshold: with ``incremental``, leave a layer untouched when re-planning it
            would raise its expected next-window balancedness by less than this (a
            fraction in [0, 1); default ``None``: no threshold); see :func:`eplb.plan`.
        active_gpus: ``[P]`` bool of live GPUs (``"eplb"``, and ``"none"``: the static
            layout over the live GPUs; ``"greedy"`` refuses it).
        initial: the placement in force before the first rebalance (default ``None``:
            ``placement`` is ``None`` until then).
        max_steps: the most steps that will ever be recorded (a replay of a trace of known
            length), or ``None`` (default: no end). The ring then holds at most these, and
            recording more is refused.
        plan_options: extra keyword arguments for the planner (e.g. ``policy``, ``seed``).

    The history is a ring buffer holding the last ``max(window, estimator.lookback(window))``
    steps, at most ``max_steps`` (``window`` for most estimators; at least five half-lives
    for ``ema:H``, ``M`` windows for ``multi:K:M``), stored as float32 (per-step counts
    are integers; sums are taken in float64). It is allocated whole at the first
    :meth:`record`, so its memory is known from the start (``ema:10000`` keeps 50,000
    steps: 2.8 GiB at 58 × 256), and one beyond 8 GiB is refused there.

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
        max_steps: int | None = None,
        **plan_options: Any,
    ) -> None:
        # the cluster as the plans will record it: one node, with eplb.plan's warning, where
        # the GPUs do not divide over the nodes (recorded as asked, every rebalance refused
        # the planner's own one-node plan; attacker pass)
        asked = Topology(num_replicas, num_gpus, num_nodes, num_groups)
        self.topology = as_planned(asked, plan_options.get("policy", "auto"), stacklevel=3,
                                   dispatch=plan_options.get("dispatch"))
        for name, value in (("window", window), ("interval", interval)):
            try:  # NumPy and 0-d tensor integers too, as the cluster's counts
                setattr(self, name, positive_int(name, value))
            except ValueError:
                raise ValueError(f"{name} must be a positive integer number of steps, "
                                 f"got {value!r}") from None
        self.estimator = make_estimator(estimator)
        self.planner_name = planner if isinstance(planner, str) else getattr(
            planner, "__name__", "callable")
        # the option values as given now, checked now: the caller's tensors, arrays and
        # lists are copied (a live mask or speeds changed in place later reached every
        # rebalance unchecked: a GPU marked dead under policy="hierarchical" failed each one)
        active_gpus, max_moves = _snapshot(active_gpus), _snapshot(max_moves)
        plan_options = {name: _snapshot(value) for name, value in plan_options.items()}
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
        # the candidates of a multi-window estimate are planned in one call, stacked as
        # [C·L, E], where the options hold nothing per layer: routing [T, L, k] does (its
        # layers then failed the first rebalance, "routing must have shape [tokens, C·L
        # layers, top-k]", after the first step's check had passed)
        self._batch = not self._user_planner and plan_options.get("routing") is None
        # (the checked ints: the raw window, a 0-d tensor say, became the ring's size)
        self.capacity = max(self.window, self.estimator.lookback(self.window))
        # a replay knows its length: a ring longer than it only costs memory (ema:10000 on
        # a 1,000-step DeepSeek-V3 trace allocated 2.8 GiB for 59 MB of counts; attacker
        # pass). With no more steps than the ring holds it never wraps: the same estimates
        self.max_steps = None if max_steps is None else positive_int("max_steps", max_steps)
        if self.max_steps is not None:
            self.capacity = min(self.capacity, self.max_steps)
        if initial is not None and not isinstance(initial, Placement):
            raise TypeError(f"initial must be an eplb.Placement (the placement in force) or "
                            f"None, got {type(initial).__name__}")
        if initial is not None and initial.topology == asked != self.topology:
            initial = Placement.from_phy2log(initial.phy2log, initial.num_experts, self.topology,
                                             initial.policy, initial.active_gpus)
        if initial is not None and initial.topology != self.topology:
            raise ValueError(f"initial placement is for {initial.topology}, the rebalancer "
                             f"for {self.topology}")
        if initial is not None:
            # checked now, not at the first rebalance ``interval`` steps later under the name
            # "previous placement" (or never, without incremental): attacker pass. Stacked
            # replicas are allowed, as in any map in force (the forced moves spread them)
            try:
                initial.validate(anti_affinity=False)
            except PlacementError as error:
                raise PlacementError(f"initial placement: {error}") from error
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
        state.setdefault("max_steps", None)  # (pickled before max_steps existed)
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
        largest = float(steps.amax()) if steps.numel() else 0.0
        if largest > limit:
            raise ValueError(f"counts hold {largest:.3g}, beyond what the history keeps "
                             f"({limit:.3g}: float32 over {self.capacity} steps); scale the "
                             "counts down")
        # and at the other end: counts whose largest is below float32's normal numbers
        # lose their precision there, or turn into zeros (an attacker pass: counts ×1e-300
        # were planned as zeros; the huge side was refused)
        if 0 < largest < torch.finfo(torch.float32).tiny:
            raise ValueError(f"counts are at most {largest:.3g}, below what the history keeps "
                             f"(float32's {torch.finfo(torch.float32).tiny:.3g}); scale the "
                             "counts up")
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
        if self.max_steps is not None and self.steps + steps.shape[0] > self.max_steps:
            # a ring cut to max_steps would drop steps the estimator still reads
            raise ValueError(f"recording {steps.shape[0]} more step(s) after {self.steps} "
                             f"goes past max_steps={self.max_steps}")
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
            # a shape the planner cannot plan is refused at the first step, not at the
            # first rebalance (attacker pass: R < E or groups that do not split the
            # experts failed only after `interval` steps)
            check = getattr(self.planner, "check_shape", None)
            if check is not None:
                check(num_layers, num_experts)
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
        # a user's callable gets one window of the model's layers per call, as documented
        # (stacked candidate windows came to it as [C·L, E] on the first rebalance)
        with caller_settings_off():  # as eplb.plan: autocast off, the CPU default device
            new = plan_estimate(estimate, self.planner,
                                previous if self._pass_previous else None, keep=previous,
                                batch=self._batch,
                                total_budget=self._total_budget, realised=self._realised)
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
            moved, per_gpu = [0] * new.num_layers, [0] * new.topology.num_gpus
            changed = True
        else:
            with caller_settings_off():  # (a "meta" default device: no numbers to read)
                moved = new.moved_slots(previous).cpu()
                per_gpu = new.moved_slots(previous, per_gpu=True).cpu()
                # emptying a dead GPU's slots moves no weights but changes the map in force
                changed = bool(moved.any()) or not torch.equal(
                    new.phy2log, previous.phy2log.to(new.phy2log.device))
        self.events.append(RebalanceEvent(self.steps, seconds, moved, changed, per_gpu))
        self._placement = new
        return new if changed else None


def _snapshot(value: Any) -> Any:
    """``value`` with the tensors and arrays in it copied (lists and tuples of them too),
    so that the caller changing its own later cannot change an option that was checked."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if type(value) in (list, tuple):
        return type(value)(_snapshot(item) for item in value)
    return value
