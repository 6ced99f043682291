"""Calibrated synthetic expert loads: real-model shapes, skewed popularity, drift, bursts, regimes.

The generator reproduces the statistics in ``data/real/SKEW_STATS.md`` (DeepSeek-V3/R1 SGLang
dumps, TensorRT-LLM's published DeepSeek-R1 figures, ESFT per-token traces). Its model, per MoE
layer ``l`` and expert ``e`` at step ``t``:

1. **Latent popularity** ``x[t, l, e] ~ N(0, 1)`` = ``sqrt(1-d) * static + sqrt(d) * drift[t]``,
   where ``drift`` is an AR(1)/Ornstein-Uhlenbeck process with correlation time
   ``drift_steps`` (``rho = exp(-1/drift_steps)``). Hot sets therefore persist for hundreds of
   steps and drift slowly (SKEW_STATS P5, C8).
2. **Log-popularity** ``log pop = sigma_l * tukey_g(x) + spike``. ``sigma_l`` is drawn per layer
   (log-normal around ``sigma_median``, rising with depth, clipped to ``sigma_range``; C2, C4).
   Tukey's g-transform ``(exp(g x) - 1) / g`` (normalised to unit variance, ``g = tail /
   sigma_l``) makes the upper tail heavier than a log-normal, as in the real quantiles (C2: p99
   4.6x, max 10x the mean at sigma 0.59); the real excess is largest in low-sigma layers, hence
   ``g`` falling with sigma. A soft ceiling on the latent (``latent_knee``, ``latent_soft``)
   stops high-sigma layers from reaching the 20-30x that an uncapped tail gives: no real
   non-spike layer exceeds ~10.5x. Spike layers (probability ``spike_prob``) get one expert
   lifted to ``spike_height`` x the layer mean (C1, C4).
3. **Regimes**: regime ``k`` has its own latent process, mixed with the base one:
   ``x_k = c_k * x_0 + sqrt(1 - c_k^2) * y_k`` (``y_k`` an independent copy of step 1), so the
   popularity right after a switch has Pearson ``c_k`` (Spearman ``6/pi asin(c_k/2)``) with the
   base. Named schedules: prefill<->decode Spearman 0.74 (C6), domain shift 0.2 (C9); their
   latent correlations are set slightly higher so the Spearman *measured* on segment aggregates,
   through sampling noise and drift, lands on the targets.
4. **Requests**: each step holds ``requests_per_step`` request slots; a request lives a geometric
   number of steps (mean ``request_lifetime``) and carries a log-normal bias
   (``request_sigma``) on every ``(layer, expert)``. Tokens of a request route with probability
   ``pop * bias / sum(pop * bias)``; the step's routing distribution is the equal-weight mixture
   over its requests. Defaults (8 request slots, sigma 0.8, ~10-step lifetime) give per-step expert
   max/mean ~7 on average and ~11 at the 90th percentile while consecutive windows of 1 to 100
   steps still correlate >= 0.9 (C8). TRT-LLM's per-iteration average of 11.9 (P2) cannot be
   had together with that correlation in this model (bursts that strong decorrelate windows);
   :data:`BURSTY_CONFIG` reaches it (~12) at a window correlation of ~0.7.
5. **Sampling**: a step's ``tokens_per_step * top_k`` assignments are drawn as one multinomial
   from that mixture (a binary tree of binomial splits; splits of variance > 30 use the rounded
   normal approximation), so per-step loads are non-negative integers summing to
   ``tokens * top_k``. Approximation, documented: the draw is *with*
   replacement while a real token picks ``top_k`` *distinct* experts; to keep a count <= tokens in
   expectation every expert's share is capped at ``1 / top_k`` (water-filling), which only binds
   for tiny expert counts (Mixtral). Sampling the mixture as one multinomial, rather than one
   multinomial per request, slightly overstates per-step variance.

Expert groups (DeepSeek-V3: 8 groups of 32, group-limited routing): the latent carries a
per-(layer, group) component (``group_fraction`` of its variance). In the real DeepSeek dumps the
group totals vary (log-std 0.25-0.42), and that is what makes contiguous EP32 per-GPU max/mean
2.0-2.6; with experts shuffled it drops to 1.7-2.0. Group-limited routing itself (top-4 groups
per token) is not modelled. Models without groups (``num_groups == 1``) have i.i.d. experts.

Known deviation: the coldest experts are ~0.2x the mean, the real dumps go down to 0.07-0.17x
(the real lower tail is heavier than this model's).

Everything is vectorised over layers and experts with torch; steps are processed in chunks, so
1000 steps of DeepSeek-V3 take a few seconds on one CPU thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from eplb.core.inputs import as_seed
from eplb.core.topology import positive_int
from eplb.core.trace import LoadTrace
from eplb.tools.generator.presets import (
    DOMAIN_LATENT_RANK,
    PREFILL_DECODE_LATENT_RANK,
    ModelShape,
    WorkloadConfig,
    default_config,
    float_pair,
    resolve_shape,
)


# --------------------------------------------------------------------------- popularity model
def _tukey_g(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Tukey's g-transform of a standard normal, rescaled to unit variance.

    ``x: [..., L, E]``, ``g: [L, 1]`` (g = 0 is the identity).
    """
    g = g.to(x.dtype)
    safe = torch.where(g > 1e-9, g, torch.ones_like(g))
    std = (torch.exp(safe * safe) * torch.expm1(safe * safe)).sqrt() / safe
    out = torch.expm1(safe * x) / (safe * std)
    return torch.where(g > 1e-9, out, x)


