"""A lower bound over every replica allocation at few slots per GPU: the companion bound.

The ceiling's ``max(W / P, T_rep)`` (:mod:`eplb.core.bounds`) is loose at few slots per
GPU, because the GPU that holds the largest piece (an expert's load over its replica
count, ``x_1``) holds ``S − 1`` further pieces, at least the ``S − 1`` lightest of all.
For replica counts ``c`` every placement therefore has a GPU of load at least
``x_1(c) + σ_{S−1}(c)``, ``σ_m`` the sum of the ``m`` lightest pieces, and the bound for
every placement is the minimum over allocations. It is found by a cap ``τ`` on the pieces:

- ``x_1(c)`` is some ``w_e / k``. Take it as the cap: the fewest replicas that keep
  every piece at most ``τ`` are ``b_e = ceil(w_e / τ)``, and the ``spare = R − Σ b``
  left over only shrink pieces, so ``σ`` is smallest with all of them spent on the
  lightest pieces. Caps below ``T_rep`` need more than ``R`` replicas; caps at or above
  the value already found cannot win.
- ``σ_1`` is the lightest piece with every spare on one expert. ``σ_2`` is two pieces of
  one expert holding every spare, or one piece of each of two experts with the spares
  split between them. For ``m = S − 1 > 2``, ``σ_m >= (m / 2) σ_2``: the ``m − 2``
  further pieces each weigh at least half of the lightest two.
- Only a few experts can hold the lightest pieces: the two lightest, and the experts with
  ``b_e >= 2``, who are among the ``R − E`` heaviest because ``Σ (b_e − 1) <= R − E``.
  Every other expert has ``b_e = 1`` and a load no lighter than the two lightest's, so
  its pieces are never lighter than theirs for the same spares.

Found with the fifty-second session's ``benchmarks/bench_companion_bound.py``: on the
real DeepSeek-V3 ``prefill_in4096`` loads at 288 slots on 96 GPUs the ceiling falls from
0.9966 to 0.9931. ``tests/test_companion_bound.py`` checks it against the exact optimum
over every allocation and packing of tiny instances.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.replication import max_replica_load

__all__ = ["companion_bound"]

#: rows × experts × splits evaluated at once (float64: 8 bytes each)
_CHUNK_ELEMENTS = 1 << 22
#: ... and the largest split table of one row that σ_2 is computed exactly from
_SPLIT_TABLE_LIMIT = 1 << 16
#: the bound is rounded down by this relative margin: sums of pieces in float64 can land
#: a few ulps above the load a placement attains exactly
_ROUND_DOWN = 1 - 1e-12


def companion_bound(weight: torch.Tensor, num_replicas: int, num_gpus: int,
                    floor: torch.Tensor) -> torch.Tensor:
    """``[L]`` ``max(floor, companion bound)`` of ``weight [L, E]`` (float64, non-negative,
    finite) placed in ``num_replicas`` slots on ``num_gpus`` GPUs (module docstring);
    ``floor [L]`` a bound already known (the mean GPU load, ``T_rep``).

    Every placement's max GPU load is at least it. Without a spare slot, or at one slot a
    GPU, it is ``floor``: the other bounds cover those rows.
    """
    num_layers, num_experts = weight.shape
    slots = num_replicas // num_gpus
    out = floor.to(torch.float64, copy=True)
    if slots < 2 or num_replicas <= num_experts or num_layers == 0:
        return out
    w = np.sort(weight.detach().cpu().numpy().astype(np.float64), axis=1)  # ascending
    t_rep = max_replica_load(torch.from_numpy(w), num_replicas).numpy()
    value = _value_at(w, t_rep, num_replicas, slots)
    value = np.where(t_rep > 0, value, 0.0)  # all-zero rows: nothing to bound
    # only rows whose value at T_rep tops the floor can raise it
    rows = np.nonzero(value > out.numpy())[0]
    if rows.size:
        value[rows] = _lower_by_other_caps(w[rows], t_rep[rows], value[rows],
                                           out.numpy()[rows], num_replicas, slots)
    bound = torch.from_numpy(value * _ROUND_DOWN).to(out.device)
    return torch.maximum(out, bound)


def _lower_by_other_caps(w: np.ndarray, t_rep: np.ndarray, value: np.ndarray,
                         floor: np.ndarray, num_replicas: int, slots: int) -> np.ndarray:
    """``[N]`` ``value`` (the bound at ``T_rep``) lowered by every other cap that can win:
    some ``w_e / k`` strictly between ``T_rep`` and
    the value, i.e. ``w_e / value < k < w_e / T_rep``, listed per expert (a dense table
    of quotients ``[N, E, R − E + 1]`` is gigabytes at a thousand experts on a thousand
    GPUs). ``w [N, E]`` ascending; ``floor [N]`` the bound already known.

    A row has at most ``R − E`` such caps, but each is evaluated over its whole row: all
    at once, ``[caps, E]`` took 3.6 GB and 81 s at 4,096 experts in 8,096 slots on 50
    layers (attacker pass). So the caps go in chunks of at most :data:`_CHUNK_ELEMENTS`
    loads, lowest (relative to ``T_rep``) first, equal ones once, and a cap is skipped
    once it cannot change the result: at or above its row's value so far (the bound at a
    cap is at least the cap), or its row already at or below ``floor`` (the bound is then
    ``floor``)."""
    num_experts = w.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.floor(w / value[:, None]) + 1
        high = np.minimum(np.ceil(w / t_rep[:, None]) - 1, num_replicas - num_experts + 1)
    count = np.maximum(high - low + 1, 0).astype(np.int64)  # [N, E]
    value = value.copy()
    if not count.any():
        return value
    rows, experts = np.nonzero(count)
    per = count[rows, experts]
    k = np.repeat(low[rows, experts] - np.cumsum(per) + per, per) + np.arange(per.sum())
    rows = np.repeat(rows, per)
    caps = w[rows, np.repeat(experts, per)] / k
    # equal caps (experts of equal load) give equal bounds: one each
    order = np.lexsort((caps, rows))
    rows, caps = rows[order], caps[order]
    distinct = np.ones(len(caps), bool)
    distinct[1:] = (rows[1:] != rows[:-1]) | (caps[1:] != caps[:-1])
    rows, caps = rows[distinct], caps[distinct]
    order = np.argsort(caps / t_rep[rows], kind="stable")
    rows, caps = rows[order], caps[order]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, num_experts))
    for start in range(0, len(caps), chunk):
        r, c = rows[start:start + chunk], caps[start:start + chunk]
        live = (c < value[r]) & (value[r] > floor[r])
        if live.any():
            r, c = r[live], c[live]
            np.minimum.at(value, r, _value_at(w[r], c, num_replicas, slots))
    return value


def _value_at(w: np.ndarray, cap: np.ndarray, num_replicas: int, slots: int) -> np.ndarray:
    """``[N]`` ``cap + σ_{S−1}`` bound for rows ``w [N, E]`` (ascending) under caps
    ``cap [N]`` (``inf`` where the cap needs more than ``num_replicas`` replicas), in
    chunks of at most :data:`_CHUNK_ELEMENTS`."""
    num_experts = w.shape[1]
    kept = min(num_experts, 2 + min(num_experts, num_replicas - num_experts))
    per_row = kept * (num_replicas - num_experts + 1)
    # the split table [rows, kept, R − E + 1] is exact; past _SPLIT_TABLE_LIMIT a row
    # (a thousand spare slots) σ_2 is bounded by twice the lightest piece instead
    exact = per_row <= _SPLIT_TABLE_LIMIT
    chunk = max(1, _CHUNK_ELEMENTS // (per_row if exact else num_experts))
    return np.concatenate([
        _value_chunk(w[i:i + chunk], cap[i:i + chunk], num_replicas, slots, exact)
        for i in range(0, len(w), chunk)
    ])


def _value_chunk(w: np.ndarray, cap: np.ndarray, num_replicas: int, slots: int,
                 exact: bool) -> np.ndarray:
    """:func:`_value_at` of one chunk (``exact``: ``σ_2`` from the split table)."""
    num_experts = w.shape[1]
    # ceil with a relative slack: w_e / (w_e / k) may round to k(1 + ulp); a count too
    # small only leaves more spares, so the bound stays valid
    with np.errstate(divide="ignore", invalid="ignore"):
        base = np.maximum(1.0, np.ceil(w / cap[:, None] * (1 - 1e-12)))
    base = np.where(np.isfinite(base), base, num_replicas + 1.0)  # cap 0: unreachable
    spare = num_replicas - base.sum(1)  # [N]
    feasible = spare >= 0
    spare = np.where(feasible, spare, 0).astype(np.int64)
    # the experts that can hold the lightest pieces (module docstring)
    heavy = min(num_experts, num_replicas - num_experts)
    keep = np.unique(np.concatenate([np.arange(min(2, num_experts)),
                                     np.arange(num_experts - heavy, num_experts)]))
    wk, bk = w[:, keep], base[:, keep]  # [N, K]
    with_all = wk / (bk + spare[:, None])  # [N, K]: every spare on one expert
    if slots == 2:
        companions = with_all.min(1)  # σ_1
    else:
        one_expert = np.where(bk + spare[:, None] >= 2, 2 * with_all, np.inf).min(1)
        if exact:
            splits = np.arange(int(spare.max()) + 1)  # [F]
            pieces = wk[:, :, None] / (bk[:, :, None] + splits)  # [N, K, F]
            pieces = np.where(splits <= spare[:, None, None], pieces, np.inf)
            lightest_two = np.minimum(one_expert, _two_experts(pieces, spare))
        else:
            lightest_two = 2 * with_all.min(1)  # each of the two is at least the lightest
        companions = (slots - 1) / 2 * lightest_two
    return np.where(feasible, cap + companions, np.inf)


def _two_experts(pieces: np.ndarray, spare: np.ndarray) -> np.ndarray:
    """``[N]`` the lightest piece of one expert plus the lightest of another, the spares
    split between them: ``pieces [N, K, F]`` the load of expert ``k`` with ``f`` spares
    (``inf`` past ``spare [N]``)."""
    num_rows, num_kept, num_splits = pieces.shape
    if num_kept < 2:
        return np.full(num_rows, np.inf)
    order = np.argsort(pieces, axis=1, kind="stable")[:, :2]  # [N, 2, F]
    lightest = np.take_along_axis(pieces, order, axis=1)  # [N, 2, F]
    first = np.arange(num_splits)
    second = spare[:, None] - first  # [N, F]: the other expert's spares
    valid = second >= 0
    second = np.where(valid, second, 0)
    rows = np.arange(num_rows)[:, None]
    a_load, a_id, a_next = lightest[:, 0, :], order[:, 0, :], lightest[:, 1, :]
    b_load, b_id, b_next = (lightest[rows, 0, second], order[rows, 0, second],
                            lightest[rows, 1, second])
    pair = np.where(a_id != b_id, a_load + b_load,
                    np.minimum(a_load + b_next, a_next + b_load))
    return np.where(valid, pair, np.inf).min(1)
