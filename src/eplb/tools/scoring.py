"""How a placement's GPU loads are scored over many steps: the replay's arithmetic.

GPU loads are linear in the counts for a fixed placement and dispatch rule, so every
step of a plan's tenure is scored by one batched product: with ``M[l, e, p]`` the share
of expert ``e``'s tokens that GPU ``p`` serves, the GPU loads of all steps are
``counts [T, L, E] @ M [L, E, P]`` (:func:`gpu_load_matrix`, :func:`gpu_loads`).
:class:`Realised` says how the engine splits an expert's tokens over its replicas:
vLLM's even split, SGLang's nearest replica (its expectation over the ranks' fair
choices), or, on one node, the table SGLang builds at a runtime rebalance
(:mod:`eplb.core.rank_draws`): one draw of it per rebalance that changes the map, as
the engine rebuilds it then (from a fixed seed: a kept map keeps its table), each layer's
deal drawn apart, as SGLang deals the layers from one stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from eplb.core.device_path import caller_settings_off
from eplb.core.dispatch import (
    realised_slot_loads,
    remote_nodes_by_node,
    remote_nodes_per_token,
    require_empty_dead,
    require_placed,
    source_distribution,
)
from eplb.core.expert_ids import as_topk_ids, require_integer_ids
from eplb.core.inputs import as_gpu_speed, as_weight, refuse_non_dense, scale_free
from eplb.core.locality import surrogate_co_selection
from eplb.core.map_tables import ideal_and_peak
from eplb.core.placement import Placement
from eplb.core.rank_draws import split_draw_shares, split_draw_slot_loads
from eplb.core.topology import positive_int
from eplb.online.estimate import as_history

#: the largest ``[L, E, P]`` scoring matrix (float64: 1 GiB) the replay builds. A 15 MB
#: trace of 58 layers × 8,192 experts on 8,192 GPUs asked torch for 31 GB and failed (or
#: took the host's memory) after planning (attacker pass); refused up front instead
MAX_MATRIX_ENTRIES = 1 << 27
#: GPU loads are computed this many entries (``[steps, L, P]``) at a time, at most
LOADS_PER_CHUNK = 1 << 24


def check_scoring_size(num_layers: int, num_experts: int, num_gpus: int) -> None:
    """``ValueError`` naming the sizes where the scoring matrix
    (:func:`gpu_load_matrix`) would pass :data:`MAX_MATRIX_ENTRIES`."""
    entries = num_layers * num_experts * num_gpus
    if entries > MAX_MATRIX_ENTRIES:
        raise ValueError(
            f"scoring {num_layers} layers × {num_experts} experts on {num_gpus} GPUs takes a "
            f"{entries * 8 / 2**30:.1f} GiB matrix; the replay scores at most "
            f"{MAX_MATRIX_ENTRIES:.3g} layer × expert × GPU entries (replay fewer layers)")


def steps_per_chunk(num_layers: int, num_gpus: int) -> int:
    """Steps whose ``[steps, L, P]`` GPU loads are computed at once: 1024, fewer where
    those would pass :data:`LOADS_PER_CHUNK` entries."""
    return max(1, min(1024, LOADS_PER_CHUNK // max(1, num_layers * num_gpus)))


@dataclass(frozen=True)
class Realised:
    """How the engine realises a placement's loads, as the plans were made for them
    (:func:`eplb.plan`'s ``dispatch``, ``source`` and ``gpu_speed``): the replay scores
    every plan so. Scored as an even split on equal GPUs, a plan for SGLang's nearest
    rule read 0.9347 where the rule realises 0.9178, and one for GPUs of two speeds read
    its load balance, 0.7154, where its time balance is 0.8221 (attacker pass).

    Attributes:
        dispatch: ``"even"`` (vLLM's split over an expert's replicas) or another rule of
            :func:`eplb.core.dispatch.realised_slot_loads` (``"nearest"``: SGLang's).
        source: ``[P]`` where tokens arise (``None``: evenly over the live GPUs).
        gpu_speed: ``[P]`` relative GPU speeds (``None``: equal): a GPU's time is its
            load over its speed, and balancedness the ideal time over the slowest's.
    """

    dispatch: str = "even"
    source: Any = None
    gpu_speed: Any = None

    @classmethod
    def of(cls, plan_options: Mapping[str, Any], dispatch: str | None = None) -> Realised:
        """The realisation the plan options name (the rest of them are the planner's), by
        the rule ``dispatch`` where one is named (:func:`simulate`'s ``score_dispatch``)."""
        if dispatch not in (None, "even", "nearest"):
            raise ValueError(f"score_dispatch must be 'even', 'nearest' or None, got "
                             f"{dispatch!r}")
        if dispatch == "nearest" and plan_options.get("gpu_speed") is not None:
            raise ValueError("gpu_speed cannot be combined with nearest dispatch (as in eplb.plan)")
        return cls(dispatch or plan_options.get("dispatch") or "even",
                   plan_options.get("source"), plan_options.get("gpu_speed"))

    def runtime_table(self, placement: Placement) -> bool:
        """Whether ``placement`` is served by the table SGLang builds at a runtime
        rebalance (:mod:`eplb.core.rank_draws`): nearest dispatch on one node of several
        GPUs, every GPU live, tokens arising evenly. Elsewhere the nearest rule is scored
        by its expectation over the ranks' fair choices."""
        topo = placement.topology
        return (self.dispatch == "nearest" and topo.num_nodes == 1 and topo.num_gpus > 1
                and self.source is None
                and (placement.active_gpus is None or bool(placement.active_gpus.all())))

    def speed(self, num_gpus: int) -> torch.Tensor | None:
        """``[P]`` float64 GPU speeds, or ``None`` for equal GPUs."""
        if self.gpu_speed is None:
            return None
        return as_gpu_speed(self.gpu_speed, num_gpus, torch.device("cpu")).to(torch.float64)


EVEN = Realised()


#: the first seed of the replay's draws of SGLang's runtime table (the planner's are 0's)
REPLAY_SEED = 1


def slot_shares(placement: Placement, realised: Realised, draw: int = 0) -> torch.Tensor:
    """``[L, R]`` float64: the share of its expert's tokens each slot serves under a
    dispatch rule other than the even split (an empty slot: 0).

    Where SGLang's runtime table serves the placement (:meth:`Realised.runtime_table`),
    the shares of its draw number ``draw`` (the engine builds one table per rebalance:
    each plan's tenure is scored by one draw, not the model's mean over draws); else the
    rule's own shares (:func:`eplb.core.dispatch.realised_slot_loads` of unit loads)."""
    topo = placement.topology
    phy2log = placement.phy2log
    num_layers, num_experts = placement.logcnt.shape
    if realised.runtime_table(placement):
        # seeds from 1: the planner's model of the table draws with seed 0, and a plan
        # chosen on those draws would be scored on them (helper pass)
        ranks = split_draw_shares(phy2log, num_experts, topo.num_gpus, draws=1,
                                  seed=REPLAY_SEED + draw, per_layer=True)[0]
        return torch.from_numpy(ranks / topo.num_gpus).to(phy2log.device)
    return realised_slot_loads(
        torch.ones(num_layers, num_experts, dtype=torch.float64, device=phy2log.device),
        phy2log, topo.num_gpus, topo.num_nodes, realised.dispatch, realised.source,
        placement.active_gpus, check=False)


def gpu_load_matrix(placement: Placement, realised: Realised = EVEN,
                    draw: int = 0) -> torch.Tensor:
    """``[L, E, P]`` float64: share of expert ``e``'s load that lands on GPU ``p`` (split
    evenly over its replicas, or as ``realised.dispatch`` routes it; ``draw`` numbers
    the runtime table's draw where one serves the placement, :func:`slot_shares`)."""
    topo = placement.topology
    num_layers, num_experts = placement.logcnt.shape
    phy2log = placement.phy2log
    live = phy2log >= 0
    gpu = (torch.arange(topo.num_replicas, device=phy2log.device) // topo.slots_per_gpu)
    layer = torch.arange(num_layers, device=phy2log.device)[:, None].expand_as(phy2log)
    expert = phy2log.clamp(min=0)
    if realised.dispatch == "even":
        share = 1.0 / placement.logcnt.clamp(min=1).to(torch.float64)  # [L, E]
        values = torch.where(live, share.gather(1, expert),
                             torch.zeros((), dtype=torch.float64))
    else:
        # a slot serves its expert's load times a share that depends on the map only (and,
        # for a table, its draw), so the loads are linear in the counts
        values = slot_shares(placement, realised, draw)
    matrix = torch.zeros(num_layers * num_experts * topo.num_gpus, dtype=torch.float64,
                         device=phy2log.device)
    flat = (layer * num_experts + expert) * topo.num_gpus + gpu[None]
    matrix.index_add_(0, flat.reshape(-1), values.reshape(-1))
    return matrix.view(num_layers, num_experts, topo.num_gpus)


def gpu_loads(counts: torch.Tensor, matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``counts [T, L, E]`` x ``matrix [L, E, P]`` -> ``[T, L, P]`` (one batched matmul), in
    ``dtype`` whatever the caller's settings: inside a caller's ``torch.autocast`` region
    the product ran in bfloat16 and every score moved by up to 0.001."""
    with caller_settings_off():
        out = torch.bmm(counts.transpose(0, 1).to(dtype), matrix.to(dtype))  # [L, T, P]
    return out.transpose(0, 1)


def scoring_counts(counts: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """``(counts, dtype)`` for the batched product that scores GPU loads: the counts as
    they are in float32 where their largest entry lies in [1e-30, 1e30] (or is 0), else
    in float64, times a power of two where that entry is beyond 2**±900
    (:func:`eplb.core.inputs.scale_free`: exact, ratios unchanged). float32 sums
    overflowed or rounded to 0, and every step scored 1.0 (attacker pass: counts × 1e40
    and × 1e-50); dividing the whole trace by its largest entry instead rounded the
    ordinary steps beside one huge step to 0 (a later pass)."""
    top = float(counts.max()) if counts.numel() else 0.0
    if top == 0 or 1e-30 <= top <= 1e30:
        return counts, torch.float32
    return scale_free(counts), torch.float64


def loads_balancedness(loads: torch.Tensor, live: torch.Tensor,
                  speed: torch.Tensor | None = None) -> torch.Tensor:
    """``loads [..., L, P]`` -> ``[...]`` Σ_l mean / Σ_l max over live GPUs (1 when all
    zero); with ``speed [P]``, in time: Σ_l total / live speed over Σ_l max load / speed."""
    ideal, peak = ideal_and_peak(loads, live.to(loads.device),
                                 None if speed is None else speed.to(loads.device))
    mean, peak = ideal.sum(-1), peak.sum(-1)
    # (a positive peak divides as it is: a floor of 1e-300 bent steps scaled near float64's
    # smallest numbers; a later attacker pass)
    return torch.where(peak > 0, mean / torch.where(peak > 0, peak, 1.0), torch.ones_like(peak))


def step_balancedness(counts: object, placement: Placement, *,
                      chunk: int | None = None, realised: Realised = EVEN) -> torch.Tensor:
    """``[T]`` float64 balancedness of every step of ``counts [T, L, E]`` under
    ``placement`` (realised as ``realised`` says: by default an even split on equal GPUs),
    ``chunk`` steps at a time (default: :func:`steps_per_chunk`)."""
    steps = as_history(counts, "counts")
    if steps.shape[1:] != placement.logcnt.shape:
        raise ValueError(f"counts have layers x experts {tuple(steps.shape[1:])}, the placement "
                         f"has {tuple(placement.logcnt.shape)}")
    num_gpus = placement.topology.num_gpus
    check_scoring_size(steps.shape[1], steps.shape[2], num_gpus)
    chunk = (steps_per_chunk(steps.shape[1], num_gpus) if chunk is None
             else positive_int("chunk", chunk))
    matrix = gpu_load_matrix(placement, realised)
    live = placement.live_gpus()
    speed = realised.speed(num_gpus)
    steps, dtype = scoring_counts(steps)
    parts = [
        loads_balancedness(gpu_loads(steps[a:a + chunk], matrix, dtype).double(), live, speed)
        for a in range(0, steps.shape[0], chunk)
    ]
    return torch.cat(parts)


def scored_loads(placement: Placement, weight: torch.Tensor, realised: Realised,
                 draw: int = 0) -> torch.Tensor:
    """``[L, P]`` GPU loads of ``weight [L, E]`` under ``placement``, realised as
    ``realised`` says (scaled by a power of two where the counts are near float64's ends:
    ratios unchanged; ``draw`` as in :func:`slot_shares`)."""
    if realised.dispatch == "even":
        return placement.scaled_gpu_loads(weight)
    # the slots' loads summed per GPU: no [L, E, P] matrix (over many windows it took GBs)
    topo = placement.topology
    weight = scale_free(weight.to(torch.float64))
    if realised.runtime_table(placement):  # (the draw slot_shares takes)
        slots = torch.from_numpy(split_draw_slot_loads(
            weight, placement.phy2log, topo.num_gpus, draws=1, seed=REPLAY_SEED + draw,
            per_layer=True)[0]).to(placement.phy2log.device)
    else:
        slots = realised_slot_loads(weight, placement.phy2log, topo.num_gpus, topo.num_nodes,
                                    realised.dispatch, realised.source,
                                    placement.active_gpus, check=False)
    return slots.view(slots.shape[0], topo.num_gpus, -1).sum(2)


#: the most ``L·N²·E`` entries of the traffic model's hit tensors computed at once
#: (:func:`modelled_remote_nodes` goes a few layers at a time past it)
MAX_TRAFFIC_CELLS = 1 << 22


def modelled_remote_nodes(phy2log: torch.Tensor, weight: torch.Tensor, num_nodes: int,
                          num_groups: int, active_gpus: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """``[L]`` expected distinct remote nodes a token's experts reach per MoE layer under
    SGLang's nearest dispatch, for ``phy2log [L, R]`` (``-1`` on the slots of the GPUs
    that ``active_gpus [P]`` marks dead) on loads ``weight [L, E]``, tokens arising evenly
    over the live GPUs: the locality policy's model
    (:func:`eplb.core.locality.surrogate_co_selection`, DeepSeek-V3's group-limited
    routing of 8 experts, :func:`eplb.core.dispatch.remote_nodes_by_node`), from the loads
    and the groups alone. A model, not counted tokens.

    Each layer is taken over its largest load (the model is scale-free: loads of 1e300
    summed to inf, every figure NaN, and loads of 1e-320 fell under the frequencies'
    floor and read 0; attacker pass), and the layers go a few at a time: the model's hit
    tensors hold ``L·N²·E`` floats (58 layers × 256 experts on 128 nodes: 2 GB each, out
    of memory under 8 GB; attacker pass). ``ValueError`` where ``num_groups`` does not
    divide the experts: no group-limited routing has such groups; or where ``phy2log``
    does not fit the loads (its layers, ids in ``[-1, E)``, a replica of every loaded
    expert) or its empty slots are not those of the GPUs ``active_gpus`` marks dead."""
    # finite and >= 0, as every load input (attacker pass: a NaN or negative load read
    # as an idle layer, modelled as uniform, and gave a figure silently)
    weight = as_weight(weight)[0]
    num_layers, num_experts = weight.shape
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the {num_experts} experts "
                         "for the group-limited routing the traffic is modelled with")
    w = weight.detach().cpu().to(torch.float64)
    peak = w.amax(1, keepdim=True)
    w = torch.where(peak > 0, w / torch.where(peak > 0, peak, 1.0), 0.0)
    phy2log = _model_map(phy2log, num_layers, num_experts, num_nodes)
    # a loaded expert without a replica is served nowhere: the model dropped its tokens
    # and read fewer remote nodes (a dead GPU's slots blanked to -1 without re-placing
    # its experts; attacker pass)
    require_placed(w > 0, phy2log, "has load")
    # tokens arise on the live GPUs: a node's share is its live GPUs' (a replay with a dead
    # GPU reported no traffic at all; every GPU of a node reaches the same remote nodes)
    share = _node_share(active_gpus, phy2log, num_nodes)
    step = max(1, MAX_TRAFFIC_CELLS // (num_nodes * num_nodes * num_experts))
    parts = []
    for a in range(0, num_layers, step):
        freq, pair_times = surrogate_co_selection(w[a:a + step], num_groups)
        parts.append(remote_nodes_by_node(phy2log[a:a + step], freq, pair_times, num_nodes,
                                          share))
    return torch.cat(parts)


def _model_map(phy2log: torch.Tensor, num_layers: int, num_experts: int,
               num_nodes: int) -> torch.Tensor:
    """``phy2log [L, R]`` as a host int64 map, checked against the loads' ``L`` layers and
    ``E`` experts and the ``num_nodes`` nodes: ``TypeError``/``ValueError`` naming what is
    wrong (an id of -2 read as an empty slot, and the model's figure dropped to 0; ids
    beyond E and a map of other layers met torch's internal errors; attacker pass)."""
    refuse_non_dense(phy2log, "phy2log")
    if not isinstance(phy2log, torch.Tensor) or phy2log.dim() != 2:
        raise ValueError("phy2log must be an integer tensor [L, R]")
    require_integer_ids(phy2log, "phy2log")
    num_nodes = positive_int("num_nodes", num_nodes)
    num_slots = phy2log.shape[1]
    if phy2log.shape[0] != num_layers or num_slots == 0 or num_slots % num_nodes:
        raise ValueError(f"phy2log has shape {tuple(phy2log.shape)}: expected [{num_layers}, "
                         f"R] (the layers of the loads), R split over the {num_nodes} nodes")
    phy2log = phy2log.detach().cpu().to(torch.int64)
    if bool(((phy2log < -1) | (phy2log >= num_experts)).any()):
        raise ValueError(f"phy2log holds expert ids outside [-1, {num_experts}) (-1 marks an "
                         "empty slot, a dead GPU's)")
    return phy2log


def _node_share(active_gpus: torch.Tensor | None, phy2log: torch.Tensor,
                num_nodes: int) -> torch.Tensor | None:
    """``[N]`` share of the tokens arising on each node, tokens arising evenly over the GPUs
    that ``active_gpus [P]`` (bool) keeps live (``None``: every GPU live, even shares).

    The dead GPUs must be those whose slots hold -1 in ``phy2log [L, R]`` (host int64), as
    in a placement: a dead GPU that holds experts served tokens the live-GPU figure counts
    from nowhere, and an empty slot on a live GPU (``active_gpus`` left out beside a map
    with dead GPUs) made tokens arise on GPUs that hold nothing; both gave a figure
    silently (the counted figure refuses the first; attacker pass)."""
    num_slots = phy2log.shape[1]
    if active_gpus is None:
        if bool((phy2log < 0).any()):
            raise ValueError("phy2log has empty (-1) slots, a dead GPU's, but active_gpus is "
                             "not given: pass the [P] live mask (Placement.live_gpus())")
        return None
    shape = getattr(active_gpus, "shape", None)
    if shape is not None and len(shape) > 1:  # len() of a [1, P] mask read it as 1 GPU
        raise ValueError(f"active_gpus must be a [P] boolean mask, one entry per GPU; got "
                         f"shape {tuple(shape)}")
    try:
        num_gpus = len(active_gpus)  # the mask's length: this model takes no num_gpus
    except TypeError:  # an int, a 0-d tensor or array, a generator: len()'s own message
        raise TypeError(f"active_gpus must be a [P] boolean mask, one entry per GPU (True = "
                        f"live), got {type(active_gpus).__name__}") from None
    if num_gpus < 1 or num_slots % num_gpus or num_gpus % num_nodes:
        raise ValueError(f"active_gpus names {num_gpus} GPUs: they must split the {num_slots} "
                         f"slots, and split over the {num_nodes} nodes")
    share = source_distribution(num_gpus, active_gpus)  # the mask checked (bool, [P])
    require_empty_dead(phy2log, num_gpus, active_gpus)
    empty = (phy2log < 0).view(phy2log.shape[0], num_gpus, -1).any(2).any(0) & (share > 0)
    if bool(empty.any()):
        gpu = int(empty.nonzero()[0])
        raise ValueError(f"GPU {gpu} (of the {num_gpus} active_gpus names) is live but phy2log "
                         "leaves slots of it empty (-1): only dead GPUs' slots are empty")
    return share.view(num_nodes, -1).sum(1)


def step_routing(routing: Sequence[torch.Tensor], counts: torch.Tensor,
                 traffic: bool) -> list[torch.Tensor]:
    """``routing`` as a checked list of ``[tokens, L, k]`` int64 ids per step of
    ``counts [T, L, E]``: ``ValueError`` naming what is wrong where the replay measures no
    traffic (``traffic``), the steps differ in number, or a step's ids do not count to
    its counts (a trace's ids cut into steps otherwise than its counts were)."""
    if not traffic:
        raise ValueError("routing counts cross-node traffic, which the replay measures under "
                         "nearest dispatch on several nodes only")
    if (isinstance(routing, (torch.Tensor, str, bytes, Mapping))
            or not hasattr(routing, "__len__")):
        raise TypeError("routing must be a sequence of [tokens, L, k] top-k ids, one per step")
    num_steps, num_layers, num_experts = counts.shape
    if len(routing) != num_steps:
        raise ValueError(f"routing has {len(routing)} steps, the trace {num_steps}")
    out = []
    for step, ids in enumerate(routing):
        # the checks remote_nodes_per_token makes, here before any planning: complex ids
        # were cast to ids with torch's warning, and a sparse, meta or None step met
        # torch's internal errors, a row naming an expert twice stopped mid-replay where
        # the counts were tallied from the same ids (attacker pass). A step may hold no
        # token, or padding only
        ids = as_topk_ids(ids, num_layers, num_experts, f"routing step {step}",
                          any_tokens=False).cpu()
        layer = torch.arange(num_layers)[None, :, None] * num_experts
        # padding (< 0) is counted nowhere, as the trace readers count it
        tally = torch.bincount((ids + layer)[ids >= 0], minlength=num_layers * num_experts)
        if not torch.equal(tally.view(num_layers, num_experts).to(counts.dtype),
                           counts[step].cpu()):
            raise ValueError(f"routing step {step}: its ids do not count to the trace's "
                             "counts of that step")
        out.append(ids)
    return out


def add_window_traffic(counts: torch.Tensor, start: int, end: int, score: int,
                       placement: Placement, remote_sum: torch.Tensor,
                       remote_tokens: torch.Tensor,
                       routing: list[torch.Tensor] | None = None) -> None:
    """Add to ``remote_sum [n]`` and ``remote_tokens [n]`` (in place) each scoring
    window's part of the steps ``[start, end)`` of ``counts [T, L, E]``, served by
    ``placement``: its remote nodes per token, layer by layer, weighted by the layer's
    selections in that part (a layer without any adds nothing); modelled, or counted from
    the steps' ids ``routing`` (:func:`step_routing`) where given."""
    topo = placement.topology
    # groups that do not divide the experts (the global policy plans around them) are no
    # routing's: modelled as routing without groups (eplb simulate --groups 3 on 256
    # experts stopped with an internal error; attacker pass)
    groups = topo.num_groups if counts.shape[2] % topo.num_groups == 0 else 1
    for window in range(start // score, min(-(-end // score), len(remote_sum))):
        a, b = max(start, window * score), min(end, (window + 1) * score)
        weight = counts[a:b].sum(0, dtype=torch.float64)  # [L, E]
        tokens = weight.sum(1)  # [L]
        if not bool((tokens > 0).any()):
            continue
        live = placement.active_gpus
        if routing is None:
            remote = modelled_remote_nodes(placement.phy2log, weight, topo.num_nodes, groups,
                                           live)
        else:
            remote = remote_nodes_per_token(placement.phy2log.cpu(), torch.cat(routing[a:b]),
                                            counts.shape[2], topo.num_gpus, topo.num_nodes,
                                            active_gpus=live)
        remote_sum[window] += float((tokens * remote).sum())
        remote_tokens[window] += float(tokens.sum())
