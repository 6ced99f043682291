"""Replication: how many replicas each logical expert gets.

All functions work on a batch of rows (``rows`` = layers, or layers × nodes) at once.

Every allocation here is a *priority rule*: the step that takes expert ``e`` from ``c`` to
``c + 1`` replicas has a priority ``f(w_e, c)`` that falls as ``c`` grows. Starting every
expert at one replica and granting the ``R - E`` highest-priority steps gives the rule's
allocation in one top-k selection, with no sequential loop:

- divisor rules ``w / (c + δ)``: ``δ = 0`` is Jefferson/D'Hondt (DeepSeek's rule, it
  minimises the largest replica load); ``−1 < δ < 0`` favours experts with few replicas
  (an expert's second replica comes cheaper the closer ``δ`` is to −1): fewer, larger hot
  replicas and finer cold ones to fill the other slots, which can pack better where a GPU
  has few slots;
- largest remainder (Hamilton) ``w·R/W − c``.

A portfolio of rules is scored later by the packed max GPU load, per layer.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from eplb.core.device_path import expand_replicas_torch, use_device_path
from eplb.core.ordering import argsort_rows, top_indices, top_mask

# cap on the [rows, experts, steps] priority tensor before chunking over rows
_MAX_PRIORITY_ELEMENTS = 1 << 24
# cap on cap_counts' [rows, experts, steps] table of further steps before chunking over
# rows (or, for one row, a heap)
_MAX_CAP_TABLE = 1 << 24
# cap_counts grants a row on a heap where its table has more entries than this many per
# freed replica (a heap grant costs about as much as sorting 16 table entries)
_TABLE_PER_GRANT = 16
# past this many candidate steps per row, bisect the grant level instead of a topk
_MAX_TOPK_CANDIDATES = 4096


def _max_steps(weight: np.ndarray, num_extra: int) -> int:
    """Most extra replicas any one expert can get under a divisor rule with δ ∈ (−1, 0].

    With ``λ`` the last granted priority, ``extras_e <= w_e / λ − δ`` and ``λ >= W / R``,
    so ``extras_e <= w_e·R / W + 1``. ``weight [rows, E]`` is a host array.
    """
    return int(_steps_per_row(weight, num_extra).max(initial=1))


def _steps_per_row(weight: np.ndarray, num_extra: int) -> np.ndarray:
    """:func:`_max_steps` of every row of ``weight [rows, E]`` alone: ``[rows]``."""
    total = weight.sum(-1)
    # an all-zero row may give every step to one expert: count it as fully concentrated
    # (no clamp on total: a subnormal total would understate the share)
    positive = total > 0
    share = np.where(positive, weight.max(-1) / np.where(positive, total, 1), 1.0)
    num_replicas = num_extra + weight.shape[-1]
    steps = np.ceil(share * num_replicas).astype(np.int64) + 2
    return np.clip(steps, 1, max(1, num_extra))


def replica_counts(
    weight: torch.Tensor, num_replicas: int, rules: tuple[float | str, ...] = (0.0,)
) -> torch.Tensor:
    """Replica counts for each rule: ``weight [rows, E]`` → ``counts [len(rules), rows, E]``.

    A rule is a divisor shift ``δ`` (float, priority ``w / (c + δ)``) or ``"hamilton"``.
    Every count is >= 1 and each row sums to ``num_replicas``. Rows must not be all zero.

    The selection runs in NumPy on the host (introselect is several times faster than
    torch's CPU top-k here, and the arrays are small); large tables fall back to bisecting
    the grant level on the weight's device.
    """
    rows, num_experts = weight.shape
    num_extra = num_replicas - num_experts
    if num_extra == 0:
        return torch.ones(len(rules), rows, num_experts, dtype=torch.int64, device=weight.device)
    w = weight.detach().to(torch.float64).cpu().numpy()
    # only the num_extra heaviest experts can win an extra replica: each of them outranks
    # every lighter expert's first step under every rule
    num_hot = min(num_experts, num_extra)
    row_steps = _steps_per_row(w, num_extra)
    # the path is chosen row by row, so a row's counts do not depend on the other rows of
    # the call (one concentrated row used to send every row to the threshold path)
    far = num_hot * row_steps > _MAX_TOPK_CANDIDATES
    if far.any():
        out = torch.empty((len(rules), rows, num_experts), dtype=torch.int64,
                          device=weight.device)
        at = torch.from_numpy(np.flatnonzero(far)).to(weight.device)
        sub = weight.index_select(0, at)
        out[:, at] = torch.stack([_counts_by_threshold(sub, num_replicas, rule)
                                  for rule in rules])
        if not far.all():
            at = torch.from_numpy(np.flatnonzero(~far)).to(weight.device)
            out[:, at] = replica_counts(weight.index_select(0, at), num_replicas, rules)
        return out
    steps = int(row_steps.max(initial=1))
    chunk = max(1, _MAX_PRIORITY_ELEMENTS // max(1, len(rules) * num_hot * steps))
    counts = np.concatenate(
        [
            _counts_by_table(w[i : i + chunk], num_replicas, rules, num_hot, steps)
            for i in range(0, rows, chunk)
        ],
        axis=1,
    )
    return torch.from_numpy(counts).to(weight.device)


def cap_counts(weight: torch.Tensor, counts: torch.Tensor, cap: int) -> torch.Tensor:
    """``counts [..., rows, E]`` with no expert above ``cap`` replicas (the GPUs of a row).

    An expert with ``c > P`` replicas on ``P`` GPUs must put two on one GPU, which then
    carries at least ``2·w / c`` of it, more than the ``w / P`` it carries with one
    replica per GPU whenever ``c < 2P`` (and never less): the replicas beyond ``P`` only
    make a hot spot. Divisor rules grant them to an expert carrying more than about
    ``1 / S`` of a row's load, e.g. one expert taking nearly all tokens (288 slots on 32
    GPUs: 0.516 of the ideal balance with 33 replicas, 1.0 with 32). Such counts are cut
    to ``cap`` and the freed replicas granted one at a time by Jefferson's priority
    ``w / c`` (ties: the lower expert id) to experts still below it. Rows where ``cap · E``
    cannot hold the slots keep their counts (the packing then shares GPUs).
    ``weight [rows, E]``. Returns ``counts`` itself when nothing is above the cap.
    """
    num_experts = counts.shape[-1]
    if not counts.numel() or int(counts.max()) <= cap:  # the common case: one reduction
        return counts
    flat = counts.reshape(-1, num_experts)
    over = (flat.amax(1) > cap) & (cap * num_experts >= flat.sum(1))
    if not bool(over.any()):
        return counts
    rows = weight.shape[0]
    which = over.nonzero()[:, 0]
    w = weight.detach().to(torch.float64).cpu().numpy()[(which % rows).cpu().numpy()]
    c = flat.index_select(0, which).cpu().numpy().astype(np.int64)
    freed = np.maximum(c - cap, 0).sum(1)
    c = np.minimum(c, cap)
    # a row's greedy runs on a heap, in time ~ its freed replicas (under a microsecond a
    # grant), unless its table of further steps (E · min(cap, freed) entries, ~50 ns each
    # in a vectorized sort over rows) is small next to them: few experts sharing many
    # freed replicas. One expert dominating 4,096 on 4,096 GPUs frees 4,096 replicas:
    # its 2**24-entry table took 1.4 s a row, the heap 4 ms. Both grant the same
    # replicas in the same order. The [rows, E, steps] table takes ~40 bytes an entry at
    # its peak, so a row's table stays under _MAX_CAP_TABLE entries (E·P reach 2**32),
    # and rows go in chunks of at most that many (a plan's memory stays flat in its
    # layers: 4 layers of one hot expert among 4,096 on 4,096 GPUs asked 2 GiB arrays)
    table = num_experts * np.minimum(cap, freed)
    by_heap = (table > _TABLE_PER_GRANT * freed) | (table > _MAX_CAP_TABLE)
    for k in np.flatnonzero(by_heap).tolist():
        _grant_by_heap(w[k], c[k], int(freed[k]), cap)
    tabled = np.flatnonzero(~by_heap)
    if len(tabled):
        # (no expert takes more than a row's freed replicas: steps beyond that never win)
        steps = min(cap, int(freed[tabled].max()))
        chunk = max(1, _MAX_CAP_TABLE // (num_experts * steps))
        for start in range(0, len(tabled), chunk):
            part = tabled[start : start + chunk]
            sub = c[part]
            _grant_by_table(w[part], sub, freed[part], cap, steps)
            c[part] = sub
    # index_copy and index_select: advanced indexing costs several times more here
    out = flat.index_copy(0, which, torch.from_numpy(c).to(flat.device, flat.dtype))
    return out.reshape(counts.shape)


def _grant_by_table(
    w: np.ndarray, c: np.ndarray, freed: np.ndarray, cap: int, steps: int
) -> None:
    """Grant ``freed [n]`` replicas per row of ``c [n, E]`` (in place) to the experts
    below ``cap``, one at a time by the largest ``w / c`` (ties: the lower expert).

    They are the largest entries of the table of further steps ``w / (c + j)``,
    ``c + j < cap``, taken in a stable descending sort of ``(expert, j)``: each expert's
    steps fall with ``j``, so the sort meets them in the order the greedy grants them."""
    count = c[:, :, None] + np.arange(steps)  # [n, E, steps] the count before each step
    priority = np.where(count < cap, w[:, :, None] / np.maximum(count, 1), -np.inf)
    order = np.argsort(-priority.reshape(len(c), -1), axis=1, kind="stable")
    granted = np.arange(order.shape[1]) < freed[:, None]  # the first `freed` of each row
    np.add.at(c, (np.nonzero(granted)[0], order[granted] // steps), 1)


def _grant_by_heap(w: np.ndarray, c: np.ndarray, freed: int, cap: int) -> None:
    """:func:`_grant_by_table` for one row ``w, c [E]``, one grant at a time from a heap
    of each expert's next step ``(−w / c, expert)``: the same priorities (one float64
    division each) and the same order, ties to the lower expert and, within an expert
    (equal steps of a zero load), to its earlier step."""
    # Python floats and ints: a NumPy scalar costs several times more per grant (the
    # division is the same IEEE float64 one)
    load, count = w.tolist(), c.tolist()
    heap = [(-(load[e] / max(n, 1)), e) for e, n in enumerate(count) if n < cap]
    heapq.heapify(heap)
    for _ in range(freed):
        e = heap[0][1]
        count[e] += 1
        if count[e] < cap:  # pop the expert and push its next step, in one sift
            heapq.heapreplace(heap, (-(load[e] / count[e]), e))
        else:
            heapq.heappop(heap)
    c[:] = count


def _priority(
    rule: float | str, load: np.ndarray, quota: np.ndarray, count: np.ndarray
) -> np.ndarray:
    """Priority of the step from ``count`` to ``count + 1`` replicas (module docstring):
    ``w / (c + δ)`` for a divisor rule, ``q − c`` for Hamilton (``q = w·R / W``)."""
    return quota - count if rule == "hamilton" else load / (count + float(rule))


def _counts_by_table(
    w: np.ndarray, num_replicas: int, rules: tuple[float | str, ...], num_hot: int, steps: int
) -> np.ndarray:
    """``[len(rules), rows, E]`` counts: grant the ``R − E`` highest priorities among the
    hot experts' steps (every priority falls with the count).

    Expert ``e`` can get at most ``ceil(w_e·R / W) + 1`` extra replicas under every rule
    here (:func:`_max_steps` for one expert; Hamilton's last granted priority is above
    −1), so only its first ``ceil(w_e·R / W) + 2`` steps (at most ``steps``) enter the
    table: where many experts are hot (``R ≈ 2E``) that is a few times fewer entries than
    ``K × steps``. The entries keep the order ``(hot expert, step)``, so ties at the last
    granted priority go to the same steps as in the full table.

    Jefferson's rule alone (``δ = 0``, the first allocation of every plan) grants at most
    ``floor(w_e·R / W)`` extra replicas: its last granted priority ``τ`` is at least
    ``W / R`` (every step above ``τ`` is granted, so ``Σ_e ceil(w_e / τ) <= R``). Its table
    stops one step earlier, ``ceil(w_e·R / W) + 1`` (a margin of at least one step, far
    beyond rounding): the dropped steps' priorities lie strictly below ``τ``, so neither
    the grants nor the tie order change, and the table is smaller.
    """
    rows, num_experts = w.shape
    num_extra = num_replicas - num_experts
    row = np.arange(rows)[:, None]
    hot_expert = top_indices(w, num_hot)
    hot_load = w[row, hot_expert]  # [rows, K]
    total = w.sum(1, keepdims=True)
    quota = hot_load * (num_replicas / np.where(total > 0, total, 1.0))
    # an all-zero row may give every step to one expert: no cap there
    margin = 1 if all(rule == 0.0 for rule in rules) else 2
    cap = np.where(total > 0, np.minimum(np.ceil(quota) + margin, steps), steps).astype(np.int64)
    length = cap.sum(1)  # [rows] entries of each row's table
    width = int(length.max())
    # ragged layout costs a dozen array calls more: measured on DeepSeek-V3, Qwen3 and
    # gpt-oss shapes, it pays where it is 2× smaller for a portfolio of rules, 4× for one
    if (2 if len(rules) > 1 else 4) * width > num_hot * steps:
        # the caps save little: the full [K, steps] table, made by broadcasting
        load, share = hot_load[:, :, None], quota[:, :, None]
        c = np.arange(1, steps + 1, dtype=np.float64)  # the count before the step
        priorities = np.stack([_priority(rule, load, share, c) for rule in rules]).reshape(
            len(rules), rows, num_hot * steps)
        expert_at = np.repeat(hot_expert, steps, 1)
    else:
        # the table's entries, row by row, (hot expert, step) ascending: a ragged
        # [rows, ·] laid out flat, then padded to the longest row with -inf priorities
        # (flat indices into raveled arrays throughout: one 1-D take or put each, a few
        # times cheaper than the same 2-D fancy indexing at tens of thousands of entries)
        flat_cap = cap.ravel()
        cell = np.repeat(np.arange(rows * num_hot), flat_cap)  # (row, hot position) of each
        row_of = cell // num_hot
        entry = np.arange(len(cell))
        c = (entry - np.repeat(np.cumsum(flat_cap) - flat_cap, flat_cap) + 1).astype(np.float64)
        slot = row_of * width + entry - np.repeat(np.cumsum(length) - length, length)
        load = hot_load.ravel()[cell]
        # only Hamilton's rule reads the quotas (a gather of the whole table saved)
        share = quota.ravel()[cell] if "hamilton" in rules else quota
        priorities = np.full((len(rules), rows * width), -np.inf)
        for k, rule in enumerate(rules):
            priorities[k, slot] = _priority(rule, load, share, c)
        priorities = priorities.reshape(len(rules), rows, width)
        expert_at = np.zeros(rows * width, np.int64)
        expert_at[slot] = hot_expert.ravel()[cell]
        expert_at = expert_at.reshape(rows, width)
    # the R − E granted steps of every (rule, row), counted per expert: the mask of the
    # chosen entries is all that is needed (no column indices, no gather by them)
    granted = top_mask(priorities, num_extra)  # [rules, rows, width]
    flat = np.arange(len(rules) * rows).reshape(len(rules), rows, 1) * num_experts + expert_at
    extra = np.bincount(flat[granted], minlength=len(rules) * rows * num_experts)
    return extra.reshape(len(rules), rows, num_experts) + 1


def _steps_granted(
    weight: torch.Tensor, num_replicas: int, rule: float | str, level: torch.Tensor
) -> torch.Tensor:
    """``[rows, E]`` extra replicas each expert gets when every step of priority >= ``level
    [rows, 1]`` is granted: the priority of step ``c → c + 1`` falls with ``c``, so it is
    ``max(0, floor(g))`` with ``g = w / λ − δ`` (divisor) or ``q − t`` (Hamilton)."""
    if rule == "hamilton":
        quota = weight * (num_replicas / weight.sum(1, keepdim=True))
        grant = quota - level
    else:
        grant = weight / level - float(rule)
    return grant.floor_().clamp_(min=0)


def _counts_by_threshold(
    weight: torch.Tensor, num_replicas: int, rule: float | str
) -> torch.Tensor:
    """Counts of one rule without the [rows, E, steps] priority table: bisect the level of
    the last granted step, then hand the few steps left at the boundary to the highest
    next priorities (``topk``), exactly as the greedy rule would."""
    num_experts = weight.shape[1]
    num_extra = num_replicas - num_experts
    w = weight.to(torch.float64)
    # invariant: level lo grants too many steps, level hi does not
    if rule == "hamilton":
        hi = (w * (num_replicas / w.sum(1, keepdim=True))).amax(1, keepdim=True) + 1
        lo = torch.full_like(hi, -float(num_extra + 1))
        for _ in range(64):
            mid = (lo + hi) / 2
            over = _steps_granted(w, num_replicas, rule, mid).sum(1, keepdim=True) > num_extra
            lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    else:
        hi = 2 * w.amax(1, keepdim=True) / (1 + float(rule))
        lo = hi * 1e-15
        for _ in range(64):  # geometric bisection: λ spans many orders of magnitude
            mid = (lo * hi).sqrt()
            over = _steps_granted(w, num_replicas, rule, mid).sum(1, keepdim=True) > num_extra
            lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    extra = _steps_granted(w, num_replicas, rule, hi)  # never more than num_extra
    left = num_extra - extra.sum(1).long()  # [rows], steps tied at the boundary
    k = int(left.max())
    counts = (extra + 1).long()
    if k > 0:
        c = counts.to(w.dtype)
        nxt = (
            w * (num_replicas / w.sum(1, keepdim=True)) - c
            if rule == "hamilton"
            else w / (c + float(rule))
        )
        # the highest next priorities, ties to the lower expert id (as the table path):
        # a stable sort, not topk, whose order among equal values is unspecified
        top = nxt.sort(dim=1, descending=True, stable=True).indices[:, :k]
        take = torch.arange(k, device=w.device) < left[:, None]
        counts.scatter_add_(1, top, take.long())
    return counts


def repeated_allocations(counts: torch.Tensor) -> torch.Tensor:
    """``[K, rows]`` True where allocation ``k`` of ``counts [K, rows, E]`` equals an
    earlier one of its row: packing it again would only tie (rows pack independently)."""
    num = counts.shape[0]
    earlier = torch.ones(num, num, dtype=torch.bool, device=counts.device).tril(-1)
    return ((counts[:, None] == counts[None]).all(3) & earlier[:, :, None]).any(1)


def max_replica_load(weight: torch.Tensor, num_replicas: int) -> torch.Tensor:
    """``[rows]`` the smallest achievable largest replica load (Jefferson's optimum).

    Granting the ``R − E`` largest quotients ``w_e / c`` leaves the next one as the largest
    replica: the ``(R − E + 1)``-th largest quotient overall. Only the ``R − E + 1``
    heaviest experts can hold it, since each of them has a first quotient at least as large.
    """
    rows, num_experts = weight.shape
    num_extra = num_replicas - num_experts
    if num_extra == 0:
        return weight.max(-1).values
    if not weight.is_floating_point():
        # quotients of integer loads in float64 (the ragged table's -inf padding cannot be
        # an integer, and the dense one divided into the default float dtype)
        weight = weight.to(torch.float64)
    hot = weight.topk(min(num_experts, num_extra + 1), dim=1).values  # [rows, K]
    # (float64 on the host: a float32 sum of huge loads reads inf, which would read as no share)
    total = weight.detach().cpu().to(torch.float64).sum(1, keepdim=True).numpy()
    steps = _steps_per_expert(hot.detach().cpu().numpy(), total, num_replicas, num_extra)
    width = int(steps.sum(1).max())
    chunk = max(1, _MAX_PRIORITY_ELEMENTS // max(1, width))
    if chunk < rows:
        return torch.cat(
            [max_replica_load(weight[i : i + chunk], num_replicas) for i in range(0, rows, chunk)]
        )
    most = int(steps.max(initial=1))
    if hot.shape[1] * most <= 2 * width:
        # even steps (the usual rows): the dense [K, most] table, a few calls fewer than
        # the ragged one below; its quotients past an expert's steps all lie below the
        # answer (the ragged table's argument), so the same value
        c = torch.arange(1, most + 1, dtype=weight.dtype, device=weight.device)
        return (hot[:, :, None] / c).view(rows, -1).topk(num_extra + 1, dim=-1).values[:, -1]
    # each expert's quotients w_e / c for c <= steps_e, side by side in its row (padded
    # with -inf): a ragged table of at most R + 4K per row, where a dense [K, max steps]
    # one was K·(R − E + 1) with one dominant expert (33 M quotients a row, 0.6 s, at 4,096
    # experts in 12,288 slots: attacker pass). The same quotients, computed alike, among
    # them every one at or above the answer: the same value
    per = torch.from_numpy(steps.reshape(-1)).to(weight.device)
    owner = torch.repeat_interleave(torch.arange(per.numel(), device=weight.device), per)
    starts = torch.cumsum(per, 0) - per
    c = (torch.arange(owner.numel(), device=weight.device) - starts[owner] + 1).to(weight.dtype)
    row = owner // hot.shape[1]
    row_starts = torch.cumsum(per.view(rows, -1).sum(1), 0) - per.view(rows, -1).sum(1)
    col = torch.arange(owner.numel(), device=weight.device) - row_starts[row]
    quotients = torch.full((rows, width), -torch.inf, dtype=weight.dtype, device=weight.device)
    quotients[row, col] = hot.reshape(-1)[owner] / c
    return quotients.topk(num_extra + 1, dim=-1).values[:, -1]


def _steps_per_expert(hot: np.ndarray, total: np.ndarray, num_replicas: int,
                      num_extra: int) -> np.ndarray:
    """``[rows, K]`` how many quotients ``w_e / c`` of each expert of ``hot [rows, K]`` (of
    rows whose loads sum to ``total [rows, 1]``, float64) can be among the ``R − E + 1``
    largest of its row: the answer ``T_rep`` is at least ``W / R`` (``R`` replicas carry
    ``W``), so those with ``w_e / c >= T_rep`` have ``c <= w_e·R / W``; a little more
    (float round-off), and at most ``R − E + 1``. An all-zero row (every quotient 0) takes
    any ``R − E + 1`` of them; a row whose sum overflows takes them all."""
    most = num_extra + 1
    hot = hot.astype(np.float64)
    finite = np.isfinite(total)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        share = np.where(total > 0, hot / np.where(total > 0, total, 1), 0.0)
        steps = np.ceil(np.minimum(share * num_replicas, most)) + 3
    even = -(-most // max(1, hot.shape[1])) + 1  # K of them hold R − E + 1 quotients
    steps = np.where(finite, np.where(total > 0, steps, even), most)
    return np.clip(steps, 1, most).astype(np.int64)


def replica_bound(weight: torch.Tensor, num_replicas: int, floor: torch.Tensor) -> torch.Tensor:
    """``[rows]`` ``max(floor, T_rep)`` with ``T_rep`` from :func:`max_replica_load`.

    ``T_rep`` is computed only where it can exceed ``floor [rows]`` (usually the mean GPU
    load). The proportional allocation ``c_e = 1 + floor(extra·w_e / W)`` is feasible and
    its replicas are all lighter than ``W / extra``, so rows with ``floor >= W / extra``
    (every row when ``R − E >= P`` and ``floor`` is the mean) need nothing; of the rest,
    only rows where some proportional replica exceeds ``floor`` need the exact value.
    """
    num_experts = weight.shape[1]
    extra = num_replicas - num_experts
    out = floor.clone()
    # equality counts as done: T_rep < W / extra strictly (float round-off: ~1e-16)
    maybe = floor * extra < weight.sum(1)
    if not bool(maybe.any()):
        return out
    rows = maybe.nonzero()[:, 0]
    weight, floor = weight[rows], floor[rows]
    total = weight.sum(1, keepdim=True)
    per_load = torch.where(total > 0, extra / total, 0.0)  # all-zero rows: one replica each
    proportional = (weight * per_load).floor_().add_(1)
    unsure = (weight > proportional.mul_(floor[:, None])).any(1)
    if bool(unsure.any()):
        rows, floor = rows[unsure], floor[unsure]
        exact = max_replica_load(weight[unsure], num_replicas)
        out[rows] = torch.maximum(floor, exact.to(floor.dtype))
    return out


def expand_replicas(
    weight: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn counts into replica items sorted heaviest first.

    Args:
        weight: ``[rows, E]`` expert loads.
        counts: ``[rows, E]`` replicas per expert, each row summing to ``R``.

    Returns:
        ``(item_load [rows, R], item_expert [rows, R])`` on the weight's device; an
        expert's replicas are adjacent. Runs in NumPy on the host (one sort, one repeat).
    """
    rows, num_experts = weight.shape
    # large problems on an accelerator expand on the device
    if use_device_path(weight, rows * num_experts):
        return expand_replicas_torch(weight, counts)
    item_load, item_expert = _expand_host(
        weight.detach().cpu().numpy(), counts.detach().cpu().numpy(), with_loads=True)
    device = weight.device
    return torch.from_numpy(item_load).to(device), torch.from_numpy(item_expert).to(device)


def replica_items(weight: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(item_load [rows, R], item_expert [rows, R])`` of :func:`expand_replicas` for
    host arrays."""
    return _expand_host(weight, counts, with_loads=True)


def replica_experts(weight: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``item_expert [rows, R]`` of :func:`expand_replicas` for host arrays, without the
    loads (one slot per GPU needs only the experts: a repeat of ``R`` values saved)."""
    return _expand_host(weight, counts, with_loads=False)[1]


def _expand_host(
    w: np.ndarray, c: np.ndarray, with_loads: bool
) -> tuple[np.ndarray | None, np.ndarray]:
    """:func:`expand_replicas` on host arrays: ``(item_load or None, item_expert)``."""
    rows, num_experts = w.shape
    per_replica = (w / c).astype(w.dtype, copy=False)
    order = argsort_rows(torch.from_numpy(per_replica), descending=True).numpy()
    # every expert's replicas, heaviest expert first, as flat [rows · E] indices
    flat = (order + np.arange(rows)[:, None] * num_experts).ravel()
    times = c.ravel()[flat]
    item_load = None
    if with_loads:
        item_load = np.repeat(per_replica.ravel()[flat], times).reshape(rows, -1)
    return item_load, np.repeat(order.ravel(), times).reshape(rows, -1)
