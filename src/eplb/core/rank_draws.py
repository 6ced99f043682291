"""SGLang's static dispatch table on one node: the ranks' fair choices, two ways.

A rank that holds a replica of an expert serves its own tokens of it; a rank that holds
none sends them to a replica SGLang picks by its "fair" choice (``_fair_choices``).
eplb's nearest-dispatch model scores the expectation of those picks, which one node's
even split reaches (0.9996-1.0); what SGLang realises depends on how the table is built:

- **From an ``--init-expert-location`` file** each rank builds its own row, drawing at
  its own point of SGLang's random stream (:func:`rank_draw_peaks`): modelled as
  independent uniform draws, one per (rank, expert) without a local replica. SGLang
  realised 0.883-0.955 from the even split's file (``benchmarks/bench_sglang_table.py``,
  BENCHMARKS.md §14); on the 12 real DeepSeek-V3 workloads on 8 and 32 GPUs this model
  reads within 0.0101 of SGLang's own table for the even split, 0.0008 for the hot
  experts on every GPU (``fair="avoid"``) and 0.006 for the per-layer choice of the two
  (:func:`plan_for_start_up_file`), which SGLang realised at 0.953-0.999.
- **At a runtime rebalance** (``--enable-eplb``) every rank builds the same table from
  one stream (:func:`split_draw_peaks`): the ``P − h`` ranks without a replica (``h``
  GPUs hold one) are dealt over the ``c`` replicas as evenly as they divide, and the
  ``(P − h) mod c`` left over go to replicas drawn at random. Counts that divide ``P``
  leave nothing to draw (``fair="divide"``,
  :func:`eplb.core.dispatch_plan.divisor_counts`).

Shapes: ``weight [L, E]``, ``phy2log [L, R]`` on ``P`` GPUs of one node, ``R / P`` slots
each.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from eplb.core.device_path import caller_settings_off
from eplb.core.inputs import as_weight
from eplb.core.placement import Placement

#: draws per layer: the spread of a layer's sampled peak is about 0.3 % of the mean at
#: DeepSeek-V3's shape, so a choice between two plans errs only where they are that close
DRAWS = 8
#: draws a seed may ask for before its numbers would repeat another seed's
DRAW_STRIDE = 1 << 16
#: (rank, expert) draws of one call, over all its draws, beyond which fewer draws are
#: taken (at least 2): 1024 GPUs of one node took 7.6 s a call with 8 (attacker pass)
MAX_DRAWN = 1 << 25
#: (rank, expert) pairs drawn at once: a call draws its layers a few at a time, as one
#: call over every layer held a dozen arrays of that many entries (200 layers × 1024
#: experts on 1024 GPUs of one node: 18.5 GB, for eplb plan's SGLang file; attacker pass)
CHUNK_CELLS = 1 << 22


def rank_draw_peaks(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int,
                    draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """``[L]`` each layer's expected max GPU load when every rank without a replica of an
    expert draws one of its replicas for itself (module docstring), over ``draws``
    samples; tokens arise evenly on the ``num_gpus`` GPUs.

    The draws depend on the expert, the rank and ``seed`` only, not on the placement nor
    on the other layers: two placements are compared on the same draws, a layer's
    figure is its own, and the same on every machine (a counter-based generator; the
    loads are sums of ``w / P`` shares in a fixed order). The layers are drawn a few at
    a time (:data:`CHUNK_CELLS`), which changes no number."""
    w = weight.detach().cpu().to(torch.float64).numpy()
    ids = phy2log.detach().cpu().numpy().astype(np.int64)
    cells = _drawn_cells(w, ids, num_gpus)
    draws = min(draws, max(2, MAX_DRAWN // max(int(cells.sum()), 1)))
    peaks = np.zeros(len(ids))
    first = 0
    while first < len(ids):
        # whole layers up to CHUNK_CELLS cells, at least one
        last = first + max(1, int(np.searchsorted(np.cumsum(cells[first:]), CHUNK_CELLS,
                                                  side="right")))
        peaks[first:last] = _rank_draw_sums(w[first:last], ids[first:last], num_gpus,
                                            draws, seed)
        first = last
    return peaks / draws


def _drawn_cells(w: np.ndarray, ids: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L]``: the (expert, rank) pairs of each layer that draw (a loaded expert with a
    replica, a rank holding none of it) of ``w [L, E]`` placed by ``ids [L, R]``."""
    layers, num_slots = ids.shape
    num_experts = w.shape[1]
    filled = ids >= 0
    key = (np.arange(layers)[:, None] * num_experts + ids)[filled]
    gpu = np.broadcast_to(np.arange(num_slots) // (num_slots // num_gpus), ids.shape)[filled]
    holders = np.bincount(np.unique(key * num_gpus + gpu) // num_gpus,
                          minlength=layers * num_experts)
    count = np.bincount(key, minlength=layers * num_experts)
    # a rank's share, as the draws test it: a load whose w / P rounds to 0 (5e-324 on
    # 2 GPUs) draws nothing, but counted here it cut the draws of a large call
    drawing = (count > 0) & ((w / num_gpus).reshape(-1) > 0)
    return np.where(drawing, num_gpus - holders, 0).reshape(layers, num_experts).sum(1)


def _rank_draw_sums(w: np.ndarray, ids: np.ndarray, num_gpus: int, draws: int,
                    seed: int) -> np.ndarray:
    """``[L]`` :func:`rank_draw_peaks` of ``w [L, E]`` (float64) and ``ids [L, R]``, summed
    over the ``draws`` samples, not yet averaged."""
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
    # what every draw reads of a cell, gathered once: its run's start among the sorted
    # slots, its replicas, its rank's share and its layer's first (layer, GPU) bin
    run_start, replicas, cell_share = start[cell], count[cell], share[cell]
    layer_bin = layer * num_gpus
    gpu_of_sorted = gpu_of_slot[order % num_slots]
    # where the chunk's layers draw more cells than there are (expert, rank) pairs, each
    # pair's number is made once per draw and looked up, not made again in every layer
    pair = expert * num_gpus + rank if num_experts * num_gpus < len(cell) else None
    peaks = np.zeros(layers)
    for draw in range(draws):
        # a draw is a function of (seed, draw, expert, rank) alone: a layer's peaks do not
        # depend on the other layers of the call, nor on where it sits among them
        if pair is None:
            uniform = _uniform(seed, draw, expert, rank, num_experts, num_gpus)
        else:
            uniform = _uniform(seed, draw, np.arange(num_experts)[:, None],
                               np.arange(num_gpus)[None, :], num_experts,
                               num_gpus).reshape(-1)[pair]
        gpu = gpu_of_sorted[run_start + (uniform * replicas).astype(np.int64)]
        loads = base + np.bincount(layer_bin + gpu, weights=cell_share,
                                   minlength=layers * num_gpus).reshape(layers, num_gpus)
        peaks += loads.max(1)
    return peaks


def split_draw_shares(phy2log: torch.Tensor, num_experts: int, num_gpus: int,
                      draws: int = DRAWS, seed: int = 0, per_layer: bool = False) -> np.ndarray:
    """``[D, L, R]``: how many ranks' tokens each slot serves in each of ``draws`` samples
    of SGLang's runtime table on one node (module docstring), every rank originating
    tokens; an empty slot (``-1``) serves none.

    An expert's ranks holding a replica use their own (the first on their GPU); the
    others are dealt ``(P − h) // c`` to each replica, and ``(P − h) mod c`` replicas,
    drawn without repeats, take one more. The draws are functions of ``(seed, draw,
    expert, slot)`` alone (a counter-based generator, the same on every machine), and
    with ``per_layer`` of the layer (its row) and of the call's row count too: SGLang
    draws every layer's deal from one stream, so a replay of its table draws each layer
    apart (the planner's model keeps one set of numbers for every layer: its plans
    compare layer by layer). A row drawn in a call of other rows so gets other numbers
    (the replay draws a trace's rows in one call)."""
    ids = phy2log.detach().cpu().numpy().astype(np.int64)
    layers, num_slots = ids.shape
    slots = num_slots // num_gpus
    gpu_of_slot = np.broadcast_to(np.arange(num_slots) // slots, ids.shape)
    filled = ids >= 0
    cells = layers * num_experts
    key = np.where(filled, np.arange(layers)[:, None] * num_experts + ids, cells)  # [L, R]
    count = np.bincount(key.ravel(), minlength=cells + 1)[:cells]
    # the first slot of each (expert, GPU): that GPU's ranks serve themselves there (a
    # stable sort keeps the slots of one (expert, GPU) in slot order)
    cell_gpu = (key * num_gpus + gpu_of_slot).ravel()
    order = np.argsort(cell_gpu, kind="stable")
    first = np.ones(len(order), bool)
    first[1:] = cell_gpu[order][1:] != cell_gpu[order][:-1]
    flat_key = key.ravel()
    local = np.zeros(layers * num_slots, bool)
    local[order] = first & (flat_key[order] < cells)
    holders = np.bincount(flat_key[local], minlength=cells + 1)[:cells]  # h
    left = num_gpus - holders
    quotient = left // np.maximum(count, 1)
    remainder = np.append(left % np.maximum(count, 1), 0)  # (the empty slots' key: 0)
    fixed = np.where(flat_key < cells, local + np.append(quotient, 0)[flat_key], 0)
    out = np.repeat(fixed.astype(np.float64).reshape(1, layers, num_slots), draws, 0)
    # only the replicas of experts with a remainder are drawn: every draw at once, each
    # expert's replicas ranked by their numbers, the first ``remainder`` taking one more
    drawn = np.nonzero(remainder[flat_key] > 0)[0]
    if not len(drawn):
        return out
    keys = flat_key[drawn]
    u = (_uniform(seed, np.arange(draws)[:, None], keys, drawn % num_slots, cells, num_slots)
         if per_layer else
         _uniform(seed, np.arange(draws)[:, None], ids.ravel()[drawn],
                  drawn % num_slots, num_experts, num_slots))  # [D, n]
    # (a key below 2^31 leaves the numbers 22 bits: ties in rank are rare, and a stable
    # sort breaks them by slot, the same at every NumPy SIMD level)
    by_key = np.argsort(keys[None] + u, axis=1, kind="stable")  # [D, n]
    start = np.searchsorted(np.sort(keys), keys)  # each drawn slot's run of its expert
    rank = np.empty_like(by_key)
    np.put_along_axis(rank, by_key, np.arange(len(drawn))[None] - start[by_key], axis=1)
    extra = rank < remainder[keys][None]
    out.reshape(draws, -1)[:, drawn] += extra
    return out


def split_draw_slot_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int,
                          draws: int = DRAWS, seed: int = 0, per_layer: bool = False
                          ) -> np.ndarray:
    """``[D, L, R]`` float64: each slot's load of ``weight [L, E]`` in each sampled draw of
    SGLang's runtime table on one node (:func:`split_draw_shares`, whose ``seed`` and
    ``per_layer`` these are); tokens arise evenly on the ``num_gpus`` GPUs, so a slot
    serving ``k`` ranks carries ``k / P`` of its expert's load (an empty slot none)."""
    w = weight.detach().cpu().to(torch.float64).numpy() / num_gpus
    ids = phy2log.detach().cpu().numpy().astype(np.int64)
    shares = split_draw_shares(phy2log, w.shape[1], num_gpus, draws, seed, per_layer)
    return shares * np.take_along_axis(w, np.maximum(ids, 0), 1)[None]


def split_draw_peaks(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int,
                     draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """``[L]`` each layer's max GPU load under SGLang's runtime table on one node
    (:func:`split_draw_slot_loads`), the mean over ``draws`` samples."""
    slot_load = split_draw_slot_loads(weight, phy2log, num_gpus, draws, seed)
    gpu = slot_load.reshape(draws, phy2log.shape[0], num_gpus, -1).sum(3)
    return gpu.max(2).mean(0)


def split_draw_balancedness(weight: torch.Tensor, phy2log: torch.Tensor,
                            num_gpus: int) -> float:
    """Balancedness of ``phy2log [L, R]`` under SGLang's runtime table on one node
    (:func:`split_draw_peaks`); 1.0 without load."""
    return _balancedness(weight, split_draw_peaks(weight, phy2log, num_gpus), num_gpus)


def rank_draw_balancedness(weight: torch.Tensor, phy2log: torch.Tensor,
                           num_gpus: int) -> float:
    """Balancedness (Σ mean / Σ max GPU load over the layers) of ``phy2log [L, R]`` when
    every rank draws for itself (:func:`rank_draw_peaks`); 1.0 without load."""
    return _balancedness(weight, rank_draw_peaks(weight, phy2log, num_gpus), num_gpus)


def _balancedness(weight: torch.Tensor, peaks: np.ndarray, num_gpus: int) -> float:
    """Σ mean over Σ ``peaks [L]`` (each layer's expected max GPU load); 1.0 without load.
    The total is added in NumPy's fixed order: torch's sum of 32,768 or more entries
    splits by the thread count (600 × 256 float loads: the last bit moved with 4 threads)."""
    total = float(weight.detach().cpu().to(torch.float64).numpy().sum()) / num_gpus
    peak = float(peaks.sum())
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


def choose_for_split_draws(weight: torch.Tensor, candidates: list[torch.Tensor],
                           num_gpus: int) -> torch.Tensor:
    """``[L, R]``: per layer the candidate ``[L, R]`` whose max GPU load under SGLang's
    runtime table (:func:`split_draw_peaks`, the same draws for all) is least, the first
    among ties."""
    return _chosen(weight, candidates, num_gpus, split_draw_peaks)[0]


def _chosen(weight: torch.Tensor, candidates: list[torch.Tensor], num_gpus: int,
            peaks_of: Callable[..., np.ndarray] | None = None
            ) -> tuple[torch.Tensor, np.ndarray]:
    """:func:`choose_for_rank_draws` (or by ``peaks_of``, e.g. :func:`split_draw_peaks`),
    and the chosen layers' expected peaks ``[L]``."""
    peaks_of = rank_draw_peaks if peaks_of is None else peaks_of
    peaks = np.stack([peaks_of(weight, c, num_gpus) for c in candidates])
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
    balancedness the draws give it, and that balancedness.

    ``weight`` is read as :func:`eplb.plan` reads loads (an array, a list, one layer
    ``[E]``), and must be the loads the plans are of: ``ValueError`` otherwise."""
    # (exported from eplb.core: an array raised AttributeError "no attribute 'detach'",
    # one layer IndexError, loads of another shape NumPy's broadcast error, and NaN or
    # negative loads gave a balancedness of 1.0000; review pass), with the caller's
    # settings off as below (a float32 subnormal load flushed in the copy read as 0)
    with caller_settings_off():
        weight, _ = as_weight(weight)
    even, avoid = plan("expect"), plan("avoid")
    if tuple(weight.shape) != (even.num_layers, even.num_experts):
        raise ValueError(f"weight is [{weight.shape[0]}, {weight.shape[1]}], but the plans "
                         f"place {even.num_layers} layers of {even.num_experts} experts: give "
                         "the loads plan(fair) plans")
    topo = even.topology
    # (as eplb.plan, whatever the caller's settings: with subnormals flushed, loads of
    # 1e-310 read as 0 and the choice between the two plans changed; determinism pass)
    with caller_settings_off():
        chosen, chosen_peaks = _chosen(weight, [even.phy2log, avoid.phy2log], topo.num_gpus)
    placement = Placement.from_phy2log(chosen, even.num_experts, topo, even.policy,
                                       even.active_gpus)
    placement.validate()
    avoided = int((chosen.cpu() != even.phy2log.cpu()).any(1).sum())
    # (the draws each layer's choice was scored on)
    with caller_settings_off():
        drawn = _balancedness(weight, chosen_peaks, topo.num_gpus)
    return placement, (f"the hot experts on every GPU in {avoided} of {even.num_layers} "
                       f"layers; each rank drawing its own fair choice (eplb's model of "
                       f"SGLang's start-up file): balancedness {drawn:.4f}"), drawn
