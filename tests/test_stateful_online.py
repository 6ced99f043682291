"""Stateful property tests of online rebalancing: sequences of calls, as engines make them.

The other property tests check one call at a time. Engines call eplb again and again:
each plan becomes the next call's map in force, GPUs die and come back between calls,
loads drift, move budgets vary. Two hypothesis state machines drive those sequences:

- :class:`PlanFromTheMapInForce` calls :func:`eplb.plan`, :func:`eplb.rebalance_experts`
  and the vLLM plugin's ``EplbPolicy.rebalance_experts`` with the last plan as the map
  in force. After every call the plan keeps the contract (``assert_contract``), leaves
  dead GPUs empty, moves no more slots than ``max_moves`` where nothing was forced (the
  map in force was planned for the same live GPUs and policy), and leaves no layer worse
  on the window at hand than the map in force then; a call made again later, or from
  loads of another integer dtype, gives the same plan bit for bit (history independence).
- :class:`RecordSteps` feeds a :class:`~eplb.online.Rebalancer` chunks of per-step counts
  and GPU failures and checks every placement it holds.
"""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import torch
from helpers import assert_contract
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import eplb
from eplb.integrations.vllm import EplbPolicy
from eplb.online import Rebalancer

#: slack on the window-at-hand comparison: float64 sums of the same loads in another order
_TOLERANCE = 1e-9


