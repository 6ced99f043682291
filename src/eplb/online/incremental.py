"""Incremental planning: rebalance a running deployment by moving few expert weights.

Every changed slot is one expert's weights crossing NVLink or the network while traffic
runs (a DeepSeek-V3 expert is 44 MB in FP8), and re-planning from scratch changes
almost every slot. Here the new plan starts from the placement in force:

1. **Forced moves** make the old placement valid for the new call, whatever the budget:
   slots of dead GPUs are emptied; every expert gets a live replica and every live slot
   an expert (a GPU that is live again is filled); replicas stacked on one GPU are
   spread; under the hierarchical policy a layer whose groups straddle nodes (vLLM's
   initial map ``slot i → expert i % E`` does) is replaced by a fresh hierarchical plan
   relabelled onto the old GPUs.
2. **A ladder of warm starts** (:func:`eplb.online.moves.warm_ladder`): replica
   transfers toward Jefferson's counts (best first), then ``steps`` steps of the
   all-pairs swap search, each allowed ``quota`` more changed slots
   (:class:`~eplb.core.options.IncrementalOptions`), batched over layers in one
   refinement; with a move budget also the transfers alone (the cheapest moves). Under
   the hierarchical policy only the nodes whose busiest GPU is near the layer's busiest
   are searched: moves elsewhere cannot lower the layer's time.
3. **Fresh plans relabelled onto the old GPUs** (:mod:`eplb.online.align`) where the
   ladder cannot serve: global layers whose ladder still gains a move price at its end;
   every hierarchical layer, as is and with the nodes that keep their groups taken from
   the ladder (only the regrouped nodes change).
4. **A choice per layer by the expected next-window peak**
   (:func:`eplb.online.moves.expected_peak`): each candidate's max GPU load under the
   drift a rebalance interval brings. Without a budget, a layer takes the candidate with
   the best expected balancedness minus ``move_price`` × the fraction of its slots that
   change: moves that only pay in-sample are not made. With ``max_moves`` (slots in
   total over all layers) the budget goes to the layers where a moved slot buys the most
   expected gain; a list gives one budget per layer. No candidate whose in-sample peak
   exceeds the placement in force's is taken.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch

from eplb.core.options import IncrementalOptions
from eplb.core.packing import repair_assignment
from eplb.core.placement import Placement, validate_planned
from eplb.core.planner import plan_fresh
from eplb.core.request import PlanRequest
from eplb.online import moves
from eplb.online.align import align_to_previous
from eplb.online.nearest import plan_nearest_incremental

# a node whose busiest GPU is this close to the layer's busiest can set the layer's time
_CRITICAL_NODE = 0.98


def _previous_phy2log(previous: object, request: PlanRequest) -> np.ndarray:
    """The placement in force as a validated ``[L, R]`` int64 host array."""
    old = previous.phy2log if isinstance(previous, Placement) else previous
    if not isinstance(old, torch.Tensor):
        try:
            old = torch.as_tensor(np.asarray(old))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"previous must be a Placement or a phy2log tensor [L, R]: {exc}"
            ) from None
    if old.is_meta or old.layout != torch.strided:
        raise TypeError(f"previous must be a dense tensor with data, got a "
                        f"{'meta' if old.is_meta else old.layout} tensor")
    if old.dim() == 1:
        old = old[None]
    expected = (request.num_layers, request.topology.num_replicas)
    if tuple(old.shape) != expected:
        raise ValueError(
            f"previous placement has shape {tuple(old.shape)}, expected [{expected[0]}, "
            f"{expected[1]}] (layers, slots) to match the weight"
        )
    if old.is_floating_point() or old.dtype == torch.bool or old.is_complex():
        raise TypeError(f"previous phy2log must hold integers, got {old.dtype}")
    old = old.detach().cpu().to(torch.int64).numpy()
    if ((old < -1) | (old >= request.num_experts)).any():
        raise ValueError(
            f"previous placement holds expert ids outside [-1, {request.num_experts})"
        )
    return old


def _group_nodes(phy2log: np.ndarray, request: PlanRequest) -> tuple[np.ndarray, np.ndarray]:
    """``(node_of_group [L, G], local [L])``: each group's node, and whether every layer
    keeps every group on one node with ``G / N`` groups per node."""
    topo = request.topology
    rows = phy2log.shape[0]
    nodes, groups = topo.num_nodes, topo.num_groups
    group_size = request.num_experts // groups
    node_of_slot = np.arange(topo.num_replicas) // (topo.num_replicas // nodes)
    group = np.where(phy2log >= 0, phy2log // group_size, groups)  # empty slots: group G
    # which nodes hold each group: one bincount over (row, group, node)
    key = (np.arange(rows)[:, None] * (groups + 1) + group) * nodes + node_of_slot[None]
    present = np.bincount(key.ravel(), minlength=rows * (groups + 1) * nodes) > 0
    present = present.reshape(rows, groups + 1, nodes)[:, :groups]  # [L, G, N]
    held = present.any(2)
    lo = np.where(held, np.argmax(present, 2), nodes)
    hi = np.where(held, nodes - 1 - np.argmax(present[..., ::-1], 2), -1)
    per_node = np.stack([(lo == n).sum(1) for n in range(nodes)], 1)
    local = ((lo == hi) & (hi >= 0)).all(1) & (per_node == groups // nodes).all(1)
    return lo, local


def _forced(request: PlanRequest, old: np.ndarray) -> np.ndarray:
    """The old placement made valid for this call with as few changes as possible."""
    topo = request.topology
    weight = request.weight.detach().cpu().to(torch.float64).numpy()
    live_slot = request.live.cpu().numpy().repeat(topo.slots_per_gpu)
    base = old.copy()
    if request.policy == "hierarchical":
        start = np.where(live_slot[None], old, -1)
        _, local = _group_nodes(start, request)
        redo = np.nonzero(~local)[0]
        if len(redo):
            sub = dataclasses.replace(request, weight=request.weight[torch.from_numpy(redo)])
            fresh = plan_fresh(sub).phy2log.cpu()
            aligned = align_to_previous(fresh, torch.from_numpy(start[redo]), topo.num_gpus,
                                        topo.gpus_per_node)
            base[redo] = aligned.numpy()
        keep = np.nonzero(local)[0]
        if len(keep):  # inside each node: fill, cover, spread (locality stays)
            base[keep] = _per_node(weight[keep], start[keep], request, _fill_and_spread)
        return base
    return _fill_and_spread(weight, old, topo.num_gpus, request.live.cpu().numpy())


def _fill_and_spread(
    weight: np.ndarray, rows: np.ndarray, num_gpus: int, live: np.ndarray | None = None
) -> np.ndarray:
    """Forced moves of a batch of global problems ``rows [B, R]``: every live slot filled,
    every expert covered, replicas stacked on one GPU spread over the live GPUs."""
    live = np.ones(num_gpus, bool) if live is None else live
    live_slot = live.repeat(rows.shape[1] // num_gpus)
    out = moves.fill_and_cover(weight, rows, live_slot, num_gpus)
    bad = np.nonzero(moves.stacked(np.where(live_slot[None], out, -1), num_gpus))[0]
    if len(bad):
        spread = repair_assignment(
            torch.from_numpy(weight[bad]), torch.from_numpy(out[bad]), torch.from_numpy(live)
        )
        out[bad] = spread.numpy()
    return out


def _node_rows(
    weight: np.ndarray, phy2log: np.ndarray, request: PlanRequest
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split hierarchical layers into node rows with local expert ids.

    Returns ``(node_weight [L·N, E/N], node_phy2log [L·N, R/N], node_experts [L·N, E/N])``
    where ``node_experts`` maps local ids back to logical experts.
    """
    topo = request.topology
    layers, num_experts = weight.shape
    nodes, groups = topo.num_nodes, topo.num_groups
    group_size = num_experts // groups
    node_of_group, _ = _group_nodes(phy2log, request)
    groups_by_node = np.argsort(node_of_group, 1, kind="stable").reshape(layers, nodes, -1)
    experts = (groups_by_node[..., None] * group_size + np.arange(group_size)).reshape(
        layers * nodes, -1
    )
    node_weight = np.take_along_axis(np.repeat(weight, nodes, 0), experts, 1)
    local_id = np.full((layers * nodes, num_experts), -1)
    np.put_along_axis(local_id, experts, np.arange(experts.shape[1])[None], 1)
    rows = phy2log.reshape(layers * nodes, -1)
    node_phy2log = np.where(rows >= 0, np.take_along_axis(local_id, np.maximum(rows, 0), 1), -1)
    return node_weight, node_phy2log, experts


