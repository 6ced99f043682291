"""DeepSeek's published greedy EPLB, re-implemented and vectorized across layers.

This is the reference planner every eplb result is compared against. It reproduces the
published algorithm (deepseek-ai/EPLB ``eplb.py``, which vLLM ports as
``DefaultEplbPolicy``) step for step:

- **replicate**: every expert starts with one replica; each of the ``R - E`` redundant
  replicas goes to the expert with the largest current per-replica load ``w / c``
  (first index on ties). This is Jefferson/D'Hondt apportionment.
- **balanced packing**: items, heaviest first, each go to the lightest pack that still has
  room; every pack holds exactly ``n / m`` items (first pack on ties). When every pack
  holds one item, item ``i`` goes to pack ``i`` (DeepSeek's shortcut).
- **hierarchical**: pack the ``G`` expert groups onto ``N`` nodes by group load, replicate
  inside each node (``R / N`` slots for its ``E / N`` experts), pack each node's replicas
  onto its ``P / N`` GPUs, then map back to logical ids.
- **global**: the hierarchical routine with one group and one node.
- **auto**: hierarchical when ``num_groups % num_nodes == 0`` (DeepSeek's exact test),
  else global.

Like the original, every decision is made on float32 loads, and the arithmetic
(``w / c``, running pack sums) is done in the same order, so choices and balancedness
match the original. Two deliberate differences:

- sorting is stable (equal loads keep ascending index order), so results are defined and
  device-independent; the original's unstable sort orders ties however torch does.
  Swapping two equal-weight replicas changes no GPU load. Checked against the original on
  all 12 real DeepSeek-V3 workloads x 6 topologies: ``logcnt`` and every GPU load are
  identical (and with torch's default CPU sort, ``phy2log`` is bit-identical).
- ``log2phy`` lists each expert's slots in ascending order (the original orders them by
  replica rank), as eplb's contract requires.

Cost: the replicate step is ``R - E`` argmax steps over all rows at once; the packing
step is one masked argmin per item over all rows at once (rows = layers, or
layers x nodes), instead of DeepSeek's Python loop per layer.
"""

from __future__ import annotations

import math

import torch

