"""DeepSeek's greedy packing as a second opinion for rows that hold every expert once.

With 3-4 slots per GPU and every expert once (no spare slot: vLLM's default of no
redundant experts) the packing is the whole plan, the rescue searches do not run (fewer
than 5 slots), and the swap searches can stop in a local optimum that DeepSeek's greedy
(heaviest first onto the lightest GPU with room) does not: real DeepSeek-V3 loads with no
spare slot on 64 GPUs had 7 of 116 layers below it, random rows of 9-256 experts on 3-64
GPUs 19 of 900 (thirty-fourth session, BENCHMARKS.md §12). :func:`greedy_look` packs those
rows the greedy way too, polishes that packing, and keeps it where its busiest GPU is
lighter.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.count_bounds import packing_bound
from eplb.core.packing.refine import refine
from eplb.core.packing.state import EXPERT, LOAD, max_load

#: rows holding every expert once at this many slots per GPU get the greedy's opinion
#: (fewer: 2 slots, where eplb's pairing of whole items is optimal; more: the rescue
#: searches of :func:`eplb.core.packing._rescue` take such rows)
GREEDY_LOOK_SLOTS = (3, 4)
#: ... where the row's busiest GPU ends this far above the cardinality bound of its items
GREEDY_LOOK_GAP = 1e-3
#: polish steps given to the greedy packing before the two are compared
GREEDY_LOOK_STEPS = 4
#: GPU loads this close (relative) are ties of the greedy's "lightest GPU"
TIE_TOLERANCE = 1e-5


def greedy_positions(item_load: np.ndarray, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's balanced packing of ``item_load [n, R]`` (heaviest first, ``R = S·P``),
    all rows at once: item ``i`` goes to the lightest GPU with a free slot (first on ties).

    Loads within :data:`TIE_TOLERANCE` of the lightest tie (first GPU wins). Returns
    ``(gpu [n, R], slot [n, R])``: each item's GPU and its place there (arrival order).
    The first ``P`` items go one to each GPU, in order, as the greedy puts positive loads
    (the rows this packs are above their bound, so never all zero).
    """
    num_rows, num_items = item_load.shape
    slots = num_items // num_gpus
    rows = np.arange(num_rows)
    gpu = np.empty((num_rows, num_items), dtype=np.int64)
    slot = np.empty((num_rows, num_items), dtype=np.int64)
    gpu[:, :num_gpus] = np.arange(num_gpus)
    slot[:, :num_gpus] = 0
    # the loads of GPUs with a free slot; +inf once a GPU is full
    open_load = item_load[:, :num_gpus].copy()
    fill = np.ones((num_rows, num_gpus), dtype=np.int64)
    for i in range(num_gpus, num_items):
        # the first GPU within TIE_TOLERANCE of the lightest: the items are float32 over
        # their mean, which splits ties of integer loads the exact greedy sees as ties
        # (16 integer loads on 4 GPUs: 149 against the greedy's 148; attacker pass)
        lightest = open_load.min(1, keepdims=True)
        to = (open_load <= lightest + TIE_TOLERANCE * np.abs(lightest)).argmax(1)
        gpu[:, i] = to
        place = fill[rows, to]
        slot[:, i] = place
        fill[rows, to] = place + 1
        open_load[rows, to] = np.where(place + 1 < slots, open_load[rows, to] + item_load[:, i],
                                       np.inf)
    return gpu, slot


def greedy_look(items: torch.Tensor, state: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``state [2, S, rows, P]`` with, in the rows of ``items [2, rows, R]`` (heaviest
    first) that hold every expert once at :data:`GREEDY_LOOK_SLOTS` and end more than
    :data:`GREEDY_LOOK_GAP` above their items' cardinality bound, the greedy packing
    (polished) where its busiest GPU is lighter. Other rows are returned as they are."""
    num_items = items.shape[2]
    slots = num_items // num_gpus
    if slots not in GREEDY_LOOK_SLOTS or num_gpus < 2:
        return state
    whole = (items[EXPERT, :, 1:] != items[EXPERT, :, :-1]).all(1)
    if not bool(whole.any()):
        return state
    peak = max_load(state)
    # the items of a row are the same in any packing: their bound from the sorted items
    bound = packing_bound(items[LOAD].double().cpu().numpy(), num_gpus)
    bound = torch.from_numpy(bound).to(peak)
    open_rows = (whole & (peak > bound * (1 + GREEDY_LOOK_GAP))).nonzero()[:, 0]
    if not len(open_rows):
        return state
    sub = items[:, open_rows]
    gpu, slot = greedy_positions(sub[LOAD].double().cpu().numpy(), num_gpus)
    count = len(open_rows)
    greedy = torch.empty(2, slots, count, num_gpus, dtype=items.dtype, device=items.device)
    row = torch.arange(count, device=items.device)[:, None].expand(-1, num_items)
    greedy[:, torch.from_numpy(slot).to(items.device), row,
           torch.from_numpy(gpu).to(items.device)] = sub
    if GREEDY_LOOK_STEPS:
        greedy = refine(greedy, GREEDY_LOOK_STEPS, "max")
    better = max_load(greedy) < peak[open_rows]
    if bool(better.any()):
        state[:, :, open_rows[better]] = greedy[:, :, better]
    return state