def _per_node(weight, phy2log, request, fn):
    """Apply ``fn(node_weight, node_phy2log, gpus_per_node)`` to every node row."""
    node_weight, node_phy2log, experts = _node_rows(weight, phy2log, request)
    done = fn(node_weight, node_phy2log, request.topology.gpus_per_node)
    out = np.where(done >= 0, np.take_along_axis(experts, np.maximum(done, 0), 1), -1)
    return out.reshape(phy2log.shape)


def _refine_rows(
    weight: np.ndarray, base: np.ndarray, request: PlanRequest, quota: np.ndarray,
    budgeted: bool,
) -> np.ndarray:
    """``[C, L, R]`` warm-start candidates of ``base`` (candidate 0 is ``base``) with a
    per-step quota of ``quota [L]`` slots (0: the layer keeps ``base``). ``budgeted``
    adds the transfer-only candidates, which only a small budget picks: without one,
    none of them was chosen in 2784 steady-state layer plans (BENCHMARKS.md §3 protocol)."""
    topo = request.topology
    packing = request.options.packing
    steps = request.options.incremental.steps
    if request.policy != "hierarchical":
        if request.active_gpus is None:
            return moves.warm_ladder(weight, base, topo.num_gpus, quota, steps, packing,
                                     budgeted)
        # dead GPUs: refine the live GPUs' slots only
        live_slot = request.live.cpu().numpy().repeat(topo.slots_per_gpu)
        num_live = int(request.live.sum())
        inner = moves.warm_ladder(weight, base[:, live_slot], num_live, quota, steps, packing,
                                  budgeted)
        out = np.repeat(base[None], inner.shape[0], 0)
        out[:, :, live_slot] = inner
        return out
    # hierarchical: node rows; only critical nodes (busiest GPU near the layer's) move
    layers, nodes = base.shape[0], topo.num_nodes
    node_weight, node_phy2log, experts = _node_rows(weight, base, request)
    per_gpu = topo.gpus_per_node
    node_peak = moves.gpu_loads_of(node_weight, node_phy2log, per_gpu).max(1).reshape(layers, nodes)
    critical = node_peak >= _CRITICAL_NODE * node_peak.max(1, keepdims=True)  # [L, N]
    node_quota = np.where(critical, quota[:, None], 0).reshape(-1)
    # rows are independent: only the node rows with a quota are searched
    moving = np.nonzero(node_quota > 0)[0]
    searched = moves.warm_ladder(node_weight[moving], node_phy2log[moving], per_gpu,
                                 node_quota[moving], steps, packing, budgeted)
    done = np.repeat(node_phy2log[None], searched.shape[0], 0)
    done[:, moving] = searched
    out = np.where(done >= 0, np.take_along_axis(experts[None], np.maximum(done, 0), 2), -1)
    return out.reshape(done.shape[0], layers, -1)


