"""Move budgets: which candidate each layer takes so that at most ``budget`` slots change
over all layers, for the most value (:func:`spend_budget`); which layers also get the
fine ladder a small budget buys from (:func:`fine_layers`); and the layers' loads a total
is weighed by (:func:`layer_loads`, :func:`load_shares`: a layer's MoE time is its load
times its peak over the mean). The budget knobs are checked here too
(:func:`check_budget`, :func:`as_threshold`), before any planning, and so is which calls
take a budget at all (:func:`takes_budget`, :func:`refuse_unscored`).

Used by incremental planning under both dispatch rules (:mod:`eplb.online.incremental`,
:mod:`eplb.online.nearest`): every layer offers a few candidates, each with the slots it
changes (``cost``) and its value (the expected MoE time it saves, less the move price);
candidate 0 is the placement in force, free.
"""

from __future__ import annotations

import itertools
import math
import reprlib

import numpy as np
import torch

from eplb.core.inputs import without_values
from eplb.core.request import PlanRequest

#: largest (budget + 1) × candidates × layers table :func:`spend_budget` solves exactly:
#: at DeepSeek-V3 size (58 layers, 9 candidates) budgets up to ~500 slots, 0.5–1.6 ms
_EXACT_BUDGET_CELLS = 1 << 18


def spend_budget(balance: np.ndarray, cost: np.ndarray, budget: int) -> np.ndarray:
    """``[L]`` candidate per layer: spend at most ``budget`` slots in total where they buy
    the most. ``balance [C, L]``: every candidate's value (what it saves, less the price
    of its moves, as the planners pass it; ``-inf``: not offered), ``cost
    [C, L]``: its slots changed; candidate 0 costs nothing and is the fallback.

    Small budgets are solved exactly (the largest sum of the layers' values within the
    budget, by dynamic programming over the slots spent): there a greedy walk of the
    layers' convex hulls kept 13 % less of the gain, and one more slot could buy less (an
    attack pass, real DeepSeek-V3 loads). Larger ones take :func:`_hull_walk`, whose
    shortfall is at most one hull step of one layer, a small share of what a large budget
    buys, at a fraction of the exact table's cost (3–4 ms at 20 % of DeepSeek-V3's
    slots, for no better next window: BENCHMARKS §3)."""
    cap = min(int(budget), int(cost.max(0).sum()))
    if (cap + 1) * balance.size > _EXACT_BUDGET_CELLS:
        return _hull_walk(balance, cost, budget)
    layers = balance.shape[1]
    spent = np.arange(cap + 1)
    best = np.zeros(cap + 1)  # best[b]: the layers so far within b slots
    choice = np.zeros((layers, cap + 1), np.int64)
    for layer in range(layers):
        offered = np.nonzero((cost[:, layer] <= cap) & np.isfinite(balance[:, layer]))[0]
        before = spent[None] - cost[offered, layer][:, None]  # [K, b]: slots left before
        reach = np.where(before >= 0, best[np.maximum(before, 0)], -np.inf)
        reach += balance[offered, layer][:, None]
        top = reach.argmax(0)  # first on ties: the lower index (the map in force first)
        best = reach[top, spent]
        choice[layer] = offered[top]
    pick = np.zeros(layers, np.int64)
    left = cap
    for layer in range(layers - 1, -1, -1):  # back from the whole budget
        pick[layer] = choice[layer, left]
        left -= int(cost[pick[layer], layer])
    return pick


