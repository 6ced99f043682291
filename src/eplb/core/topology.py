"""The cluster's shape, and the words eplb uses for it.

Glossary (used throughout eplb):

- **logical expert**: one of the model's ``E`` experts in a MoE layer.
- **physical slot**: one of the ``R`` expert slots in the cluster; a slot holds one
  *replica* of one logical expert. Slot ``s`` lives on GPU ``s // S`` where
  ``S = R // P`` is the number of slots per GPU.
- **redundant experts**: the ``R - E`` replicas beyond the first of every expert.
- **node**: a group of ``P // N`` consecutive GPUs (fast intra-node links).
- **expert group**: ``E // G`` consecutive logical experts (group-limited routing).
- **dead GPU**: a GPU excluded from serving; its slots hold ``-1``.
- **row**: one independent packing problem inside a batch: a layer, a (layer, node)
  pair, or a randomised candidate of either.
"""

from __future__ import annotations

import math
import numbers
import operator
import reprlib  # a wrong value may be a huge list: quote it short
from collections.abc import Sequence
from dataclasses import dataclass


def positive_int(name: str, value: object) -> int:
    """``value`` as a Python int if it is a positive integer of any integer type
    (``int``, ``numpy.int64``, a 0-d integer tensor); else ``ValueError`` naming it."""
    return _int_at_least(name, value, 1, "a positive integer")


def non_negative_int(name: str, value: object) -> int:
    """``value`` as a Python int if it is an integer >= 0 of any integer type (as
    :func:`positive_int`); else ``ValueError`` naming it."""
    return _int_at_least(name, value, 0, "an integer >= 0")


def int_at_least(name: str, value: object, minimum: int) -> int:
    """``value`` as a Python int if it is an integer >= ``minimum`` of any integer type
    (as :func:`positive_int`; stored as int, so a record stays hashable and prints
    plainly); else ``ValueError`` naming it."""
    return _int_at_least(name, value, minimum, f"an integer >= {minimum}")


def _int_at_least(name: str, value: object, minimum: int, what: str) -> int:
    if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
        raise ValueError(f"{name} must be {what}, got {reprlib.repr(value)}")
    try:
        number = operator.index(value)  # ints and integer scalars, never floats
    except (TypeError, RuntimeError):  # RuntimeError: a meta or fake tensor has no value
        raise ValueError(f"{name} must be {what}, got {reprlib.repr(value)}") from None
    if number < minimum:
        raise ValueError(f"{name} must be {what}, got {number}")
    return number


def real_number(value: object) -> float | None:
    """``value`` as a float if it is a real number of any type (Python, NumPy, a 0-d
    real array or tensor), else ``None``: booleans, complex numbers, text and arrays are not
    knob values. Stored as float, a record stays hashable and prints plainly."""
    kind = str(getattr(value, "dtype", ""))
    if isinstance(value, bool) or "bool" in kind or "complex" in kind:
        return None
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except OverflowError:  # an int past float's range: as large, for the range checks
            return math.inf if value > 0 else -math.inf  # (they raised OverflowError)
    if tuple(getattr(value, "shape", (None,))) == () and ("int" in kind or "float" in kind):
        try:  # a 0-d NumPy array or tensor (a meta tensor has no value to read)
            return float(value)
        except (NotImplementedError, RuntimeError):
            return None
    return None


def is_name(value: object, names: Sequence[str]) -> bool:
    """Whether ``value`` is one of the option names ``names`` (``policy="global"``).

    Only a ``str`` can be: ``value in names`` compares a NumPy array element-wise, so an
    array passed by mistake raised NumPy's "truth value of an array is ambiguous" instead
    of the caller's error naming the option (found by the twelfth-session fuzz pass)."""
    return isinstance(value, str) and value in names


#: ``L·R``, the most slots over all layers eplb plans or builds a placement of: several
#: ``[L, R]`` int64 arrays live at once (256 MiB each)
MAX_TOTAL_SLOTS = 1 << 25


def check_total_slots(num_layers: int, topology: Topology) -> None:
    """Refuse ``num_layers`` layers of ``topology``'s slots beyond :data:`MAX_TOTAL_SLOTS`,
    before anything is allocated: the planners and the helpers that build a placement
    from a shape alone (``trivial_placement``) would otherwise fail in the allocator, or
    take the host's memory. Raises ``ValueError`` naming the limit."""
    total = num_layers * topology.num_replicas
    if total > MAX_TOTAL_SLOTS:
        raise ValueError(f"{num_layers} layers × {topology.num_replicas} slots is beyond what "
                         f"eplb plans: at most {MAX_TOTAL_SLOTS:.2e} slots over all layers")


@dataclass(frozen=True)
class Topology:
    """Where slots live: ``num_replicas`` slots on ``num_gpus`` GPUs in ``num_nodes`` nodes.

    ``num_groups`` is the number of expert groups (1 when the model has none). Integer
    scalars of any type (e.g. ``numpy.int64``) are accepted and stored as ``int``.
    """

    num_replicas: int
    num_gpus: int
    num_nodes: int = 1
    num_groups: int = 1

    def __post_init__(self) -> None:
        for name in ("num_replicas", "num_gpus", "num_nodes", "num_groups"):
            object.__setattr__(self, name, positive_int(name, getattr(self, name)))
        if self.num_replicas % self.num_gpus:
            raise ValueError(
                f"num_replicas ({self.num_replicas}) must be a multiple of num_gpus "
                f"({self.num_gpus}) so every GPU holds the same number of slots"
            )

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    @property
    def gpus_per_node(self) -> int:
        if self.num_gpus % self.num_nodes:
            raise ValueError(
                f"num_gpus ({self.num_gpus}) is not a multiple of num_nodes ({self.num_nodes})"
            )
        return self.num_gpus // self.num_nodes

    @property
    def grouped(self) -> bool:
        """More than one node and one group, groups spread evenly over nodes: the shape
        for which ``policy="auto"`` means hierarchical (if :meth:`hierarchy_problems` is
        empty)."""
        return self.num_groups > 1 and self.num_nodes > 1 and self.num_groups % self.num_nodes == 0

    def hierarchy_problems(
        self, num_experts: int | None, *, has_dead_gpus: bool = False, has_speeds: bool = False
    ) -> list[str]:
        """Why the hierarchical policy cannot apply to this cluster (empty: it can);
        ``num_experts`` ``None``: before the loads are seen, the cluster's own problems."""
        problems = []
        if num_experts is not None and num_experts % self.num_groups:
            problems.append(f"num_experts ({num_experts}) is not a multiple of num_groups "
                            f"({self.num_groups})")
        if self.num_groups % self.num_nodes:
            problems.append(f"num_groups ({self.num_groups}) is not a multiple of num_nodes "
                            f"({self.num_nodes})")
        if self.num_gpus % self.num_nodes:
            problems.append(f"num_gpus ({self.num_gpus}) is not a multiple of num_nodes "
                            f"({self.num_nodes})")
        if has_dead_gpus:
            problems.append("some GPUs are dead (active_gpus), so nodes are no longer alike")
        if has_speeds:
            problems.append("GPU speeds differ (gpu_speed), so nodes are no longer alike")
        return problems

    def as_dict(self) -> dict[str, int]:
        """The four sizes by their ``eplb.plan`` argument names (as placement files record them)."""
        return {
            "num_replicas": self.num_replicas,
            "num_gpus": self.num_gpus,
            "num_nodes": self.num_nodes,
            "num_groups": self.num_groups,
        }
