"""A lower bound on the max GPU load of any packing of *given* replica counts.

The ceiling (:mod:`eplb.core.bounds`) bounds every placement by ``max(W / P, T_rep)``. With few
slots per GPU it is loose: the GPU holding a large replica must also hold ``S − 1``
others. For items sorted heaviest first ``x_1 >= ... >= x_R`` (``R = S·P``) and any
``k <= P``:

- if the ``k`` heaviest items sit on ``k`` different GPUs, those GPUs also hold
  ``k (S − 1)`` other items, at least the ``k (S − 1)`` lightest, so one of them carries
  at least ``(x_1 + ... + x_k + y_1 + ... + y_{k(S−1)}) / k`` (``y`` ascending);
- otherwise one GPU holds two of them: at least ``2 x_k + (S − 2) y_1``.

So every packing has max load ``>= max_k min(A_k, B_k)`` (and ``>= W / P``). At
``S = 2`` the bound is the largest pair of the heaviest-with-lightest pairing instead,
optimal for the items (anti-affinity aside).
:func:`packing_bound` computes it for many rows at once; the planner uses it to pick a
replica allocation per row without packing every candidate (issue 14: at ``S <= 4`` the
allocation with the smallest bound is the one the full search packs best, and packing the
portfolio's five allocations cost five times the rows).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["bound_is_mean", "packing_bound", "rank_allocations"]


def packing_bound(item_load: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[rows]`` lower bound on the max GPU load of packing ``item_load [rows, R]``.

    ``item_load`` is sorted heaviest first per row (as
    :func:`eplb.core.replication.expand_replicas` returns it); ``R`` is a multiple of
    ``num_gpus``. Cost: a few vectorized passes over ``[rows, R]``.
    """
    num_items = item_load.shape[1]
    slots = num_items // num_gpus
    x = np.asarray(item_load, dtype=np.float64)
    k = np.arange(1, num_gpus + 1)
    top = np.cumsum(x[:, :num_gpus], 1)  # Σ of the k heaviest
    mean = x.sum(1) / num_gpus
    if slots == 1:
        return np.maximum(mean, x[:, 0])
    if slots == 2:
        # pairing the heaviest with the lightest is optimal for given items (anti-affinity
        # aside): its largest pair is the bound, and the optimum where it can be kept
        return np.maximum(mean, (x + x[:, ::-1]).max(1))
    light = np.cumsum(x[:, ::-1][:, : num_gpus * (slots - 1)], 1)  # Σ of the n lightest
    spread = (top + light[:, k * (slots - 1) - 1]) / k
    shared = 2 * x[:, :num_gpus] + (slots - 2) * x[:, -1:]
    shared[:, 0] = np.inf  # one item cannot share a GPU with itself
    return np.maximum(mean, np.minimum(spread, shared).max(1))


def bound_is_mean(item_load: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[rows]`` True where :func:`packing_bound` of ``item_load [rows, R]`` is the mean
    GPU load itself.

    Every allocation of a row has the same total, so its bound is at least that mean: an
    allocation whose bound equals it has the smallest bound there is, and
    :func:`rank_allocations` (first on ties) picks it whatever the others' are.
    """
    x = item_load.detach().cpu().numpy()
    # the same arithmetic as packing_bound: it returns exactly this mean where it binds
    mean = np.asarray(x, dtype=np.float64).sum(1) / num_gpus
    return torch.from_numpy(packing_bound(x, num_gpus) <= mean).to(item_load.device)


def rank_allocations(
    item_load: torch.Tensor, num_gpus: int, groups: torch.Tensor, keep: int
) -> torch.Tensor:
    """The ``keep`` allocations of every row with the smallest :func:`packing_bound`.

    Args:
        item_load: ``[rows', R]`` items of every candidate row, heaviest first.
        groups: ``[A, n]`` for each of ``n`` planned rows, the indices (into ``rows'``) of
            its ``A`` candidate allocations, in portfolio order.
        keep: how many to keep per row (``>= 1``).

    Returns:
        ``[min(keep, A), n]`` the kept candidates, smallest bound first (ties keep the
        portfolio order, so Jefferson's allocation wins a tie).
    """
    bound = packing_bound(item_load.detach().cpu().numpy(), num_gpus)
    host = groups.cpu().numpy()
    # relative rounding: bounds equal to 1e-9 are ties (float noise must not reorder)
    scored = np.round(bound[host] / bound[host].min(0, keepdims=True), 9)
    order = np.argsort(scored, axis=0, kind="stable")[:keep]
    return torch.from_numpy(np.take_along_axis(host, order, 0)).to(groups.device)
