"""The placement record and the output contract (see :mod:`eplb.core.topology` for the
words used).

The contract (DeepSeek's, extended with dead GPUs), all int64 on one device:

- ``phy2log [L, R]``: the logical expert held by each slot, ``-1`` on dead GPUs.
- ``log2phy [L, E, maxcnt]``: each expert's slot ids ascending, padded with ``-1``.
- ``logcnt [L, E]``: replicas per expert, every entry >= 1, each row summing to
  the number of live slots.

eplb adds two promises that :meth:`Placement.validate` checks too: no GPU holds two
replicas of one expert unless the expert has more replicas than GPUs that may hold it
(*anti-affinity*), and under the hierarchical policy every replica of a group's experts
sits on the group's node (*locality*).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from eplb.core.expert_ids import as_old_map, require_integer_ids
from eplb.core.inputs import (
    as_gpu_speed,
    as_live_mask,
    as_weight,
    native_array,
    refuse_non_dense,
    scale_free,
    scale_rows_to_unit,
)
from eplb.core.map_tables import build_log2phy, load_balance, ratio_or_one
from eplb.core.topology import Topology, is_name


class PlacementError(ValueError):
    """A placement breaks the output contract; the message names the violation."""


_MAX_EXPERTS = (1 << 31) - 1


@dataclass(frozen=True, eq=False)
class Placement:
    """One expert placement for every layer, plus the topology it was planned for.

    Attributes:
        phy2log: ``[L, R]`` logical expert per slot, ``-1`` for slots of dead GPUs.
        log2phy: ``[L, E, maxcnt]`` each expert's slot ids ascending, ``-1`` padded.
        logcnt: ``[L, E]`` replicas per expert.
        topology: the cluster shape the placement was planned for.
        policy: ``"global"``, ``"hierarchical"`` (adds a locality rule) or ``"locality"``.
        active_gpus: ``[P]`` bool, ``None`` when every GPU is live.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    topology: Topology
    policy: str = "global"
    active_gpus: torch.Tensor | None = field(default=None)

    @classmethod
    def from_phy2log(
        cls,
        phy2log: torch.Tensor,
        num_experts: int,
        topology: Topology,
        policy: str = "global",
        active_gpus: torch.Tensor | None = None,
    ) -> Placement:
        """Build the full record from ``phy2log [L, R]`` (or ``[R]`` for one layer) of
        integer expert ids; raises ``TypeError`` for anything else."""
        if not isinstance(topology, Topology):
            raise TypeError(f"topology must be an eplb.Topology, got {type(topology).__name__}")
        if (isinstance(num_experts, bool) or not isinstance(num_experts, int | np.integer)
                or num_experts < 1):
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        num_experts = int(num_experts)
        if num_experts > _MAX_EXPERTS:
            # the engines hold expert ids in int32, and log2phy has a row per expert
            raise ValueError(f"num_experts={num_experts} is beyond what a placement holds "
                             f"(at most 2**31 - 1 experts)")
        if phy2log is None:
            raise TypeError("phy2log must be a [L, R] tensor of expert ids, got None")
        refuse_non_dense(phy2log, "phy2log")  # sparse: torch's "COO only supports ..."
        phy2log = torch.as_tensor(native_array(phy2log))
        require_integer_ids(phy2log, "phy2log")  # a cast would truncate 0.7 to expert 0
        # contiguous: engines view and copy the map (a transposed one broke ``.view``); a
        # copy: an engine's live int64 map, changed in place later, changed this record
        phy2log = phy2log.to(torch.int64, copy=True, memory_format=torch.contiguous_format)
        if phy2log.dim() == 1:
            phy2log = phy2log[None]
        if active_gpus is not None:
            # checked as every planner input is: a uint8 or list mask built a record that
            # validate() and the writers then refused (attacker pass)
            active_gpus = as_live_mask(active_gpus, topology.num_gpus, phy2log.device)
        log2phy, logcnt = build_log2phy(phy2log, num_experts)
        return cls(phy2log, log2phy, logcnt, topology, policy, active_gpus)

    def __repr__(self) -> str:  # the maps themselves are pages long
        dead = "" if self.active_gpus is None else (
            f", dead_gpus={int((~self.active_gpus.bool()).sum())}")
        return (f"Placement(policy={self.policy!r}, layers={self.num_layers}, "
                f"experts={self.num_experts}, {self.topology!r}{dead}, "
                f"device={self.phy2log.device})")

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(phy2log, log2phy, logcnt)``, DeepSeek's return value."""
        return self.phy2log, self.log2phy, self.logcnt

    def live_gpus(self) -> torch.Tensor:
        """``[P]`` bool mask of the GPUs that serve."""
        if self.active_gpus is None:
            return torch.ones(self.topology.num_gpus, dtype=torch.bool, device=self.phy2log.device)
        return self.active_gpus.to(self.phy2log.device, torch.bool)

    # ------------------------------------------------------------------ loads
    def _weight(self, weight: torch.Tensor) -> torch.Tensor:
        # the loads contract every planner input has (lists of numbers, as the docs'
        # examples use, too): no NaN, inf or negative loads
        weight, one_layer = as_weight(weight)
        weight = weight.to(self.phy2log.device)
        if weight.shape != (self.num_layers, self.num_experts):
            given = tuple(weight.shape[1:] if one_layer else weight.shape)  # as passed
            raise ValueError(
                f"weight has shape {given}, the placement needs "
                f"[{self.num_layers}, {self.num_experts}]"
            )
        return weight.to(torch.float64)

    def _replica_loads(self, weight: torch.Tensor) -> torch.Tensor:
        """:meth:`replica_loads` of a checked float64 ``weight [L, E]``."""
        if self.phy2log.numel() and int(self.phy2log.max()) >= self.num_experts:
            # a record built without validate() (from_phy2log does not check): torch's
            # gather would fail with an index error
            raise ValueError(f"phy2log holds expert ids outside [-1, {self.num_experts}); "
                             "validate() says what else is wrong with this placement")
        expert = self.phy2log.clamp(min=0)
        per_replica = weight / self.logcnt.clamp(min=1)
        loads = per_replica.gather(1, expert)
        return torch.where(self.phy2log >= 0, loads, torch.zeros_like(loads))

    def _gpu_loads(self, weight: torch.Tensor, gpu_speed: object = None) -> torch.Tensor:
        topo = self.topology
        loads = self._replica_loads(weight).view(self.num_layers, topo.num_gpus, -1).sum(-1)
        if gpu_speed is not None:
            speed = as_gpu_speed(gpu_speed, topo.num_gpus, loads.device)
            loads = loads / speed.to(loads.dtype)
        return loads

    def replica_loads(self, weight: torch.Tensor) -> torch.Tensor:
        """``[L, R]`` load of every slot: the expert's load split evenly over its replicas,
        float64, in the units of ``weight``."""
        return self._replica_loads(self._weight(weight))

    def gpu_loads(
        self, weight: torch.Tensor, gpu_speed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[L, P]`` load per GPU, float64, in the units of ``weight`` (divided by
        ``gpu_speed [P]`` when given); for ratios of them see :meth:`scaled_gpu_loads`."""
        return self._gpu_loads(self._weight(weight), gpu_speed)

    def scaled_gpu_loads(
        self, weight: torch.Tensor, gpu_speed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`gpu_loads` (``[L, P]`` from ``weight [L, E]``, ``gpu_speed [P]``) times one
        power of two where ``weight``'s largest load is
        beyond ``2**±900`` (:func:`~eplb.core.inputs.scale_free`): exact, so every ratio
        of them (balancedness, max / mean) is unchanged, and finite where loads near
        float64's ends would sum to inf or become subnormal. For ratios only:
        :meth:`gpu_loads` gives the loads themselves (it returned these scaled values
        until the twelfth-session fuzz pass found 1e-301 loads reported as 0.1)."""
        return self._gpu_loads(scale_free(self._weight(weight)), gpu_speed)

    def layer_balancedness(self, weight: torch.Tensor) -> torch.Tensor:
        """``[L]`` mean / max live-GPU load per layer (1.0 for an all-zero layer).

        Each layer's loads are scaled by their own power of two first (exact, so each
        ratio is unchanged): one scale for all layers let a layer 1e-300 beside one of
        1e300 vanish and read 1.0 (attacker pass)."""
        # (an all-zero row stays zero)
        loads = self._gpu_loads(scale_rows_to_unit(self._weight(weight))[0],
                                None)[:, self.live_gpus()]
        mean, peak = loads.mean(1), loads.max(1).values
        return ratio_or_one(mean, peak)

    def balancedness(self, weight: torch.Tensor, gpu_speed: torch.Tensor | None = None) -> float:
        """Σ_layers ideal time / Σ_layers actual time over the live GPUs (1.0 is perfect).

        With equal GPUs that is Σ mean load / Σ max load. With ``gpu_speed [P]`` (as
        planned with ``eplb.plan(..., gpu_speed=)``) a GPU's time is its load over its
        speed, and a layer's ideal time its load over the live GPUs' total speed
        (:func:`load_balance`)."""
        speed = None if gpu_speed is None else as_gpu_speed(
            gpu_speed, self.topology.num_gpus, self.phy2log.device)
        return load_balance(self.scaled_gpu_loads(weight), self.live_gpus(), speed)[1]

    def moved_slots(self, previous: Placement | torch.Tensor, per_gpu: bool = False,
                    across_nodes: bool = False) -> torch.Tensor:
        """``[L]`` number of slots whose expert differs from ``previous`` (weights to move);
        ``per_gpu=True``: ``[P]`` of them on each GPU over every layer, what each GPU
        receives (the busiest sets how long a rebalance stalls); ``across_nodes=True``:
        only those whose expert no slot of their node held in ``previous`` (weights over
        the network; the others copy within a node)."""
        if previous is None:
            raise TypeError("previous must be a Placement or a [L, R] phy2log, got None")
        for name, flag in (("per_gpu", per_gpu), ("across_nodes", across_nodes)):
            if not isinstance(flag, bool):  # ("no" is true)
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if isinstance(previous, Placement) and previous.topology.num_gpus != self.topology.num_gpus:
            # the same slot index is another GPU's slot there: nothing to compare
            raise ValueError(
                f"previous placement is for {previous.topology.num_gpus} GPUs, this one for "
                f"{self.topology.num_gpus}: its slots are other GPUs' slots"
            )
        old = previous.phy2log if isinstance(previous, Placement) else as_old_map(
            previous, tuple(self.phy2log.shape), self.num_experts)
        old = old.to(self.phy2log.device)
        if old.shape != self.phy2log.shape:
            raise ValueError(f"previous phy2log has shape {tuple(old.shape)}, "
                             f"expected {tuple(self.phy2log.shape)}")
        moved = (self.phy2log != old) & (self.phy2log >= 0)
        if across_nodes:
            moved &= ~_held_on_node(old, self.phy2log, self.topology.num_nodes,
                                    self.num_experts)
        if per_gpu:
            return moved.view(moved.shape[0], self.topology.num_gpus, -1).sum((0, 2))
        return moved.sum(1)

    def to(self, device: torch.device | str) -> Placement:
        """The same placement with its tensors on ``device``; ``ValueError`` for a device
        this torch cannot use (torch itself raised a bare ``AssertionError`` for CUDA on a
        CPU-only build, a ``RuntimeError`` for a misspelt name)."""
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"cannot move the placement to device {device!r}: {exc}") from None
        if target.type == "cuda" and not torch.cuda.is_available():
            built = "a CPU-only build" if torch.version.cuda is None else "none is visible"
            raise ValueError(f"cannot move the placement to device {device!r}: this torch "
                             f"has no CUDA device ({built})")
        active = None if self.active_gpus is None else self.active_gpus.to(target)
        return Placement(self.phy2log.to(target), self.log2phy.to(target),
                         self.logcnt.to(target), self.topology, self.policy, active)

    # ------------------------------------------------------------- validation
    def validate(self, *, anti_affinity: bool = True) -> Placement:
        """Check the whole output contract; raise :class:`PlacementError` naming the violation.

        ``anti_affinity=False`` skips eplb's extra promise that no GPU holds two replicas of
        one expert (DeepSeek's greedy does not make it). Returns ``self`` for chaining.
        """
        _validate(self, anti_affinity)
        return self