def _choose(
    peak: np.ndarray,
    cost: np.ndarray,
    slots: int,
    max_moves: object,
    skip_threshold: float | None,
    options: IncrementalOptions,
) -> np.ndarray:
    """``[L]`` candidate index per layer from expected peaks and costs ``[C, L]``
    (candidate 0 is the forced base, cost 0)."""
    layers = peak.shape[1]
    balance = 1.0 / peak  # expected next-window balancedness of each candidate
    if max_moves is None:
        value = balance - options.move_price * cost / slots
        pick = np.argmax(value, 0)  # first on ties: fewer moves
    elif isinstance(max_moves, (int, np.integer)) and not isinstance(max_moves, bool):
        pick = _knapsack(balance, cost, int(max_moves))
    else:
        budget = np.asarray(max_moves)
        if budget.shape != (layers,) or budget.dtype.kind not in "iu" or (budget < 0).any():
            raise ValueError(
                f"max_moves must be a non-negative int (slots in total) or {layers} "
                f"non-negative ints (slots per layer); got {max_moves!r}"
            )
        affordable = cost <= budget[None]
        pick = np.argmax(np.where(affordable, balance, -np.inf), 0)
    if skip_threshold is not None:
        gain = balance[pick, np.arange(layers)] - balance[0]
        pick = np.where(gain < skip_threshold, 0, pick)
    return pick


def _knapsack(balance: np.ndarray, cost: np.ndarray, budget: int) -> np.ndarray:
    """Spend ``budget`` slots where they buy the most expected balancedness: per layer the
    upper convex hull of (cost, balance), then the steepest hull steps first."""
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
    return pick