from eplb.core.inputs import as_weight
from eplb.core.placement import Placement
from eplb.core.policies import resolve_policy
from eplb.core.topology import Topology, check_total_slots


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (Jefferson) replication of every row, all rows at once.

    Args:
        weight: ``[X, n]`` float loads of ``n`` experts in each of ``X`` rows.
        num_phy: replicas per row (``>= n``).

    Returns:
        ``phy2log [X, num_phy]``: replica ``i < n`` is expert ``i``; replica ``i >= n`` is the
        expert chosen at step ``i - n``. ``logcnt [X, n]``: replicas per expert.
    """
    num_rows, num_log = weight.shape
    device = weight.device
    phy2log = torch.arange(num_phy, dtype=torch.int64, device=device).repeat(num_rows, 1)
    logcnt = torch.ones(num_rows, num_log, dtype=torch.int64, device=device)
    per_replica = weight.clone()  # w / c with c = 1
    rows = torch.arange(num_rows, device=device)
    for i in range(num_log, num_phy):
        best = per_replica.argmax(-1)  # first index on ties, like DeepSeek's max().indices
        phy2log[:, i] = best
        logcnt[rows, best] += 1
        # recompute only the chosen entry, with the same float32 w / c the original uses
        per_replica[rows, best] = weight[rows, best] / logcnt[rows, best]
    return phy2log, logcnt


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy balanced packing of every row, all rows at once.

    Items sorted heaviest first (stable) each go to the lightest pack with room (first
    pack on ties); every pack receives exactly ``n / num_packs`` items.

    Args:
        weight: ``[X, n]`` item weights (float32 for DeepSeek parity).
        num_packs: ``m``, a divisor of ``n``.

    Returns:
        ``pack_index [X, n]`` (the pack of each item) and ``rank_in_pack [X, n]`` (the
        order in which it entered its pack), both int64.
    """
    num_rows, num_items = weight.shape
    device = weight.device
    if num_items % num_packs:
        raise ValueError(f"cannot pack {num_items} items evenly into {num_packs} packs")
    per_pack = num_items // num_packs
    if per_pack == 1:
        # DeepSeek's shortcut: item i -> pack i (not the greedy order)
        pack_index = torch.arange(num_items, dtype=torch.int64, device=device).expand(
            num_rows, num_items
        )
        return pack_index.clone(), torch.zeros_like(pack_index)

    order = torch.sort(weight, dim=-1, descending=True, stable=True).indices
    sorted_w = weight.gather(-1, order).unbind(-1)  # n views of [X]
    pack_w = torch.zeros(num_rows, num_packs, dtype=weight.dtype, device=device)
    pack_n = torch.zeros(num_rows, num_packs, dtype=torch.int64, device=device)
    full = torch.tensor(math.inf, dtype=weight.dtype, device=device)
    ones = torch.ones(num_rows, 1, dtype=torch.int64, device=device)
    picks = []
    for k in range(num_items):
        pick = torch.where(pack_n < per_pack, pack_w, full).argmin(-1, keepdim=True)
        picks.append(pick)
        # one float32 add per row, in item order: the same running sums as the original
        pack_w.scatter_add_(-1, pick, sorted_w[k][:, None])
        pack_n.scatter_add_(-1, pick, ones)
    pack_of = torch.cat(picks, dim=-1)  # [X, n] pack of the k-th heaviest item
    # rank in pack = how many earlier (heavier) items went to the same pack: a stable sort
    # by pack lists each pack's items in arrival order, and every pack holds per_pack items
    by_pack = torch.sort(pack_of, dim=-1, stable=True).indices
    arrival = torch.arange(num_items, device=device).remainder(per_pack).expand_as(by_pack)
    rank_of = torch.empty_like(pack_of).scatter_(-1, by_pack, arrival)
    pack_index = torch.empty_like(pack_of).scatter_(-1, order, pack_of)
    rank_in_pack = torch.empty_like(rank_of).scatter_(-1, order, rank_of)
    return pack_index, rank_in_pack


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of a permutation ``[X, n]``."""
    arange = torch.arange(perm.shape[1], dtype=torch.int64, device=perm.device)
    return torch.empty_like(perm).scatter_(1, perm, arange.expand_as(perm))


def rebalance_experts_hierarchical(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> torch.Tensor:
    """DeepSeek's hierarchical routine on float32 loads; returns ``phy2log [L, R]``.

    Args:
        weight: ``[L, E]`` float32 loads (already validated).
        num_replicas: ``R``, a multiple of ``num_gpus`` and ``>= E``.
        num_groups: ``G``, divides ``E`` and is a multiple of ``num_nodes``.
        num_nodes: ``N``, divides ``num_gpus``.
        num_gpus: ``P``.

    Every replica of a group's experts lands on the node its group was packed to.
    """
    num_layers, num_experts = weight.shape
    device = weight.device
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_experts // num_nodes
    slots_per_gpu = num_replicas // num_gpus

    # 1. groups -> nodes by group load; "mlog" numbers experts node by node
    group_load = weight.view(num_layers, num_groups, group_size).sum(-1)  # [L, G]
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    group_pos = group_pack * groups_per_node + group_rank  # [L, G] group's slot in mlog order
    offset = torch.arange(group_size, dtype=torch.int64, device=device)
    log2mlog = (group_pos[:, :, None] * group_size + offset).flatten(1)  # [L, E]
    mlog2log = _inverse(log2mlog)

    # 2. replicate inside each node: rows are (layer, node)
    node_w = weight.gather(1, mlog2log).view(num_layers * num_nodes, experts_per_node)
    phy2mlog, mlogcnt = replicate_experts(node_w, num_replicas // num_nodes)

    # 3. each node's replicas -> its GPUs
    replica_w = (node_w / mlogcnt).gather(1, phy2mlog)
    pack, rank = balanced_packing(replica_w, num_gpus // num_nodes)
    phy2slot = pack * slots_per_gpu + rank  # slot inside the node
    slot2mlog = torch.empty_like(phy2mlog).scatter_(1, phy2slot, phy2mlog)

    # 4. back to logical ids
    node_base = torch.arange(0, num_experts, experts_per_node, dtype=torch.int64, device=device)
    slot2mlog = (slot2mlog.view(num_layers, num_nodes, -1) + node_base[None, :, None]).flatten(1)
    return mlog2log.gather(1, slot2mlog)


def _float32_loads(weight: torch.Tensor) -> torch.Tensor:
    """``weight [L, E]`` as float32, the precision DeepSeek decides in.

    Loads whose peak lies outside ``[2**-100, 2**100]`` would overflow (in group or pack
    sums) or lose precision in float32; they are first scaled by a power of two, which is
    exact and changes no decision. Inside that range nothing is rescaled.
    """
    peak = float(weight.max())
    if peak > 0 and not (2.0**-100 <= peak <= 2.0**100):
        # in two factors: a subnormal peak needs 2**1062 or so, past float64's range (an
        # OverflowError from 1e-320 loads: attacker pass)
        shift = -math.frexp(peak)[1]
        weight = weight.to(torch.float64) * 2.0 ** (shift // 2) * 2.0 ** (shift - shift // 2)
    return weight.to(torch.float32)


def plan_greedy(
    weight: object,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    *,
    policy: str = "auto",
) -> Placement:
    """Plan with DeepSeek's greedy EPLB and return a :class:`~eplb.core.placement.Placement`.

    Args:
        weight: ``[L, E]`` or ``[E]`` loads (tensor, array or nested list), any device.
        num_replicas: ``R`` physical slots, a multiple of ``num_gpus`` and ``>= E``.
        num_gpus: ``P``.
        num_nodes: ``N``, divides ``num_gpus``.
        num_groups: ``G`` expert groups.
        policy: ``"auto"`` (hierarchical when ``G % N == 0``, like DeepSeek), ``"global"``
            or ``"hierarchical"``.

    Returns:
        A placement with ``L`` layers (``L = 1`` for ``[E]`` input) on the input's device;
        its ``policy`` is ``"hierarchical"`` whenever the hierarchical routine ran with the
        given ``G`` and ``N`` (also for ``N = 1``, where locality holds trivially).
        Two replicas of one expert may share a GPU (validate with ``anti_affinity=False``).
    """
    w, _ = as_weight(weight)
    topo = Topology(num_replicas, num_gpus, num_nodes, num_groups)
    num_experts = w.shape[1]
    if topo.num_replicas < num_experts:
        raise ValueError(
            f"num_replicas ({topo.num_replicas}) must be >= the number of experts ({num_experts})"
        )
    topo.gpus_per_node  # noqa: B018  (raises when num_gpus % num_nodes != 0)
    check_total_slots(w.shape[0], topo)  # eplb's planners' limit, before any allocation
    resolved = resolve_policy(policy, topo, num_experts, rule="deepseek")
    w32 = _float32_loads(w)
    if resolved == "hierarchical":
        phy2log = rebalance_experts_hierarchical(
            w32, topo.num_replicas, topo.num_groups, topo.num_nodes, topo.num_gpus
        )
    else:
        phy2log = rebalance_experts_hierarchical(w32, topo.num_replicas, 1, 1, topo.num_gpus)
    return Placement.from_phy2log(phy2log, num_experts, topo, resolved)


def rebalance_experts_greedy(
    weight: object,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's ``rebalance_experts`` signature and return value.

    Args:
        weight: ``[L, E]`` or ``[E]`` loads.
        num_replicas, num_groups, num_nodes, num_gpus: as in DeepSeek's ``rebalance_experts``.
        policy: ``"auto"``, ``"global"`` or ``"hierarchical"`` (see :func:`plan_greedy`).

    Returns:
        ``(phy2log [L, R], log2phy [L, E, maxcnt], logcnt [L, E])``, int64, on the input's
        device; the layer dimension is dropped for ``[E]`` input.
    """
    w, one_layer = as_weight(weight)
    placement = plan_greedy(w, num_replicas, num_gpus, num_nodes, num_groups, policy=policy)
    out = placement.as_tuple()
    if one_layer:
        out = tuple(t[0] for t in out)
    return out  # type: ignore[return-value]
