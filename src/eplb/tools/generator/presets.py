"""Model shapes and generator configurations: what each preset models.

A :class:`ModelShape` is what a planner needs to know about a model (layers, experts,
groups, top-k, slots); a :class:`WorkloadConfig` is how its traffic behaves (skew, drift,
bursts, regimes). :data:`PRESETS` and :data:`PRESET_CONFIGS` name the built-in ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """The MoE shape of a model: what a planner needs to know about it.

    Attributes:
        name: preset name.
        num_layers: number of MoE layers ``L`` (dense layers excluded).
        num_experts: routed experts per layer ``E`` (shared experts excluded).
        top_k: experts each token is routed to.
        num_groups: expert groups for group-limited routing (1 if none).
        first_moe_layer: model index of the first MoE layer; MoE layers are assumed contiguous,
            so ``layer_ids = first_moe_layer .. first_moe_layer + L - 1``.
    """

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    num_groups: int = 1
    first_moe_layer: int = 0

    def __post_init__(self) -> None:
        for attr in ("num_layers", "num_experts", "top_k", "num_groups"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelShape.{attr} must be a positive int, got {value!r}")
        if isinstance(self.first_moe_layer, bool) or not isinstance(self.first_moe_layer, int) or (
            self.first_moe_layer < 0
        ):
            raise ValueError(
                "ModelShape.first_moe_layer must be a non-negative int, got "
                f"{self.first_moe_layer!r}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"ModelShape.top_k ({self.top_k}) exceeds num_experts ({self.num_experts})"
            )
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"ModelShape.num_experts ({self.num_experts}) is not divisible by num_groups "
                f"({self.num_groups})"
            )

    @property
    def layer_ids(self) -> list[int]:
        """``[L]`` model layer index of each MoE layer."""
        return list(range(self.first_moe_layer, self.first_moe_layer + self.num_layers))


# Shapes from the models' published config.json files.
PRESETS: dict[str, ModelShape] = {
    # 61 layers, first_k_dense_replace=3 -> MoE layers 3..60; n_group=8, topk_group=4.
    "deepseek-v3": ModelShape("deepseek-v3", 58, 256, 8, num_groups=8, first_moe_layer=3),
    # 61 layers, first_k_dense_replace=1 -> MoE layers 1..60 (60 of them); n_group=1.
    "kimi-k2": ModelShape("kimi-k2", 60, 384, 8, num_groups=1, first_moe_layer=1),
    # every layer is MoE (decoder_sparse_step=1, no mlp_only_layers).
    "qwen3-235b": ModelShape("qwen3-235b", 94, 128, 8),
    "qwen3-30b": ModelShape("qwen3-30b", 48, 128, 8),
    "gpt-oss-120b": ModelShape("gpt-oss-120b", 36, 128, 4),
    "mixtral-8x7b": ModelShape("mixtral-8x7b", 32, 8, 2),
    # the architecture of the ESFT per-token traces in data/real (27 layers, layer 0 dense).
    "deepseek-v2-lite": ModelShape("deepseek-v2-lite", 26, 64, 6, num_groups=1, first_moe_layer=1),
}


PREFILL_DECODE_RANK_CORR = 0.74
DOMAIN_RANK_CORR = 0.2
# Latent Spearman used by the named schedules: a little above the targets because sampling noise,
# request bursts and drift lower the correlation measured on segment aggregates (calibrated with
# the default config, 100-step segments, 4096 tokens/step).
PREFILL_DECODE_LATENT_RANK = 0.80
DOMAIN_LATENT_RANK = 0.24


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class WorkloadConfig:
    """Knobs of the synthetic workload. Defaults are calibrated to DeepSeek-V3 (SKEW_STATS.md).

    Attributes:
        sigma_median: median over layers of the per-layer std of log-popularity (C2: 0.59
            decode, 0.66-0.86 prefill).
        sigma_range: per-layer sigma is clipped to this range (C2: 0.40-1.07).
        sigma_depth_slope: change of log(sigma) from the first to the last layer (C4: later
            layers more skewed; real thirds 0.55 / 0.68 / 0.72).
        sigma_spread: std of the per-layer log(sigma) jitter around the depth trend.
        group_fraction: share of the latent variance that is common to an expert group (models
            with ``num_groups > 1``). DeepSeek's real loads have group totals with log-std
            0.25-0.42; that, not the expert tail, is what puts contiguous EP32 per-GPU max/mean at
            2.0-2.6 (1.7-2.0 with experts shuffled).
        tail: Tukey-g strength of the log-popularity: layer ``l`` uses ``g = tail / sigma_l``
            (0 = log-normal); > 0 makes the hot tail heavier, as the real quantiles demand (C2).
        latent_knee: above this latent value (in standard deviations) the latent saturates ...
        latent_soft: ... at ``latent_knee + latent_soft`` (tanh), so no non-spike layer gets a
            hottest/mean far beyond the real maximum (~10.5x at sigma ~0.9).
        spike_prob: probability that a layer is a spike layer (C4: "isolated spikes").
        spike_height: (lo, hi) hottest/mean of a spike layer's spike expert (C1: up to 13.7).
        drift_steps: correlation time of the drifting part of log-popularity, in steps (P5:
            hot sets persist tens-hundreds of iterations).
        drift_fraction: share of the latent variance that drifts (the rest is static).
        tokens_per_step: tokens per step (iteration); each routes to ``top_k`` experts.
            4096 matches P1/P2's 128 tokens per expert at 256 experts, top-8.
        requests_per_step: concurrent request groups per step; tokens of one request share a
            bias. Fewer, longer requests mean burstier steps.
        request_sigma: std of a request's log-bias per (layer, expert).
        request_lifetime: mean number of steps a request stays in the batch (geometric).
        regime_correlations: latent Pearson correlation of regimes 1.. with the base regime 0.
        regime_schedule: ``((start_step, regime), ...)``; steps before the first entry use
            regime 0. Regime indices refer to ``(base, *regime_correlations)``.
    """

    sigma_median: float = 0.64
    sigma_range: tuple[float, float] = (0.4, 1.1)
    sigma_depth_slope: float = 0.35
    sigma_spread: float = 0.12
    tail: float = 0.1
    group_fraction: float = 0.35
    latent_knee: float = 2.5
    latent_soft: float = 0.4
    spike_prob: float = 0.05
    spike_height: tuple[float, float] = (10.0, 14.0)
    drift_steps: float = 1000.0
    drift_fraction: float = 0.25
    tokens_per_step: int = 4096
    requests_per_step: int = 8
    request_sigma: float = 0.8
    request_lifetime: float = 10.0
    regime_correlations: tuple[float, ...] = ()
    regime_schedule: tuple[tuple[int, int], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        def positive(name: str, value: float, allow_zero: bool = False) -> None:
            ok = value >= 0 if allow_zero else value > 0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok or (
                not math.isfinite(value)
            ):
                bound = ">= 0" if allow_zero else "> 0"
                raise ValueError(
                    f"WorkloadConfig.{name} must be a finite number {bound}, got {value!r}"
                )

        positive("sigma_median", self.sigma_median, allow_zero=True)
        positive("sigma_spread", self.sigma_spread, allow_zero=True)
        positive("tail", self.tail, allow_zero=True)
        positive("drift_steps", self.drift_steps)
        positive("request_sigma", self.request_sigma, allow_zero=True)
        positive("request_lifetime", self.request_lifetime)
        positive("latent_knee", self.latent_knee)
        positive("latent_soft", self.latent_soft)
        if not isinstance(self.sigma_depth_slope, (int, float)) or not math.isfinite(
            self.sigma_depth_slope
        ):
            raise ValueError(
                f"WorkloadConfig.sigma_depth_slope must be finite, got {self.sigma_depth_slope!r}"
            )
        lo, hi = float_pair("sigma_range", self.sigma_range)
        if not 0 <= lo <= hi:
            raise ValueError(
                f"WorkloadConfig.sigma_range must satisfy 0 <= lo <= hi, got {(lo, hi)}"
            )
        slo, shi = float_pair("spike_height", self.spike_height)
        if not 1 <= slo <= shi:
            raise ValueError(
                f"WorkloadConfig.spike_height must satisfy 1 <= lo <= hi, got {(slo, shi)}"
            )
        if not 0 <= self.spike_prob <= 1:
            raise ValueError(
                f"WorkloadConfig.spike_prob must be in [0, 1], got {self.spike_prob!r}"
            )
        if not 0 <= self.group_fraction < 1:
            raise ValueError(
                f"WorkloadConfig.group_fraction must be in [0, 1), got {self.group_fraction!r}"
            )
        if not 0 <= self.drift_fraction <= 1:
            raise ValueError(
                f"WorkloadConfig.drift_fraction must be in [0, 1], got {self.drift_fraction!r}"
            )
        for name in ("tokens_per_step", "requests_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"WorkloadConfig.{name} must be a positive int, got {value!r}")
        corr = tuple(float(c) for c in self.regime_correlations)
        if any(not -1 <= c <= 1 for c in corr):
            raise ValueError(f"WorkloadConfig.regime_correlations must be in [-1, 1], got {corr}")
        schedule = tuple((int(s), int(k)) for s, k in self.regime_schedule)
        starts = [s for s, _ in schedule]
        if starts != sorted(starts) or any(s < 0 for s in starts):
            raise ValueError(
                f"WorkloadConfig.regime_schedule start steps must be >= 0 and sorted, got {starts}"
            )
        bad = [k for _, k in schedule if not 0 <= k <= len(corr)]
        if bad:
            raise ValueError(
                f"WorkloadConfig.regime_schedule names regimes {bad}; only 0..{len(corr)} exist "
                f"(0 = base, then one per regime_correlations entry)"
            )
        object.__setattr__(self, "sigma_range", (lo, hi))
        object.__setattr__(self, "spike_height", (slo, shi))
        object.__setattr__(self, "regime_correlations", corr)
        object.__setattr__(self, "regime_schedule", schedule)

    def as_dict(self) -> dict[str, Any]:
        """Plain-Python dict of the knobs (for trace metadata)."""
        return asdict(self)


def float_pair(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"WorkloadConfig.{name} must be a (lo, hi) pair, got {value!r}") from None
    return lo, hi


# Model-specific overrides of the DeepSeek-calibrated defaults. Mixtral's 8 experts are nearly
# balanced (C11: aggregate max/mean 1.1-1.3) and cannot host a 10x spike at top-2.
PRESET_CONFIGS: dict[str, WorkloadConfig] = {
    "mixtral-8x7b": WorkloadConfig(
        sigma_median=0.12, sigma_range=(0.05, 0.25), spike_prob=0.0, request_sigma=0.3
    ),
}


# Burstier steps (per-step expert max/mean ~12 on average, as P2) at the cost of window
# correlation (~0.7 at 10-100 steps instead of >= 0.9): few request groups with strong biases.
BURSTY_CONFIG = WorkloadConfig(request_sigma=1.5, requests_per_step=6, request_lifetime=8.0)


def default_config(preset: str | ModelShape = "deepseek-v3") -> WorkloadConfig:
    """The calibrated default :class:`WorkloadConfig` of a preset (DeepSeek-V3's if unknown)."""
    name = preset.name if isinstance(preset, ModelShape) else str(preset)
    return PRESET_CONFIGS.get(name, WorkloadConfig())


def resolve_shape(
    preset: str | ModelShape = "deepseek-v3",
    *,
    num_layers: int | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
) -> ModelShape:
    """A preset's :class:`ModelShape`, with optional overrides of its dimensions.

    Raises:
        ValueError: unknown preset name (the message lists the known ones).
    """
    if isinstance(preset, ModelShape):
        shape = preset
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known presets: {sorted(PRESETS)}")
        shape = PRESETS[preset]
    else:
        raise TypeError(
            f"preset must be a preset name or a ModelShape, got {type(preset).__name__}"
        )
    changes: dict[str, int] = {}
    if num_layers is not None:
        changes["num_layers"] = num_layers
    if num_experts is not None:
        changes["num_experts"] = num_experts
        if num_experts % shape.num_groups:
            changes["num_groups"] = 1
    if top_k is not None:
        changes["top_k"] = top_k
    return replace(shape, **changes) if changes else shape
