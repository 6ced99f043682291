"""Count builders that keep the first ``k`` of Jefferson's extra replicas and give the
others to the coldest experts, which no divisor rule does (:mod:`eplb.core.replication`
holds the rules): :func:`filler_counts` for few slots per GPU, :func:`ladder_counts` for
rows of few GPUs, :func:`layer_counts` (and its :func:`layer_bound`) for a few experts
carrying most of a row's load. All work on a batch of rows at once, on the host.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.replication import cap_counts, replica_counts


def _jefferson_order(w: np.ndarray, extra: np.ndarray) -> tuple[np.ndarray, ...]:
    """Jefferson's steps of every row, ``extra [rows, E]`` of them per expert (each
    expert's first steps: from one replica to two, and so on), as a ragged table laid
    out flat: ``(row, expert, rank)``, ``rank`` a step's place in its row's Jefferson
    order (priority ``w / j`` falling; ties: the lower expert, then its earlier step).
    Given every step below a cap, or the steps of Jefferson's capped counts
    (:func:`~eplb.core.replication.cap_counts`), the first ``k`` in that order are
    Jefferson's capped allocation of ``k`` extra replicas (D'Hondt is house-monotone):
    any ``k`` reads off this one table."""
    rows, num_experts = extra.shape
    per_row = int(extra[0].sum()) if rows else 0
    if (extra.sum(1) != per_row).any():  # every row holds R − E steps, or E·(cap − 1)
        raise ValueError("Jefferson's step table needs as many steps in every row")
    step_row = np.repeat(np.arange(rows), per_row)
    step_expert = np.repeat(np.tile(np.arange(num_experts), rows), extra.ravel())
    first = np.repeat(np.cumsum(extra.ravel()) - extra.ravel(), extra.ravel())
    step_j = np.arange(len(step_expert)) - first + 1
    priority = (w[step_row, step_expert] / step_j).reshape(rows, per_row)
    # a stable sort of each row: equal priorities stay in table order (expert, then step)
    order = np.argsort(-priority, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(per_row)[None], 1)
    return step_row, step_expert, rank.ravel()


def _first_steps(shape: tuple[int, int], steps: tuple[np.ndarray, ...],
                 keep: np.ndarray) -> np.ndarray:
    """``[K, rows, E]`` counts of the first ``keep [K, rows]`` steps of
    :func:`_jefferson_order`'s table ``steps`` (every expert at one replica first)."""
    rows, num_experts = shape
    step_row, step_expert, rank = steps
    kept = rank[None] < keep[:, step_row]  # [K, steps]
    which, at = np.nonzero(kept)
    flat = (which * rows + step_row[at]) * num_experts + step_expert[at]
    grants = np.bincount(flat, minlength=len(keep) * rows * num_experts)
    return 1 + grants.reshape(len(keep), rows, num_experts)


def _to_coldest(w: np.ndarray, counts: np.ndarray, left: np.ndarray,
                cap: np.ndarray) -> np.ndarray:
    """``counts [K, rows, E]`` plus ``left [K, rows]`` replicas given to the coldest
    experts, one each per round, coldest first (ties: the lower id), to experts below
    ``cap [rows]`` replicas."""
    if not left.any():
        return counts.copy()
    cold = np.argsort(w, axis=1, kind="stable")  # ties: the lower id
    room = np.take_along_axis(cap[None, :, None] - counts, cold[None], 2)  # [K, rows, E]
    given = np.zeros_like(room)
    done = np.zeros_like(left)
    for round_ in range(1, int(room.max(initial=0)) + 1):
        if (done >= left).all():
            break
        open_ = room >= round_
        take = open_ & (done[..., None] + open_.cumsum(2) <= left[..., None])
        given += take
        done = done + take.sum(2)
    # back in expert order (cold is a permutation: every entry is written)
    back = np.empty_like(given)
    np.put_along_axis(back, np.broadcast_to(cold[None], back.shape), given, 2)
    return counts + back


def filler_counts(
    weight: torch.Tensor, counts: torch.Tensor, num_gpus: int, rounds: int = 3
) -> torch.Tensor:
    """``counts [rows, E]`` reshaped for few slots per GPU: at most ``P`` replicas above
    half the mean GPU load, the slots this frees given to the coldest experts.

    Two replicas above half the mean on one GPU put it above the mean, so with more
    than ``P`` of them some GPU is. Jefferson's counts make them when the hot experts'
    share of the slots splits them into pieces just above it: 6 + 4 replicas of two
    experts on 8 GPUs of 3 slots (14 idle experts holding the other slots) pair them on
    two GPUs, 0.64 of the ideal balance, where 5 + 3 hot replicas and two idle experts
    twice reach 0.9375. A divisor rule never gives an idle expert a second replica, yet
    here that replica is what lets the hot ones stay whole. The hot experts keep the
    first ``k`` of Jefferson's steps, ``k`` lowered (their last granted steps undone)
    until at most ``P`` pieces exceed half the mean (a few ``rounds``: a removal can push
    another expert's pieces over it); the freed replicas go one each to the coldest
    experts, round by round. ``weight [rows, E]``; ``counts`` are Jefferson's (capped:
    :func:`~eplb.core.replication.cap_counts`).
    """
    rows, num_experts = counts.shape
    w = weight.detach().to(torch.float64).cpu().numpy()
    c = counts.detach().cpu().numpy().astype(np.int64)
    steps = _jefferson_order(w, c - 1)
    extra = c.sum(1) - num_experts
    half = w.sum(1, keepdims=True) / (2 * num_gpus)
    keep = extra.copy()
    for _ in range(rounds):
        kept = _first_steps((rows, num_experts), steps, keep[None])[0]
        more = np.maximum(np.where(w / kept > half, kept, 0).sum(1) - num_gpus, 0)
        if not more.any():
            break
        keep = np.maximum(keep - more, 0)
    hot = _first_steps((rows, num_experts), steps, keep[None])
    # as cap_counts: one replica per GPU at most where the slots fit that
    cap = np.where(num_gpus * num_experts >= c.sum(1), num_gpus, c.sum(1))
    out = _to_coldest(w, hot, (extra - keep)[None], cap)[0]
    return torch.from_numpy(out).to(counts.device, counts.dtype)