def _fail(message: str) -> None:
    raise PlacementError(message)


def _held_on_node(old: torch.Tensor, new: torch.Tensor, num_nodes: int, num_experts: int
                  ) -> torch.Tensor:
    """``[L, R]``: whether ``new``'s expert in each slot was held by some slot of the same
    node in ``old`` (both ``[L, R]``; ``-1`` slots read as one more, never-new id)."""
    layers, slots = new.shape
    node = torch.arange(slots, device=new.device) // (slots // num_nodes)
    width = num_experts + 1
    held = torch.zeros(layers, num_nodes * width, dtype=torch.bool, device=new.device)
    held.scatter_(1, (node[None] * width + torch.where(old >= 0, old, num_experts)).long(),
                  True)
    return held.gather(1, (node[None] * width + torch.where(new >= 0, new, num_experts)).long())


def validate_planned(p: Placement) -> Placement:
    """:meth:`Placement.validate` for a placement the planner just built with
    :meth:`Placement.from_phy2log`: ``log2phy`` and ``logcnt`` were derived from
    ``phy2log`` there, so only ``phy2log`` itself is checked (O(L·R))."""
    _validate(p, anti_affinity=True, tables=False)
    return p


def _validate(p: Placement, anti_affinity: bool, tables: bool = True) -> None:
    topo = p.topology
    if not isinstance(topo, Topology):  # (an AttributeError on None; attacker pass)
        _fail(f"topology is a {type(topo).__name__}, expected an eplb.Topology")
    for name in ("phy2log", "log2phy", "logcnt"):
        t = getattr(p, name)
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} is a {type(t).__name__}, expected a torch.Tensor")
        if t.dtype != torch.int64:
            _fail(f"{name} has dtype {t.dtype}, expected torch.int64")
        if t.device != p.phy2log.device:
            _fail(f"{name} is on {t.device} but phy2log is on {p.phy2log.device}")
        if t.is_meta:
            _fail(f"{name} is a meta tensor: it has no data to check")
    if p.active_gpus is not None and (not isinstance(p.active_gpus, torch.Tensor)
                                      or p.active_gpus.dtype != torch.bool):
        # a float mask of 0.5 read as live (attacker pass): the dtype is the contract
        what = (f"a {p.active_gpus.dtype} tensor" if isinstance(p.active_gpus, torch.Tensor)
                else f"a {type(p.active_gpus).__name__}")
        _fail(f"active_gpus is {what}, expected a bool torch.Tensor [{topo.num_gpus}] or None")
    if p.phy2log.dim() != 2 or p.logcnt.dim() != 2 or p.log2phy.dim() != 3:
        _fail(
            "expected phy2log [L, R], log2phy [L, E, maxcnt], logcnt [L, E]; got shapes "
            f"{tuple(p.phy2log.shape)}, {tuple(p.log2phy.shape)}, {tuple(p.logcnt.shape)}"
        )
    num_layers, num_slots = p.phy2log.shape
    num_experts = p.logcnt.shape[1]
    if num_slots != topo.num_replicas:
        _fail(f"phy2log has {num_slots} slots but the topology has {topo.num_replicas}")
    if p.logcnt.shape[0] != num_layers or p.log2phy.shape[:2] != (num_layers, num_experts):
        _fail(
            f"layer/expert dimensions disagree: phy2log {tuple(p.phy2log.shape)}, "
            f"log2phy {tuple(p.log2phy.shape)}, logcnt {tuple(p.logcnt.shape)}"
        )
    if not is_name(p.policy, ("global", "hierarchical", "locality")):
        _fail(f"unknown policy {p.policy!r}")

    if p.active_gpus is None:  # every GPU live: no mask to check or copy
        live = np.ones(topo.num_gpus, bool)
    else:
        live_gpu = p.live_gpus()
        if live_gpu.shape != (topo.num_gpus,):
            _fail(f"active_gpus has shape {tuple(live_gpu.shape)}, expected [{topo.num_gpus}]")
        live = live_gpu.detach().cpu().numpy()
    # the checks run in NumPy on the host for every device: one copy of the [L, R] map,
    # then array calls a fraction of a torch call's cost (and no device sync per check)
    ids = p.phy2log.detach().cpu().numpy()
    logcnt = p.logcnt.detach().cpu().numpy()
    slots_per_gpu = topo.slots_per_gpu
    live_slot = np.repeat(live, slots_per_gpu)
    num_live_slots = int(live_slot.sum())
    all_live = num_live_slots == live_slot.size
    # the smallest and largest id settle the range check, and with every GPU live the
    # empty-slot check, in two reductions; the masks are built only to name a violation
    lowest, highest = (int(ids.min()), int(ids.max())) if ids.size else (0, -1)

    if lowest < -1 or highest >= num_experts:
        bad = (ids < -1) | (ids >= num_experts)
        layer, slot = (int(i) for i in np.argwhere(bad)[0])
        _fail(
            f"layer {layer} slot {slot} holds expert {int(ids[layer, slot])}, "
            f"outside [0, {num_experts})"
        )
    empty = ids < 0 if lowest < 0 or not all_live else None
    wrong = None if empty is None else empty != ~live_slot[None]
    if wrong is not None and wrong.any():
        layer, slot = (int(i) for i in np.argwhere(wrong)[0])
        state = "empty (-1)" if bool(empty[layer, slot]) else "filled"
        gpu = slot // slots_per_gpu
        alive = "live" if bool(live[gpu]) else "dead"
        _fail(f"layer {layer} slot {slot} is {state} but its GPU {gpu} is {alive}")

    if logcnt.size and int(logcnt.min()) < 1:
        layer, expert = (int(i) for i in np.argwhere(logcnt < 1)[0])
        _fail(f"layer {layer} expert {expert} has {int(logcnt[layer, expert])} replicas, "
              "needs >= 1")
    row_sum = logcnt.sum(1)
    if (row_sum != num_live_slots).any():
        layer = int(np.argwhere(row_sum != num_live_slots)[0, 0])
        _fail(f"layer {layer}: logcnt sums to {int(row_sum[layer])}, expected {num_live_slots}")

    if tables:
        _validate_tables(p, num_experts)
    if anti_affinity:
        _validate_anti_affinity(p, ids, logcnt, int(live.sum()))
    if p.policy == "hierarchical":
        _validate_locality(p, ids)


