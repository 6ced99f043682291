"""Packing: replicas onto GPUs, exactly ``S = R / P`` slots per GPU, batched over rows.

Two entry points:

- :func:`pack`: items (replicas with loads) → a packing state, for fresh plans:
  construction (:mod:`.construct`), anti-affinity repair (:mod:`.repair`), then swap
  refinement (:mod:`.refine`), keeping the best of several randomised candidates.
- :func:`refine_assignment`: a placement whose GPUs keep their identity (an old plan, a
  plan on GPUs of different speeds) → the same placement improved by swaps, optionally
  under a move budget against an origin.

The state layout every step shares is described in :mod:`.state`.
"""

from __future__ import annotations

import torch

from eplb.core.count_bounds import packing_bound
from eplb.core.map_tables import expert_counts
from eplb.core.options import PackingOptions
from eplb.core.ordering import argsort_rows
from eplb.core.packing.construct import construct, construct_with_suspects
from eplb.core.packing.greedy import greedy_look
from eplb.core.packing.refine import Tracking, refine
from eplb.core.packing.repair import repair_conflicts
from eplb.core.packing.state import EXPERT, LOAD, gpu_loads, make_items, max_load, to_slots

__all__ = [
    "PackingOptions",
    "construct",
    "make_items",
    "max_load",
    "pack",
    "refine_assignment",
    "refine_path",
    "repair_assignment",
    "to_slots",
]


#: the swap searches hold about ``rows · P/2 · S²`` scored swaps at once (measured ≈ 32
#: bytes each at the peak, CPU, float32); rows are packed in chunks that keep this near
#: 1 GiB, so a plan's memory stays flat in the number of layers
SWAPS_PER_CHUNK = 2**25
#: one row beyond this (≈ 4 GiB at the peak) is refused before planning starts
MAX_SWAPS_PER_ROW = 2**27


