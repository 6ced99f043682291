"""How an engine sends each token to one replica, and what that does to loads and traffic.

A placement only fixes where replicas live; the engine's dispatch rule decides which
replica serves a token. Two rules are modelled, both vectorized over layers:

- ``"even"`` (vLLM 0.33; also SGLang 0.5.23 without an all-to-all backend, whose
  default ``dynamic`` dispatch then picks replica ``token_row mod c`` among all of
  them): every replica of expert ``e`` carries ``w_e / c_e`` and a token from any GPU
  reaches each replica with probability ``1 / c_e``. :meth:`eplb.Placement.gpu_loads`
  scores this rule.
- ``"nearest"`` (SGLang 0.5.23 with an all-to-all backend such as DeepEP, where
  ``arg_groups/parallel_hook.py`` makes ``static`` the default once EPLB or an
  ``--init-expert-location`` is used: the table of
  ``expert_location.compute_logical_to_rank_dispatch_physical_map``, same-node
  preference on, i.e. no elastic "scale" join). A token of expert ``e`` that arises on
  GPU ``r`` goes to

  1. the expert's only replica when ``c_e == 1``;
  2. else the *first* (lowest slot id) replica on GPU ``r``, if any;
  3. else the *first* replica on ``r``'s node, if the node holds some but not all of the
     expert's replicas (SGLang applies the node rule only when it narrows the choice);
  4. else a "fair choice" among all ``c_e`` replicas.

  The fair choice is SGLang's ``_fair_choices``: the ``k`` ranks left for the expert get
  ``arr * (k // c) + random.Random(seed).sample(arr, k % c)``, shuffled, with one
  ``random.Random(42)`` consumed over (layer, expert) in order. It is a *seeded* pseudo-
  random choice, not a rank rule. This module models it by its expectation: every
  remaining rank reaches each replica with probability ``1 / c_e``. On SGLang's own
  planning path all ranks share one stream, so each replica gets the floor or ceiling of
  its share of the remaining ranks (exact whenever ``c_e`` divides them); on the
  ``--init-expert-location`` map path every rank draws from its own point of the stream
  and the realised split can stray far (``eplb.core.rank_draws`` models it). SGLang's
  ``dynamic`` dispatch with an all-to-all backend applies the same tiers 1-3 and draws
  the fair choice per token, so this expectation is its mean load. Tests run SGLang's
  real function and check tiers 1-3 slot for slot and the fair tier's counts; planners
  can avoid the fair tier altogether (``eplb.core.dispatch_plan``, ``fair="avoid"``).

Tokens arise on the live GPUs in proportion to ``source [P]`` (default: evenly, as with
DP attention). Loads are *expected* routed-token counts per GPU ``[L, P]``.

Traffic: DeepEP's normal (prefill) mode sends a token once to every remote node that
serves one of its experts, so the cost is the expected number of *distinct remote
nodes per token*. It is computed exactly (under the model) from a per-token trace of
top-k ids ``[T, L, k]``, or estimated from pairwise co-activation counts ``[L, E, E]``
when no trace is kept (:func:`remote_nodes_from_coactivation`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from eplb.core.expert_ids import as_topk_ids, padding_mask, require_integer_ids
from eplb.core.inputs import as_gpu_speed, as_live_mask, as_weight, refuse_non_dense
from eplb.core.map_tables import ratio_or_one
from eplb.core.topology import is_name, positive_int

DISPATCH_RULES = ("even", "nearest")


def check_dispatch(dispatch: str) -> str:
    """``dispatch`` if it names a modelled rule, else ``ValueError``."""
    if not is_name(dispatch, DISPATCH_RULES):
        raise ValueError(f"unknown dispatch {dispatch!r}; choose one of {DISPATCH_RULES}")
    return dispatch


def _check_shape(phy2log: torch.Tensor, num_gpus: int, num_nodes: int) -> tuple[int, int]:
    if not isinstance(phy2log, torch.Tensor) or phy2log.dim() != 2:
        raise ValueError("phy2log must be an integer tensor [L, R]")
    refuse_non_dense(phy2log, "phy2log")  # sparse: torch's "Could not run 'aten::min'"
    require_integer_ids(phy2log, "phy2log")
    if phy2log.numel() == 0:
        raise ValueError(f"phy2log is empty (shape {tuple(phy2log.shape)})")
    if int(phy2log.min()) < -1:
        raise ValueError(f"phy2log holds expert id {int(phy2log.min())}; -1 marks an empty "
                         "slot, ids start at 0")
    num_slots = phy2log.shape[1]
    for name, value in (("num_gpus", num_gpus), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if num_gpus < 1 or num_slots % num_gpus:
        raise ValueError(f"R = {num_slots} slots do not split over {num_gpus} GPUs")
    if num_nodes < 1 or num_gpus % num_nodes:
        raise ValueError(f"{num_gpus} GPUs do not split over {num_nodes} nodes")
    return num_slots // num_gpus, num_gpus // num_nodes


def source_distribution(
    num_gpus: int,
    active_gpus: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[P]`` float64 share of tokens arising on each GPU, summing to 1.

    ``source`` (non-negative, any scale) is taken as given, zeroed on dead GPUs; the
    default spreads tokens evenly over the live GPUs (``active_gpus [P]`` bool).
    """
    if source is None:
        src = torch.ones(num_gpus, dtype=torch.float64, device=device)
    else:
        # the planner's own check (attacker pass: a str met torch's internal error here,
        # and a bool mask passed as counts)
        src = as_gpu_speed(source, num_gpus, torch.device(device), name="source",
                           allow_zero=True)
    if active_gpus is not None:
        # the planner's own check: a boolean mask (GPU ids such as [0, 1, 2, 3] are refused,
        # not read as a 0/1 mask)
        live = as_live_mask(active_gpus, num_gpus, torch.device(device))
        src = torch.where(live, src, torch.zeros_like(src))
    total = float(src.sum())
    if total <= 0:
        raise ValueError("no tokens arise anywhere: source is zero on every live GPU")
    if total == float("inf"):  # e.g. 4 × 1e308: every share would come out 0
        raise ValueError(f"source sums beyond float64's range (largest {float(src.max()):g}); "
                         "only the ratios matter: give relative values, e.g. 1 and 2")
    return src / total