def _validate_tables(p: Placement, num_experts: int) -> None:
    """``log2phy`` and ``logcnt`` are exactly what ``phy2log`` implies."""
    want_log2phy, want_cnt = build_log2phy(p.phy2log, num_experts)
    if not torch.equal(want_cnt, p.logcnt):
        layer, expert = (int(i) for i in (want_cnt != p.logcnt).nonzero()[0])
        _fail(
            f"layer {layer} expert {expert}: logcnt says {int(p.logcnt[layer, expert])} replicas "
            f"but phy2log holds {int(want_cnt[layer, expert])}"
        )
    width = want_log2phy.shape[2]
    have = p.log2phy
    if have.shape[2] < width or (have[:, :, width:] != -1).any():
        _fail(
            f"log2phy has width {have.shape[2]}; it needs {width} columns with -1 beyond the "
            "replica count"
        )
    if not torch.equal(have[:, :, :width], want_log2phy):
        layer, expert, _ = (int(i) for i in (have[:, :, :width] != want_log2phy).nonzero()[0])
        _fail(
            f"layer {layer} expert {expert}: log2phy lists {have[layer, expert].tolist()}, "
            f"phy2log implies {want_log2phy[layer, expert].tolist()} (ascending, -1 padded)"
        )


#: most slots per GPU for which the anti-affinity check compares slot pairs before sorting
#: (anti-affine maps: 41 vs 96 µs at L = 58, P = 32, S = 9; 56 vs 153 at P = 64; about
#: even at S = 17, where the S² compares catch up with the sort)
_PAIRWISE_SLOTS = 12