def _latent_corr(rank_corr: float) -> float:
    """Pearson correlation of a bivariate normal with the given Spearman correlation."""
    return 2.0 * math.sin(math.pi * rank_corr / 6.0)


@dataclass
class _Process:
    """One regime's latent process: static parts and AR(1) drifts.

    ``*_e`` are per expert ``[L, E]``, ``*_g`` per expert group ``[L, G]`` (``G = 1`` when the
    model has no groups; then the group part is not used).
    """

    static_e: torch.Tensor
    drift_e: torch.Tensor
    static_g: torch.Tensor
    drift_g: torch.Tensor
    step: int = 0  # the step the drift state belongs to


class _Model:
    """Random draws shared by :func:`generate_loads` and :func:`generate_trace`.

    Draw order from the generator is fixed (layer sigmas, spikes, base process, regimes), so the
    same seed gives the same base popularity in both functions.
    """

    def __init__(self, shape: ModelShape, cfg: WorkloadConfig, gen: torch.Generator,
                 sigma_override: float | None = None) -> None:
        L, E, k = shape.num_layers, shape.num_experts, shape.top_k
        self.shape, self.cfg = shape, cfg
        lo, hi = cfg.sigma_range
        depth = torch.linspace(-0.5, 0.5, L, dtype=torch.float64) if L > 1 else torch.zeros(1)
        jitter = torch.randn(L, generator=gen, dtype=torch.float64)
        if sigma_override is not None:
            self.sigma = torch.full((L,), float(sigma_override), dtype=torch.float64)
        else:
            log_sigma = (math.log(max(cfg.sigma_median, 1e-12)) + cfg.sigma_depth_slope * depth
                         + cfg.sigma_spread * jitter)
            self.sigma = log_sigma.exp().clamp(lo, hi)
        # Spike layers: one expert's log-popularity is lifted so it reaches `height` x mean.
        spike_u = torch.rand(L, generator=gen, dtype=torch.float64)
        height_u = torch.rand(L, generator=gen, dtype=torch.float64)
        # A share above 1/top_k is impossible (tokens pick distinct experts): cap the height.
        max_height = 0.5 * E / k
        h_lo, h_hi = cfg.spike_height
        self.spike_height = (h_lo + (h_hi - h_lo) * height_u).clamp(max=max_height)
        self.spike_layer = (spike_u < cfg.spike_prob) & (self.spike_height > 1.0)
        self.spike_expert = [torch.randint(E, (L,), generator=gen)]
        self.groups = shape.num_groups
        self.group_share = cfg.group_fraction if self.groups > 1 else 0.0
        self.base = self._new_process(gen)
        self.regime_corr = [1.0, *cfg.regime_correlations]
        self.regimes: list[_Process] = []
        for c in cfg.regime_correlations:
            self.regimes.append(self._new_process(gen))
            # A regime keeps the base's spike expert with probability c (else a new one).
            keep = torch.rand(L, generator=gen, dtype=torch.float64) < c
            other = torch.randint(E, (L,), generator=gen)
            self.spike_expert.append(torch.where(keep, self.spike_expert[0], other))
        self.rho = math.exp(-1.0 / cfg.drift_steps)

    def _new_process(self, gen: torch.Generator) -> _Process:
        L, E, G = self.shape.num_layers, self.shape.num_experts, self.groups
        return _Process(
            static_e=torch.randn(L, E, generator=gen, dtype=torch.float64),
            drift_e=torch.randn(L, E, generator=gen, dtype=torch.float64),
            static_g=torch.randn(L, G, generator=gen, dtype=torch.float64),
            drift_g=torch.randn(L, G, generator=gen, dtype=torch.float64),
        )

    def latent(self, proc: _Process) -> torch.Tensor:
        """``[L, E]`` standard-normal latent: (static + drift) x (expert + group) parts."""
        d, f = self.cfg.drift_fraction, self.group_share
        sd, dd = math.sqrt(1 - d), math.sqrt(d)
        x = sd * proc.static_e + dd * proc.drift_e
        if f > 0:
            grp = sd * proc.static_g + dd * proc.drift_g
            per = self.shape.num_experts // self.groups
            x = math.sqrt(1 - f) * x + math.sqrt(f) * grp.repeat_interleave(per, dim=-1)
        return x

    def advance(self, regime: int, step: int, gen: torch.Generator) -> None:
        """Bring the drift of the processes regime ``regime`` uses to ``step``.

        An AR(1) process jumps ``k`` steps exactly as ``rho^k x + sqrt(1 - rho^2k) noise``, so
        inactive regimes are not stepped while they wait.
        """
        procs = [self.base] if regime == 0 else [self.base, self.regimes[regime - 1]]
        for proc in procs:
            k = step - proc.step
            if k <= 0:
                continue
            rho = self.rho**k
            scale = math.sqrt(max(0.0, 1 - rho * rho))
            for drift in (proc.drift_e, proc.drift_g):
                # float32 noise: 3x cheaper to draw, and ample for a latent N(0, 1)
                noise = torch.randn(drift.shape, generator=gen, dtype=torch.float32)
                drift.mul_(rho).add_(noise.to(torch.float64), alpha=scale)
            proc.step = step

    def log_popularity(self, latent: torch.Tensor, regime: int) -> torch.Tensor:
        """``latent: [..., L, E]`` -> log-popularity ``[..., L, E]`` (before normalisation)."""
        return self._add_spikes(self.shape_latent(latent), regime)

    def shape_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """``sigma_l * tukey_g(latent, tail / sigma_l)``: ``[..., L, E]`` log-popularity."""
        g = (self.cfg.tail / self.sigma.clamp_min(1e-6)).clamp(max=0.25)
        a, b = self.cfg.latent_knee, self.cfg.latent_soft
        # Soft ceiling on the latent: above the knee it saturates at knee + soft.
        latent = torch.where(latent > a, a + b * torch.tanh((latent - a) / b), latent)
        return self.sigma[:, None] * _tukey_g(latent, g[:, None])

    def _add_spikes(self, logp: torch.Tensor, regime: int) -> torch.Tensor:
        if not bool(self.spike_layer.any()):
            return logp
        E = self.shape.num_experts
        layers = torch.nonzero(self.spike_layer).squeeze(1)
        experts = self.spike_expert[regime][layers]
        # Solve for the weight p of the spike expert given the others' sum S:
        # p / ((S + p) / E) = h  ->  p = h S / (E - h).
        sel = logp[..., layers, :]
        pop = (sel - sel.amax(-1, keepdim=True)).exp()
        idx = experts.expand(sel.shape[:-1]).unsqueeze(-1)
        hot = pop.gather(-1, idx).squeeze(-1)
        rest = pop.sum(-1) - hot
        h = self.spike_height[layers]
        target = h * rest / (E - h)
        lift = (target / hot).log().clamp_min(0.0)  # only ever raise the spike expert
        out = logp.clone()
        out[..., layers, :] = sel.scatter_add(-1, idx, lift.unsqueeze(-1))
        return out

    def regime_latent(self, regime: int) -> torch.Tensor:
        base = self.latent(self.base)
        if regime == 0:
            return base
        c = self.regime_corr[regime]
        return c * base + math.sqrt(max(0.0, 1 - c * c)) * self.latent(self.regimes[regime - 1])