def _slot_experts(
    phy2log: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """``(expert [L, R], live [L, R], width, count [L, width])`` of ``phy2log``: every
    slot's expert with empty (``-1``) slots on a sentinel id ``width − 1``, which slots
    hold an expert, and the replicas of every id per layer."""
    phy = phy2log.to(torch.int64)
    live = phy >= 0
    width = int(phy.max()) + 2 if phy.numel() else 1  # experts + a sentinel for -1
    expert = torch.where(live, phy, width - 1)
    count = torch.zeros(phy.shape[0], width, dtype=torch.int64, device=phy.device)
    count.scatter_add_(1, expert, torch.ones_like(expert))
    return expert, live, width, count


def _tally(
    expert: torch.Tensor, unit_of_slot: torch.Tensor, units: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replicas and first slot per (layer, unit, expert) of ``expert [L, R]`` (ids below
    ``width``) with slots grouped into ``units`` by ``unit_of_slot [R]``: ``(count [L,
    units, width], first [L, units, width], index [L, R])``, ``index`` each slot's flat
    (unit, expert) cell."""
    num_layers, num_slots = expert.shape
    device = expert.device
    index = unit_of_slot[None] * width + expert  # [L, R]
    cnt = torch.zeros(num_layers, units * width, dtype=torch.int64, device=device)
    cnt.scatter_add_(1, index, torch.ones_like(expert))
    first = torch.full((num_layers, units * width), num_slots, dtype=torch.int64,
                       device=device)
    slot = torch.arange(num_slots, device=device)
    first.scatter_reduce_(1, index, slot.expand(num_layers, -1), reduce="amin")
    return cnt.view(num_layers, units, width), first.view(num_layers, units, width), index


def dispatch_fractions(
    phy2log: torch.Tensor, num_gpus: int, num_nodes: int = 1, dispatch: str = "nearest"
) -> torch.Tensor:
    """``[L, P, R]`` expected share of source GPU ``r``'s tokens of expert ``phy2log[l, s]``
    that slot ``s`` serves (rows over one expert's slots sum to 1; ``-1`` slots get 0).

    ``dispatch="nearest"`` follows SGLang's tiers (module docstring) with the fair choice
    in expectation; ``"even"`` gives ``1 / c_e`` everywhere.
    """
    check_dispatch(dispatch)
    slots_per_gpu, gpus_per_node = _check_shape(phy2log, num_gpus, num_nodes)
    num_layers, num_slots = phy2log.shape
    device = phy2log.device
    expert, live, width, count = _slot_experts(phy2log)
    live = live[:, None, :]  # [L, 1, R]
    c = count.gather(1, expert)[:, None, :].to(torch.float64)  # [L, 1, R] replicas of e(s)
    fair = torch.where(live, 1.0 / c.clamp(min=1), torch.zeros_like(c))
    if dispatch == "even":
        return fair.expand(num_layers, num_gpus, num_slots).contiguous()

    slot = torch.arange(num_slots, device=device)
    gpu_of_slot = slot // slots_per_gpu
    node_of_slot = gpu_of_slot // gpus_per_node
    node_of_gpu = torch.arange(num_gpus, device=device) // gpus_per_node

    gpu_cnt, gpu_first, _ = _tally(expert, gpu_of_slot, num_gpus, width)
    node_cnt, node_first, _ = _tally(expert, node_of_slot, num_nodes, width)
    # per (layer, source GPU r, slot s): the tier that decides r's tokens of e(s)
    idx = expert[:, None, :].expand(num_layers, num_gpus, num_slots)
    on_gpu = gpu_cnt.gather(2, idx) > 0
    first_gpu = gpu_first.gather(2, idx)
    node_cnt_r = node_cnt[:, node_of_gpu].gather(2, idx)  # replicas on r's node
    first_node = node_first[:, node_of_gpu].gather(2, idx)
    on_node = ~on_gpu & (node_cnt_r > 0) & (node_cnt_r < c) & (c > 1)
    frac = torch.where(on_gpu, (first_gpu == slot).to(torch.float64), fair)
    frac = torch.where(on_node, (first_node == slot).to(torch.float64), frac)
    return torch.where(live, frac, torch.zeros_like(frac))


def realised_slot_loads(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    num_nodes: int = 1,
    dispatch: str = "nearest",
    source: torch.Tensor | None = None,
    active_gpus: torch.Tensor | None = None,
    *,
    check: bool = True,
) -> torch.Tensor:
    """``[L, R]`` expected tokens each slot serves: ``weight [L, E]`` routed through the rule,
    tokens arising as :func:`source_distribution` says.

    ``check``: refuse a map that gives a loaded expert no replica, or puts experts on a GPU
    ``active_gpus`` marks dead (its tokens would be missing from every figure). The
    planners pass ``False`` for maps they built themselves (about 0.1 ms a call)."""
    _check_shape(phy2log, num_gpus, num_nodes)
    w = as_weight(weight)[0].to(torch.float64)  # finite, >= 0, named errors
    if w.dim() != 2 or w.shape[0] != phy2log.shape[0]:
        raise ValueError(f"weight must be [L, E] with L = {phy2log.shape[0]}, got {tuple(w.shape)}")
    if int(phy2log.max()) >= w.shape[1]:
        raise ValueError(f"phy2log holds expert ids >= E = {w.shape[1]}")
    w = w.to(phy2log.device)
    src = source_distribution(num_gpus, active_gpus, source, phy2log.device)
    if check:
        require_placed(w > 0, phy2log, "has load")
        require_empty_dead(phy2log, num_gpus, active_gpus)
    if dispatch == "nearest":
        share = _nearest_share(phy2log, src, num_gpus, num_nodes)
    else:
        share = torch.einsum("lpr,p->lr", dispatch_fractions(phy2log, num_gpus, num_nodes,
                                                             dispatch), src)
    expert_load = w.gather(1, phy2log.clamp(min=0).to(torch.int64))
    return torch.where(phy2log >= 0, expert_load * share, torch.zeros_like(share))


def require_empty_dead(phy2log: torch.Tensor, num_gpus: int, active_gpus: object) -> None:
    """``ValueError`` naming the first GPU that ``active_gpus [P]`` marks dead but that holds
    an expert in ``phy2log``: it would serve tokens whose load no live-GPU figure counts."""
    if active_gpus is None:
        return
    dead = ~as_live_mask(active_gpus, num_gpus, phy2log.device)
    held = (phy2log >= 0).view(phy2log.shape[0], num_gpus, -1).any(2).any(0)
    wrong = (held & dead).nonzero()
    if len(wrong):
        raise ValueError(f"GPU {int(wrong[0])} is dead (active_gpus) but phy2log places experts "
                         "on it: dead GPUs' slots hold -1")


def require_placed(used: torch.Tensor, phy2log: torch.Tensor, what: str) -> None:
    """``ValueError`` naming the first expert that ``used [L, E]`` marks but that
    ``phy2log [L, R]`` gives no replica: its tokens would be dropped from every figure."""
    held = torch.zeros(used.shape, dtype=torch.int64, device=phy2log.device)
    held.scatter_add_(1, phy2log.clamp(min=0).to(torch.int64), (phy2log >= 0).to(torch.int64))
    missing = (used.to(phy2log.device) & (held == 0)).nonzero()
    if len(missing):
        layer, expert = (int(x) for x in missing[0])
        raise ValueError(f"expert {expert} of layer {layer} {what} but phy2log gives it no "
                         f"replica ({len(missing)} such experts): is the placement for these "
                         f"{'loads' if what == 'has load' else 'tokens'}?")


def _nearest_share(
    phy2log: torch.Tensor, src: torch.Tensor, num_gpus: int, num_nodes: int
) -> torch.Tensor:
    """``[L, R]`` share of its expert's tokens each slot serves under the nearest rule,
    tokens arising as ``src [P]`` says: :func:`dispatch_fractions` summed over the source
    GPUs without building its ``[L, P, R]`` table.

    Slot ``s`` of expert ``e`` on GPU ``g`` in node ``n`` (``c`` replicas) receives GPU
    ``g``'s tokens if it is ``e``'s first slot on ``g``; the tokens of ``n``'s GPUs that
    hold no ``e`` if it is ``e``'s first slot on ``n`` and ``n`` holds some but not all of
    ``e``'s replicas; and ``1 / c`` of the tokens of every GPU that holds no ``e`` on a
    node holding none or all of them.
    """
    slots_per_gpu, gpus_per_node = _check_shape(phy2log, num_gpus, num_nodes)
    num_layers, num_slots = phy2log.shape
    expert, live, width, count = _slot_experts(phy2log)
    slot = torch.arange(num_slots, device=phy2log.device)
    gpu_of_slot = slot // slots_per_gpu
    node_of_slot = gpu_of_slot // gpus_per_node

    def first_and_count(unit_of_slot: torch.Tensor, units: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whether each slot is its expert's first on its unit ``[L, R]``, and the
        replicas per (layer, unit, expert) ``[L, units, width]``."""
        cnt, first, index = _tally(expert, unit_of_slot, units, width)
        return first.view(num_layers, -1).gather(1, index) == slot, cnt

    first_on_gpu, gpu_cnt = first_and_count(gpu_of_slot, num_gpus)
    first_on_node, node_cnt = first_and_count(node_of_slot, num_nodes)
    # tokens arising on each node's GPUs that hold no replica of e: [L, N, width]
    holding = (gpu_cnt > 0).to(torch.float64) * src[None, :, None]
    held = holding.view(num_layers, num_nodes, gpus_per_node, width).sum(2)
    free = src.view(num_nodes, gpus_per_node).sum(1)[None, :, None] - held
    partial = (node_cnt > 0) & (node_cnt < count[:, None, :])  # [L, N, width]
    fair = torch.where(partial, torch.zeros_like(free), free).sum(1)  # [L, width]
    at_node = (node_of_slot[None] * width + expert).view(num_layers, -1)
    node_part = torch.where(partial.view(num_layers, -1).gather(1, at_node),
                            free.view(num_layers, -1).gather(1, at_node), 0.0)
    share = (src[gpu_of_slot][None] * first_on_gpu
             + node_part * first_on_node
             + fair.gather(1, expert) / count.gather(1, expert).to(torch.float64))
    return torch.where(live, share, torch.zeros_like(share))


def realised_gpu_loads(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    num_gpus: int,
    num_nodes: int = 1,
    dispatch: str = "nearest",
    source: torch.Tensor | None = None,
    active_gpus: torch.Tensor | None = None,
    *,
    check: bool = True,
) -> torch.Tensor:
    """``[L, P]`` expected tokens per GPU under the dispatch rule (see
    :func:`realised_slot_loads`, also for ``check``); ``dispatch="even"`` equals
    ``Placement.gpu_loads``."""
    loads = realised_slot_loads(weight, phy2log, num_gpus, num_nodes, dispatch, source,
                                active_gpus, check=check)
    return loads.view(loads.shape[0], num_gpus, -1).sum(2)


def _live(gpu_loads: torch.Tensor, active_gpus: object) -> torch.Tensor:
    """``[P]`` the live-GPU mask of ``gpu_loads [L, P]``, checked as the planner checks it."""
    return as_live_mask(active_gpus, gpu_loads.shape[1], gpu_loads.device)


def layer_balancedness(gpu_loads: torch.Tensor, active_gpus: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """``[L]`` mean / max live-GPU load of ``gpu_loads [L, P]`` (1.0 for an empty layer)."""
    loads = gpu_loads if active_gpus is None else gpu_loads[:, _live(gpu_loads, active_gpus)]
    mean, peak = loads.mean(1), loads.amax(1)
    return ratio_or_one(mean, peak)


def balancedness(gpu_loads: torch.Tensor, active_gpus: torch.Tensor | None = None) -> float:
    """Σ_l mean live-GPU load / Σ_l max live-GPU load of ``gpu_loads [L, P]`` (1.0 perfect)."""
    loads = gpu_loads if active_gpus is None else gpu_loads[:, _live(gpu_loads, active_gpus)]
    peak = float(loads.amax(1).sum())
    return float(loads.mean(1).sum()) / peak if peak > 0 else 1.0


def table_gpu_loads(
    weight: torch.Tensor,
    table: torch.Tensor,
    num_gpus: int,
    num_slots: int,
    source: torch.Tensor | None = None,
    active_gpus: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[L, P]`` loads an engine's per-rank dispatch table realises.

    ``table [P, L, E]``: the physical slot source rank ``r`` sends expert ``e`` to (e.g.
    SGLang's ``logical_to_rank_dispatch_physical_map`` of every rank, stacked).
    """
    w = torch.as_tensor(weight).to(torch.float64)
    ranks, num_layers, num_experts = table.shape
    if ranks != num_gpus or w.shape != (num_layers, num_experts):
        raise ValueError(f"table {tuple(table.shape)} does not match weight {tuple(w.shape)}")
    src = source_distribution(num_gpus, active_gpus, source, w.device)
    slot_load = torch.zeros(num_layers, num_slots, dtype=torch.float64, device=w.device)
    part = (src[:, None, None] * w[None]).permute(1, 0, 2).reshape(num_layers, -1)
    slot_load.scatter_add_(1, table.to(torch.int64).permute(1, 0, 2).reshape(num_layers, -1),
                           part)
    return slot_load.view(num_layers, num_gpus, -1).sum(2)


def node_hit_probs(
    phy2log: torch.Tensor,
    num_experts: int,
    num_gpus: int,
    num_nodes: int,
    dispatch: str = "nearest",
) -> torch.Tensor:
    """``[L, P, E, N]`` probability that a token of expert ``e`` from source GPU ``r`` is
    served on node ``m`` (sums to 1 over ``m`` for every placed expert)."""
    slots_per_gpu, gpus_per_node = _check_shape(phy2log, num_gpus, num_nodes)
    if int(phy2log.max()) >= num_experts:
        raise ValueError(f"phy2log holds expert id {int(phy2log.max())}, beyond the "
                         f"{num_experts} experts given (num_experts)")
    num_layers, num_slots = phy2log.shape
    frac = dispatch_fractions(phy2log, num_gpus, num_nodes, dispatch)  # [L, P, R]
    node_of_slot = torch.arange(num_slots, device=phy2log.device) // (
        slots_per_gpu * gpus_per_node)
    expert = torch.where(phy2log >= 0, phy2log, num_experts).to(torch.int64)
    index = (expert * num_nodes + node_of_slot)[:, None, :].expand(-1, num_gpus, -1)
    hits = torch.zeros(num_layers, num_gpus, (num_experts + 1) * num_nodes,
                       dtype=torch.float64, device=phy2log.device)
    hits.scatter_add_(2, index, frac)
    return hits.view(num_layers, num_gpus, num_experts + 1, num_nodes)[:, :, :num_experts]


def remote_nodes_per_token(
    phy2log: torch.Tensor,
    ids: torch.Tensor,
    num_experts: int,
    num_gpus: int,
    num_nodes: int,
    dispatch: str = "nearest",
    sources: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
    active_gpus: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """``[L]`` expected distinct remote nodes a token reaches per MoE layer.

    Args:
        phy2log: ``[L, R]`` placement; ids: ``[T, L, k]`` top-k expert ids per token, ids
            below 0 padding (a padded entry reaches no node, and a layer's figure is over
            the tokens with an expert there: SGLang pads a batch's extra tokens with -1;
            a layer without one reads 0, so leave it out of a mean over layers).
        sources: ``[T]`` source GPU of every token; ``None`` averages every token over the
            source GPUs, weighted by :func:`source_distribution` (``source``,
            ``active_gpus``).
        chunk: tokens per step (memory ``chunk · L · k · N`` floats).

    Per token and source GPU ``r`` the count is ``Σ_{m ≠ node(r)} 1 − Π_j (1 − h_jm)``
    with ``h_jm`` the probability that expert ``j``'s token is served on node ``m``
    (choices of different experts independent, as the fair choice is).
    """
    _check_shape(phy2log, num_gpus, num_nodes)
    chunk = positive_int("chunk", chunk)
    num_experts = positive_int("num_experts", num_experts)
    num_layers = phy2log.shape[0]
    ids = as_topk_ids(ids, num_layers, num_experts)
    real = padding_mask(ids)  # None: no padding (the plain path)
    chosen = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    if real is None:
        chosen.scatter_(1, ids.transpose(0, 1).reshape(num_layers, -1), True)
    else:
        layer_of = torch.arange(num_layers)[None, :, None].expand_as(ids)
        chosen[layer_of[real], ids[real]] = True
    hits = node_hit_probs(phy2log, num_experts, num_gpus, num_nodes, dispatch)  # [L,P,E,N]
    require_placed(chosen, phy2log, "is chosen by the trace")
    gpus_per_node = num_gpus // num_nodes
    layer = torch.arange(num_layers, device=phy2log.device)[None, :, None]
    node_ids = torch.arange(num_nodes, device=phy2log.device)
    total = torch.zeros(num_layers, dtype=torch.float64, device=phy2log.device)
    num_tokens = ids.shape[0]
    # a layer's tokens: those with an expert there (a row of padding is no token)
    tokens = (torch.full((num_layers,), float(num_tokens), dtype=torch.float64) if real is None
              else real.any(2).sum(0, dtype=torch.float64)).to(phy2log.device)
    if sources is not None:
        if not hasattr(sources, "__len__"):  # e.g. a Placement passed by mistake
            raise TypeError(f"sources must be the [T] source GPU ids of the tokens, got "
                            f"{type(sources).__name__}")
        sources = torch.as_tensor(sources)
        if sources.is_floating_point() or sources.is_complex() or sources.dtype == torch.bool:
            raise TypeError(f"sources must hold integer GPU ids, got {sources.dtype}")
        sources = sources.to(device=phy2log.device, dtype=torch.int64).flatten()
        if sources.shape != (num_tokens,) or (num_tokens and (
                int(sources.min()) < 0 or int(sources.max()) >= num_gpus)):
            raise ValueError(f"sources must be {num_tokens} GPU ids in [0, {num_gpus})")
        weights = None
    else:
        weights = source_distribution(num_gpus, active_gpus, source, phy2log.device)
        require_empty_dead(phy2log, num_gpus, active_gpus)
    if real is not None:
        # a token padded in every layer reaches no node: left out before the loop, which
        # cost it as much as a real token (1M tokens, 1,000 of them real: 315 s, where
        # the 1,000 alone took 0.08 s; attacker pass)
        routed = real.any(2).any(1)  # [T]
        ids, real = ids[routed], real[routed]
        if sources is not None:
            sources = sources[routed.to(sources.device)]
        num_tokens = ids.shape[0]
    for start in range(0, num_tokens, chunk):
        part = ids[start:start + chunk].to(phy2log.device)  # [t, L, k]
        # a padded entry reaches no node: its hit probabilities are zero
        keep = None if real is None else real[start:start + chunk, :, :, None].to(part.device)
        part = part.clamp(min=0)
        if sources is not None:
            gpu = sources[start:start + chunk]
            h = hits[layer, gpu[:, None, None], part]  # [t, L, k, N]
            if keep is not None:
                h = h * keep
            reach = 1 - (1 - h).prod(2)  # [t, L, N]
            remote = (reach * (node_ids != (gpu // gpus_per_node)[:, None])[:, None]).sum(2)
            total += remote.sum(0)
            continue
        for gpu in weights.nonzero()[:, 0].tolist():
            h = hits[layer, gpu, part]
            if keep is not None:
                h = h * keep
            reach = 1 - (1 - h).prod(2)
            remote = reach.sum(2) - reach[:, :, gpu // gpus_per_node]
            total += float(weights[gpu]) * remote.sum(0)
    return total / tokens.clamp(min=1)


def coactivation(ids: torch.Tensor, num_experts: int, chunk: int = 2048) -> torch.Tensor:
    """``[L, E, E]`` float64 pair counts of a top-k trace ``ids [T, L, k]``: entry ``(e, f)``
    counts tokens that chose both (the diagonal counts tokens that chose ``e``); ids below 0
    are padding, in no pair."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 3:
        raise ValueError(f"ids must be [T, L, k], got {tuple(ids.shape)}")
    ids = as_topk_ids(ids, ids.shape[1], num_experts)
    real = padding_mask(ids)
    if real is not None:  # a token padded in every layer is in no pair: not looped over
        routed = real.any(2).any(1)  # [T]
        ids, real = ids[routed], real[routed]
    num_tokens, num_layers, _ = ids.shape
    pairs = torch.zeros(num_layers, num_experts * num_experts, dtype=torch.float64)
    for start in range(0, num_tokens, chunk):
        part = ids[start:start + chunk].transpose(0, 1)  # [L, t, k]
        if real is None:
            flat = (part[:, :, :, None] * num_experts + part[:, :, None, :]).flatten(1)
            pairs.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
            continue
        # a pair with a padded entry is no pair: added as zero
        keep = real[start:start + chunk].transpose(0, 1)
        part = part.clamp(min=0)
        flat = (part[:, :, :, None] * num_experts + part[:, :, None, :]).flatten(1)
        both = (keep[:, :, :, None] & keep[:, :, None, :]).flatten(1)
        pairs.scatter_add_(1, flat, both.to(torch.float64))
    return pairs.view(num_layers, num_experts, num_experts)


def _prob_none(mean: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """P(X = 0) of a count with mean ``mean`` and factorial moment ``E[X(X−1)] = pair``.

    Moment-matched Katz family: ``(1 + μδ)^(−1/δ)`` with ``δ = pair/μ² − 1`` (binomial for
    δ < 0, Poisson as δ → 0, negative binomial for δ > 0: experts that fire together
    clump). ``|δ|`` is kept >= 1e-6 (the Poisson limit, to 1e-6 relative) and ``1 + μδ``
    above 0 (a binomial's support); ``μ = 0`` gives 1.
    """
    mu = mean.clamp(min=1e-12)
    delta = pair / (mu * mu) - 1
    delta = torch.where(delta.abs() < 1e-6, torch.full_like(delta, 1e-6), delta)
    p0 = torch.exp(-torch.log1p((mu * delta).clamp(min=-1 + 1e-12)) / delta)
    return p0.clamp(0, 1)


def remote_nodes_from_coactivation(
    phy2log: torch.Tensor,
    pairs: torch.Tensor,
    num_tokens: int,
    num_gpus: int,
    num_nodes: int,
    dispatch: str = "nearest",
    source: torch.Tensor | None = None,
    active_gpus: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[L]`` estimated distinct remote nodes per token from pair counts ``[L, E, E]``
    (:func:`coactivation`) of ``num_tokens`` tokens, without a per-token trace (a trace's
    tokens with an expert: padded ones are in no pair, and counting them lowers the figure).

    For every source GPU and node, the count ``X`` of a token's experts served there has
    exact mean and second factorial moment from single and pair counts; ``P(X ≥ 1)`` is
    then estimated by a moment-matched Katz distribution (:func:`_prob_none`). The error
    against the per-token formula is measured in ``benchmarks/bench_dispatch.py``.
    """
    pairs = torch.as_tensor(pairs, dtype=torch.float64, device=phy2log.device)
    num_experts = pairs.shape[1]
    if num_tokens <= 0:
        raise ValueError("num_tokens must be positive")
    hits = node_hit_probs(phy2log, num_experts, num_gpus, num_nodes, dispatch)  # [L,P,E,N]
    freq = pairs.diagonal(dim1=1, dim2=2) / num_tokens  # [L, E]
    off = (pairs - torch.diag_embed(pairs.diagonal(dim1=1, dim2=2))) / num_tokens
    home = torch.arange(num_gpus, device=phy2log.device) // (num_gpus // num_nodes)
    remote = _remote_nodes(hits, freq, lambda x: torch.bmm(off, x), home)  # [L, P]
    weights = source_distribution(num_gpus, active_gpus, source, phy2log.device)
    return remote @ weights


def remote_nodes_by_node(
    phy2log: torch.Tensor, freq: torch.Tensor,
    pair_times: Callable[[torch.Tensor], torch.Tensor], num_nodes: int,
    node_share: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[L]`` :func:`remote_nodes_from_coactivation` under the nearest rule with tokens
    arising evenly, by source node rather than source GPU, from selection frequencies
    ``freq [L, E]`` and pairwise co-selection (``pair_times(x)``: the ``[L, E, E]`` pair
    matrix, zero diagonal, times ``x [L, E, K]``); ``phy2log [L, R]`` with every expert
    placed, ``-1`` on dead GPUs' slots; ``node_share [N]``: the share of the tokens that
    arise on each node (default even; with dead GPUs, the node's live GPUs' share), any
    scale (taken over its sum), finite and >= 0.

    A token is served on its own node whenever the node holds the expert (on its own GPU
    or another), else by the fair choice over all replicas, so every GPU of a node reaches
    the same remote nodes: the pair term is ``N²`` columns wide instead of ``P·N`` (16
    against 128 on DeepSeek-V3's 32 GPUs in 4 nodes)."""
    num_layers, num_slots = phy2log.shape
    num_experts = freq.shape[1]
    share = None
    if node_share is not None:  # any scale, as token sources (a share of [2, 2] read 4 of 2)
        share = as_gpu_speed(node_share, num_nodes, torch.device("cpu"), name="node_share",
                             allow_zero=True, per="node")
        share = share / share.sum()
    node_of_slot = torch.arange(num_slots) // (num_slots // num_nodes)
    held = torch.zeros(num_layers, num_nodes * num_experts, dtype=torch.float64)
    # an empty slot (a dead GPU's) holds no replica: added as zero
    held.scatter_add_(1, node_of_slot[None] * num_experts + phy2log.long().clamp(min=0),
                      (phy2log >= 0).to(torch.float64))
    held = held.view(num_layers, num_nodes, num_experts)  # replicas of e on node m
    fair = held / held.sum(1, keepdim=True).clamp(min=1)  # the fair choice's node shares
    here = (held > 0).to(torch.float64)  # [L, N, E]: the source node holds it
    eye = torch.eye(num_nodes, dtype=torch.float64)
    # hits[l, n, e, m]: a token of e from node n is served on node m
    hits = (here[:, :, :, None] * eye[None, :, None, :]
            + (1 - here)[:, :, :, None] * fair.transpose(1, 2)[:, None, :, :])
    remote = _remote_nodes(hits, freq.to(torch.float64), pair_times, torch.arange(num_nodes))
    return remote.mean(1) if share is None else remote @ share


def _remote_nodes(hits: torch.Tensor, freq: torch.Tensor,
                  pair_times: Callable[[torch.Tensor], torch.Tensor], home: torch.Tensor
                  ) -> torch.Tensor:
    """``[L, S]`` expected distinct remote nodes per token from each of ``S`` sources,
    whose tokens of expert ``e`` are served on node ``m`` with probability ``hits [L, S,
    E, N]`` (``home [S]``: each source's node): per node the count of a token's experts
    served there has exact mean and second factorial moment, and ``P(X ≥ 1)`` comes from
    the moment-matched Katz distribution (:func:`_prob_none`)."""
    num_layers, sources, num_experts, num_nodes = hits.shape
    mean = torch.einsum("le,lpen->lpn", freq, hits)
    flat = hits.permute(0, 2, 1, 3).reshape(num_layers, num_experts, -1)  # [L, E, S·N]
    pair = (flat * pair_times(flat)).sum(1).view(num_layers, sources, num_nodes)
    reach = 1 - _prob_none(mean, pair)  # [L, S, N]
    return reach.sum(2) - reach.gather(2, home[None, :, None].expand(num_layers, -1, 1))[..., 0]