def _validate_anti_affinity(
    p: Placement, ids: np.ndarray, logcnt: np.ndarray, num_live: int
) -> None:
    """At most ceil(c / G) replicas of an expert on one GPU, with G the GPUs that may hold
    it (the ``num_live`` live ones, or its node's under the hierarchical policy).
    ``ids [L, R]`` and ``logcnt [L, E]`` are the placement's maps on the host.

    O(L·R) time and memory: each GPU's slots are sorted by expert, so copies of an expert
    on one GPU are adjacent; a copy's rank in its run is its position minus the run start.
    """
    topo = p.topology
    num_layers = logcnt.shape[0]
    slots = topo.slots_per_gpu
    able = num_live
    if p.policy == "hierarchical" and topo.num_gpus % topo.num_nodes == 0:
        able = topo.gpus_per_node
    if slots < 2:
        return
    if slots <= _PAIRWISE_SLOTS and ids.size and int(ids.min()) >= 0:
        # no GPU holds an expert twice (the common case) unless two of its slots agree:
        # S − 1 shifted compares over [S, L, P] cost a fraction of sorting L·P rows of
        # a few ids (166 vs 11 µs at L = 58, P = 96, S = 3); only where some agree (or
        # some slot is empty) do the copies get counted below
        grid = ids.reshape(num_layers, topo.num_gpus, slots)
        by_slot = np.ascontiguousarray(grid.transpose(2, 0, 1))  # [S, L, P]
        if not any((by_slot[shift:] == by_slot[:-shift]).any() for shift in range(1, slots)):
            return
    grid = np.sort(ids.reshape(num_layers, topo.num_gpus, slots), axis=2)
    same = (grid[..., 1:] == grid[..., :-1]) & (grid[..., 1:] >= 0)  # [L, P, S-1]
    if not same.any():
        return
    # run rank of every slot: 1 + number of equal neighbours before it in the sorted row
    position = np.arange(grid.size).reshape(grid.shape)
    starts = np.ones(grid.shape, bool)
    starts[..., 1:] = ~same
    # one running max over the flattened GPUs (every GPU's first slot starts a run)
    run_start = np.maximum.accumulate(np.where(starts, position, 0).ravel())
    copies = position - run_start.reshape(grid.shape) + 1  # [L, P, S]
    cap = (logcnt + able - 1) // able  # [L, E]
    allowed = np.take_along_axis(cap, np.maximum(grid, 0).reshape(num_layers, -1), 1)
    over = (copies > allowed.reshape(grid.shape)) & (grid >= 0)
    if over.any():
        layer, gpu, slot = (int(i) for i in np.argwhere(over)[0])
        expert = int(grid[layer, gpu, slot])
        held = int((grid[layer, gpu] == expert).sum())
        _fail(
            f"anti-affinity: layer {layer} GPU {gpu} holds {held} replicas of expert {expert} "
            f"(it has {int(logcnt[layer, expert])} replicas over {able} GPUs that may hold it)"
        )