@st.composite
def clusters(draw) -> dict:
    """A small cluster: 1-2 nodes of 1, 2 or 4 GPUs, 1-4 slots a GPU, groups that divide
    the experts (and the nodes, when hierarchical can apply)."""
    nodes = draw(st.integers(1, 2))
    # (now and then GPUs that the nodes do not divide: planned as one node, as vLLM does)
    gpus = draw(st.sampled_from([nodes, 2 * nodes, 4 * nodes, 3]))
    gpus = max(gpus, 2)
    slots = draw(st.integers(1, 4))
    replicas = gpus * slots
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if g <= replicas]))
    # mostly a GPU's slots to spare, so that GPUs can die
    spare = slots if replicas - slots >= groups and draw(st.booleans()) else 0
    experts = groups * draw(st.integers(1, (replicas - spare) // groups))
    layers = draw(st.integers(2, 3))
    dispatch = "nearest" if (nodes == 1 or groups == 1) and gpus % nodes == 0 and \
        draw(st.integers(0, 3)) == 0 else "even"
    return {"nodes": nodes, "gpus": gpus, "slots": slots, "replicas": replicas,
            "groups": groups, "experts": experts, "layers": layers, "dispatch": dispatch}


def hierarchy_fits(c: dict) -> bool:
    """Whether a forced ``policy="hierarchical"`` can plan this cluster with every GPU live."""
    return not eplb.Topology(c["replicas"], c["gpus"], c["nodes"],
                             c["groups"]).hierarchy_problems(c["experts"])


class PlanFromTheMapInForce(RuleBasedStateMachine):
    """Each call plans from the last call's plan; GPUs die and come back in between."""

    @initialize(cluster=clusters(), seed=st.integers(0, 2**32 - 1), static=st.booleans())
    def start(self, cluster: dict, seed: int, static: bool) -> None:
        self.c = cluster
        self.rng = np.random.default_rng(seed)
        shape = (cluster["layers"], cluster["experts"])
        self.base = np.exp(self.rng.normal(0.0, 1.0, shape)) * 100
        self.live = torch.ones(cluster["gpus"], dtype=torch.bool)
        self.previous: eplb.Placement | None = None
        if static:  # the engines' first map in force: slot i holds expert i % E
            topo = eplb.Topology(cluster["replicas"], cluster["gpus"], cluster["nodes"],
                                 cluster["groups"])
            phy2log = torch.arange(cluster["replicas"]).remainder(cluster["experts"])
            self.previous = eplb.Placement.from_phy2log(
                phy2log.repeat(cluster["layers"], 1), cluster["experts"], topo)
        # (the call's inputs, the phy2log it returned) of every call so far
        self.calls: list[tuple[dict, torch.Tensor]] = []
        # the live GPUs and policy the map in force was planned for
        self.planned_for: tuple[tuple[bool, ...], str] | None = None

    # ------------------------------------------------------------ the world changes
    def _loads(self, dtype: torch.dtype, zeros: float) -> torch.Tensor:
        """``[L, E]`` integer loads drifted from the base, some entries 0."""
        self.base = self.base * np.exp(self.rng.normal(0.0, 0.3, self.base.shape))
        loads = np.round(self.base)
        loads[self.rng.random(loads.shape) < zeros] = 0
        return torch.from_numpy(loads).to(dtype)

    @rule(gpu=st.integers(0, 7))
    def gpu_dies(self, gpu: int) -> None:
        gpu %= self.c["gpus"]
        live = self.live.clone()
        live[gpu] = False
        if int(live.sum()) * self.c["slots"] >= self.c["experts"] and live.any():
            self.live = live

    @precondition(lambda self: not bool(self.live.all()))
    @rule(pick=st.integers(0, 7))
    def gpu_comes_back(self, pick: int) -> None:
        dead = torch.nonzero(~self.live).flatten()
        self.live[dead[pick % len(dead)]] = True

    # ------------------------------------------------------------------ the calls
    def _check(self, kwargs: dict, phy2log: torch.Tensor, policy: str | None) -> None:
        """Check one call's plan against the map in force and make it the new one."""
        c = self.c
        topo = eplb.Topology(c["replicas"], c["gpus"], c["nodes"], c["groups"])
        live = kwargs.get("active_gpus")
        if policy is None:  # (the drop-in's tuple does not say: as eplb.plan resolves it)
            policy = "hierarchical" if live is None and kwargs.get("policy") != "global" and \
                c["groups"] > 1 and c["nodes"] > 1 and hierarchy_fits(c) else "global"
        placement = eplb.Placement.from_phy2log(phy2log, c["experts"], topo, policy, live)
        placement.validate()
        assert_contract(placement)
        mask = torch.ones(c["gpus"], dtype=torch.bool) if live is None else live
        assert bool((phy2log[:, ~mask.repeat_interleave(c["slots"])] == -1).all()), \
            "a dead GPU holds an expert"
        key = (tuple(mask.tolist()), policy)
        if self.previous is not None and self.planned_for == key:
            # nothing is forced: the map in force was planned for these GPUs and policy
            moved = placement.moved_slots(self.previous)
            budget = kwargs.get("max_moves")
            if isinstance(budget, list):  # one cap per layer
                assert bool((moved <= torch.tensor(budget)).all()), (
                    f"{moved.tolist()} slots moved over budgets of {budget}")
            elif budget is not None:
                assert int(moved.sum()) <= budget, (
                    f"{int(moved.sum())} slots moved over a budget of {budget}")
            if budget is not None and "policy" in kwargs:
                # "never more slots in a layer than the plan without a budget" (README),
                # under either rule (found here: on one node under nearest dispatch a
                # budget also offers the even split's own plan within it, and 2 GPUs, 4
                # slots each, 6 experts moved [2, 0] slots under a budget of 2 where no
                # budget moved [0, 2])
                free = self._plan({k: v for k, v in kwargs.items() if k != "max_moves"})
                unlimited = free.moved_slots(self.previous)
                assert bool((moved <= unlimited).all()), (
                    f"budget {budget} moved {moved.tolist()} slots per layer, no budget "
                    f"{unlimited.tolist()}")
            if c["dispatch"] == "even":
                # "a layer never gets worse on the window at hand" (README)
                weight = kwargs["weight"].to(torch.float64)
                before = self.previous.gpu_loads(weight).max(1).values
                after = placement.gpu_loads(weight).max(1).values
                assert bool((after <= before * (1 + _TOLERANCE) + _TOLERANCE).all()), (
                    f"a layer got worse on the window at hand: {before} -> {after}")
        self.calls.append((dict(kwargs, previous_placement=self.previous), phy2log))
        self.previous, self.planned_for = placement, key

    def _common(self, dtype_name: str, zeros: float, budget: int | None) -> dict:
        kwargs = {"weight": self._loads(getattr(torch, dtype_name), zeros)}
        if self.previous is not None:
            kwargs["previous"] = self.previous.phy2log
            if budget is not None:
                kwargs["max_moves"] = budget
        return kwargs

    @rule(dtype_name=st.sampled_from(["int32", "int64"]), zeros=st.sampled_from([0.0, 0.2]),
          budget=st.none() | st.integers(0, 12),
          policy=st.sampled_from(["auto", "global", "hierarchical"]))
    def plan(self, dtype_name: str, zeros: float, budget: int | None, policy: str) -> None:
        kwargs = self._common(dtype_name, zeros, budget)
        c = self.c
        if not bool(self.live.all()):
            kwargs["active_gpus"] = self.live.clone()
        if policy == "hierarchical" and (not hierarchy_fits(c) or "active_gpus" in kwargs
                                         or c["dispatch"] == "nearest"):
            policy = "auto"
        kwargs["policy"] = policy
        if c["dispatch"] == "nearest":
            kwargs["dispatch"] = "nearest"
            if c["nodes"] > 1 and "active_gpus" in kwargs:
                # documented: nearest dispatch re-plans whole there, and refuses a budget
                kwargs.pop("max_moves", None)
        placement = self._plan(kwargs)
        self._check(kwargs, placement.phy2log, placement.policy)

    @precondition(lambda self: self.previous is not None and self.c["dispatch"] == "even")
    @rule(zeros=st.sampled_from([0.0, 0.5]), per_layer=st.lists(st.integers(0, 6), min_size=3,
                                                             max_size=3) | st.none(),
          skip=st.none() | st.sampled_from([0.0, 0.01, 0.2]),
          price=st.none() | st.sampled_from([0.0, 0.05]))
    def plan_with_knobs(self, zeros: float, per_layer: list[int] | None, skip: float | None,
                        price: float | None) -> None:
        """Per-layer budgets, a skip threshold, a move price (global policy)."""
        kwargs = self._common("int64", zeros, None)
        kwargs["policy"] = "global"
        if per_layer is not None:
            kwargs["max_moves"] = per_layer[:self.c["layers"]]
        if skip is not None:
            kwargs["skip_threshold"] = skip
        if price is not None:
            kwargs["move_price"] = price
        if not bool(self.live.all()):
            kwargs["active_gpus"] = self.live.clone()
        placement = self._plan(kwargs)
        self._check(kwargs, placement.phy2log, placement.policy)

    def _plan(self, kwargs: dict) -> eplb.Placement:
        c = self.c
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return eplb.plan(kwargs["weight"], c["replicas"], c["gpus"], c["nodes"],
                             c["groups"], **{k: v for k, v in kwargs.items() if k != "weight"})

    @precondition(lambda self: bool(self.live.all()) and self.c["dispatch"] == "even")
    @rule(dtype_name=st.sampled_from(["int32", "int64"]), zeros=st.sampled_from([0.0, 0.2]),
          budget=st.none() | st.integers(0, 12))
    def vllm_rebalances(self, dtype_name: str, zeros: float, budget: int | None) -> None:
        """vLLM's call: int32 loads, the map in force (a dead GPU's slots read -1, as vLLM
        marks GPUs it adds), the budget through the plugin's options."""
        kwargs = self._common(dtype_name, zeros, budget)
        c = self.c
        EplbPolicy.options = {"agree_timeout_s": 0}
        if budget is not None and self.previous is not None:
            EplbPolicy.options["max_moves"] = budget
        extra = {} if budget is None or self.previous is None else {"max_moves": budget}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                phy2log = EplbPolicy.rebalance_experts(kwargs["weight"], c["replicas"],
                                                       c["groups"], c["nodes"], c["gpus"],
                                                       kwargs.get("previous"))
            finally:
                EplbPolicy.options = {}
            # the plugin plans what the drop-in plans from the same map
            drop_in = eplb.rebalance_experts(kwargs["weight"], c["replicas"], c["groups"],
                                             c["nodes"], c["gpus"],
                                             old_phy2log=kwargs.get("previous"), **extra)[0]
        assert torch.equal(phy2log, drop_in), "the vLLM plugin planned otherwise than the drop-in"
        self._check(kwargs, phy2log, None)

    # ------------------------------------------------------ history independence
    @precondition(lambda self: len(self.calls) > 0)
    @rule(pick=st.integers(0, 50), dtype_name=st.sampled_from(["int32", "int64", "float64"]))
    def an_earlier_call_again(self, pick: int, dtype_name: str) -> None:
        """The same call later (another dtype of the same loads) plans the same."""
        kwargs, phy2log = self.calls[pick % len(self.calls)]
        previous = kwargs.get("previous_placement")
        kwargs = {k: v for k, v in kwargs.items() if k != "previous_placement"}
        if "policy" not in kwargs:
            return  # a vLLM call: compared with the drop-in when it was made
        again = dict(kwargs, weight=kwargs["weight"].to(getattr(torch, dtype_name)))
        assert torch.equal(self._plan(again).phy2log, phy2log), "the same call planned otherwise"
        if previous is not None:  # the map in force as the record rather than its phy2log
            again["previous"] = previous
            assert torch.equal(self._plan(again).phy2log, phy2log), (
                "the map in force as a Placement planned otherwise than as its phy2log")


PlanFromTheMapInForce.TestCase.settings = settings(
    max_examples=12, stateful_step_count=8, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_plan_from_the_map_in_force = PlanFromTheMapInForce.TestCase


class RecordSteps(RuleBasedStateMachine):
    """A rebalancer fed chunks of per-step counts; every placement it holds keeps eplb's
    contract and leaves its dead GPUs empty. A twin fed the same steps one at a time (and
    at times replaced by a pickled copy of the first) holds the same placements: how the
    steps were chunked, copies and refused chunks change nothing."""

    @initialize(cluster=clusters(), seed=st.integers(0, 2**32 - 1),
                incremental=st.booleans(), budget=st.none() | st.integers(0, 12),
                dead=st.booleans(),
                estimator=st.sampled_from(["sum", "ema:4", "robust:1.0", "multi:2:2", "auto:2:2"]))
    def start(self, cluster: dict, seed: int, incremental: bool, budget: int | None,
              dead: bool, estimator: str) -> None:
        self.c = cluster
        self.rng = np.random.default_rng(seed)
        self.live = torch.ones(cluster["gpus"], dtype=torch.bool)
        if dead and (cluster["gpus"] - 1) * cluster["slots"] >= cluster["experts"]:
            self.live[-1] = False
        kwargs: dict = {"incremental": incremental, "window": 4, "interval": 3,
                        "estimator": estimator}
        if incremental and budget is not None:
            kwargs["max_moves"] = budget
        if not bool(self.live.all()):
            kwargs["active_gpus"] = self.live
        if cluster["dispatch"] == "nearest":
            kwargs["dispatch"] = "nearest"
            if cluster["nodes"] > 1 and "active_gpus" in kwargs:
                kwargs.pop("max_moves", None)  # (refused there, as under plan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.rebalancer = Rebalancer(cluster["replicas"], cluster["gpus"], cluster["nodes"],
                                         cluster["groups"], **kwargs)
        self.twin = pickle.loads(pickle.dumps(self.rebalancer))
        self.seen = 0

    @rule(steps=st.integers(1, 7), high=st.sampled_from([1, 50, 1000]))
    def record(self, steps: int, high: int) -> None:
        c = self.c
        counts = torch.from_numpy(self.rng.integers(0, high, (steps, c["layers"], c["experts"])))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.rebalancer.record(counts)
            for step in counts:
                self.twin.record(step)

    @precondition(lambda self: self.rebalancer.steps > 0)
    @rule()
    def rebalance_now(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.rebalancer.rebalance_now()
            self.twin.rebalance_now()

    @rule()
    def copied(self) -> None:
        self.twin = pickle.loads(pickle.dumps(self.rebalancer))

    @precondition(lambda self: self.rebalancer.steps > 0)
    @rule(steps=st.integers(1, 7), what=st.sampled_from(["negative", "shape"]))
    def a_bad_chunk(self, steps: int, what: str) -> None:
        """Refused whole: nothing of it is recorded."""
        c = self.c
        shape = (steps, c["layers"], c["experts"] + (what == "shape"))
        counts = torch.from_numpy(self.rng.integers(0, 50, shape))
        if what == "negative":
            counts[-1, 0, 0] = -1
        try:
            self.rebalancer.record(counts)
        except ValueError:
            return
        raise AssertionError(f"a chunk with {what} counts was recorded")

    @invariant()
    def the_twin_agrees(self) -> None:
        if not hasattr(self, "rebalancer"):
            return
        mine, theirs = self.rebalancer, self.twin
        assert mine.steps == theirs.steps
        assert [(e.step, e.moved_slots.tolist(), e.changed) for e in mine.events] == \
            [(e.step, e.moved_slots.tolist(), e.changed) for e in theirs.events]
        if mine.placement is not None:
            assert torch.equal(mine.placement.phy2log, theirs.placement.phy2log)
            assert torch.equal(mine.history, theirs.history)

    @invariant()
    def every_placement_keeps_the_contract(self) -> None:
        if not hasattr(self, "rebalancer"):
            return
        placement = self.rebalancer.placement
        if placement is None or len(self.rebalancer.events) == self.seen:
            return
        self.seen = len(self.rebalancer.events)
        placement.validate()
        assert_contract(placement)
        slot_live = self.live.repeat_interleave(self.c["slots"])
        assert bool((placement.phy2log[:, ~slot_live] == -1).all()), "a dead GPU holds an expert"


RecordSteps.TestCase.settings = settings(
    max_examples=10, stateful_step_count=8, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_record_steps = RecordSteps.TestCase
