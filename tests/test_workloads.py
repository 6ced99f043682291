"""Tests for eplb.tools.generator: presets, determinism, calibration against SKEW_STATS targets."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.tools import generator as wl
from eplb.tools.generator import (
    PRESETS,
    TARGETS,
    ModelShape,
    WorkloadConfig,
    generate_loads,
    generate_trace,
    rank_correlation,
    skew_stats,
)


def within(name: str, value: float | None) -> bool:
    lo, hi = TARGETS[name]
    return value is not None and lo <= value <= hi


# --------------------------------------------------------------------------- presets
EXPECTED_SHAPES = {
    "deepseek-v3": (58, 256, 8, 8, 3),
    "kimi-k2": (60, 384, 8, 1, 1),
    "qwen3-235b": (94, 128, 8, 1, 0),
    "qwen3-30b": (48, 128, 8, 1, 0),
    "gpt-oss-120b": (36, 128, 4, 1, 0),
    "mixtral-8x7b": (32, 8, 2, 1, 0),
}


@pytest.mark.parametrize(("name", "dims"), sorted(EXPECTED_SHAPES.items()))
def test_presets_have_documented_shapes(name: str, dims: tuple[int, ...]) -> None:
    shape = PRESETS[name]
    assert shape.name == name
    got = (shape.num_layers, shape.num_experts, shape.top_k, shape.num_groups,
           shape.first_moe_layer)
    assert got == dims
    assert shape.layer_ids == list(range(dims[4], dims[4] + dims[0]))
    loads = generate_loads(name, seed=0)
    assert loads.shape == (dims[0], dims[1])
    assert loads.dtype == torch.float64


def test_model_shape_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="num_experts"):
        ModelShape("x", 4, 10, 2, num_groups=3)
    with pytest.raises(ValueError, match="top_k"):
        ModelShape("x", 4, 4, 8)
    with pytest.raises(ValueError, match="num_layers"):
        ModelShape("x", 0, 4, 2)


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="deepseek-v3"):
        generate_loads("deepseek-v9")
    with pytest.raises(TypeError, match="preset"):
        generate_trace(42, steps=2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spike_prob": 1.5},
        {"sigma_range": (0.9, 0.4)},
        {"drift_fraction": -0.1},
        {"tokens_per_step": 0},
        {"regime_correlations": (2.0,)},
        {"regime_schedule": ((0, 1),)},
        {"group_fraction": 1.0},
    ],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="WorkloadConfig"):
        WorkloadConfig(**kwargs)


def test_bad_generator_arguments() -> None:
    with pytest.raises(ValueError, match="steps"):
        generate_trace("mixtral-8x7b", steps=0)
    with pytest.raises(ValueError, match="regime"):
        generate_trace("mixtral-8x7b", steps=4, regime="weekend")
    with pytest.raises(ValueError, match="tokens"):
        generate_loads("mixtral-8x7b", tokens=-1)
    with pytest.raises(ValueError, match="sigma"):
        generate_loads("mixtral-8x7b", sigma=float("nan"))


# --------------------------------------------------------------------------- determinism
def test_generate_loads_is_deterministic_by_seed() -> None:
    a = generate_loads("qwen3-30b", seed=7)
    b = generate_loads("qwen3-30b", seed=7)
    c = generate_loads("qwen3-30b", seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_trace_is_deterministic_by_seed() -> None:
    kw = {"steps": 6, "tokens_per_step": 128, "num_layers": 4}
    a = generate_trace("deepseek-v3", seed=3, regime="prefill-decode", **kw)
    b = generate_trace("deepseek-v3", seed=3, regime="prefill-decode", **kw)
    c = generate_trace("deepseek-v3", seed=4, regime="prefill-decode", **kw)
    assert torch.equal(a.counts, b.counts)
    assert not torch.equal(a.counts, c.counts)
    assert a.meta == b.meta


# --------------------------------------------------------------------------- generate_loads
def test_generate_loads_sums_and_overrides() -> None:
    loads = generate_loads("deepseek-v3", seed=1, num_layers=5, num_experts=64, tokens=1000)
    assert loads.shape == (5, 64)
    assert bool((loads > 0).all())
    torch.testing.assert_close(loads.sum(-1), torch.full((5,), 8000.0, dtype=torch.float64))


def test_generate_loads_fixed_sigma() -> None:
    loads = generate_loads("kimi-k2", seed=0, sigma=0.5, spike_prob=0.0)
    stats = skew_stats(loads, gpus=0)
    # the tail transform and the soft ceiling move the sample std only slightly
    assert 0.42 <= stats["sigma_min"] <= stats["sigma_max"] <= 0.58
    wide = skew_stats(generate_loads("kimi-k2", seed=0, sigma=(0.4, 1.1)), gpus=0)
    assert wide["sigma_median"] > stats["sigma_median"]


@pytest.fixture(scope="module")
def deepseek_windows() -> list[dict]:
    return [skew_stats(generate_loads("deepseek-v3", seed=s)) for s in range(5)]


@pytest.mark.parametrize(
    "name",
    ["max_mean_median", "max_mean_min", "max_mean_max", "sigma_median", "sigma_min", "sigma_max",
     "gpu_max_mean_median"],
)
def test_generate_loads_matches_skew_targets(deepseek_windows: list[dict], name: str) -> None:
    values = [s[name] for s in deepseek_windows]
    assert all(within(name, v) for v in values), (name, values, TARGETS[name])


def test_later_layers_more_skewed(deepseek_windows: list[dict]) -> None:
    # C4: depth trend; compare first and last third, median over seeds
    first = sorted(s["max_mean_thirds"][0] for s in deepseek_windows)[2]
    last = sorted(s["max_mean_thirds"][2] for s in deepseek_windows)[2]
    assert last > first


def test_spike_layers_reach_height() -> None:
    cfg = WorkloadConfig(spike_prob=1.0, spike_height=(12.0, 12.0))
    loads = generate_loads("deepseek-v3", seed=0, config=cfg)
    ratio = loads.max(-1).values / loads.mean(-1)
    assert bool((ratio >= 12.0 - 1e-6).all())
    # never beyond a 1/top_k share
    assert float(ratio.max()) <= 256 / 8 + 1e-6


def test_mixtral_is_nearly_balanced() -> None:
    stats = skew_stats(generate_loads("mixtral-8x7b", seed=0), gpus=0)
    # C11: Mixtral aggregate max/mean 1.1-1.3
    assert 1.05 <= stats["max_mean_median"] <= 1.45


# --------------------------------------------------------------------------- generate_trace
@pytest.fixture(scope="module")
def deepseek_trace():
    return generate_trace("deepseek-v3", steps=150, seed=0)


def test_trace_is_a_generated_load_trace(deepseek_trace) -> None:
    tr = deepseek_trace
    assert tr.counts.shape == (150, 58, 256)
    assert tr.counts.dtype == torch.float64
    assert tr.layer_ids == list(range(3, 61))
    assert tr.format == "generated"
    assert tr.meta["top_k"] == 8
    assert tr.meta["tokens_per_step"] == 4096
    assert len(tr.meta["regime"]) == 150


def test_trace_counts_are_nonnegative_integers(deepseek_trace) -> None:
    c = deepseek_trace.counts
    assert bool((c >= 0).all())
    assert torch.equal(c, c.round())
    assert bool((c.sum(-1) == 4096 * 8).all())


@pytest.mark.parametrize(
    "name",
    ["max_mean_median", "sigma_median", "gpu_max_mean_median", "step_max_mean_mean",
     "step_max_mean_p90", "step_gpu_max_mean_mean"],
)
def test_trace_matches_skew_targets(deepseek_trace, name: str) -> None:
    stats = skew_stats(deepseek_trace)
    assert within(name, stats[name]), (name, stats[name], TARGETS[name])


def test_trace_window_correlation_at_1k_tokens(deepseek_trace) -> None:
    stats = skew_stats(deepseek_trace, window_tokens=1024)
    assert stats["window_steps"] == 1  # 4096 tokens per step
    assert within("window_corr_1k_median", stats["window_corr_median"])
    # larger windows stay correlated (hot sets persist for hundreds of steps)
    for steps in (10, 50):
        corr = skew_stats(deepseek_trace, window_steps=steps)["window_corr_median"]
        assert corr >= 0.9, (steps, corr)


def test_window_correlation_with_small_steps() -> None:
    tr = generate_trace("qwen3-30b", steps=100, seed=2, tokens_per_step=256)
    stats = skew_stats(tr, window_tokens=1024)
    assert stats["window_steps"] == 4
    assert within("window_corr_1k_median", stats["window_corr_median"])


def test_trace_aggregate_follows_generate_loads_popularity(deepseek_trace) -> None:
    base = generate_loads("deepseek-v3", seed=0)
    rho = rank_correlation(deepseek_trace.total(), base)
    assert float(rho.median()) > 0.8


def test_bursty_config_reaches_p2_burstiness() -> None:
    tr = generate_trace("deepseek-v3", steps=60, seed=0, config=wl.BURSTY_CONFIG)
    stats = skew_stats(tr)
    assert stats["step_max_mean_mean"] >= 10.0


@pytest.mark.parametrize(
    ("regime", "target"),
    [("prefill-decode", "prefill_decode_rank_corr"), ("domain-shift", "domain_rank_corr")],
)
def test_regime_switches_hit_rank_correlation(regime: str, target: str) -> None:
    tr = generate_trace("deepseek-v3", steps=200, seed=5, regime=regime, regime_period=50)
    regimes = tr.meta["regime"]
    assert len(set(regimes)) == (2 if regime == "prefill-decode" else 3)
    stats = skew_stats(tr)
    assert within(target, stats["regime_rank_corr"]), (stats["regime_rank_corr"], TARGETS[target])


def test_custom_regime_schedule() -> None:
    cfg = WorkloadConfig(regime_correlations=(0.0,))
    tr = generate_trace("qwen3-30b", steps=20, seed=1, config=cfg, regime=[(0, 0), (10, 1)],
                        tokens_per_step=512)
    assert tr.meta["regime"] == [0] * 10 + [1] * 10
    with pytest.raises(ValueError, match="regime"):
        generate_trace("qwen3-30b", steps=4, regime=[(0, 3)])


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 3),
    experts=st.sampled_from([2, 5, 8, 16, 33, 64]),
    k_frac=st.floats(0.0, 1.0),
    tokens=st.integers(1, 300),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_trace_invariants_any_shape(layers, experts, k_frac, tokens, steps, seed) -> None:
    top_k = max(1, round(k_frac * experts))
    shape = ModelShape("tiny", layers, experts, top_k)
    tr = generate_trace(shape, steps=steps, seed=seed, tokens_per_step=tokens)
    c = tr.counts
    assert c.shape == (steps, layers, experts)
    assert bool((c >= 0).all())
    assert torch.equal(c, c.round())
    assert bool((c.sum(-1) == tokens * top_k).all())


# --------------------------------------------------------------------------- skew_stats
def test_skew_stats_on_known_input() -> None:
    # one layer, 64 experts: one at 4, the rest at 1 -> max/mean = 4 / (67/64)
    w = torch.ones(1, 64, dtype=torch.float64)
    w[0, 5] = 4.0
    stats = skew_stats(w)
    assert math.isclose(stats["max_mean_median"], 4.0 / (67 / 64))
    # EP32: 2 experts per GPU; GPU 2 holds 4 + 1 = 5, mean 67/32
    assert math.isclose(stats["gpu_max_mean_median"], 5.0 / (67 / 32))
    assert stats["step_max_mean_mean"] is None  # a single window has no per-step stats
    assert stats["window_corr_median"] is None


def test_skew_stats_per_step_and_windows() -> None:
    pattern = torch.arange(1, 33, dtype=torch.float64).repeat(2, 1)  # [L=2, E=32]
    counts = pattern.expand(6, 2, 32).clone()
    stats = skew_stats(counts, window_steps=2, gpus=8)
    assert stats["window_steps"] == 2
    assert math.isclose(stats["window_corr_median"], 1.0)
    assert math.isclose(stats["step_max_mean_mean"], 32 / 16.5)
    # 8 GPUs x 4 contiguous experts: last GPU holds 29..32 = 122, mean 528 / 8 = 66
    assert math.isclose(stats["step_gpu_max_mean_mean"], 122 / 66)
    assert stats["gpu_max_mean_median"] is not None


def test_rank_correlation_extremes() -> None:
    a = torch.rand(3, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rank_correlation(a, a * 2), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(rank_correlation(a, 1 / a), -torch.ones(3, dtype=torch.float64))
    stats = skew_stats(a, reference=a)
    assert math.isclose(stats["rank_corr_reference"], 1.0)


def test_skew_stats_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        skew_stats(torch.ones(4))
    with pytest.raises(ValueError, match=">= 0"):
        skew_stats(-torch.ones(2, 4))
    with pytest.raises(ValueError, match="shapes differ"):
        rank_correlation(torch.ones(2, 4), torch.ones(2, 5))


# ------------------------------------------------------------------ hostile arguments
@pytest.mark.parametrize("kwargs", [{"sigma": 300.0}, {"sigma": 1e300}, {"sigma": (1e6, 1e6)}])
def test_a_skew_beyond_float64_is_refused_not_nan(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="skew is beyond float64"):
        generate_loads("deepseek-v2-lite", **kwargs)
    with pytest.raises(ValueError, match="skew is beyond float64"):
        generate_trace("deepseek-v2-lite", 2, **kwargs)


def test_infinite_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="tokens must be a finite positive number"):
        generate_loads("deepseek-v2-lite", tokens=math.inf)


def test_the_size_is_checked_before_a_named_regime_lists_its_segments() -> None:
    # a segment per step of 10**12 steps was a MemoryError (or, at 10**9, minutes of work)
    with pytest.raises(ValueError, match="GiB of counts"):
        generate_trace("deepseek-v2-lite", 10**12, regime="prefill-decode", regime_period=1)


def test_the_size_cap_counts_the_peak_of_generating_and_writing():
    """8 GiB of float64 counts took about 20 GiB at the peak of `eplb generate` (attacker
    pass): the cap counts that peak, 2.5× the counts."""
    with pytest.raises(ValueError, match=r"3\.3 GiB of counts, about 2\.5× that at the peak"):
        generate_trace("deepseek-v3", 30_000)


def test_a_step_sum_beyond_float64s_integers_is_refused():
    """Each step sums to tokens_per_step × top_k: above 2**53 float64 rounds it (a step of
    2**60 + 1 tokens summed to 2 less than documented; attacker pass)."""
    with pytest.raises(ValueError, match=r"passes 2\*\*53"):
        generate_trace("deepseek-v2-lite", 2, tokens_per_step=2**60 + 1)


@pytest.mark.parametrize("regime", [[("a", 1)], [(0, 1, 2)], [1, 2], 5])
def test_a_malformed_regime_schedule_is_named(regime: object) -> None:
    with pytest.raises(ValueError, match="regime must be a name or a sequence"):
        generate_trace("deepseek-v2-lite", 2, regime=regime)


@pytest.mark.parametrize("period", [1.5, True, "3", 0])
def test_regime_period_must_be_a_positive_integer(period: object) -> None:
    """``int()`` used to take 1.5 as 1, True as 1 and "3" as 3."""
    with pytest.raises(ValueError, match="regime_period must be a positive integer"):
        generate_trace("deepseek-v2-lite", 8, regime="prefill-decode", regime_period=period)
