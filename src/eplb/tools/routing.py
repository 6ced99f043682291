"""Per-token routing traces sampled from measured per-expert loads.

:func:`fit_router` builds a stochastic router whose tokens choose their top-k experts the
way DeepSeek-V3's gate does (``n_group`` groups, the ``topk_group`` best groups by the
sum of their ``2`` best scores, then the ``top_k`` best experts inside those groups),
with expert biases fitted so that every expert's selection frequency matches the
measured loads. :meth:`Router.sample` then emits top-k ids ``[T, L, k]``.

Per token ``t``, layer ``l`` and expert ``e`` the choice score is

    s = b[l, e] + latent_scale · <z_t, u[l, e]> / sqrt(d) + Gumbel noise,

- ``b``: fitted biases (the measured loads);
- ``z_t ~ N(0, I_d)``: a per-token latent shared by all layers (what the token is about);
- ``u[l, e] ~ N(0, I_d)``: fixed expert directions. Experts with aligned directions fire
  together (co-activation), and a token's choices correlate across layers.

Without the latent the choices are Gumbel top-k draws (sampling without replacement in
proportion to ``exp(b)``), i.e. as independent as top-k allows. :data:`LATENT_SCALE` and
:data:`LATENT_DIM` were fitted on the real per-token traces (Qwen3-30B-A3B ShareGPT
prefill, 128 experts top-8; ESFT DeepSeek-V2-Lite, 64 experts top-6): a router fitted
to a trace's own loads, sampled at its token count, then shows about the same pair
dispersion (mean chi-square of the pair counts against top-k independence, per pair) as
the trace: Qwen3 batch ``ep_states`` 12.42 real vs 12.46 sampled (0.79 without the
latent), ESFT intent 48.8 vs 46.0, translation 40.2 vs 39.1 (``--fit-latent``,
2026-12-01). Distinct nodes hit under *random* expert partitions do not tell the routers
apart (real and independent agree within 0.2%), so that statistic was not used.
DeepSeek-V3's own co-activation is not in the data: the fitted strength is borrowed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from eplb.core.inputs import as_seed, as_weight
from eplb.core.messages import integer_runs
from eplb.core.topology import non_negative_int, positive_int
from eplb.tools.generator.model import MAX_TRACE_BYTES

#: latent strength and dimension fitted to the co-activation of the real traces (module
#: docstring; ``benchmarks/bench_dispatch.py --fit-latent`` re-measures the match)
LATENT_SCALE = 7.0
LATENT_DIM = 4


@dataclass(frozen=True)
class Router:
    """A fitted stochastic router; shapes ``bias [L, E]``, ``embed [L, d, E]``."""

    bias: torch.Tensor
    embed: torch.Tensor
    top_k: int
    num_groups: int
    topk_groups: int
    group_top: int
    latent_scale: float

    @property
    def num_layers(self) -> int:
        return self.bias.shape[0]

    @property
    def num_experts(self) -> int:
        return self.bias.shape[1]

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores [t, L, E]`` → top-k ids ``[t, L, k]`` under group-limited routing."""
        t, num_layers, num_experts = scores.shape
        if self.num_groups == 1 or self.topk_groups == self.num_groups:
            return scores.topk(self.top_k, dim=2).indices
        size = num_experts // self.num_groups
        grouped = scores.view(t, num_layers, self.num_groups, size)
        # sum of each group's best `group_top` scores, by repeated max (cheaper than topk)
        work, group_score = grouped, None
        for _ in range(self.group_top):
            best, where = work.max(3)
            group_score = best if group_score is None else group_score + best
            work = work.scatter(3, where[..., None], float("-inf"))
        keep = group_score.topk(self.topk_groups, dim=2).indices  # [t, L, g]
        kept = grouped.gather(2, keep[..., None].expand(-1, -1, -1, size))  # [t, L, g, size]
        local = kept.flatten(2).topk(self.top_k, dim=2).indices  # into the kept groups
        return keep.gather(2, local // size) * size + local % size

    def scores(self, num_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[T, L, E]`` random choice scores of ``num_tokens`` fresh tokens."""
        latent_dim = self.embed.shape[1]
        z = torch.randn(num_tokens, latent_dim, generator=generator, dtype=torch.float32)
        out = torch.einsum("td,lde->tle", z, self.embed) * (
            self.latent_scale / math.sqrt(latent_dim))
        # Gumbel(0, 1) = −log(Exp(1))
        gumbel = torch.empty_like(out).exponential_(generator=generator).log_().neg_()
        return out.add_(gumbel).add_(self.bias[None])

    def sample(self, num_tokens: int, generator: torch.Generator | None = None,
               chunk: int = 1024) -> torch.Tensor:
        """``[T, L, k]`` int64 top-k expert ids of ``num_tokens`` tokens."""
        num_tokens = non_negative_int("num_tokens", num_tokens)
        # before any work: the parts are kept until the end, so a typo'd count (10**20)
        # took the host's memory chunk by chunk instead of failing with a message
        need = num_tokens * self.num_layers * self.top_k * 8
        if need > MAX_TRACE_BYTES:
            raise ValueError(
                f"{num_tokens} tokens of {self.num_layers} layers × top-{self.top_k} need "
                f"{need / 2**30:.1f} GiB of ids, beyond {MAX_TRACE_BYTES >> 30} GiB: sample "
                "fewer tokens (or several batches)")
        parts = [self._choose(self.scores(min(chunk, num_tokens - s), generator))
                 for s in range(0, num_tokens, chunk)]
        if not parts:
            return torch.zeros(0, self.num_layers, self.top_k, dtype=torch.int64)
        return torch.cat(parts)


def _check(weight: torch.Tensor, top_k: int, num_groups: int, topk_groups: int,
           group_top: int) -> torch.Tensor:
    # checked as eplb.plan checks loads: a sparse weight failed inside torch ("Could not
    # run 'aten::ne.Scalar' ... 'SparseCPU' backend"), a NaN was not located
    w, one_layer = as_weight(weight)
    if one_layer:
        raise ValueError("weight must be finite non-negative loads [L, E]; got one layer "
                         f"[{w.shape[1]}] (weight[None] makes it [1, E])")
    num_experts = w.shape[1]
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"{num_experts} experts do not split into {num_groups} groups")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups must be in [1, {num_groups}], got {topk_groups}")
    group_size = num_experts // num_groups
    if not 1 <= group_top <= group_size:
        raise ValueError(f"group_top must be in [1, {group_size}], got {group_top}")
    if not 1 <= top_k <= topk_groups * group_size:
        raise ValueError(f"top_k = {top_k} does not fit in {topk_groups} groups of {group_size}")
    idle = (w.sum(1) <= 0).nonzero().flatten().tolist()
    if idle:
        # a real SGLang dump has all-zero rows for the dense layers (0..2 of DeepSeek-V3):
        # no router reproduces "no tokens", so name them and say what to pass instead
        raise ValueError(
            f"layer{'s' if len(idle) > 1 else ''} {integer_runs(idle)} of the weight carry no "
            f"load, and a router cannot be fitted to them: pass the MoE layers' rows only "
            f"(e.g. weight[3:] for a DeepSeek-V3 dump, whose layers 0..2 are dense)")
    return w


def fit_router(
    weight: torch.Tensor,
    top_k: int = 8,
    num_groups: int = 8,
    topk_groups: int = 4,
    group_top: int = 2,
    latent_dim: int = LATENT_DIM,
    latent_scale: float = LATENT_SCALE,
    iterations: int = 12,
    fit_tokens: int = 1024,
    generator: torch.Generator | None = None,
) -> Router:
    """Fit a :class:`Router` to measured loads ``weight [L, E]``.

    Defaults are DeepSeek-V3's gate (8 groups, top-4 groups by their top-2 sum, top-8
    experts); ``num_groups=1`` gives plain top-k routing (Qwen3, DeepSeek-V2-Lite).
    The biases start from the Poisson-sampling approximation of top-k inclusion and follow
    ``b += rate · log(target / achieved)`` over ``iterations`` rounds of ``fit_tokens``
    fresh tokens (rate 1, then falling as ``3 / round``), target = ``top_k · w / Σw``
    (experts with no load are never chosen, as in the data).
    """
    for name, value in (("top_k", top_k), ("num_groups", num_groups),
                        ("topk_groups", topk_groups), ("group_top", group_top),
                        ("latent_dim", latent_dim), ("fit_tokens", fit_tokens)):
        positive_int(name, value)  # a float or bool failed deep in torch, 0 divided by 0
    iterations = non_negative_int("iterations", iterations)
    if isinstance(latent_scale, bool) or not isinstance(latent_scale, numbers.Real) or not (
            math.isfinite(latent_scale) and latent_scale >= 0):
        # NaN scored every expert NaN: the samples came from a few groups only
        raise ValueError(f"latent_scale must be a finite number >= 0, got {latent_scale!r}")
    w = _check(weight, top_k, num_groups, topk_groups, group_top)
    num_layers, num_experts = w.shape
    target = top_k * w / w.sum(1, keepdim=True)
    if bool((target > 1).any()):
        raise ValueError("an expert's load share exceeds 1 / top_k: no top-k router gives it")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    embed = torch.randn(num_layers, latent_dim, num_experts, generator=gen)
    dead = target <= 0
    # start: Poisson-sampling approximation of Gumbel top-k inclusion, π = 1 − exp(−λ·e^b)
    start = (-torch.log1p(-target.clamp(max=1 - 1e-6))).clamp(min=1e-12).log()
    bias = torch.where(dead, -1e4, start).to(torch.float32)
    layer = torch.arange(num_layers)[None, :, None]
    for it in range(iterations):
        router = Router(bias, embed, top_k, num_groups, topk_groups, group_top, latent_scale)
        # fresh tokens every round with a falling step (stochastic approximation): the
        # biases average the sampling noise instead of fitting one sample's
        ids = router.sample(fit_tokens, gen)
        got = torch.zeros(num_layers * num_experts, dtype=torch.float64)
        got.scatter_add_(0, (layer * num_experts + ids).flatten(),
                         torch.ones(ids.numel(), dtype=torch.float64))
        got = got.view(num_layers, num_experts) / fit_tokens
        step = (target.clamp(min=1e-12) / got.clamp(min=0.5 / fit_tokens)).log()
        rate = 1.0 if it < 3 else 3.0 / (it + 1)
        bias = torch.where(dead, bias, bias + (rate * step).to(torch.float32).clamp(-2, 2))
    return Router(bias, embed, top_k, num_groups, topk_groups, group_top, latent_scale)


def sample_group_limited(
    weight: torch.Tensor,
    num_tokens: int,
    top_k: int = 8,
    num_groups: int = 8,
    topk_groups: int = 4,
    latent_scale: float = LATENT_SCALE,
    seed: int = 0,
) -> torch.Tensor:
    """``[T, L, k]`` top-k ids of ``num_tokens`` tokens routed like DeepSeek-V3 from
    measured loads ``weight [L, E]`` (:func:`fit_router`, then :meth:`Router.sample`)."""
    gen = torch.Generator().manual_seed(as_seed(seed))
    router = fit_router(weight, top_k, num_groups, topk_groups, latent_scale=latent_scale,
                        generator=gen)
    return router.sample(num_tokens, gen)