def check_budget(max_moves: object, skip_threshold: object) -> int | np.ndarray | None:
    """Check the move-budget knobs before any planning and return ``max_moves`` as
    ``None``, an int (slots in total) or an ``[L]`` integer array (slots per layer; its
    length is checked against the layers when planning). Raises ``ValueError``."""
    if skip_threshold is not None and (
        isinstance(skip_threshold, bool) or not isinstance(skip_threshold, float | int | np.number)
        or not skip_threshold >= 0
    ):
        raise ValueError(f"skip_threshold must be a number >= 0, got {skip_threshold!r}")
    if isinstance(max_moves, torch.Tensor):
        max_moves = max_moves.detach().cpu().numpy()
    if isinstance(max_moves, (list, tuple)):
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
                         f"non-negative int per layer (slots per layer); got {max_moves!r}")
    # a total beyond any slot count means "no limit but the forced moves"; capped so that
    # per-layer shares fit int64
    return min(int(max_moves), 1 << 62) if total else max_moves


def plan_incremental(
    request: PlanRequest,
    previous: Placement | torch.Tensor,
    *,
    max_moves: int | torch.Tensor | None = None,
    skip_threshold: float | None = None,
) -> Placement:
    """Re-plan ``request`` from the placement in force ``previous`` (``[L, R]`` or a
    :class:`Placement`); see the module docstring. Returns a validated placement.

    ``max_moves``: ``None`` (decide by expected next-window gain), an int (slots in total
    over all layers, beyond forced moves) or ``[L]`` ints (per layer).
    ``skip_threshold``: leave a layer as it is (after forced moves) when its expected
    next-window balancedness would rise by less than this.
    """
    max_moves = check_budget(max_moves, skip_threshold)
    options = request.options.incremental
    topo = request.topology
    old = _previous_phy2log(previous, request)
    if request.dispatch == "nearest" and topo.num_nodes > 1:
        return _plan_nearest(request, old, max_moves, skip_threshold)
    weight = request.weight.detach().cpu().to(torch.float64).numpy()
    base = _forced(request, old)
    quota = max(2, round(options.quota * topo.num_replicas))
    candidates = _refine_rows(weight, base, request, np.full(request.num_layers, quota),
                              budgeted=max_moves is not None)
    live_gpus = request.live.cpu().numpy()
    num_live = int(live_gpus.sum())
    peak, now = moves.expected_peak(weight, _live_only(candidates, live_gpus, topo), num_live,
                                    options.drift)
    # a fresh plan, relabelled onto the old GPUs, for the layers the warm path cannot
    # serve. Global: the layers whose ladder still gains a move price over its last
    # 1/16 of the slots (the last step at the default quota; at least one step).
    # Hierarchical: every layer. The ladder refines inside nodes only, and a fresh
    # group→node split, even one with the same bound, is often more even across nodes and
    # holds up better in the next window (measured on the BENCHMARKS.md §3 protocol:
    # +0.003 next-window balancedness for 36 % of the slots moved instead of 20 %; the
    # fresh plan costs about the same for 16 layers as for 58)
    balance = 1.0 / peak
    back = max(1, round(1 / 16 / options.quota))
    need = balance[-1] - balance[max(0, len(balance) - 1 - back)] > options.move_price
    if request.policy == "hierarchical":
        need[:] = True
    if need.any():
        extra = _fresh_aligned(request, base, np.nonzero(need)[0], candidates[-1])
        extra_peak, extra_now = moves.expected_peak(
            weight, _live_only(extra, live_gpus, topo), num_live, options.drift
        )
        candidates = np.concatenate([candidates, extra])
        peak = np.concatenate([peak, np.where(need[None], extra_peak, np.inf)])
        now = np.concatenate([now, extra_now])
    cost = (candidates != base[None]).sum(2)
    # never worse than the placement in force on the window at hand: a candidate whose
    # in-sample peak exceeds the base's is not taken, whatever its expected next window
    peak = np.where(now <= now[0][None] * (1 + 1e-12), peak, np.inf)
    pick = _choose(peak, cost, topo.num_replicas, max_moves, skip_threshold, options)
    best = candidates[pick, np.arange(request.num_layers)]
    phy2log = torch.from_numpy(best).to(request.weight.device)
    placement = Placement.from_phy2log(
        phy2log, request.num_experts, topo, request.policy, request.active_gpus
    )
    return validate_planned(placement)