def _softmax(logp: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logp, dim=-1)


def _cap_shares(p: torch.Tensor, cap: float, iters: int = 8) -> torch.Tensor:
    """Water-fill ``p [..., E]`` (rows sum to 1) so that no share exceeds ``cap``."""
    if cap >= 1.0:
        return p
    for _ in range(iters):
        over = p > cap
        if not bool(over.any()):
            break
        excess = (p - cap).clamp_min(0).sum(-1, keepdim=True)
        p = torch.where(over, torch.full_like(p, cap), p)
        free = torch.where(over, torch.zeros_like(p), p)
        p = p + excess * free / free.sum(-1, keepdim=True).clamp_min(1e-300)
    return p


def _multinomial(total: float, probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Multinomial draws of ``total`` items for every row of ``probs [..., E]``.

    A binary tree of binomial splits: ``log2(E)`` vectorised passes instead of ``total``
    categorical draws per row. A split whose binomial variance ``n q (1 - q)`` exceeds
    :data:`_NORMAL_SPLIT_VARIANCE` is drawn from the rounded normal approximation (clamped to
    ``[0, n]``; skewness error below 1/sqrt(variance)); smaller ones use exact
    ``torch.binomial``, which is ~10x slower. Returns float64 integer counts summing to
    ``total`` in every row.
    """
    E = probs.shape[-1]
    lead = probs.shape[:-1]
    width = 1 << max(0, (E - 1).bit_length())
    p = probs.reshape(-1, E)
    if width != E:
        p = torch.cat([p, p.new_zeros(p.shape[0], width - E)], dim=1)
    # levels[i] holds the probability mass of the nodes at depth log2(width) - i.
    levels = [p]
    while levels[-1].shape[1] > 1:
        cur = levels[-1]
        levels.append(cur[:, 0::2] + cur[:, 1::2])
    counts = torch.full((p.shape[0], 1), float(total), dtype=torch.float64)
    for level, mass in zip(reversed(levels[:-1]), reversed(levels[1:]), strict=True):
        q = (level[:, 0::2] / mass.clamp_min(1e-300)).clamp_(0.0, 1.0)
        var = counts * q * (1 - q)
        # normal approximation everywhere (cheap), then exact binomials where variance is small
        z = torch.randn(counts.shape, generator=gen, dtype=torch.float32)
        left = torch.minimum((counts * q + var.sqrt() * z).round_().clamp_min_(0), counts)
        small = var <= _NORMAL_SPLIT_VARIANCE
        if bool(small.any()):
            left[small] = torch.binomial(counts[small], q[small], generator=gen)
        counts = torch.stack([left, counts - left], dim=-1).reshape(p.shape[0], -1)
    return counts[:, :E].reshape(*lead, E)


# Binomial splits with a larger variance are drawn from the normal approximation.
_NORMAL_SPLIT_VARIANCE = 30.0


# --------------------------------------------------------------------------- public generators
def _config_for(
    shape: ModelShape,
    config: WorkloadConfig | None,
    **overrides: Any,
) -> WorkloadConfig:
    cfg = config if config is not None else default_config(shape)
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(cfg, **changes) if changes else cfg


def generate_loads(
    preset: str | ModelShape = "deepseek-v3",
    *,
    seed: int = 0,
    num_layers: int | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    sigma: float | tuple[float, float] | None = None,
    spike_prob: float | None = None,
    tokens: float | None = None,
    config: WorkloadConfig | None = None,
) -> torch.Tensor:
    """One window's expected expert loads: popularity x tokens x top_k (no sampling noise).

    Args:
        preset: a :data:`PRESETS` name or a :class:`ModelShape`.
        seed: RNG seed; the result is a pure function of the arguments.
        num_layers, num_experts, top_k: override the preset's dimensions.
        sigma: a float gives every layer that log-popularity std (no depth trend); a
            ``(lo, hi)`` pair sets ``sigma_range`` with the median at ``sqrt(lo * hi)``.
        spike_prob: override the probability of a spike layer.
        tokens: tokens in the window (default ``1000 * tokens_per_step``, the engines' 1000-step
            recording window); rows sum to ``tokens * top_k``.
        config: base :class:`WorkloadConfig` (default: :func:`default_config` of the preset).

    Returns:
        ``[L, E]`` float64 expected loads. Same seed and shape -> the same base popularity as
        step 0 of :func:`generate_trace`.
    """
    shape = resolve_shape(preset, num_layers=num_layers, num_experts=num_experts, top_k=top_k)
    check_trace_size(1, shape.num_layers, shape.num_experts)
    cfg, sigma_override = _apply_sigma(_config_for(shape, config, spike_prob=spike_prob), sigma)
    if tokens is None:
        tokens = 1000.0 * cfg.tokens_per_step
    if not isinstance(tokens, (int, float)) or isinstance(tokens, bool) or not (
            tokens > 0 and math.isfinite(tokens)):
        raise ValueError(f"tokens must be a finite positive number, got {tokens!r}")
    gen = torch.Generator().manual_seed(as_seed(seed))
    model = _Model(shape, cfg, gen, sigma_override)
    pop = _cap_shares(_softmax(model.log_popularity(model.regime_latent(0), 0)), 1.0 / shape.top_k)
    _check_finite(pop, cfg, sigma)
    return pop * (float(tokens) * shape.top_k)


def _check_finite(probs: torch.Tensor, cfg: WorkloadConfig, sigma: object) -> None:
    """Refuse popularities that float64 could not represent (skews far beyond any model's)."""
    if not bool(torch.isfinite(probs).all()):
        raise ValueError(
            f"the workload's skew is beyond float64 (sigma={sigma!r}, sigma_range="
            f"{cfg.sigma_range}, request_sigma={cfg.request_sigma}): the expert popularities "
            "come out NaN; real workloads have per-layer sigma 0.4-1.1 (the default "
            "sigma_range) and work up to sigma ~100")


def _apply_sigma(
    cfg: WorkloadConfig, sigma: float | tuple[float, float] | None
) -> tuple[WorkloadConfig, float | None]:
    if sigma is None:
        return cfg, None
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        return cfg, float(sigma)
    lo, hi = float_pair("sigma_range", sigma)
    if not 0 < lo <= hi:
        raise ValueError(f"sigma range must satisfy 0 < lo <= hi, got {(lo, hi)}")
    return replace(cfg, sigma_range=(lo, hi), sigma_median=math.sqrt(lo * hi)), None


def _regime_config(
    cfg: WorkloadConfig, regime: str | Sequence[tuple[int, int]] | None, steps: int,
    period: int | None,
) -> WorkloadConfig:
    """Resolve the ``regime`` shortcut of :func:`generate_trace` into config fields."""
    if regime is None:
        return cfg
    if isinstance(regime, str):  # not ``regime == "config"`` first: an array of pairs
        if regime == "config":   # would compare element-wise and raise NumPy's error
            return cfg
        # int() would take 1.5 as 1, True as 1 and "3" as 3
        period = max(1, steps // 4) if period is None else positive_int("regime_period", period)
        starts = list(range(0, steps, period))
        if regime == "stationary":
            return replace(cfg, regime_correlations=(), regime_schedule=())
        if regime == "prefill-decode":
            corr = (_latent_corr(PREFILL_DECODE_LATENT_RANK),)
            schedule = tuple((s, i % 2) for i, s in enumerate(starts))
            return replace(cfg, regime_correlations=corr, regime_schedule=schedule)
        if regime == "domain-shift":
            # Excursions from the base domain: 0, 1, 0, 2, 0, 3, ... so that every switch is
            # between two workloads of Spearman ~0.2 (two foreign domains would share only c^2).
            n = 3
            corr = (_latent_corr(DOMAIN_LATENT_RANK),) * n
            cycle = [r for d in range(1, n + 1) for r in (0, d)]
            schedule = tuple((s, cycle[i % len(cycle)]) for i, s in enumerate(starts))
            return replace(cfg, regime_correlations=corr, regime_schedule=schedule)
        raise ValueError(
            f"unknown regime {regime!r}; expected 'stationary', 'prefill-decode', 'domain-shift', "
            f"'config' or a sequence of (start_step, regime_index)"
        )
    try:
        schedule = tuple((int(s), int(k)) for s, k in regime)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"regime must be a name or a sequence of (start_step, regime_index) "
                         f"pairs of ints, got {regime!r} ({exc})") from None
    return replace(cfg, regime_schedule=schedule)


def _regime_per_step(cfg: WorkloadConfig, steps: int) -> torch.Tensor:
    regime = torch.zeros(steps, dtype=torch.int64)
    for start, k in cfg.regime_schedule:
        if start < steps:
            regime[start:] = k
    return regime


#: the most memory generating one trace may take at its peak: a typo'd step count must
#: fail with a message, not take the host's memory
MAX_TRACE_BYTES = 8 << 30
#: peak memory over the float64 counts' own size: generating them takes 1.3× (the
#: per-chunk work), writing them (``eplb generate``) one more copy. Measured 2.3× plus
#: 0.3 GB (attacker pass: a cap on the counts alone let 8 GiB of counts reach ~20 GiB)
_PEAK_OVER_COUNTS = 2.5


def check_trace_size(steps: int, layers: int, experts: int) -> None:
    """Refuse loads whose generation would pass :data:`MAX_TRACE_BYTES` at its peak
    (:data:`_PEAK_OVER_COUNTS` times the float64 counts) before any work."""
    need = steps * layers * experts * 8  # the float64 counts alone
    if need * _PEAK_OVER_COUNTS > MAX_TRACE_BYTES:
        raise ValueError(
            f"{steps} steps of {layers} layers × {experts} experts need {need / 2**30:.1f} GiB "
            f"of counts, about {_PEAK_OVER_COUNTS:g}× that at the peak of generating and "
            f"writing them, beyond {MAX_TRACE_BYTES >> 30} GiB: generate fewer steps, layers "
            "or experts (or several traces)"
        )


def generate_trace(
    preset: str | ModelShape = "deepseek-v3",
    steps: int = 1000,
    *,
    seed: int = 0,
    tokens_per_step: int | None = None,
    config: WorkloadConfig | None = None,
    regime: str | Sequence[tuple[int, int]] | None = None,
    regime_period: int | None = None,
    num_layers: int | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    sigma: float | tuple[float, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoadTrace:
    """Sample a per-step routed-token trace.

    Args:
        preset: a :data:`PRESETS` name or a :class:`ModelShape`.
        steps: number of steps ``T``.
        seed: RNG seed; the trace is a pure function of the arguments.
        tokens_per_step: override ``config.tokens_per_step``.
        config: :class:`WorkloadConfig` (default: :func:`default_config` of the preset).
        regime: ``None``/``"config"`` keeps the config's regime schedule; ``"stationary"`` has
            none; ``"prefill-decode"`` alternates base and a regime of Spearman 0.74 every
            ``regime_period`` steps; ``"domain-shift"`` makes excursions from the base into
            three domains of Spearman 0.2 with it (0, 1, 0, 2, 0, 3, ...); a sequence of
            ``(start_step, regime_index)`` replaces the config's schedule (indices into
            ``config.regime_correlations``, 0 = base).
        regime_period: steps per regime segment for the named schedules (default ``steps // 4``).
        num_layers, num_experts, top_k, sigma: shape / skew overrides as in
            :func:`generate_loads`.
        progress: called as ``progress(steps_done, steps)`` after each chunk of steps (for
            a progress bar; long traces take tens of seconds). It does not change the trace.

    Returns:
        :class:`eplb.formats.LoadTrace` with ``counts [T, L, E]`` float64 non-negative integers,
        each ``counts[t, l]`` summing to ``tokens_per_step * top_k``; ``format="generated"``;
        ``meta`` holds the preset, seed, top_k, tokens_per_step, config, per-step ``regime``
        indices, per-layer ``sigma`` and the spike layers.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    shape = resolve_shape(preset, num_layers=num_layers, num_experts=num_experts, top_k=top_k)
    # before any work: a named regime builds a list of its segments' starts
    check_trace_size(steps, shape.num_layers, shape.num_experts)
    cfg = _config_for(shape, config, tokens_per_step=tokens_per_step)
    cfg = _regime_config(cfg, regime, steps, regime_period)
    cfg, sigma_override = _apply_sigma(cfg, sigma)
    gen = torch.Generator().manual_seed(as_seed(seed))
    model = _Model(shape, cfg, gen, sigma_override)
    L, E, k = shape.num_layers, shape.num_experts, shape.top_k
    S = cfg.requests_per_step
    regimes = _regime_per_step(cfg, steps)

    # Request slots: slot s is renewed at step t with probability 1/lifetime; ids count up.
    renew = torch.rand(steps, S, generator=gen, dtype=torch.float64) < 1.0 / cfg.request_lifetime
    renew[0] = True
    flat = renew.reshape(-1)
    ids_flat = torch.cumsum(flat.to(torch.int64), 0) - 1
    # Each slot keeps the id of its latest renewal: forward-fill along time per slot.
    marker = torch.where(flat, ids_flat, torch.full_like(ids_flat, -1)).reshape(steps, S)
    req_ids = torch.cummax(marker, dim=0).values

    counts = torch.empty(steps, L, E, dtype=torch.float64)
    chunk = max(1, (1 << 22) // max(1, S * L * E))
    # Bias bank, [L, N, E] float32 (only ratios matter; halves the memory traffic of the mix).
    bank_ids = torch.empty(0, dtype=torch.int64)
    bank = torch.empty(L, 0, E, dtype=torch.float32)
    next_id = 0
    rs = cfg.request_sigma
    if cfg.tokens_per_step * k > 2**53:  # a step's sum must be exact in float64
        raise ValueError(f"tokens_per_step × top_k ({cfg.tokens_per_step} × {k}) passes 2**53, "
                         "beyond which float64 counts cannot sum to it exactly")
    total = float(cfg.tokens_per_step * k)
    cap = 1.0 / k
    for c0 in range(0, steps, chunk):
        c1 = min(steps, c0 + chunk)
        C = c1 - c0
        # Latent popularity for each step in the chunk, advancing the drift step by step.
        latent = torch.empty(C, L, E, dtype=torch.float64)
        for t in range(c0, c1):
            r = int(regimes[t])
            model.advance(r, t, gen)
            latent[t - c0] = model.regime_latent(r)
        logp = model.shape_latent(latent)
        chunk_regimes = regimes[c0:c1]
        for r in torch.unique(chunk_regimes).tolist():
            at = chunk_regimes == r
            logp[at] = model._add_spikes(logp[at], int(r))
        pop = _softmax(logp)  # [C, L, E]
        # Request biases for the ids used in this chunk (new ids drawn in id order).
        ids = req_ids[c0:c1]  # [C, S]
        needed = torch.unique(ids)
        old = needed[needed < next_id]
        fresh = needed[needed >= next_id]
        new_bias = torch.randn(L, fresh.numel(), E, generator=gen, dtype=torch.float32)
        new_bias = (new_bias * rs - 0.5 * rs * rs).exp()
        if fresh.numel():
            next_id = int(fresh.max()) + 1
        bank = torch.cat([bank[:, torch.searchsorted(bank_ids, old)], new_bias], dim=1)
        bank_ids = torch.cat([old, fresh])
        bias = bank[:, torch.searchsorted(bank_ids, ids.reshape(-1))]  # [L, C*S, E]
        bias = bias.view(L * C, S, E) if C == 1 else bias.view(L, C, S, E).reshape(L * C, S, E)
        # Mixture over requests of pop * bias / <pop, bias>, batched over (layer, step).
        pop_lc = pop.transpose(0, 1).reshape(L * C, E, 1).to(torch.float32)
        z = torch.bmm(bias, pop_lc)  # [L*C, S, 1]
        mix = torch.bmm((1.0 / S) / z.transpose(1, 2), bias)  # [L*C, 1, E]
        mix = mix.view(L, C, E).transpose(0, 1).to(torch.float64)
        probs = _cap_shares(pop * mix, cap)
        probs = probs / probs.sum(-1, keepdim=True)
        _check_finite(probs, cfg, sigma)
        counts[c0:c1] = _multinomial(total, probs, gen)
        if progress is not None:
            progress(c1, steps)

    meta = {
        "preset": shape.name,
        "seed": int(seed),
        "top_k": k,
        "num_groups": shape.num_groups,
        "tokens_per_step": cfg.tokens_per_step,
        "config": cfg.as_dict(),
        "regime": regimes.tolist(),
        "sigma": model.sigma.tolist(),
        "spike_layers": torch.nonzero(model.spike_layer).squeeze(1).tolist(),
    }
    source = f"eplb.tools.generator.generate_trace({shape.name!r}, steps={steps}, seed={seed})"
    return _load_trace(counts, shape.layer_ids, source, meta)


def _load_trace(counts: torch.Tensor, layer_ids: list[int], source: str, meta: dict) -> LoadTrace:
    return LoadTrace(counts=counts, layer_ids=layer_ids, source=source, format="generated",
                     meta=meta)