def ladder_counts(weight: torch.Tensor, num_replicas: int, cap: int,
                  rungs: int) -> torch.Tensor:
    """``counts [K, rows, E]``: the first ``k`` of Jefferson's extra replicas (capped at
    ``cap``), the other ``R − E − k`` given to the coldest experts, for ``K <= rungs``
    values of ``k`` spread evenly over ``0..R − E``.

    On few GPUs a GPU's mean load is only a few experts, so the replicas' sizes must add
    up to it, and no divisor rule makes them do so: 0.78, 0.55, 0.50, 0.11, 0.05, 0.01 of
    the mean on 2 GPUs of 4 slots pack at 1.18 of the mean with Jefferson's counts (both
    hot experts halved) and at 1.001 with one hot expert halved and the coldest one
    twice. Which split fits is a packing question, so the rungs are packed, not ranked.
    The coldest experts get one more replica each, round by round, coldest first (ties:
    the lower id), while below ``cap``. ``weight [rows, E]`` with ``R < cap · E``.
    """
    rows, num_experts = weight.shape
    if not num_experts <= num_replicas < cap * num_experts:
        # the planner calls it only so; outside, the counts could not sum to R (attacker)
        raise ValueError(f"ladder_counts needs E <= R < cap * E, got E={num_experts}, "
                         f"R={num_replicas}, cap={cap}")
    w = weight.detach().to(torch.float64).cpu().numpy()
    num_extra = num_replicas - num_experts
    # every step below the cap is in the table (at most cap - 1 per expert: few here)
    steps = _jefferson_order(w, np.full(w.shape, min(cap - 1, num_extra), np.int64))
    ks = np.unique(np.round(np.linspace(0, num_extra, min(rungs, num_extra + 1))).astype(np.int64))
    keep = np.broadcast_to(ks[:, None], (len(ks), rows))
    hot = _first_steps((rows, num_experts), steps, keep)
    counts = _to_coldest(w, hot, num_extra - keep, np.full(rows, cap))
    return torch.from_numpy(counts).to(weight.device)