def _fresh_aligned(
    request: PlanRequest, base: np.ndarray, layers: np.ndarray, warm: np.ndarray
) -> np.ndarray:
    """``[C, L, R]`` fresh plans of ``layers`` relabelled onto ``base``'s GPUs (other rows:
    ``base``). Hierarchical: also the fresh plan with the nodes that keep their groups
    taken from ``warm [L, R]`` (only the regrouped nodes re-planned)."""
    topo = request.topology
    sub = dataclasses.replace(request, weight=request.weight[torch.from_numpy(layers)])
    fresh = plan_fresh(sub).phy2log.cpu()
    out = base.copy()
    if request.active_gpus is not None:  # align the live GPUs only
        live_slot = request.live.cpu().numpy().repeat(topo.slots_per_gpu)
        old_live = torch.from_numpy(base[layers][:, live_slot])
        aligned = align_to_previous(fresh[:, live_slot], old_live, int(request.live.sum()))
        rows = out[layers]
        rows[:, live_slot] = aligned.numpy()
        out[layers] = rows
        return out[None]
    per_node = topo.gpus_per_node if request.policy == "hierarchical" else None
    aligned = align_to_previous(fresh, torch.from_numpy(base[layers]), topo.num_gpus,
                                per_node).numpy()
    out[layers] = aligned
    if per_node is None:
        return out[None]
    # a node that keeps its groups can keep its warm-start packing: only the nodes whose
    # groups change are re-planned
    new_nodes, _ = _group_nodes(aligned, request)
    old_nodes, _ = _group_nodes(base[layers], request)
    nodes = topo.num_nodes
    same = np.stack([((new_nodes == n) == (old_nodes == n)).all(1) for n in range(nodes)], 1)
    keep = np.repeat(same, topo.num_replicas // nodes, 1)  # [n, R]
    hybrid = base.copy()
    hybrid[layers] = np.where(keep, warm[layers], aligned)
    return np.stack([out, hybrid])


def _plan_nearest(
    request: PlanRequest, old: np.ndarray, max_moves: object, skip_threshold: float | None
) -> Placement:
    """Incremental planning under SGLang's nearest dispatch (:mod:`eplb.online.nearest`).

    The global policy with every GPU live has a budgeted planner; a total ``max_moves``
    is split evenly over the layers here (not spent where it pays most, as under the even
    split). The locality policy and dead GPUs get a fresh dispatch-aware plan relabelled
    onto the old GPUs (no budget)."""
    topo = request.topology
    if skip_threshold is not None:
        raise ValueError("skip_threshold is not supported with dispatch='nearest'")
    even = dataclasses.replace(request, dispatch="even", fair="auto", source=None)
    if request.policy != "global" or request.active_gpus is not None:
        if max_moves is not None:
            raise ValueError(
                "max_moves with dispatch='nearest' is supported for the global policy with "
                "every GPU live; here eplb re-plans and relabels onto the old GPUs"
            )
        fresh = plan_fresh(request).phy2log.cpu()
        live_slot = request.live.cpu().numpy().repeat(topo.slots_per_gpu)
        out = fresh.clone()
        aligned = align_to_previous(
            fresh[:, live_slot], torch.from_numpy(np.where(live_slot[None], old, -1)[:, live_slot]),
            int(request.live.sum()), topo.gpus_per_node if request.active_gpus is None else None,
        )
        out[:, torch.from_numpy(live_slot)] = aligned
        placement = Placement.from_phy2log(out.to(request.weight.device), request.num_experts,
                                           topo, request.policy, request.active_gpus)
        return validate_planned(placement)
    base = torch.from_numpy(_forced(even, old))
    budget = None
    if max_moves is not None:
        layers = request.num_layers
        if isinstance(max_moves, (int, np.integer)) and not isinstance(max_moves, bool):
            if max_moves < 0:
                raise ValueError(f"max_moves must be >= 0 (slots in total), got {max_moves}")
            budget = torch.full((layers,), int(max_moves) // layers, dtype=torch.int64)
        else:
            budget = torch.as_tensor(np.asarray(max_moves))
            if budget.shape != (layers,) or budget.is_floating_point() or bool((budget < 0).any()):
                raise ValueError(
                    f"max_moves must be a non-negative int (slots in total) or {layers} "
                    f"non-negative ints (slots per layer); got {max_moves!r}"
                )

    def warm_even(start: torch.Tensor, layer_budget: torch.Tensor | None) -> torch.Tensor:
        planned = plan_incremental(even, start, max_moves=layer_budget)
        return planned.phy2log.cpu()

    out = plan_nearest_incremental(request, base, budget, warm_even)
    placement = Placement.from_phy2log(out.to(request.weight.device), request.num_experts,
                                       topo, request.policy, request.active_gpus)
    return validate_planned(placement)


def _live_only(candidates: np.ndarray, live_gpus: np.ndarray, topo) -> np.ndarray:
    if live_gpus.all():
        return candidates
    return candidates[..., live_gpus.repeat(topo.slots_per_gpu)]
