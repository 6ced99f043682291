"""SGLang's start-up file on one node: every rank draws its own fair choice.

From an ``--init-expert-location`` file each SGLang rank builds its own row of the static
dispatch table: a rank that holds a replica of an expert serves its own tokens of it,
and a rank that holds none sends them to a replica drawn for that rank alone (its own
point of SGLang's random stream). eplb's nearest-dispatch model scores the expectation
of those draws, which one node's even split reaches (0.9996-1.0) while SGLang realised
0.883-0.955 from the file (``benchmarks/bench_sglang_table.py``, BENCHMARKS.md §14).

Modelled here as independent uniform draws, one per (rank, expert) without a local
replica, over the expert's replicas: on the 12 real DeepSeek-V3 workloads on 8 and 32
GPUs this reads within 0.0101 of SGLang's own table for the even split, 0.0008 for the
hot experts on every GPU (``fair="avoid"``) and 0.006 for the per-layer choice of the
two (:func:`plan_for_start_up_file`), which SGLang realised at 0.953-0.999.

Shapes: ``weight [L, E]``, ``phy2log [L, R]`` on ``P`` GPUs of one node, ``R / P`` slots
each.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from eplb.core.placement import Placement

#: draws per layer: the spread of a layer's sampled peak is about 0.3 % of the mean at
#: DeepSeek-V3's shape, so a choice between two plans errs only where they are that close
DRAWS = 8
#: draws a seed may ask for before its numbers would repeat another seed's
DRAW_STRIDE = 1 << 16
#: (rank, expert) draws of one call, over all its draws, beyond which fewer draws are
#: taken (at least 2): 1024 GPUs of one node took 7.6 s a call with 8 (attacker pass)
MAX_DRAWN = 1 << 25


def rank_draw_peaks(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int,
                    draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """``[L]`` each layer's expected max GPU load when every rank without a replica of an
    expert draws one of its replicas for itself (module docstring), over ``draws``
    samples; tokens arise evenly on the ``num_gpus`` GPUs.

    The draws depend on the expert, the rank and ``seed`` only, not on the placement nor
    on the other layers: two placements are compared on the same draws, a layer's
    figure is its own, and the same on every machine (a counter-based generator; the
    loads are sums of ``w / P`` shares in a fixed order)."""
    w = weight.detach().cpu().to(torch.float64).numpy()
    ids = phy2log.detach().cpu().numpy().astype(np.int64)
    layers, num_slots = ids.shape
    num_experts = w.shape[1]
    slots = num_slots // num_gpus
    gpu_of_slot = np.arange(num_slots) // slots
    filled = ids >= 0
    key = np.arange(layers)[:, None] * num_experts + np.where(filled, ids, 0)
    # replicas of each (layer, expert), and which GPUs hold one: [L·E], [L·E, P]
    count = np.bincount(key[filled], minlength=layers * num_experts)
    holds = np.zeros((layers * num_experts, num_gpus), bool)
    holds[key[filled], np.broadcast_to(gpu_of_slot, ids.shape)[filled]] = True
    # each (layer, expert)'s slots, expert by expert: a draw picks one of its run
    order = np.argsort(np.where(filled, key, layers * num_experts), axis=None, kind="stable")
    start = np.cumsum(count) - count
    share = (w / num_gpus).reshape(-1)  # a rank's tokens of the expert
    # the ranks' own tokens, served where they arise
    base = (holds * share[:, None]).reshape(layers, num_experts, num_gpus).sum(1)
    # (layer, expert, rank) sending its tokens elsewhere, by a draw
    cell, rank = np.nonzero(~holds & (count > 0)[:, None] & (share > 0)[:, None])
    layer, expert = np.divmod(cell, num_experts)
    peaks = np.zeros(layers)
    draws = min(draws, max(2, MAX_DRAWN // max(len(cell), 1)))
    for draw in range(draws):
        # a draw is a function of (seed, draw, expert, rank) alone: a layer's peaks do not
        # depend on the other layers of the call, nor on where it sits among them
        pick = start[cell] + (_uniform(seed, draw, expert, rank, num_experts, num_gpus)
                              * count[cell]).astype(np.int64)
        gpu = gpu_of_slot[order[pick] % num_slots]
        loads = base + np.bincount(layer * num_gpus + gpu, weights=share[cell],
                                   minlength=layers * num_gpus).reshape(layers, num_gpus)
        peaks += loads.max(1)
    return peaks / draws


def rank_draw_balancedness(weight: torch.Tensor, phy2log: torch.Tensor,
                           num_gpus: int) -> float:
    """Balancedness (Σ mean / Σ max GPU load over the layers) of ``phy2log [L, R]`` when
    every rank draws for itself (:func:`rank_draw_peaks`); 1.0 without load."""
    return _balancedness(weight, rank_draw_peaks(weight, phy2log, num_gpus), num_gpus)


def _balancedness(weight: torch.Tensor, peaks: np.ndarray, num_gpus: int) -> float:
    """Σ mean over Σ ``peaks [L]`` (each layer's expected max GPU load); 1.0 without load."""
    total, peak = float(weight.detach().to(torch.float64).sum()) / num_gpus, float(peaks.sum())
    return total / peak if peak > 0 else 1.0


def _uniform(seed: int, draw: int, expert: np.ndarray, rank: np.ndarray, num_experts: int,
             num_gpus: int) -> np.ndarray:
    """Uniform numbers in [0, 1), one per (expert, rank): SplitMix64 of the pair's index
    in the draw (a counter-based generator, the same numbers on every machine)."""
    index = ((seed * DRAW_STRIDE + draw) * num_experts + expert) * num_gpus + rank
    z = index.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def choose_for_rank_draws(weight: torch.Tensor, candidates: list[torch.Tensor],
                          num_gpus: int) -> torch.Tensor:
    """``[L, R]``: per layer the candidate ``[L, R]`` whose expected max GPU load under
    every rank's own draw (:func:`rank_draw_peaks`, the same draws for all) is least,
    the first among ties."""
    return _chosen(weight, candidates, num_gpus)[0]


def _chosen(weight: torch.Tensor, candidates: list[torch.Tensor], num_gpus: int
            ) -> tuple[torch.Tensor, np.ndarray]:
    """:func:`choose_for_rank_draws`, and the chosen layers' expected peaks ``[L]``."""
    peaks = np.stack([rank_draw_peaks(weight, c, num_gpus) for c in candidates])
    pick = np.argmin(peaks, 0)
    stacked = torch.stack([c.cpu() for c in candidates])
    layer = np.arange(stacked.shape[1])
    chosen = stacked[torch.from_numpy(pick), torch.from_numpy(layer)]
    return chosen.to(candidates[0].device), peaks[pick, layer]


def plan_for_start_up_file(plan: Callable[[str], Placement], weight: torch.Tensor
                           ) -> tuple[Placement, str, float]:
    """A one-node nearest-dispatch plan for SGLang's start-up file: ``plan(fair)`` (a
    validated :class:`Placement` of ``weight [L, E]`` for ``fair`` ``"expect"``, the
    even split, and ``"avoid"``, the hot experts on every GPU) per layer, whichever
    serves the ranks' own draws better (:func:`choose_for_rank_draws`). Returns the
    validated placement, a line saying how many layers took ``"avoid"`` and the
    balancedness the draws give it, and that balancedness."""
    even, avoid = plan("expect"), plan("avoid")
    topo = even.topology
    chosen, chosen_peaks = _chosen(weight, [even.phy2log, avoid.phy2log], topo.num_gpus)
    placement = Placement.from_phy2log(chosen, even.num_experts, topo, even.policy,
                                       even.active_gpus)
    placement.validate()
    avoided = int((chosen.cpu() != even.phy2log.cpu()).any(1).sum())
    # (the draws each layer's choice was scored on)
    drawn = _balancedness(weight, chosen_peaks, topo.num_gpus)
    return placement, (f"the hot experts on every GPU in {avoided} of {even.num_layers} "
                       f"layers; each rank drawing its own fair choice (eplb's model of "
                       f"SGLang's start-up file): balancedness {drawn:.4f}"), drawn
