"""What the replay simulator refuses, up front and by name: bad arguments and traces,
traces too short to score or replays too wide to score, planners that return no
placement or cannot take the weight and previous plan, and bad step chunks.
"""

from __future__ import annotations

import pytest
import torch
from test_simulate import E, L, P, R, _trace

import eplb
from eplb import Topology
from eplb.online import trivial_placement
from eplb.tools import generate_trace
from eplb.tools.scoring import step_balancedness
from eplb.tools.simulate import (
    Cadence,
    simulate,
)


def test_a_trace_too_short_for_a_scoring_window_after_the_first_rebalance_is_refused() -> None:
    """Scoring windows start at multiples of their length: rebalancing every 20 steps and
    scoring windows of 100 (cadence "adrs" with its interval overridden) first scores at
    step 100. 192 steps passed the length check (20 + 100) and came back with no window
    scored (window_balancedness None, new-user pass); now the check counts that start."""
    counts = _trace(192)
    with pytest.raises(ValueError, match=r"starts at step 100, so the simulation needs at "
                                         r"least 200 steps"):
        simulate(counts, "eplb", num_replicas=R, num_gpus=P, cadence="adrs", window=20,
                 interval=20, oracle=False)
    res = simulate(_trace(200), "eplb", num_replicas=R, num_gpus=P, cadence="adrs",
                   window=20, interval=20, oracle=False)
    assert res.planned.tolist() == [False, True]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cadence": "hourly"}, ValueError, "unknown cadence 'hourly'"),
        ({"interval": 0}, ValueError, "interval"),
        ({"planner": "magic"}, ValueError, "unknown planner"),
        ({"estimator": "median"}, ValueError, "accepted specs"),
        ({"num_replicas": 10}, ValueError, "multiple of num_gpus"),
        ({"expert_bytes": -1}, ValueError, "expert_bytes"),
        ({"expert_bytes": 0}, ValueError, r"expert_bytes must be an integer in 1\.\.1099511627776"),
        # int64 bytes moved overflowed beyond this (attacker pass)
        ({"expert_bytes": 2**40 + 1}, ValueError, r"in 1\.\.1099511627776 \(1 TiB\)"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    args = {"num_replicas": R, "num_gpus": P, "cadence": "adrs"} | kwargs
    planner = args.pop("planner", "eplb")
    with pytest.raises(error, match=match):
        simulate(_trace(200), planner, **args)


def test_a_trace_too_short_to_score_anything_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 200 steps"):
        simulate(_trace(150), "eplb", num_replicas=R, num_gpus=P, cadence="adrs")


def test_bad_traces() -> None:
    with pytest.raises(ValueError, match="dimensions"):
        simulate(torch.zeros(2, 3, 4, 5), "none", num_replicas=R, num_gpus=P)
    with pytest.raises(TypeError, match="trace"):
        simulate("trace.json", "none", num_replicas=R, num_gpus=P)
    wrong = trivial_placement(E + 1, L, Topology(R, P))
    with pytest.raises(ValueError, match="initial placement"):
        simulate(_trace(10), "none", num_replicas=R, num_gpus=P, initial=wrong)


def test_a_planner_that_returns_no_placement_is_named(tiny_trace_for_planners) -> None:
    trace = tiny_trace_for_planners
    cases = [
        (lambda w, prev: "x", TypeError, "must return an eplb.Placement, got str"),
        (lambda w, prev: eplb.plan(w, 16, 8).phy2log, TypeError, "got Tensor"),
        (lambda w, prev: eplb.plan(w[:3], 16, 8), ValueError, "placement of 3 layers"),
    ]
    for planner, error, message in cases:
        with pytest.raises(error, match=message):
            simulate(trace, planner, num_replicas=16, num_gpus=8, cadence="adrs")
        with pytest.raises(error, match=message):  # the multi-window estimator's path too
            simulate(trace, planner, num_replicas=16, num_gpus=8, cadence="adrs",
                     estimator="multi:2")


def test_a_planner_that_cannot_take_weight_and_previous_is_refused_up_front(
        tiny_trace_for_planners) -> None:
    # (new-user pass: a natural lambda w, R, P failed with a raw TypeError at the first
    # rebalance)
    refused = r"planner\(weight \[L, E\], previous.*<lambda>\(w, R, P\)"
    with pytest.raises(ValueError, match=refused):
        simulate(tiny_trace_for_planners, lambda w, R, P: eplb.plan(w, R, P),
                 num_replicas=16, num_gpus=8, cadence="adrs")
    # any callable that takes (weight, previous) is fine, keywords or *args included, and a
    # functools.wraps wrapper whose target takes other arguments (second attacker pass)
    import functools

    def fresh(weight):
        return eplb.plan(weight, 16, 8)

    @functools.wraps(fresh)
    def wrapped(weight, previous):
        return fresh(weight)

    for planner in (lambda w, prev=None, *rest: eplb.plan(w, 16, 8),
                    lambda *args: eplb.plan(args[0], 16, 8), wrapped):
        simulate(tiny_trace_for_planners, planner, num_replicas=16, num_gpus=8, cadence="adrs")


@pytest.fixture(scope="module")
def tiny_trace_for_planners():
    return generate_trace("mixtral-8x7b", steps=200)


def test_oracle_must_be_a_bool() -> None:
    """``oracle="no"`` was truthy: the oracle ran."""
    with pytest.raises(ValueError, match="oracle must be True or False"):
        simulate(_trace(50), "eplb", num_replicas=R, num_gpus=P, cadence=Cadence(5, 10),
                 oracle="no")


def test_a_replay_too_wide_to_score_is_refused_before_planning():
    """58 layers × 8,192 experts on 8,192 GPUs: the scoring matrix would take 29 GiB; a
    15 MB trace asked torch for 31 GB after planning (attacker pass). Refused up front,
    naming the sizes; step_balancedness alike."""
    counts = torch.rand(2, 58, 8192)
    with pytest.raises(ValueError, match=r"58 layers × 8192 experts on 8192 GPUs takes a "
                                         r"29\.0 GiB matrix"):
        simulate(counts, "none", num_replicas=8192, num_gpus=8192, window=1, interval=1)
    plan = trivial_placement(8192, 58, Topology(8192, 8192))
    with pytest.raises(ValueError, match=r"29\.0 GiB matrix"):
        step_balancedness(counts, plan)


@pytest.mark.parametrize("chunk", [0, -1, 1.5, True])
def test_step_balancedness_names_a_bad_chunk(chunk) -> None:
    # (attacker pass: range()'s, torch.cat's and a TypeError's words, none naming chunk)
    placement = eplb.plan(torch.rand(L, E) + 0.1, R, P)
    with pytest.raises(ValueError, match="chunk"):
        step_balancedness(_trace(4), placement, chunk=chunk)


def test_numpy_and_tensor_integers_are_taken_for_the_cadence_and_expert_bytes() -> None:
    """Found by an attacker pass: ``window=np.int64(20)`` (or a 0-d tensor) was refused as
    "cadence window must be a positive integer", and ``expert_bytes=np.int64(...)`` alike,
    where the Rebalancer under the replay takes them; the replay is the same as with ints."""
    np = pytest.importorskip("numpy")
    plain = simulate(_trace(200), "eplb", num_replicas=R, num_gpus=P, cadence="adrs",
                     window=20, interval=20, expert_bytes=1000, oracle=False)
    numeric = simulate(_trace(200), "eplb", num_replicas=R, num_gpus=P, cadence="adrs",
                       window=np.int64(20), interval=torch.tensor(20),
                       score_window=np.int32(100), expert_bytes=np.int64(1000), oracle=False)
    assert numeric.cadence == plain.cadence == Cadence(20, 20, 100)
    assert type(numeric.cadence.window) is int and type(numeric.expert_bytes) is int
    assert torch.equal(numeric.window_balancedness, plain.window_balancedness)
    assert numeric.moved_bytes.tolist() == plain.moved_bytes.tolist()
    # what is no positive integer is still refused, by name
    for bad in (np.float64(20.0), np.int64(0), torch.tensor(True)):
        with pytest.raises(ValueError, match="cadence window must be a positive integer"):
            Cadence(bad, 20)
    with pytest.raises(ValueError, match=r"expert_bytes must be an integer in 1\.\."):
        simulate(_trace(200), "eplb", num_replicas=R, num_gpus=P, cadence="adrs",
                 expert_bytes=np.float64(1000.0))
