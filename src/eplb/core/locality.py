"""``policy="locality"``: trade balance against cross-node traffic on purpose.

The plan is made for SGLang's nearest dispatch (:mod:`eplb.core.dispatch`) and DeepEP's
normal mode, where a token costs one transfer per distinct remote node it reaches.

Structure of the plan (every layer):

- **Hot experts everywhere.** The ``k = (R − E) // (N − 1)`` hottest experts get one
  replica on every node (:func:`eplb.core.dispatch_plan.coverage_counts`). Under the
  nearest rule every rank then finds a hot expert on its own node, so hot experts cost no
  cross-node traffic, split evenly over the nodes, and the engine's table never falls
  back to its (seeded random) fair choice for them: the realised loads are the modelled
  ones. The ``(R − E) mod (N − 1)`` slots left give the coldest experts a second replica
  on their own node (even in expectation; the fair choice moves next to nothing).
- **Single experts on nodes.** Every other expert has one replica (one "unit"). Units
  start on their group's node (the hierarchical group→node split with the smallest
  largest node load; without groups, a balanced split) and move by pairwise swaps
  between nodes (Kernighan-Lin style, vectorized over layers and disjoint node pairs).
- **GPUs inside nodes.** Each node's replicas are packed onto its GPUs by eplb's packing
  (``pack`` batched over layers × nodes), as the hierarchical policy does.
- **Balance first where that fails.** A layer whose busiest GPU the rule would load more
  than ``1 + slack`` times the global plan for the rule's (beyond a 5 % tolerance) takes
  that plan instead (:func:`within_slack`, applied by the policy): with few slots per GPU
  and mild skew the packing inside nodes is not tight, and the slack is the balance the
  user gives up.

The swaps minimise the expected number of distinct remote nodes per token,

    (N − 1)/N · Σ_n P(a token picks some unit on node n),

subject to every node's load staying at most ``(1 + slack)`` times the mean node load
(while a node is above the bound, load violation dominates the objective). ``P(pick on
n)`` comes from the units' selection frequencies and pairwise co-selection probabilities
through the moment-matched estimate of :func:`eplb.core.dispatch._prob_none`. The
co-selection comes from a ``routing=`` trace of top-k ids (experts that fire together go
to one node: the Occult/ExFlow idea), else from a surrogate built from the loads and the
group structure alone (:func:`group_pair_surrogate`).

**The knob, ``slack``** (physical meaning): the MoE compute time the operator accepts to
lose to node imbalance. Node ``n``'s expected load may exceed the mean by at most
``slack`` (0.03 = the slowest node does at most 3% more work than the average, so the
expected-load balancedness stays near ``1 / (1 + slack)`` once packing inside the nodes
is tight); within that budget the swaps spend their freedom on traffic. ``slack = 0`` is
the balance corner (as balanced as the dispatch-aware global plan, with less traffic);
a large ``slack`` lets the traffic estimate alone decide, from the hierarchical start
(the hierarchical corner's locality, with the hot experts' copies as local replicas).
``benchmarks/bench_dispatch.py`` measures the curve and both corners.

Not yet handled here (design in the branch report): dead GPUs (per-node capacities and
token shares). Planning from a map in force: :mod:`eplb.online.locality` (the map kept,
or re-packed inside its nodes, where the fresh plan does not pay).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import numpy as np
import torch

from eplb.core.dispatch import _prob_none, coactivation, realised_gpu_loads
from eplb.core.dispatch_plan import _AUTO_TOLERANCE, coverage_counts
from eplb.core.expert_ids import padding_mask
from eplb.core.options import PlanOptions
from eplb.core.packing import make_items, pack, to_slots
from eplb.core.topology import Topology

_PENALTY = 100.0  # weight of node-load violation (per unit of mean node load)
_NODE_PAIR_STEPS, _NODE_MAX_STEPS = 4, 16  # packing search inside nodes (see _pack_nodes)
#: ``L · (E + 1)²`` pair statistics at most (float32: 256 MiB each, float64 512; the swap
#: search holds a few arrays of that order). DeepSeek-V3: 58 · 257² = 3.8e6.
MAX_PAIR_CELLS = 1 << 26
#: the most GPUs × all slots (``P · R``) the locality policy plans for: its searches grow
#: about as P³ like the nearest plan's relabelling. 58 real DeepSeek-V3 layers on one core,
#: 8 nodes (``benchmarks/bench_nearest_scale.py --policy locality --real``): about 50 s at
#: 256 GPUs × 4 slots (the limit), 69 s at 384 × 2, 5 minutes at 512 × 2
MAX_LOCALITY_WORK = 1 << 18
_MIN_GAIN = 1e-5  # smallest swap gain taken, in remote nodes per token (~2 in total)


def pair_stats(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(freq [L, E], pair [L, E, E])`` from top-k ids ``[T, L, k]``: the share of tokens
    choosing ``e``, and of tokens choosing both ``e`` and ``f`` (zero diagonal); a layer's
    tokens are those with an expert there (ids below 0 are padding)."""
    counts = coactivation(ids, num_experts)
    ids = torch.as_tensor(ids)
    real = padding_mask(ids)
    tokens = (max(int(ids.shape[0]), 1) if real is None
              else real.any(2).sum(0, dtype=torch.float64).clamp(min=1)[:, None])
    freq = counts.diagonal(dim1=1, dim2=2) / tokens
    pair = counts / (tokens if real is None else tokens[:, :, None])
    pair.diagonal(dim1=1, dim2=2).zero_()
    return freq, pair