def pack(
    items: torch.Tensor,
    num_gpus: int,
    options: PackingOptions,
    allow_shared: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    floor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pack the items of ``rows`` problems, keeping the best of several candidates.

    Args:
        items: ``[2, rows, R]`` from :func:`make_items`, heaviest first, replicas of an
            expert adjacent.
        num_gpus: ``P``; ``R`` must be a multiple of it.
        allow_shared: ``[rows]`` rows where some expert has more replicas than GPUs.
        generator: its seed (``initial_seed``) seeds the randomised candidates; its own
            stream is not advanced, so every pack of a plan draws alike.
        floor: ``[rows]`` a max GPU load (in item units) that is good enough, e.g. a lower
            bound the row's layer cannot beat anyway: rows packed at or below it are not
            refined.

    Returns:
        ``state [2, S, rows, P]`` of the candidate with the smallest max GPU load per row.
    """
    _, rows, num_items = items.shape
    slots = num_items // num_gpus
    cands = options.num_candidates or 1
    # the first start keeps the exact order unless told (few slots per GPU: see
    # PackingOptions.perturb_first); the others sort by perturbed loads. One draw per
    # start and item rank, shared by every row, from a stream of this call's own seeded
    # with the generator's seed: a row's packing depends on its own items only, not on
    # which other rows (layers, nodes) are in the call, the chunks, or the packs made
    # before (a second look packs only where some row needs one)
    perturbed = cands if options.perturbs_first() else cands - 1
    noise = None
    if perturbed:
        stream = (None if generator is None
                  else torch.Generator().manual_seed(generator.initial_seed()))
        noise = torch.rand(perturbed, 1, num_items, generator=stream, dtype=items.dtype)
    swaps_per_row = cands * max(1, num_gpus // 2) * slots * slots
    chunk = max(1, SWAPS_PER_CHUNK // swaps_per_row)
    if rows <= chunk:
        return _pack_chunk(items, num_gpus, options, noise, allow_shared, floor)
    parts = []
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        parts.append(_pack_chunk(
            items[:, part], num_gpus, options, noise,
            None if allow_shared is None else allow_shared[part],
            None if floor is None else floor[part]))
    return torch.cat(parts, dim=2)


def _pack_chunk(
    items: torch.Tensor,
    num_gpus: int,
    options: PackingOptions,
    noise: torch.Tensor | None,
    allow_shared: torch.Tensor | None = None,
    floor: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`pack` on rows that fit one chunk; ``noise [C', 1, R]``: the uniform draws of
    the perturbed starts (``None``: no start is perturbed)."""
    _, rows, num_items = items.shape
    cands = options.num_candidates or 1
    exact = items  # heaviest first, before any start reorders them
    if noise is not None:
        perturbed = noise.shape[0]
        # perturbed per expert (the draw of its first replica's rank), so that an
        # expert's replicas stay adjacent
        first = first_replica(items[EXPERT])
        noise = noise.to(items.device).expand(-1, rows, -1).gather(
            2, first.expand(perturbed, -1, -1))
        key = items[LOAD] * (1 + options.noise_for() * (2 * noise - 1))
        # [C', rows, R]; the packed-key sort of core/ordering.py: the same stable order
        # as torch's (keys are non-negative float32), several times faster on a CPU
        order = argsort_rows(key.reshape(-1, num_items), descending=True).view(key.shape)
        shuffled = (
            items[:, None].expand(-1, perturbed, -1, -1).gather(3, order.expand(2, -1, -1, -1))
        )
        starts = [shuffled] if perturbed == cands else [items[:, None], shuffled]
        items = torch.cat(starts, 1).view(2, cands * rows, num_items)
    if cands > 1:
        if allow_shared is not None:
            allow_shared = allow_shared.repeat(cands)
        if floor is not None:
            floor = floor.repeat(cands)
    # rows held to the tight gap of the second search: every expert once (no spare slot:
    # vLLM's default of no redundant experts), or at most one spare a GPU on GPUs of many
    # slots. Replicas are adjacent, so a row's spares are its neighbours of one expert
    # (items hold every start's rows by now). Only the second search reads it
    tight = None
    if num_items >= RESCUE_MIN_SLOTS * num_gpus:
        spares = (items[EXPERT, :, 1:] == items[EXPERT, :, :-1]).sum(1)
        many_slots = num_items >= RESCUE_FEW_SPARE_SLOTS * num_gpus
        tight = spares <= (num_gpus if many_slots else 0)
    state, suspects = construct_with_suspects(items, num_gpus, options.construction)
    state = repair_conflicts(state, allow_shared, suspects)
    open_rows = None
    if floor is not None:
        above = max_load(state) > floor * (1 + 1e-6)
        if not bool(above.all()):
            open_rows = above.nonzero()[:, 0]
    slots = num_items // num_gpus
    pair_steps = options.pair_steps_for(num_gpus, slots)
    max_steps = options.max_steps_for(num_gpus, slots)
    if open_rows is None:
        state = refine(state, pair_steps, "pairs")
        state = refine(state, max_steps, "max")
        state = _rescue(state, slots, num_gpus, tight)
    elif len(open_rows):
        sub = refine(state[:, :, open_rows], pair_steps, "pairs")
        state[:, :, open_rows] = _rescue(refine(sub, max_steps, "max"), slots, num_gpus,
                                         None if tight is None else tight[open_rows])
    if cands > 1:
        _, slots, _, _ = state.shape
        peak = max_load(state).view(cands, rows)
        best = peak.min(0).indices
        state = state.view(2, slots, cands, rows, num_gpus)[
            :, :, best, torch.arange(rows, device=best.device)
        ]
        if floor is not None:
            floor = floor[:rows]
    if slots == 3 and num_gpus > 1 and options.max_steps is None:  # (steps given: as given)
        state = _three_slot_polish(state, exact, floor)
    return greedy_look(exact, state, num_gpus)


#: a row whose busiest GPU ends this far above its lower bound (the mean GPU load or its
#: largest replica) gets a second, longer search (:func:`_rescue`)
RESCUE_GAP = 0.01
#: ... and this far, for a row that holds every expert once (no spare slots, as vLLM runs
#: without redundant experts): the packing is the whole plan there, the automatic steps
#: (4 polish steps on 8 GPUs) left Qwen3-30B-A3B's real loads on 8 GPUs × 16 slots at
#: 0.9965-0.9983 where DeepSeek's greedy reached 0.9993-0.9997, and the longer search
#: reaches the bound within 0.02 % there. At spare slots (hot experts split) the rows end
#: within 0.1 % on their own, and the S = 5 rows this gap would search again cost 2-4×
#: the time for +0.0006-0.002 (new-user pass; BENCHMARKS.md §12, thirty-third session)
RESCUE_GAP_WHOLE = 0.001
#: ... where a GPU has at least this many slots (fewer: the bound is rarely reachable;
#: 3 slots get :func:`_three_slot_polish` instead)
RESCUE_MIN_SLOTS = 5
#: at 3 slots a GPU, a row still this far above the cardinality bound of its own items
#: gets THREE_SLOT_POLISH_STEPS more polish steps (:func:`_three_slot_polish`)
THREE_SLOT_POLISH_GAP = 0.003
THREE_SLOT_POLISH_STEPS = 32
#: rows of at most one spare slot a GPU get RESCUE_GAP_WHOLE too where a GPU has at least
#: this many slots. A few hot experts then take the spares and the rest pack whole: three
#: experts 20× the rest, one spare a GPU, ended 0.05-0.2 % above their bound at 17-65
#: slots (384 experts on 8 GPUs: 0.9980 against DeepSeek's greedy's 0.9992; the tight
#: gap 0.9999-1.0). At 9 slots it gained at most 0.0002 for about 17 % more time (real
#: DeepSeek-V3 hierarchical node rows: 5.6 → 6.6 ms for +0.00001; thirty-fourth session)
RESCUE_FEW_SPARE_SLOTS = 16
#: a row at most this far above the cardinality bound of its items is at it (float32 loads
#: summed in another order differ by about 1e-7)
AT_BOUND = 1e-6
#: a row still this far above its bound after that second search, on GPUs of more than
#: P/2 slots, gets a third with steps scaled by the slots (:func:`_rescue`). At 1 % (every
#: row still above RESCUE_GAP) plans changed in the incremental chains, the fresh plans
#: and 36×32 on 8 GPUs of 5 slots of ``plan_hashes.py`` (not measured further); at 5 % one
#: nearest-dispatch plan of its variants changed, realising the same balancedness
RESCUE_STUCK_GAP = 0.05


def _items_bound(state: torch.Tensor) -> torch.Tensor:
    """``[rows]`` lower bound on the max GPU load of any packing of ``state``'s own items,
    in its dtype: :func:`eplb.core.count_bounds.packing_bound`, the mean, the largest item,
    and the ``S − 1`` lightest items beside a heavy one.

    The searches only swap items, so no search gets below it: a row at it is done. With
    every expert once, a dominant expert's rows often end there while still above their
    largest item and the mean (one expert 50× the others, 384 experts on 64 GPUs of 6
    slots: at the bound, 0.15–3.2 % above both), and searching them again cost time for
    nothing (``benchmarks/bench_no_spare.py``: 7.0 → 3.2 ms there, the same plans;
    BENCHMARKS.md §12, thirty-fourth session). Cost: one sort of the items of the rows
    the second search would take.
    """
    _, slots, rows, num_gpus = state.shape
    items = state[LOAD].permute(1, 0, 2).reshape(rows, slots * num_gpus)
    items = items.sort(1, descending=True).values.double().cpu().numpy()
    return torch.from_numpy(packing_bound(items, num_gpus)).to(state)


def _three_slot_polish(state: torch.Tensor, items: torch.Tensor,
                       floor: torch.Tensor | None) -> torch.Tensor:
    """``state`` (3 slots a GPU) with the rows more than :data:`THREE_SLOT_POLISH_GAP`
    above the cardinality bound of their own items ``items [2, rows, R]`` (heaviest first,
    as :func:`pack` takes them, so no sort: :func:`_items_bound` of ``state`` is the same
    bound), and above ``floor [rows]`` where given, polished
    :data:`THREE_SLOT_POLISH_STEPS` more steps.

    At three slots a GPU the automatic steps leave rows whose items could pack at the
    mean 0.6-1.1 % above it (real DeepSeek-V3 ``prefill_in4096``, 288 slots on 96 GPUs:
    0.9888 of the ceiling, issue 14's target 0.99): more polish on those rows alone
    reaches 0.9902. Pair steps as well cost more for less, and searching every row again
    (the rescue of 5+ slots) 1.7-2× the time; at 4 slots every shape of BENCHMARKS §12 is
    at 0.996 or more without it (BENCHMARKS §12, "Fifty-third session"). It runs on the
    chosen start only, after the starts are compared, and only with the automatic polish
    steps (``PackingOptions.max_steps`` unset)."""
    peak = max_load(state)
    bound = packing_bound(items[LOAD].double().cpu().numpy(), state.shape[3])
    far = peak > torch.from_numpy(bound).to(peak) * (1 + THREE_SLOT_POLISH_GAP)
    if floor is not None:
        far &= peak > floor * (1 + 1e-6)
    rows = far.nonzero()[:, 0]
    if len(rows):
        state[:, :, rows] = refine(state[:, :, rows], THREE_SLOT_POLISH_STEPS, "max")
    return state


def _rescue(state: torch.Tensor, slots: int, num_gpus: int,
            tight: torch.Tensor | None = None) -> torch.Tensor:
    """``state`` with the rows still more than :data:`RESCUE_GAP` above their lower bound
    (the mean GPU load or the largest item; :data:`RESCUE_GAP_WHOLE` for the rows
    ``tight [rows]``) searched again, ``P/2`` all-pairs steps and ``P`` polish steps (at
    least 8 each). On GPUs of more than ``P/2`` slots, those still
    :data:`RESCUE_STUCK_GAP` above that bound, or still that first gap above the
    cardinality bound of their items (:func:`_items_bound`), are searched a third time,
    with steps scaled by the slots. Rows at the cardinality bound are done: no search
    gets below it.

    One expert far hotter than the rest with few spare slots left the construction
    bimodal (136 experts on 16 GPUs with 9 slots, one 50× the others: six GPUs at 0.8 of
    the mean, ten at 1.0–1.2) where the automatic steps (no pair step, 8 polish steps at
    16 GPUs) lift one GPU per step: 0.835 against DeepSeek's greedy's 0.965 (found by a
    quality attacker pass). Rows already near their bound, as on every input of
    BENCHMARKS.md §12 at five slots or more, are not searched again."""
    if slots < RESCUE_MIN_SLOTS or num_gpus < 2:
        return state
    loads = gpu_loads(state)  # [rows, P]
    peak = loads.amax(1)
    # swaps keep a row's items, so the mean, the largest item and their cardinality
    # bound hold for every search below: a row at the last is done
    bound = torch.maximum(loads.mean(1), state[LOAD].amax((0, 2)))
    # (the factor as the scalar 1 + gap rounds it, for the same bits on every row; built
    # in the loads' dtype, not torch's default one, which a caller may have set to bf16)
    factor = (1 + RESCUE_GAP if tight is None
              else torch.where(tight, *(torch.tensor(1 + gap, dtype=loads.dtype,
                                                     device=loads.device)
                                        for gap in (RESCUE_GAP_WHOLE, RESCUE_GAP))))
    far = (peak > bound * factor).nonzero()[:, 0]
    if not len(far):
        return state
    done = _items_bound(state[:, :, far])
    still_open = peak[far] > done * (1 + AT_BOUND)
    far, done = far[still_open], done[still_open]
    if not len(far):
        return state
    sub = refine(refine(state[:, :, far], max(8, num_gpus // 2), "pairs"),
                 max(8, num_gpus), "max")
    if 2 * slots > num_gpus:
        # a swap moves one item of a GPU: with many slots per GPU a GPU may need more swaps
        # than the P-scaled steps give to shed its excess (one expert 50× the rest, every
        # expert once, 384 experts on 4 GPUs of 96 slots: 0.76 after them against
        # DeepSeek's greedy's 0.91; quality attacker pass). Rows still RESCUE_STUCK_GAP
        # above their bound get steps scaled by the slots too (0.96 there). So do rows
        # still the first gap above their items' cardinality bound: with one expert 1000×
        # the rest that bound is its item plus the S − 1 lightest, a GPU of it sheds one
        # item per swap, and the rows stopped 0.3-3.8 % above it, under RESCUE_STUCK_GAP,
        # where DeepSeek's greedy sat on it (0.5798 against 0.5826 on 2 GPUs of 96 slots;
        # attacker pass, thirty-fourth session)
        peak = gpu_loads(sub).amax(1)
        near = factor if isinstance(factor, float) else factor[far]
        stuck = peak > bound[far] * (1 + RESCUE_STUCK_GAP)
        still = (stuck | (peak > done * near)) & (peak > done * (1 + AT_BOUND))
        still = still.nonzero()[:, 0]
        if len(still):
            again = refine(sub[:, :, still], max(8, slots // 2), "pairs")
            sub[:, :, still] = refine(again, 2 * slots, "max")
    state[:, :, far] = sub
    return state


def first_replica(item_expert: torch.Tensor) -> torch.Tensor:
    """``[rows, R]`` index of the first item of the same expert (items of one expert adjacent)."""
    rows, num_items = item_expert.shape
    start = torch.ones(rows, num_items, dtype=torch.bool, device=item_expert.device)
    start[:, 1:] = item_expert[:, 1:] != item_expert[:, :-1]
    idx = torch.arange(num_items, device=item_expert.device).expand(rows, -1)
    return torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values


def _assignment_state(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    live: torch.Tensor,
    counts: torch.Tensor | None = None,
    all_live: bool = False,
    suspects: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(state [2, S, L, P_live], live_ids)`` of a placement, loads in units of the row's
    mean slot load, stacked replicas already spread (moves no budget can refuse).
    ``counts [L, E]``: the placement's replica counts, when the caller has them.
    ``all_live``: the caller knows every GPU of ``live`` is live; the state's columns
    are then the GPUs themselves and ``live_ids`` is ``None`` (no index built, no copy).
    ``suspects [n]``: the only rows (ascending) that may stack replicas, when known."""
    num_layers, num_slots = phy2log.shape
    num_gpus = live.shape[0]
    slots = num_slots // num_gpus
    grid = phy2log.view(num_layers, num_gpus, slots)  # [L, P_live, S]
    if all_live:
        live_ids, num_live = None, num_gpus
    else:
        live_ids = live.nonzero()[:, 0]
        num_live = len(live_ids)
        grid = grid[:, live_ids]
    if counts is None:
        counts = expert_counts(phy2log, weight.shape[1])
    per = weight / counts.clamp(min=1)
    scale = weight.sum(1, keepdim=True) / max(1, num_live * slots)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    load = (
        per.gather(1, grid.reshape(num_layers, -1).clamp(min=0)).view_as(grid) / scale[:, :, None]
    )
    # written into the float32 state: the same roundings as stacking in float64 and
    # casting (ids are exact in both), without the float64 [2, L, P, S] temporaries
    state = torch.empty((2, slots, num_layers, num_live), dtype=torch.float32,
                        device=phy2log.device)
    state[LOAD].copy_(load.permute(2, 0, 1))
    state[EXPERT].copy_(grid.permute(2, 0, 1))
    return repair_conflicts(state, counts.amax(1) > num_live, suspects), live_ids


def _to_slots(
    state: torch.Tensor, gpu: torch.Tensor, phy2log: torch.Tensor, live_ids: torch.Tensor
) -> torch.Tensor:
    """``[L, R]``: ``phy2log`` with the live GPUs' slots read from a refined ``state``
    whose column ``k`` is GPU ``live_ids[gpu[:, k]]``."""
    num_layers, num_slots = phy2log.shape
    slots = state.shape[1]
    back = gpu.long().argsort(dim=1)
    state = state.gather(3, back.expand(2, slots, -1, -1))
    result = phy2log.clone().view(num_layers, -1, slots)
    result[:, live_ids] = state[EXPERT].permute(1, 2, 0).long()
    return result.view(num_layers, num_slots)


def _origin_grid(
    origin: torch.Tensor, live_ids: torch.Tensor, gpu: torch.Tensor, slots: int
) -> torch.Tensor:
    """``[S, L, P_live]`` float32 expert ids of ``origin [L, R]`` in the state's GPU order."""
    num_layers = origin.shape[0]
    grid = origin.view(num_layers, -1, slots)[:, live_ids]
    grid = grid.gather(1, gpu.long()[:, :, None].expand(-1, -1, slots))
    return grid.permute(2, 0, 1).to(torch.float32)


def repair_assignment(
    weight: torch.Tensor, phy2log: torch.Tensor, live: torch.Tensor
) -> torch.Tensor:
    """``phy2log [L, R]`` with replicas stacked on one GPU spread by the cheapest legal
    swaps (:func:`~eplb.core.packing.repair.repair_conflicts`), nothing else changed."""
    num_layers = phy2log.shape[0]
    state, live_ids = _assignment_state(weight, phy2log, live)
    gpu = torch.arange(len(live_ids), device=phy2log.device).expand(num_layers, -1)
    return _to_slots(state, gpu, phy2log, live_ids)


def refine_assignment(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    live: torch.Tensor,
    options: PackingOptions,
    *,
    speed: torch.Tensor | None = None,
    origin: torch.Tensor | None = None,
    budget: torch.Tensor | None = None,
) -> torch.Tensor:
    """Swap refinement of a placement whose GPUs keep their identity.

    Replica counts are kept (swaps exchange two slots); an inherited placement that
    stacks replicas of an expert on one GPU is repaired first, whatever the budget.

    Args:
        weight: ``[L, E]`` loads, no all-zero row (the planner normalises those).
        phy2log: ``[L, R]`` the placement (``-1`` on dead GPUs).
        live: ``[P]`` bool live GPUs; only their slots are touched.
        options: the packing search (its polish and pair step counts are used).
        speed: ``[P]`` GPU speeds: minimise Σ load² / speed (heaviest bins start on the
            fastest GPUs).
        origin: ``[L, R]`` placement to charge moves against, with ``budget [L]`` slots.

    Returns:
        ``[L, R]`` refined placement.
    """
    num_layers, num_slots = phy2log.shape
    slots = num_slots // live.shape[0]
    state, live_ids = _assignment_state(weight, phy2log, live)
    num_live = len(live_ids)
    gpu = torch.arange(num_live, device=phy2log.device).expand(num_layers, -1)
    speed_live = None
    if speed is not None:
        speed_live = speed[live_ids].to(torch.float32).expand(num_layers, -1).contiguous()
        # rearrangement: the heaviest bin goes to the fastest GPU
        bins = gpu_loads(state).argsort(dim=1, descending=True)
        fastest = speed_live.argsort(dim=1, descending=True)
        gpu = torch.empty_like(bins).scatter_(1, bins, fastest)  # gpu of each bin
        speed_live = speed_live.gather(1, gpu)
    track = Tracking(gpu=gpu.to(torch.float32).contiguous(), speed=speed_live)
    if origin is not None:
        track.origin = _origin_grid(origin, live_ids, gpu, slots)
        track.budget = budget
    polish = options.max_steps_for(num_live)
    steps = max(options.pair_steps_for(num_live) + polish, 2 * slots)
    state = refine(state, steps, "pairs", track=track)
    if speed is None:  # the polish keeps GPUs in place; it does not weigh speeds
        state = refine(state, polish, "max", track=track)
    return _to_slots(state, track.gpu, phy2log, live_ids)


def refine_path(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    options: PackingOptions,
    *,
    origin: torch.Tensor,
    quota: torch.Tensor,
    steps: int,
    counts: torch.Tensor | None = None,
    suspects: torch.Tensor | None = None,
) -> torch.Tensor:
    """The placements a budgeted refinement passes through, for choosing how far to go.

    Starting from ``phy2log [L, R]`` on ``num_gpus`` live GPUs (stacked replicas are
    spread first), step ``k`` of the all-pairs search may change up to ``k · quota [L]``
    more slots than the start did (counted against ``origin [L, R]``), heaviest GPU pairs
    first. Rows with a zero quota only have stacked replicas spread. ``counts [L, E]``:
    the start's replica counts, when the caller has them; ``suspects [n]``: the only rows
    (ascending) of the start that may stack replicas, when the caller knows them.

    Returns:
        ``[steps, L, R]``: the placement after each step (a search that converged early
        repeats its last placement).
    """
    num_layers, num_slots = phy2log.shape
    if steps == 0:
        return phy2log.new_empty((0, num_layers, num_slots))
    slots = num_slots // num_gpus
    live = torch.ones(num_gpus, dtype=torch.bool, device=phy2log.device)
    state, _ = _assignment_state(weight, phy2log, live, counts, all_live=True,
                                 suspects=suspects)
    gpu = torch.arange(num_gpus, device=phy2log.device).expand(num_layers, -1)
    track = Tracking(gpu=gpu.to(torch.float32).contiguous())
    # every GPU in its own column: the origin's grid needs no selecting nor reordering
    track.origin = origin.view(num_layers, num_gpus, slots).permute(2, 0, 1).to(torch.float32)
    quota = quota.to(torch.int64)
    track.budget = (state[EXPERT] != track.origin).sum((0, 2)) + quota
    states: list[torch.Tensor] = []
    gpus: list[torch.Tensor] = []

    def record(current: torch.Tensor) -> None:
        states.append(current[EXPERT].clone())  # expert ids are all a snapshot needs
        gpus.append(track.gpu)  # replaced, never written in place
        track.budget = track.budget + quota  # the next step may spend one quota more

    track.on_step = record
    refine(state, steps, "pairs", track=track)
    if not states:  # nothing to search (one GPU): the start, spread
        record(state)
    while len(states) < steps:  # converged early: the rest of the path stands still
        states.append(states[-1])
        gpus.append(gpus[-1])
    # all snapshots back onto their GPUs at once: [K, S, L, P] → [K, L, R]. Every GPU is
    # live here, so column k of a snapshot goes to GPU gpu[k]: one scatter, no argsort
    experts = torch.stack(states[:steps])
    home = torch.stack(gpus[:steps]).long()[:, None].expand(-1, slots, -1, -1)
    experts = torch.empty_like(experts).scatter_(3, home, experts)
    return experts.permute(0, 2, 3, 1).long().reshape(steps, num_layers, num_slots)