def _hull_walk(balance: np.ndarray, cost: np.ndarray, budget: int) -> np.ndarray:
    """:func:`spend_budget`'s greedy for tables too large to solve exactly: per layer the
    upper convex hull of (cost, balance), then the steepest hull steps of all layers first,
    then what is left on the best affordable gains off the hull."""
    layers = balance.shape[1]
    pick = np.zeros(layers, np.int64)
    steps = []  # (gain per slot, layer, from, to)
    for layer in range(layers):
        order = np.lexsort((-balance[:, layer], cost[:, layer]))
        hull = [0]
        bal, cst = balance[:, layer], cost[:, layer]

        def slope(a: int, b: int) -> float:
            return (bal[b] - bal[a]) / (cst[b] - cst[a])  # noqa: B023 (used in this loop)

        for c in order:
            if cst[c] <= cst[hull[-1]] or bal[c] <= bal[hull[-1]]:
                continue
            while len(hull) >= 2 and slope(hull[-1], c) >= slope(hull[-2], hull[-1]):
                hull.pop()
            hull.append(int(c))
        steps += [(slope(a, b), layer, a, b) for a, b in itertools.pairwise(hull)]
    spent = 0
    for _gain, layer, a, b in sorted(steps, key=lambda s: (-s[0], s[1])):
        if pick[layer] != a:
            continue  # an earlier step of this layer was unaffordable
        extra = cost[b, layer] - cost[a, layer]
        if spent + extra > budget:
            continue
        pick[layer] = b
        spent += extra
    # the hull passes over candidates under it: a layer whose next hull step did not fit
    # may still afford a smaller step off the hull (a small budget, one layer whose only
    # hull step is a fresh plan). What is left goes to the best gain per slot among every
    # candidate that fits, one at a time
    left, each = budget - spent, np.arange(layers)
    while True:
        gain = balance - balance[pick, each]
        extra = cost - cost[pick, each]
        fits = (gain > 0) & (extra <= left)
        if not fits.any():
            return pick
        rate = np.where(fits, gain / np.maximum(extra, 1), -np.inf)
        c, layer = np.unravel_index(np.argmax(rate), rate.shape)
        pick[layer] = c
        left -= extra[c, layer]



#: slots a step of the fine ladder may change (one swap), offered beside the default
#: ladder under budgets below that ladder's reach (:func:`fine_layers`)
FINE_QUOTA = 2


def fine_layers(max_moves: int | np.ndarray | None, reach: int, layers: int
                ) -> np.ndarray | None:
    """``[L]`` the layers that also get the fine ladder (steps of :data:`FINE_QUOTA`
    slots, transfer-only candidates of one and two transfers), or ``None``: every layer
    under a total budget below ``reach`` slots a layer (the default ladder's swap steps
    times its quota), the layers whose own budget is below it under per-layer budgets,
    none without a budget.

    Every default candidate changes at least one step's quota (3/64 of a layer's slots),
    so a smaller budget bought nothing (attacker pass: ``max_moves=8`` with every expert
    once on 64 GPUs moved no slot; ``max_moves=1`` never moved one). Below the line the
    fine ladder is searched whatever the budget, so a larger budget chooses among the
    same candidates as a smaller one and, where :func:`spend_budget` is exact, never ends
    worse by the objective it spends on (cutting the step to the budget instead gave each
    budget its own candidates: 46 of 1,680 budget pairs ended worse for the larger one;
    attacker pass). The line sits where the default ladder reaches as far as the fine
    one: drawn at one default step a layer, every real DeepSeek-V3 case ended worse at
    the line than one slot below it, and stayed worse 25 % above it (attacker pass).
    Above it the fine ladder is left out: it bought little there, for 1.5-1.8× the time
    of a plan with 20 % of the slots as its budget (BENCHMARKS.md §3)."""
    if max_moves is None:
        return None
    if isinstance(max_moves, np.ndarray):
        if max_moves.shape != (layers,):  # refused with a named error when choosing
            return None
        small = max_moves < reach
    else:
        small = np.full(layers, int(max_moves) < reach * layers)
    return small if small.any() else None


def layer_loads(request: PlanRequest, weight: np.ndarray) -> np.ndarray:
    """``[L]`` each layer's total load, up to one common power of two, from the request's
    scaled rows ``weight [L, E]`` (float64 on the host; idle layers 0): exact sums,
    correctly rounded, so the same bits on every machine. A total budget weighs the layers
    by it: a layer's MoE time is its load times its peak over the mean."""
    total = np.array([math.fsum(row) for row in weight])
    if request.row_shift is None:
        return total
    unshift = -request.row_shift.numpy()
    load = np.ldexp(total, unshift - unshift.max())  # (the largest scale 1: no overflow)
    if request.idle is not None:
        load[request.idle.cpu().numpy()] = 0.0
    return load