def groups_on_nodes(ids: np.ndarray, num_experts: int, topology: Topology) -> np.ndarray:
    """``[L, G, N]``: whether layer ``l`` of the map ``ids [L, R]`` (host, ``-1`` empty)
    holds a replica of expert group ``g`` (consecutive expert ids) on node ``n`` (a node's
    slots are contiguous). Needs ``G | E`` and ``N | P``."""
    layers = ids.shape[0]
    groups, nodes = topology.num_groups, topology.num_nodes
    node_of_slot = np.arange(topology.num_replicas) // (topology.num_replicas // nodes)
    group = np.where(ids >= 0, ids // (num_experts // groups), groups)  # empty: group G
    # one bincount over (layer, group, node)
    key = (np.arange(layers)[:, None] * (groups + 1) + group) * nodes + node_of_slot[None]
    present = np.bincount(key.ravel(), minlength=layers * (groups + 1) * nodes) > 0
    return present.reshape(layers, groups + 1, nodes)[:, :groups]


def _validate_locality(p: Placement, ids: np.ndarray) -> None:
    """Every replica of a group's experts sits on one node, the group's node, and every node
    holds ``G / N`` groups (``ids [L, R]``: the placement's map on the host)."""
    topo = p.topology
    num_experts = p.num_experts
    if num_experts % topo.num_groups or topo.num_gpus % topo.num_nodes or (
            topo.num_groups % topo.num_nodes):
        _fail(f"hierarchical placement needs experts ({num_experts}) % groups "
              f"({topo.num_groups}), groups % nodes ({topo.num_nodes}) and GPUs "
              f"({topo.num_gpus}) % nodes to be 0")
    present = groups_on_nodes(ids, num_experts, topo)
    split = present.sum(2) > 1  # [L, G]
    if split.any():
        layer, g = (int(i) for i in np.argwhere(split)[0])
        on = np.nonzero(present[layer, g])[0]
        _fail(f"hierarchical locality: layer {layer} group {g} has replicas on nodes "
              f"{int(on[0])}..{int(on[-1])}, expected a single node")
    # an equal share each, as the policy places them and the bounds and incremental planner
    # model them: 2 groups and 4 passed, and eval scored the map above its ceiling (attacker)
    share = topo.num_groups // topo.num_nodes
    held = present.sum(1)  # [L, N] groups on each node
    if (held != share).any():
        layer, node = (int(i) for i in np.argwhere(held != share)[0])
        _fail(f"hierarchical locality: layer {layer} node {node} holds {int(held[layer, node])} "
              f"expert groups, expected {share} (groups / nodes: an equal share each)")