def group_pair_surrogate(
    weight: torch.Tensor, num_groups: int, top_k: int, topk_groups: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(freq [L, E], pair [L, E, E])`` from loads and the group structure alone.

    ``freq = top_k · w / Σw``. A token picks ``topk_groups`` of ``G`` groups and ``top_k``
    experts inside them, so two experts of one group are picked together far more often
    than independence says: given group ``g`` is picked (probability
    ``q_g ≈ min(1, Σ_{e∈g} freq_e / (top_k / topk_groups))``), its experts are picked
    independently, so ``pair_ef = freq_e·freq_f / q_g``. Pairs across groups get
    ``κ·freq_e·freq_f`` with ``κ`` making the pair mass ``top_k(top_k − 1)`` per token.
    Without groups every pair gets the ``κ`` rule.
    """
    num_experts = weight.shape[1]
    freq, q = group_frequencies(weight, num_groups, top_k, topk_groups)
    outer = freq[:, :, None] * freq[:, None, :]
    group = torch.arange(num_experts, device=weight.device) // (num_experts // num_groups)
    same = group[:, None] == group[None, :]
    if q is not None:
        within = outer / q.repeat_interleave(num_experts // num_groups, 1)[:, :, None]
        within = torch.where(same, within, torch.zeros_like(within))
    else:
        within = torch.zeros_like(outer)
        same = torch.zeros_like(same)
    eye = torch.eye(num_experts, dtype=torch.bool, device=weight.device)
    within = within.masked_fill(eye, 0.0)
    across = outer.masked_fill(same | eye, 0.0)
    mass = top_k * (top_k - 1) - within.sum((1, 2))
    kappa = (mass.clamp(min=0) / across.sum((1, 2)).clamp(min=1e-300))[:, None, None]
    return freq, within + kappa * across


def surrogate_routing(num_groups: int) -> tuple[int, int | None]:
    """``(top_k, topk_groups)`` the surrogate assumes without a routing trace:
    DeepSeek-V3's group-limited routing, 8 experts among half the groups (4 of 8), or
    8 experts among all where the model has no groups."""
    return 8, (max(1, num_groups // 2) if num_groups > 1 else None)


def group_frequencies(
    weight: torch.Tensor, num_groups: int, top_k: int, topk_groups: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(freq [L, E], q [L, G])`` of :func:`group_pair_surrogate`: every expert's
    selection frequency and every group's probability of being picked (``None`` without
    groups)."""
    w = weight.to(torch.float64)
    num_layers = w.shape[0]
    freq = top_k * w / w.sum(1, keepdim=True).clamp(min=1e-300)
    if num_groups <= 1:
        return freq, None
    per_group = top_k / (topk_groups or num_groups)
    return freq, (freq.view(num_layers, num_groups, -1).sum(2) / per_group).clamp(1e-12, 1.0)


def surrogate_pair_times(
    weight: torch.Tensor, num_groups: int, top_k: int, topk_groups: int | None,
    x: torch.Tensor,
) -> torch.Tensor:
    """``[L, E, K]``: :func:`group_pair_surrogate`'s pair matrix times ``x [L, E, K]``,
    ``Σ_f pair[l, e, f] · x[l, f, k]``, from its factors: within a group ``pair_ef =
    freq_e·freq_f / q_g``, across groups ``κ·freq_e·freq_f``, so the product needs group
    sums of ``freq·x`` only (``L·E·K`` work where the matrix takes ``L·E²·K``; 0.07 s of
    a DeepSeek-V3 re-plan went to building the matrix). Equal to the dense product up to
    rounding."""
    num_layers, num_experts, _ = x.shape
    freq, q = group_frequencies(weight, num_groups, top_k, topk_groups)
    fx = freq[:, :, None] * x  # [L, E, K]
    total = fx.sum(1, keepdim=True)  # [L, 1, K]
    total_freq = freq.sum(1)
    if q is None:  # every pair by the κ rule
        across_sum = total_freq**2 - (freq**2).sum(1)
        kappa = top_k * (top_k - 1) / across_sum.clamp(min=1e-300)
        return kappa[:, None, None] * freq[:, :, None] * (total - fx)
    size = num_experts // num_groups
    group_freq = freq.view(num_layers, num_groups, size).sum(2)  # [L, G]
    inv_q = (1 / q).repeat_interleave(size, 1)  # [L, E]
    within_sum = ((group_freq**2 - (freq**2).view(num_layers, num_groups, size).sum(2))
                  / q).sum(1)
    across_sum = total_freq**2 - (group_freq**2).sum(1)
    kappa = ((top_k * (top_k - 1) - within_sum).clamp(min=0)
             / across_sum.clamp(min=1e-300))[:, None, None]
    in_group = fx.view(num_layers, num_groups, size, -1).sum(2).repeat_interleave(size, 1)
    return (freq * inv_q)[:, :, None] * (in_group - fx) + kappa * freq[:, :, None] * (
        total - in_group)


def surrogate_co_selection(
    weight: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(freq [L, E], pair_times)`` of the surrogate without a routing trace
    (:func:`surrogate_routing`, :func:`surrogate_pair_times`), as
    :func:`eplb.core.dispatch.remote_nodes_by_node` takes them, from loads ``weight
    [L, E]`` (a layer without load counts as uniform) and the model's ``num_groups``:
    what the locality policy plans with, and what a load trace's cross-node traffic is
    modelled by (``eplb simulate``)."""
    weight = weight.detach().cpu().to(torch.float64)
    weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))
    top_k, top_groups = surrogate_routing(num_groups)
    freq, _ = group_frequencies(weight, num_groups, top_k, top_groups)
    return freq, lambda x: surrogate_pair_times(weight, num_groups, top_k, top_groups, x)


def _partitions(num_groups: int, num_nodes: int) -> torch.Tensor | None:
    """``[A, G]`` every split of ``G`` groups into ``N`` nodes of ``G/N`` (up to labels),
    or ``None`` when there are more than 20 000 (counted first: the recursion below
    cannot stop its loops early, so a large count would run for hours)."""
    per = num_groups // num_nodes
    count = math.factorial(num_groups) // (math.factorial(per) ** num_nodes
                                           * math.factorial(num_nodes))
    if count > 20000:
        return None
    out: list[list[int]] = []

    def rec(label: list[int], free: list[int], node: int) -> None:
        if len(out) > 20000:
            return
        if not free:
            out.append(label.copy())
            return
        first, rest = free[0], free[1:]
        for others in itertools.combinations(rest, per - 1):
            for g in (first, *others):
                label[g] = node
            rec(label, [g for g in rest if g not in others], node + 1)

    rec([0] * num_groups, list(range(num_groups)), 0)
    return None if len(out) > 20000 else torch.tensor(out, dtype=torch.int64)


def _start(
    unit_load: torch.Tensor, unit_freq: torch.Tensor, is_unit: torch.Tensor,
    capacity: np.ndarray, num_groups: int, num_nodes: int,
) -> torch.Tensor:
    """``[L, E]`` start node of every unit (``-1`` for non-units): the group split with the
    smallest largest node load (groups dividing over nodes), else a snake deal by load;
    then the least-picked units of over-full nodes move to nodes with room."""
    num_layers, num_experts = unit_load.shape
    parts = _partitions(num_groups, num_nodes) if num_groups > 1 and \
        num_groups % num_nodes == 0 else None
    if parts is not None:
        group_load = unit_load.view(num_layers, num_groups, -1).sum(2)  # [L, G]
        onehot = torch.nn.functional.one_hot(parts, num_nodes).to(group_load.dtype)  # [A,G,N]
        node_load = torch.einsum("lg,agn->lan", group_load, onehot)
        best = node_load.amax(2).argmin(1)  # [L]
        node = parts[best].repeat_interleave(num_experts // num_groups, 1)  # [L, E]
    else:
        order = unit_load.argsort(dim=1, descending=True, stable=True)
        lap = torch.arange(num_experts) % (2 * num_nodes)
        snake = torch.where(lap < num_nodes, lap, 2 * num_nodes - 1 - lap)
        node = torch.empty_like(order).scatter_(1, order, snake.expand(num_layers, -1))
    node = torch.where(is_unit, node, -1).numpy().copy()
    freq = unit_freq.numpy()
    for layer in range(num_layers):
        have = np.bincount(node[layer][node[layer] >= 0], minlength=num_nodes)
        over = have - capacity[layer]
        if not (over > 0).any():
            continue
        moving = []
        for n in np.nonzero(over > 0)[0]:
            mine = np.nonzero(node[layer] == n)[0]
            moving.extend(mine[np.argsort(freq[layer, mine], kind="stable")[: over[n]]])
        room = np.repeat(np.arange(num_nodes), np.clip(-over, 0, len(moving)))
        node[layer, moving] = room[: len(moving)]
    return torch.from_numpy(node)


def _round_robin(num_nodes: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint node pairs covering every pair once (circle method)."""
    nodes = list(range(num_nodes)) + ([-1] if num_nodes % 2 else [])
    m = len(nodes)
    rounds = []
    for r in range(m - 1):
        ring = [nodes[0], *(nodes[1:][r:] + nodes[1:][:r])]
        pairs = [(ring[i], ring[m - 1 - i]) for i in range(m // 2)]
        rounds.append([(a, b) for a, b in pairs if a >= 0 and b >= 0])
    return rounds


def _reach(mean: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """``P(X >= 1)`` (:func:`_prob_none`), in float64 and rounded to the inputs' dtype:
    ``exp``/``log1p`` differ in the last bits between torch's CPU kernels, and float64's
    rarely reach float32's (:func:`_swap_search`)."""
    wide = 1 - _prob_none(mean.to(torch.float64), pair.to(torch.float64).clamp(min=0))
    return wide.to(mean.dtype)


def _members(node: torch.Tensor, num_nodes: int, pad: int) -> torch.Tensor:
    """``[L, N, K]`` experts of every node (``node [L, E]``), padded with ``pad``."""
    num_layers, num_experts = node.shape
    key = torch.where(node >= 0, node, num_nodes)
    order = key.argsort(dim=1, stable=True)
    per = torch.zeros(num_layers, num_nodes + 1, dtype=torch.int64)
    per.scatter_add_(1, key, torch.ones_like(key))
    width = max(int(per[:, :num_nodes].max()), 1)
    first = per.cumsum(1) - per  # [L, N+1]
    rank = torch.arange(num_experts)[None] - first.gather(1, key.gather(1, order))
    out = torch.full((num_layers, num_nodes + 1, width), pad, dtype=torch.int64)
    sorted_key = key.gather(1, order)
    keep = rank < width
    rows = torch.arange(num_layers)[:, None].expand_as(order)
    out[rows[keep], sorted_key[keep], rank[keep]] = order[keep]
    return out[:, :num_nodes]


def _swap_search(
    node: torch.Tensor, movable: torch.Tensor, load: torch.Tensor, freq: torch.Tensor,
    pair: torch.Tensor, num_nodes: int, fixed: torch.Tensor, bound: torch.Tensor,
    scale: torch.Tensor, max_steps: int,
) -> torch.Tensor:
    """Pairwise swaps of movable experts between nodes → ``node [L, E]``.

    ``node [L, E]``: node of every single-node expert (``-1``: hot, on every node);
    ``load``, ``freq`` ``[L, E]`` and ``pair [L, E, E]`` as in :func:`plan_locality`;
    ``fixed [L]``: load every node carries anyway (the hot experts' shares). Each step
    takes the next round of disjoint node pairs (circle method) and applies, per layer
    and pair, the best improving swap: pairs of one round touch different nodes, so their
    swaps change disjoint statistics and are applied together. A layer drops out once a
    whole round of pairs finds nothing.

    The search runs in float32, but what the instruction set may change is computed in
    float64 and rounded to float32: its sums over experts (BLAS and torch's reductions
    add in an order, and with fused multiply-adds, that depend on it) and ``exp`` and
    ``log1p`` (:func:`_reach`); float64's last bits rarely reach float32's, and the
    float32 element-wise steps round alike everywhere. All in float32, the plans
    differed between ATen's default kernels and AVX2 on 1 of 5,000 tiny problems, and
    on 1 of 5,000 of their next windows with the sums alone in float64
    (``benchmarks/bench_locality_determinism.py``, BENCHMARKS.md §11).
    """
    num_layers, num_experts = node.shape
    pad = num_experts  # a sentinel expert with no load, no picks, never movable
    dtype = torch.float32
    zero_col = torch.zeros(num_layers, 1, dtype=dtype)
    load_x = torch.cat([load.to(dtype), zero_col], 1)
    freq_x = torch.cat([freq.to(dtype), zero_col], 1)
    move_x = torch.cat([movable, torch.zeros(num_layers, 1, dtype=torch.bool)], 1)
    pair_x = torch.nn.functional.pad(pair.to(dtype), (0, 1, 0, 1))
    bound, scale, fixed = bound.to(dtype), scale.to(dtype), fixed.to(dtype)
    members = _members(node, num_nodes, pad)  # [L, N, K]
    width = members.shape[2]
    rounds = _round_robin(num_nodes)
    quiet = torch.zeros(num_layers, dtype=torch.int64)
    slot_node = torch.arange(num_nodes).repeat_interleave(width)

    def at(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return table.gather(1, ids.flatten(1)).view_as(ids)

    for step in range(max_steps):
        live = (quiet < len(rounds)).nonzero()[:, 0]
        if not len(live):
            break
        pairs = rounds[step % len(rounds)]
        u_idx = torch.tensor([p[0] for p in pairs])
        v_idx = torch.tensor([p[1] for p in pairs])
        mem, px = members[live], pair_x[live]
        fx, lx = freq_x[live], load_x[live]
        rows = len(live)
        node_of = torch.full((rows, num_experts + 1), num_nodes, dtype=torch.int64)
        node_of.scatter_(1, mem.flatten(1), slot_node.expand(rows, -1))
        node_of[:, pad] = num_nodes
        onehot = torch.nn.functional.one_hot(node_of, num_nodes + 1)[..., :num_nodes].to(dtype)
        # the sums over experts in float64, rounded (docstring)
        f64, onehot64 = torch.float64, onehot.to(torch.float64)
        m = torch.bmm(px.to(f64), onehot64)  # [A, E+1, N] pair mass of e with n's experts
        mu = torch.einsum("le,len->ln", fx.to(f64), onehot64).to(dtype)
        f2 = (m * onehot64).sum(1).to(dtype)  # [A, N] ordered pairs inside each node
        m = m.to(dtype)
        nload = torch.einsum("le,len->ln", lx.to(f64), onehot64).to(dtype) + fixed[live, None]
        bnd = bound[live]
        over = (nload - bnd[:, None]).clamp(min=0)
        reach = _reach(mu, f2)
        a, c = mem[:, u_idx], mem[:, v_idx]  # [A, q, K]
        mt = m.transpose(1, 2)  # [A, N, E+1]
        mu_t, mv_t = mt[:, u_idx], mt[:, v_idx]  # [A, q, E+1]
        ma_u, ma_v = mu_t.gather(2, a), mv_t.gather(2, a)  # [A, q, K]
        mc_u, mc_v = mu_t.gather(2, c), mv_t.gather(2, c)
        q = len(pairs)
        p_ac = px.gather(1, a.view(rows, -1, 1).expand(-1, -1, num_experts + 1)).view(
            rows, q, width, -1).gather(3, c[:, :, None, :].expand(-1, -1, width, -1))
        fa, fc, la, lc = at(fx, a), at(fx, c), at(lx, a), at(lx, c)
        d_mu = fa[..., :, None] - fc[..., None, :]  # picks leaving u
        f2_u = f2[:, u_idx, None, None] - 2 * ma_u[..., :, None] + 2 * (mc_u[..., None, :] - p_ac)
        f2_v = f2[:, v_idx, None, None] - 2 * mc_v[..., None, :] + 2 * (ma_v[..., :, None] - p_ac)
        gain = _reach(mu[:, u_idx, None, None] - d_mu, f2_u) + _reach(
            mu[:, v_idx, None, None] + d_mu, f2_v) - (reach[:, u_idx] + reach[:, v_idx])[
            ..., None, None]
        d_load = la[..., :, None] - lc[..., None, :]
        b = bnd[:, None, None, None]
        viol = ((nload[:, u_idx, None, None] - d_load - b).clamp(min=0)
                + (nload[:, v_idx, None, None] + d_load - b).clamp(min=0)
                - (over[:, u_idx] + over[:, v_idx])[..., None, None])
        score = gain + viol * (_PENALTY / scale[live])[:, None, None, None]
        ok = at(move_x[live], a)[..., :, None] & at(move_x[live], c)[..., None, :]
        best, flat = score.masked_fill(~ok, float("inf")).flatten(2).min(2)  # [A, q]
        do = best < -_MIN_GAIN
        hit = do.any(1)
        quiet[live] = torch.where(hit, 0, quiet[live] + 1)
        if not bool(hit.any()):
            continue
        ka, kc = flat // width, flat % width
        ea, ec = a.gather(2, ka[..., None])[..., 0], c.gather(2, kc[..., None])[..., 0]
        r = live[:, None].expand_as(do)[do]
        uu, vv = u_idx.expand_as(do)[do], v_idx.expand_as(do)[do]
        members[r, uu, ka[do]] = ec[do]
        members[r, vv, kc[do]] = ea[do]
    node_of = torch.full((num_layers, num_experts + 1), -1, dtype=torch.int64)
    node_of.scatter_(1, members.flatten(1), slot_node.expand(num_layers, -1))
    return torch.where(node >= 0, node_of[:, :num_experts], node)


def _pack_nodes(
    weight: torch.Tensor, counts: torch.Tensor, hot: torch.Tensor, node: torch.Tensor,
    topology: Topology, options: PlanOptions, generator: torch.Generator | None,
) -> torch.Tensor:
    """Pack every node's replicas onto its GPUs → ``phy2log [L, R]``.

    Node ``n`` holds one replica (``w / N``) of every hot expert and every expert with
    ``node == n`` (``counts`` replicas of ``w / counts`` each)."""
    num_layers, num_experts = weight.shape
    nodes = topology.num_nodes
    per_node = topology.num_replicas // nodes
    w = weight.numpy()
    c = counts.numpy()
    h = hot.numpy()
    nd = node.numpy()
    load = np.empty((num_layers, nodes, per_node))
    expert = np.empty((num_layers, nodes, per_node), dtype=np.int64)
    ids = np.arange(num_experts)
    for layer in range(num_layers):
        hot_ids = ids[h[layer]]
        for n in range(nodes):
            mine = ids[nd[layer] == n]
            e = np.concatenate([hot_ids, np.repeat(mine, c[layer, mine])])
            x = np.concatenate([w[layer, hot_ids] / nodes,
                                np.repeat(w[layer, mine] / c[layer, mine], c[layer, mine])])
            if len(e) != per_node:
                raise AssertionError(f"layer {layer} node {n}: {len(e)} replicas, "
                                     f"{per_node} slots")
            order = np.lexsort((e, -x))  # heaviest first, one expert's replicas adjacent
            load[layer, n], expert[layer, n] = x[order], e[order]
    if topology.gpus_per_node == 1:  # a node is one GPU: nothing to pack
        return torch.from_numpy(expert.reshape(num_layers, topology.num_replicas))
    rows = num_layers * nodes
    items = make_items(torch.from_numpy(load.reshape(rows, per_node)),
                       torch.from_numpy(expert.reshape(rows, per_node)))
    packing = options.packing
    if packing.pair_steps is None and packing.max_steps is None:
        # node rows are small (8 GPUs on DeepSeek-V3's shape) and hold whole single experts:
        # the automatic 4 polish steps leave ~0.8% there, these close it (measured on
        # prefill_in2048: 0.9916 → 0.9993, in bench_dispatch.py's setting)
        packing = dataclasses.replace(packing, pair_steps=_NODE_PAIR_STEPS,
                                      max_steps=_NODE_MAX_STEPS)
    state = pack(items, topology.gpus_per_node, packing, None, generator)
    return to_slots(state).view(num_layers, topology.num_replicas)


def plan_locality(
    weight: torch.Tensor,
    topology: Topology,
    options: PlanOptions | None = None,
    generator: torch.Generator | None = None,
    *,
    slack: float = 0.03,
    routing: torch.Tensor | None = None,
    top_k: int = 8,
    topk_groups: int | None = 4,
    max_steps: int | None = None,
) -> torch.Tensor:
    """Locality plan → ``phy2log [L, R]`` on the weight's device (see the module docstring).

    Args:
        weight: ``[L, E]`` loads; topology: ``R, P, N, G`` (``N > 1``; ``G`` groups, 1 if
            the model has none).
        slack: the knob: largest node load allowed, as a fraction above the mean node load.
        routing: ``[T, L, k]`` top-k ids of recorded tokens for the co-selection statistics;
            ``None``: :func:`group_pair_surrogate` with ``top_k`` and ``topk_groups``.
        max_steps: swap steps (default ``4·E``); the search stops once a whole round of
            node pairs finds no improving swap.
    """
    options = options or PlanOptions()
    cells = weight.shape[0] * (weight.shape[1] + 1) ** 2
    if cells > MAX_PAIR_CELLS:
        raise ValueError(
            f"the locality policy keeps co-selection statistics of every expert pair in every "
            f"layer: {weight.shape[0]} × {weight.shape[1]}² = {cells:.2e} cells, beyond its "
            f"limit of {MAX_PAIR_CELLS:.2e}; plan fewer layers at once, or use "
            f"policy='global' with dispatch='nearest'")
    if isinstance(slack, bool) or not isinstance(slack, (int, float)) or not slack >= 0:
        raise ValueError(f"slack must be a number >= 0, got {slack!r}")
    num_layers, num_experts = weight.shape
    nodes, slots_total, groups = topology.num_nodes, topology.num_replicas, topology.num_groups
    if nodes <= 1:
        raise ValueError("the locality policy needs num_nodes > 1")
    topology.gpus_per_node  # noqa: B018 - raises when GPUs do not split over nodes
    if num_experts % groups:
        raise ValueError(f"num_experts ({num_experts}) is not a multiple of num_groups ({groups})")
    device = weight.device
    w = weight.detach().to(torch.float64).cpu()
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    counts = coverage_counts(w, slots_total, nodes)  # [L, E]: N (hot), 2 (cold pairs), 1
    hot = counts >= nodes  # (for N = 2 no cold pair exists: every count-2 expert is hot)
    if routing is not None:
        freq, pair = pair_stats(torch.as_tensor(routing).cpu(), num_experts)
    else:
        freq, pair = group_pair_surrogate(w, groups, top_k, topk_groups)
    # hot experts are local on every node: they never add a remote node
    freq = torch.where(hot, torch.zeros_like(freq), freq)
    pair = pair * (~hot)[:, :, None] * (~hot)[:, None, :]
    single = ~hot
    movable = single & (counts == 1)
    load = torch.where(single, w, torch.zeros_like(w))
    # start: the group split; pairs of cold replicas (two slots on one node) go there as
    # far as every node has room for them beside the hot experts' copies, then single
    # units fill each node up to its slots
    pinned = single & ~movable
    free = slots_total // nodes - hot.sum(1, keepdim=True)  # [L, 1] slots beside hot copies
    base = _start(load, freq, pinned, (free // 2).expand(-1, nodes).numpy(), groups, nodes)
    pinned_slots = torch.zeros(num_layers, nodes, dtype=torch.int64)
    pinned_slots.scatter_add_(1, base.clamp(min=0), torch.where(pinned, counts, 0))
    capacity = slots_total // nodes - hot.sum(1, keepdim=True) - pinned_slots
    node = _start(load, freq, movable, capacity.numpy(), groups, nodes)
    node = torch.where(pinned, base, node)
    mean = w.sum(1) / nodes
    fixed = torch.where(hot, w, torch.zeros_like(w)).sum(1) / nodes
    steps = 4 * num_experts if max_steps is None else max_steps
    node = _swap_search(node, movable, load, freq, pair, nodes, fixed, (1 + slack) * mean,
                        mean, steps)
    phy2log = _pack_nodes(w, counts, hot, node, topology, options, generator)
    return phy2log.to(device)


def within_slack(
    weight: torch.Tensor, phy2log: torch.Tensor, other: torch.Tensor, topology: Topology,
    slack: float,
) -> torch.Tensor:
    """``[L, R]``: the locality plan ``phy2log``, but ``other`` (the global plan for the
    nearest rule, as the planner makes it) in the layers where the nearest rule would load
    ``phy2log``'s busiest GPU more than ``1 + slack`` times ``other``'s (beyond a 5 %
    tolerance, the dispatch planner's own).

    ``slack`` bounds node loads, and GPUs inside a node are packed tight where a node has
    many slots (DeepSeek-V3 on 32 GPUs: 0.972 at slack 0.03). With few slots per GPU and
    mild skew it is not so: the hot experts' copies take the spare slots, and a single
    expert outweighs a GPU's share with no light replica to pair it with (found by an
    attacker pass: 64 experts of uniform loads on 64 GPUs in 8 nodes, 2 slots each, served
    at 0.52 where the global plan serves 0.96). There the balance given up is far beyond
    what the knob allows, so the layer is planned for balance."""
    other = other.to(phy2log.device)
    args = (topology.num_gpus, topology.num_nodes, "nearest")
    peak = realised_gpu_loads(weight, phy2log, *args, check=False).amax(1)
    peak_other = realised_gpu_loads(weight, other, *args, check=False).amax(1)
    beyond = peak > peak_other * (1 + slack) * (1 + _AUTO_TOLERANCE)
    return torch.where(beyond[:, None], other, phy2log)