def load_shares(load: np.ndarray) -> np.ndarray:
    """``load [L]`` over its mean (exactly summed; all zero: zeros)."""
    return load * (len(load) / max(math.fsum(load), 1e-300))


def paying_candidates(value: np.ndarray, cost: np.ndarray, usual: np.ndarray | None,
                      balance: np.ndarray, skip_threshold: float | None) -> np.ndarray:
    """``[C, L]`` the candidates a budget may buy: candidate 0, and those of a higher
    ``value`` than it that move no more slots than the choice of the rule without a
    budget (the best value among the ``usual [C]`` candidates, that rule's own, or
    candidate 0 where it gains the balancedness ``balance [C, L]`` less than
    ``skip_threshold``): a budget is never a reason for more moves in a layer (attacker
    pass: an ample budget moved a layer 90 slots where no budget moved 6)."""
    layers = value.shape[1]
    own = value if usual is None else np.where(usual[:, None], value, -np.inf)
    unbudgeted = np.argmax(own, 0)
    if skip_threshold is not None:
        # that rule skips the layer: a transfer-only candidate, which only a budget
        # offers, could still clear the threshold and move it (attacker pass: 3 slots
        # in a layer that the call without a budget left alone)
        gain = balance[unbudgeted, np.arange(layers)] - balance[0]
        unbudgeted = np.where(gain < skip_threshold, 0, unbudgeted)
    pays = (value > value[:1]) & (cost <= cost[unbudgeted, np.arange(layers)][None])
    pays[0] = True
    return pays


def as_threshold(skip_threshold: object) -> float | None:
    """``skip_threshold`` as a float in [0, 1) (Python, NumPy and 0-d tensor numbers, as
    the other knobs take them) or ``None``; else ``ValueError``."""
    value = skip_threshold
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool
            and not value.is_complex() and not without_values(value)):
        value = float(value)
    elif (isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf"):
        value = float(value)  # np.array(0.1), as torch.tensor(0.1) (attacker pass)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, float | int | np.number) or not (
        0 <= value < 1
    ):
        # a rise in balancedness (at most 1): from 1 on it skipped every layer without a
        # word; 2 meant for "2 %" switched rebalancing off (new-user pass)
        raise ValueError(f"skip_threshold must be a fraction in [0, 1) (a rise in "
                         f"balancedness: 0.01 is 1 %), got {reprlib.repr(skip_threshold)}"
                         + ("; max_moves=0 keeps the map in force but for forced moves"
                            if isinstance(value, float | int | np.number)
                            and not isinstance(value, bool) and value >= 1 else ""))
    return float(value)