def layer_counts(weight: torch.Tensor, counts: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``counts [rows, E]`` with the replicas above the mean replica load ``W / R`` (the
    heavy ones) trimmed to a whole number of layers of GPUs, ``j·P``: the heavy experts
    keep the first of their own Jefferson steps, the freed replicas go one each to the
    coldest experts. Rows with at most ``P`` heavy replicas, or more heavy experts than
    the layers below them hold, keep their counts; so do rows of ``P`` to ``2·P`` heavy
    replicas where the heavy experts hold fewer than two each on average (many whole
    experts, not a few split ones: on real DeepSeek-V3 node rows of 24 GPUs ~25 heavy
    experts held ~33 replicas, and trimming them changed ordinary plans).

    ``j·P + 1`` replicas each above ``1 / (j + 1)`` of the mean GPU load put ``j + 1`` of
    them on some GPU, above the mean, whatever the packing; :func:`filler_counts` keeps
    that from happening at ``j = 1`` only. Four experts carrying nearly all the load on
    4,096 GPUs of 3 slots got 2,049 replicas each from Jefferson's rule: 8,196 pieces just
    below half the mean (so ``filler_counts`` keeps them) but above a third of it, so
    four GPUs carried three (0.668 of the ideal balance); 2,048 each fill two layers of
    GPUs exactly, and four idle experts twice the third (1.0). At ``j = 1``, two pieces
    below half the mean (which :func:`filler_counts` keeps) and the smallest items
    beside them can still exceed the mean: three experts of 1,000 among 4,093 of load 1
    on 4,096 GPUs of 3 slots got 1,368 + 1,367 + 1,367 replicas (0.731; the cold ones
    0.5; mean 1.732), so six GPUs held two and a cold half (0.882; the packed divisor
    rule δ = −0.75's 1,251 each left 343 GPUs without one and two cold halves beside
    every hot piece: 0.962); 4,096 hot pieces put one on every GPU (0.9995).
    ``weight [rows, E]``;
    ``counts`` every row summing to ``R``, a multiple of ``P`` (the packed allocation's).
    """
    rows, num_experts = counts.shape
    w = weight.detach().to(torch.float64).cpu().numpy()
    c = counts.detach().cpu().numpy().astype(np.int64)
    total = c.sum(1, keepdims=True)
    heavy = w / c > w.sum(1, keepdims=True) / total  # [rows, E] pieces above W / R
    held = np.where(heavy, c, 0).sum(1)
    extra = held - heavy.sum(1)  # the heavy experts' steps
    keep = (held // num_gpus) * num_gpus - heavy.sum(1)
    # one layer (P < held < 2P) only where the heavy experts are split, two replicas each
    # on average: a few hot experts, not many whole ones (see the docstring)
    layers = (held >= 2 * num_gpus) | ((held > num_gpus) & (held >= 2 * heavy.sum(1)))
    keep = np.where(layers & (keep >= 0), keep, extra)
    if (keep == extra).all():  # (no rows, too)
        return counts
    if (extra != extra[0]).any():  # the step table is laid out with as many per row
        return torch.cat([layer_counts(weight[i : i + 1], counts[i : i + 1], num_gpus)
                          for i in range(rows)])
    # the heavy experts' own steps, in Jefferson's order: the first k keep the heaviest
    # pieces as even as the rule makes them; the other experts keep every one of theirs
    steps = _jefferson_order(w, np.where(heavy, c - 1, 0))
    trimmed = _first_steps((rows, num_experts), steps, keep[None]) + np.where(heavy, 0, c - 1)
    # as cap_counts: one replica per GPU at most where the slots fit that
    cap = np.where(num_gpus * num_experts >= total[:, 0], num_gpus, total[:, 0])
    out = _to_coldest(w, trimmed, (extra - keep)[None], cap)[0]
    return torch.from_numpy(out).to(counts.device, counts.dtype)


def layer_bound(item_load: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[rows]`` the pigeonhole bound of packing ``item_load [rows, R]`` (heaviest first)
    on ``P`` GPUs of ``S = R / P`` slots: some GPU holds ``j + 1`` of the ``j·P + 1``
    heaviest items and ``S − j − 1`` others, so carries at least ``(j + 1)·x[j·P] +
    (S − j − 1)·x[R − 1]``, for every ``1 <= j < S``; and at least the mean."""
    x = np.asarray(item_load, dtype=np.float64)
    slots = x.shape[1] // num_gpus
    out = x.sum(1) / num_gpus
    for j in range(1, slots):
        out = np.maximum(out, (j + 1) * x[:, j * num_gpus] + (slots - j - 1) * x[:, -1])
    return out


def hot_counts(weight: torch.Tensor, counts: torch.Tensor,
               num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [n, E], rows [n])``: for the rows of ``counts [rows, E]`` (the packed
    allocation's, each summing to ``R``) whose experts above the mean GPU load ``W / P``
    (the hot ones) hold fewer than ``P`` replicas, counts where the hot experts hold
    exactly ``P`` (split among them by Jefferson's rule) and the others ``R − P``
    (Jefferson's, capped at ``P`` each). Rows where the others cannot take ``R − P``
    (fewer slots than experts, or more than ``P`` each) are left out.

    Hot experts holding fewer than ``P`` replicas leave some GPU without a hot piece, and
    its slots must add up to the mean from cold pieces alone, which they rarely do: one
    expert of 100 among 4,095 of load 1 on 4,096 GPUs of 3 slots got 201 replicas from
    Jefferson's rule (0.4975 each) and the cold experts halves and thirds, so GPUs carried
    a half and two thirds, 1.167 where the mean is 1.024 (0.878 of the ideal balance);
    4,096 hot pieces of 0.024, one per GPU, beside two cold halves reach 0.9998.
    ``weight [rows, E]``.
    """
    w = weight.detach().to(torch.float64)
    total = int(counts[0].sum())
    hot = w > w.sum(1, keepdim=True) / num_gpus  # [rows, E]
    short = hot.any(1) & (torch.where(hot, counts, 0).sum(1) < num_gpus)
    outs, kept = [], []
    for row in short.nonzero()[:, 0].tolist():
        is_hot, cold = hot[row], ~hot[row]
        num_cold = int(cold.sum())
        if not num_cold <= total - num_gpus <= num_gpus * num_cold:
            continue
        out = torch.zeros_like(counts[row])
        out[is_hot] = replica_counts(w[row, is_hot][None], num_gpus)[0, 0]
        cold_w = w[row, cold][None]
        if float(cold_w.sum()) <= 0:  # idle experts: spread evenly (the rule needs load)
            cold_w = torch.ones_like(cold_w)
        cold_counts = replica_counts(cold_w, total - num_gpus)[0]
        out[cold] = cap_counts(cold_w, cold_counts, num_gpus)[0]
        outs.append(out)
        kept.append(row)
    if not outs:
        return counts[:0], torch.zeros(0, dtype=torch.int64, device=counts.device)
    return torch.stack(outs), torch.tensor(kept, dtype=torch.int64, device=counts.device)
