"""Load estimators: hand-made histories, spec parsing, per-layer scenario selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb import Placement, Topology
from eplb.online import Rebalancer
from eplb.online.estimate import (
    ESTIMATORS,
    AdaptiveAverage,
    Estimator,
    ExponentialAverage,
    MultiWindow,
    RobustMean,
    WindowSum,
    as_history,
    expected_max,
    make_estimator,
    select_per_layer,
)


def _history(steps: int = 12, layers: int = 3, experts: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (steps, layers, experts), generator=g).to(torch.float64)


# ------------------------------------------------------------------ window sum
def test_sum_equals_engine_window_sum() -> None:
    h = _history()
    assert torch.equal(WindowSum().estimate(h, window=5).weight, h[-5:].sum(0))
    assert torch.equal(WindowSum()(h), h.sum(0))  # window defaults to the whole history


def test_sum_accepts_integer_numpy_and_one_step() -> None:
    h = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4)
    w = WindowSum()(h)
    assert w.dtype == torch.float64
    assert torch.equal(w, torch.from_numpy(h.sum(0)).double())
    one = WindowSum()(h[0])  # [L, E] is one step
    assert torch.equal(one, torch.from_numpy(h[0]).double())


# ------------------------------------------------------------------ EMA
def test_ema_weights_by_hand() -> None:
    # two steps, half-life 1: ages 1, 0 -> weights 0.5, 1 -> rescaled to sum 2
    c0, c1 = 3.0, 6.0
    h = torch.tensor([[[c0]], [[c1]]], dtype=torch.float64)
    got = ExponentialAverage(1.0).estimate(h, window=2).weight
    # weighted mean per step (0.5*c0 + c1) / 1.5, times the window of 2 steps
    assert got.item() == pytest.approx(2 * (0.5 * c0 + c1) / 1.5)
    weights = ExponentialAverage(1.0).weights(3)
    assert torch.allclose(weights, torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64) * 3 / 1.75)


def test_ema_constant_history_is_window_sum_and_long_half_life_tends_to_sum() -> None:
    step = torch.rand(1, 2, 5, dtype=torch.float64)
    const = step.repeat(10, 1, 1)
    assert torch.allclose(ExponentialAverage(3.0)(const, 10), const.sum(0))
    h = _history()
    # a huge half-life weighs the whole (5 half-lives) lookback equally
    assert torch.allclose(ExponentialAverage(1e9)(h, 6), h.sum(0) * 6 / 12, rtol=1e-6)
    assert ExponentialAverage(2.0).lookback(4) == 10
    assert ExponentialAverage(2.0).lookback(40) == 40
    # steps older than the lookback are ignored
    assert torch.allclose(ExponentialAverage(1.0)(h, 2), ExponentialAverage(1.0)(h[-5:], 2))


def test_ema_favours_recent_steps() -> None:
    h = torch.zeros(10, 1, 2, dtype=torch.float64)
    h[:5, 0, 0] = 1.0  # expert 0 was hot long ago
    h[5:, 0, 1] = 1.0  # expert 1 is hot now
    w = ExponentialAverage(2.0)(h)
    assert w[0, 1] > w[0, 0]
    assert w.sum().item() == pytest.approx(10.0, rel=1e-6)  # mass = steps when loads constant


# ------------------------------------------------------------------ robust
def test_robust_mean_plus_z_std_by_hand() -> None:
    # two sub-windows of 2 steps: rates 1 and 3 per step -> mean 2, std sqrt(2)
    h = torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=torch.float64).view(4, 1, 1)
    got = RobustMean(z=1.0, num_chunks=2).estimate(h, window=4).weight.item()
    assert got == pytest.approx(4 * (2 + math.sqrt(2)))
    assert RobustMean(z=0.0, num_chunks=2)(h, 4).item() == pytest.approx(8.0)  # = window sum


def test_robust_gives_volatile_experts_headroom() -> None:
    steady = torch.full((8,), 2.0, dtype=torch.float64)
    bursty = torch.tensor([0, 0, 4, 4, 0, 0, 4, 4], dtype=torch.float64)
    h = torch.stack([steady, bursty], dim=1)[:, None, :]  # [8, 1, 2], equal sums
    w = RobustMean(z=1.0, num_chunks=4)(h)
    assert w[0, 1] > w[0, 0] == pytest.approx(16.0)


# ------------------------------------------------------------------ multi
def test_multi_scenarios_and_candidates() -> None:
    h = _history(steps=8)
    est = MultiWindow(num_windows=2, num_spans=2).estimate(h, window=4)
    assert est.scenarios is not None and est.candidates is not None
    # two scenario windows of 4 steps each, in window units (4 steps)
    assert torch.allclose(est.scenarios[0], h[:4].sum(0))
    assert torch.allclose(est.scenarios[1], h[4:].sum(0))
    assert torch.allclose(est.weight, h.sum(0) / 2)
    assert est.candidates.shape == (4, 3, 8)
    assert torch.allclose(est.candidates[1], h[-4:].sum(0))  # the engine's estimate
    assert MultiWindow(3, 2).lookback(100) == 200


def test_multi_sub_windows_rescale_to_window_units() -> None:
    h = _history(steps=6)
    est = MultiWindow(num_windows=3).estimate(h, window=6)
    assert est.scenarios is not None
    assert torch.allclose(est.scenarios[2], h[4:].sum(0) * 3)


# ------------------------------------------------------------------ specs
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("sum", WindowSum()),
        ("ema:50", ExponentialAverage(50.0)),
        ("robust:1.5", RobustMean(1.5, 4)),
        ("robust:0.5:8", RobustMean(0.5, 8)),
        ("multi:4", MultiWindow(4, 1)),
        ("multi:3:2", MultiWindow(3, 2)),
        ("auto", AdaptiveAverage()),
        ("auto:2", AdaptiveAverage(memory=2)),
        ("auto:2:5", AdaptiveAverage(memory=2, folds=5)),
    ],
)
def test_make_estimator_parses_and_round_trips(spec: str, expected: Estimator) -> None:
    est = make_estimator(spec)
    assert est == expected
    assert make_estimator(est.spec) == est
    assert make_estimator(est) is est


@pytest.mark.parametrize("spec", ["median", "ema", "ema:x", "ema:0", "ema:-3", "robust",
                                  "multi:0", "multi:2:0", "sum:3", "robust:1:0", "ema:1:2"])
def test_bad_specs_name_the_accepted_ones(spec: str) -> None:
    with pytest.raises(ValueError) as err:
        make_estimator(spec)
    message = str(err.value)
    if spec == "median":
        for name in ESTIMATORS:
            assert name in message
        assert "ema:HALF_LIFE" in message


def test_make_estimator_rejects_non_string() -> None:
    with pytest.raises(TypeError, match="spec string"):
        make_estimator(3)  # type: ignore[arg-type]


# ------------------------------------------------------------------ input checks
@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.zeros(2, 3, 4, 5), ValueError, "dimensions"),
        (torch.zeros(0, 3, 4), ValueError, "empty"),
        (torch.tensor([[[1.0, -1.0]]]), ValueError, r"history\[0, 0, 1\]"),
        (torch.tensor([[[1.0, float("nan")]]]), ValueError, "finite"),
        ("counts", TypeError, "LoadTrace"),
    ],
)
def test_as_history_rejects_bad_input(bad: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        as_history(bad)


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window"):
        WindowSum().estimate(_history(), window=0)


@pytest.mark.parametrize("wrap", [np.int64, np.int32, lambda v: torch.tensor(v)])
def test_estimator_knobs_take_numpy_and_tensor_numbers(wrap) -> None:
    # the planner's knobs took NumPy integers; the estimators' refused them ("must be an
    # integer >= 1, got np.int64(4)"), and a window of np.int64(6) likewise
    history = _history()
    pairs = [(RobustMean(z=wrap(1), num_chunks=wrap(4)), RobustMean(z=1.0, num_chunks=4)),
             (MultiWindow(num_windows=wrap(3), num_spans=wrap(2)), MultiWindow(3, 2)),
             (AdaptiveAverage(memory=wrap(2), folds=wrap(2)), AdaptiveAverage(memory=2, folds=2)),
             (ExponentialAverage(wrap(3)), ExponentialAverage(3.0))]
    for given_, plain in pairs:
        assert given_ == plain and given_.spec == plain.spec  # stored as plain numbers
        assert torch.equal(given_.estimate(history, wrap(6)).weight,
                           plain.estimate(history, 6).weight)
    for bad in (True, np.bool_(True), 1.5, "4", 0):
        with pytest.raises(ValueError, match="robust sub-window count must be an integer"):
            RobustMean(num_chunks=bad)
    with pytest.raises(ValueError, match="ema half-life must be a number"):
        ExponentialAverage(complex(1, 1))


def test_auto_half_lives_take_numbers_and_refuse_the_rest() -> None:
    # the estimators' other knobs went through the real-number rule; half_lives did not:
    # True was a half-life of 1, "2" raised TypeError from a comparison, and NumPy or
    # tensor numbers (or a list, unhashable) were stored as given
    plain = AdaptiveAverage(half_lives=(0.5, 2.0))
    given_ = AdaptiveAverage(half_lives=[np.float64(0.5), torch.tensor(2.0)])
    assert given_ == plain and given_.half_lives == (0.5, 2.0) and hash(given_) == hash(plain)
    for bad in ((True,), (np.bool_(True),), ("2",), (complex(1, 0),), (math.nan,),
                (math.inf,), (0.0,), (), (1e300,)):
        with pytest.raises(ValueError, match=r"auto half-lives must be numbers in \(0, 1e\+09\]"):
            AdaptiveAverage(half_lives=bad)


@settings(max_examples=25, deadline=None)
@given(
    steps=st.integers(1, 12),
    window=st.integers(1, 12),
    seed=st.integers(0, 1000),
    spec=st.sampled_from(["sum", "ema:3", "robust:1", "multi:3", "multi:2:2", "auto:2"]),
)
def test_estimates_are_finite_nonnegative_and_shaped(steps: int, window: int, seed: int,
                                                     spec: str) -> None:
    h = _history(steps=steps, seed=seed)
    est = make_estimator(spec).estimate(h, window)
    assert est.weight.shape == (3, 8)
    assert est.weight.dtype == torch.float64
    assert bool(torch.isfinite(est.weight).all()) and bool((est.weight >= 0).all())
    # every estimator keeps the scale of a `window`-step sum for a constant history
    # (the window is capped at the history's length)
    const = h[:1].repeat(steps, 1, 1)
    assert torch.allclose(make_estimator(spec)(const, window), const[0] * min(window, steps))


# ------------------------------------------------------------------ selection
def _placement(rows: list[list[int]], experts: int, topo: Topology) -> Placement:
    return Placement.from_phy2log(torch.tensor(rows), experts, topo)


def test_select_per_layer_keeps_the_better_candidate_per_layer() -> None:
    topo = Topology(4, 2)
    # scenario: experts 0 and 1 hot in layer 0; experts 0 and 3 hot in layer 1
    scen = torch.tensor([[[5.0, 5.0, 1.0, 1.0], [5.0, 1.0, 1.0, 5.0]]])
    a = _placement([[0, 2, 1, 3], [0, 3, 1, 2]], 4, topo)  # good for layer 0 only
    b = _placement([[0, 1, 2, 3], [0, 3, 1, 2]], 4, topo)  # bad for both layers
    c = _placement([[0, 1, 2, 3], [0, 1, 2, 3]], 4, topo)  # good for layer 1 only
    chosen = select_per_layer([b, a, c], scen).validate()
    assert chosen.phy2log.tolist() == [[0, 2, 1, 3], [0, 1, 2, 3]]
    em = expected_max(chosen, scen)
    assert torch.allclose(em, torch.ones(2, dtype=torch.float64))
    for cand in (a, b, c):
        assert (expected_max(cand, scen) >= em - 1e-12).all()


def test_select_per_layer_rejects_mismatched_candidates() -> None:
    a = _placement([[0, 1, 2, 3]], 4, Topology(4, 2))
    b = _placement([[0, 1, 2, 3]], 4, Topology(4, 4))
    with pytest.raises(ValueError, match="candidate 1"):
        select_per_layer([a, b], torch.ones(1, 1, 4))
    with pytest.raises(ValueError, match="at least one"):
        select_per_layer([], torch.ones(1, 1, 4))


@pytest.mark.parametrize("reduce", ["Mean", "avg", "", None])
def test_an_unknown_reduce_is_refused(reduce: object) -> None:
    """Any word but "mean" meant "max" (the worst case), silently (found by the
    twelfth-session fuzz pass)."""
    a = _placement([[0, 1, 2, 3]], 4, Topology(4, 2))
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'max'"):
        expected_max(a, torch.ones(1, 1, 4), reduce)
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'max'"):
        select_per_layer([a], torch.ones(1, 1, 4), reduce)


# ------------------------------------------------------------------ adaptive
def test_auto_picks_short_memory_for_a_trend_and_long_memory_for_noise() -> None:
    w, steps = 20, 140
    t = torch.arange(steps, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    trend = torch.stack([t + 1, steps - t, torch.full_like(t, 50.0)], dim=1)  # [T, 3]
    noise = torch.poisson(torch.full((steps, 3), 5.0, dtype=torch.float64), generator=g)
    h = torch.stack([trend, noise], dim=1)  # [T, 2 layers, 3 experts]
    est = make_estimator("auto")
    assert est == AdaptiveAverage()
    got = est(h, w)
    short = ExponentialAverage(0.25 * w)(h[-4 * w:], w)
    long = ExponentialAverage(2.0 * w)(h[-4 * w:], w)
    assert torch.allclose(got[0], short[0])  # drifting layer: the shortest half-life
    assert torch.allclose(got[1], long[1])  # stationary noisy layer: the longest
    assert est.lookback(w) == 7 * w


def test_auto_with_one_window_is_the_sum() -> None:
    h = _history(steps=6)
    assert torch.allclose(make_estimator("auto:2")(h, 6), h.sum(0))
    assert make_estimator("auto:2:1").spec == "auto:2:1"


# ------------------------------------------------------------------ unsigned counts
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("spec", ["sum", "ema:3", "robust:1", "multi:2", "auto:1:1"])
def test_unsigned_counts_estimate_as_their_values(dtype: type, spec: str) -> None:
    # torch has no max/min for uint16/32/64, which as_history used to call on them
    h = _history(steps=6)
    want = make_estimator(spec).estimate(h, 3).weight
    for counts in (h.numpy().astype(dtype), torch.from_numpy(h.numpy().astype(dtype))):
        got = make_estimator(spec).estimate(counts, 3).weight
        # (small counts are summed in float32, as integer counts are)
        assert torch.allclose(got, want, rtol=1e-6)


def test_unsigned_counts_beyond_int64_are_read() -> None:
    counts = np.full((2, 1, 3), np.iinfo(np.uint64).max, dtype=np.uint64)
    assert WindowSum().estimate(counts).weight.tolist() == [[2.0**65] * 3]


def test_window_sums_stay_exact_above_65536_tokens_per_expert_and_step():
    # many ranks' passes summed: 100,000-200,000 tokens per expert and step; a float32
    # block of 256 such steps passes 2**24 and rounded (off by 3 here)
    generator = torch.Generator().manual_seed(0)
    steps = torch.randint(100_000, 200_000, (300, 2, 3), generator=generator)
    exact = steps.sum(0).to(torch.float64)
    assert torch.equal(WindowSum()(steps), exact)
    assert torch.equal(WindowSum()(steps.to(torch.float32)), exact)
    rebalancer = Rebalancer(num_replicas=6, num_gpus=2, window=300, interval=300)
    for step in steps:
        rebalancer.record(step)
    assert torch.equal(rebalancer.estimate().weight, exact)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor", "ignore:The PyTorch API of nested")
def test_nested_and_quantized_scenarios_are_refused_by_name() -> None:
    # a nested tensor of scenarios raised torch's "Internal error: NestedTensorImpl
    # doesn't support sizes" from expected_max and select_per_layer (review pass)
    a = _placement([[0, 1, 2, 3]], 4, Topology(4, 2))
    b = _placement([[0, 2, 1, 3]], 4, Topology(4, 2))
    scenarios = torch.rand(3, 1, 4)
    for kind, bad in (("nested", torch.nested.nested_tensor(list(scenarios))),
                      ("quantized", torch.quantize_per_tensor(scenarios, 0.1, 0, torch.qint32))):
        with pytest.raises(TypeError, match=f"scenarios is a {kind} tensor"):
            expected_max(a, bad)
        with pytest.raises(TypeError, match=f"scenarios is a {kind} tensor"):
            select_per_layer([a, b], bad)
    select_per_layer([a, b], scenarios).validate()