def check_budget(max_moves: object, skip_threshold: object) -> int | np.ndarray | None:
    """Check the move-budget knobs before any planning and return ``max_moves`` as
    ``None``, an int (slots in total) or an ``[L]`` integer array (slots per layer; its
    length is checked against the layers when planning). Raises ``ValueError``."""
    as_threshold(skip_threshold)
    given = max_moves  # as the caller wrote it, for the messages
    if isinstance(max_moves, torch.Tensor):
        kind = without_values(max_moves)  # e.g. a model built on the meta device
        if kind:
            raise ValueError(f"max_moves is a {kind} tensor, which holds no values; got "
                             f"{given!r}")
        # torch's own errors else: "can't convert Sparse layout tensor to numpy",
        # "NestedTensorImpl doesn't support sizes", "unsupported ScalarType QInt32"
        kind = ("nested" if max_moves.is_nested else "quantized" if max_moves.is_quantized
                else None if max_moves.layout == torch.strided else str(max_moves.layout))
        if kind:
            raise ValueError(f"max_moves is a {kind} tensor; give an int, one int per layer "
                             "or a plain dense tensor of them")
        max_moves = max_moves.detach().cpu().numpy()
    if isinstance(max_moves, (list, tuple)):
        if any(isinstance(v, bool | np.bool_) for v in max_moves):
            raise ValueError(f"max_moves per layer must be ints, got {reprlib.repr(given)}")
        if all(isinstance(v, int | np.integer) and v >= 0 for v in max_moves):
            # Python ints beyond int64 (no limit in that layer) are capped as a total is;
            # else NumPy reads the list as floats or objects and it is refused (an empty
            # list is ints: refused by its length, as an empty tensor is)
            max_moves = np.asarray([min(int(v), 1 << 62) for v in max_moves], np.int64)
        max_moves = np.asarray(max_moves)
    if isinstance(max_moves, np.ndarray) and max_moves.ndim == 0:
        max_moves = max_moves[()]  # a 0-d array or tensor is a total budget
    total = isinstance(max_moves, int | np.integer) and not isinstance(max_moves, bool)
    per_layer = (isinstance(max_moves, np.ndarray) and max_moves.ndim == 1
                 and np.issubdtype(max_moves.dtype, np.integer))
    if max_moves is None:
        return None
    negative = bool((np.asarray(max_moves) < 0).any()) if total or per_layer else False
    if not (total or per_layer) or negative:
        raise ValueError(f"max_moves must be a non-negative int (slots in total) or one "
                         f"non-negative int per layer (slots per layer); got "
                         f"{reprlib.repr(given)}")
    # a total beyond any slot count means "no limit but the forced moves"; capped so that
    # per-layer shares fit int64
    return min(int(max_moves), 1 << 62) if total else max_moves


def takes_budget(dispatch: str, num_nodes: int, policy: str, dead_gpus: bool) -> bool:
    """Whether incremental planning takes a move budget (``max_moves``): everywhere but
    under nearest dispatch on several nodes with the hierarchical policy or dead GPUs,
    which re-plan whole and relabel onto the old GPUs (``eplb.online.incremental``; the
    locality policy, which refuses dead GPUs, chooses per layer what pays to move within
    the budget: :mod:`eplb.online.locality`); the CLI asks it too, before telling forced
    moves from the others."""
    return not (dispatch == "nearest" and num_nodes > 1
                and (policy not in ("global", "locality") or dead_gpus))


def refuse_unscored(names: list[str], dispatch: str, num_nodes: int, policy: str) -> None:
    """Refuse the move-scoring options ``names`` (``move_price``, ``drift``,
    ``group_share`` the caller set) where the plan from a map in force scores no moves:
    nearest dispatch on several nodes with the hierarchical policy re-plans and relabels
    onto the old GPUs (:func:`takes_budget`), so they were taken and changed nothing
    (attacker pass). ``eplb.plan`` and the ``Rebalancer`` ask it alike (the locality
    policy refuses dead GPUs before).

    ``group_share`` shapes the even-split planner's expected balance only (the global
    policy's warm start there, :func:`takes_budget`): the locality policy's candidates
    are valued under the nearest rule with each expert drifting alone
    (:func:`eplb.online.nearest.paying_values`), so it was taken and changed nothing
    there too (attacker pass)."""
    if names and not takes_budget(dispatch, num_nodes, policy, False):
        raise ValueError(f"{', '.join(names)}: with dispatch='nearest' the {policy} policy "
                         "re-plans and relabels onto the old GPUs, scoring no moves; leave "
                         "them out, or pass policy='global'")
    if ("group_share" in names and dispatch == "nearest" and num_nodes > 1
            and policy == "locality"):
        raise ValueError(f"group_share: with dispatch='nearest' the {policy} policy values "
                         "its moves under the nearest rule, each expert drifting alone (no "
                         "drift shared by a group); leave it out (move_price and drift "
                         "apply), or pass policy='global'")
