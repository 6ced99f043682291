"""Placement policies behind one interface, a registry, and the one policy resolver.

- ``"global"`` (:class:`GlobalPolicy`): all replicas onto all GPUs.
- ``"hierarchical"`` (:class:`HierarchicalPolicy`, DeepSeek's): groups → nodes, then
  replicate and pack inside every node; every replica of a group stays on its node.
- ``"locality"`` (:class:`LocalityPolicy`, for SGLang's nearest dispatch): hot experts on
  every node, the others on their group's node unless moving them lowers cross-node
  traffic within a node-load ``slack``: the curve between the other two.

:func:`resolve_policy` turns ``"auto"`` into one of them. It is the only resolver: the
planner, the reference greedy (``rule="deepseek"``) and the CLI all call it.
"""

from __future__ import annotations

import warnings

from eplb.core.locality import MAX_LOCALITY_WORK
from eplb.core.policies.base import PlacementPolicy, plan_rows
from eplb.core.policies.global_policy import GlobalPolicy
from eplb.core.policies.hierarchical import HierarchicalPolicy
from eplb.core.policies.locality_policy import LocalityPolicy
from eplb.core.topology import Topology, is_name

__all__ = [
    "POLICIES",
    "POLICY_NAMES",
    "GlobalPolicy",
    "HierarchicalPolicy",
    "LocalityPolicy",
    "PlacementPolicy",
    "locality_problems",
    "plan_rows",
    "resolve_policy",
]

#: name → policy class
POLICIES: dict[str, type[PlacementPolicy]] = {
    GlobalPolicy.name: GlobalPolicy,
    HierarchicalPolicy.name: HierarchicalPolicy,
    LocalityPolicy.name: LocalityPolicy,
}

#: what ``policy=`` accepts
POLICY_NAMES: tuple[str, ...] = ("auto", *POLICIES)


def resolve_policy(
    policy: str,
    topology: Topology,
    num_experts: int | None,
    *,
    has_dead_gpus: bool = False,
    has_speeds: bool = False,
    rule: str = "eplb",
    stacklevel: int = 3,
    quiet: bool = False,
) -> str:
    """The concrete policy for ``policy`` (``"auto"`` or a key of :data:`POLICIES`).

    ``rule="eplb"``: ``auto`` is hierarchical when ``num_groups > 1``, ``num_nodes > 1``
    and groups divide evenly over nodes, else global. When hierarchical cannot apply (GPUs
    or experts do not divide, or GPUs are dead or of different speeds) ``auto`` warns and
    plans globally, and a forced ``"hierarchical"`` raises ``ValueError`` naming the reason.

    ``rule="deepseek"``: DeepSeek's exact test, for the reference greedy: ``auto`` is
    hierarchical whenever ``num_groups % num_nodes == 0`` (also with one node or one group,
    where the hierarchical routine runs trivially), else global, without a warning.

    ``stacklevel`` points the warning at the user's call (callers add their own frames);
    ``quiet`` leaves it out, for callers that only check a policy or say why in their own
    words (a ``warnings.catch_warnings`` block to silence it changes the process-wide filters,
    which threads calling it at once restored into an ``ignore`` that outlived them).
    ``num_experts`` ``None`` (before any loads are seen: a ``Rebalancer`` at construction)
    checks what the cluster, its dead GPUs and its speeds decide alone.
    """
    if not is_name(policy, POLICY_NAMES):
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICY_NAMES)}")
    if policy == "locality" and rule == "deepseek":
        # the greedy has no such plan: its global one came back labelled "locality"
        raise ValueError("DeepSeek's greedy has no locality policy; choose 'auto', 'global' "
                         "or 'hierarchical' (eplb.plan plans policy='locality')")
    if policy == "locality":
        problems = locality_problems(topology, num_experts, has_dead_gpus, has_speeds)
        if problems:
            raise ValueError("the locality policy is impossible: " + "; ".join(problems))
        return policy
    if policy not in ("auto", "hierarchical"):
        return policy
    if policy == "auto":
        if rule == "deepseek":
            if topology.num_groups % topology.num_nodes:
                return "global"
        elif not topology.grouped:
            return "global"
    problems = topology.hierarchy_problems(num_experts, has_dead_gpus=has_dead_gpus,
                                           has_speeds=has_speeds)
    if not problems:
        return "hierarchical"
    reason = "; ".join(problems)
    if policy == "hierarchical" or rule == "deepseek":
        raise ValueError(f"hierarchical placement is impossible: {reason}")
    if quiet:
        return "global"
    warnings.warn(
        f"eplb: planning globally because hierarchical placement is impossible: {reason}",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
    return "global"


def _locality_room(topology: Topology, num_experts: int) -> list[str]:
    """Shapes the locality plan's structure cannot fill: ``k = (R − E) // (N − 1)`` hot
    experts with a copy on every node, and the ``(R − E) mod (N − 1)`` replicas left as
    second copies of cold experts on one node (two GPUs of one node, two free slots)."""
    nodes, replicas = topology.num_nodes, topology.num_replicas
    extra = replicas - num_experts
    if nodes <= 1 or topology.num_gpus % nodes or extra <= 0:
        return []
    hot, left = divmod(extra, nodes - 1)
    if hot + left > num_experts:
        return [f"{replicas} slots exceed what {num_experts} experts can use on {nodes} nodes"]
    pairs_per_node = (replicas // nodes - hot) // 2
    if left and (topology.num_gpus // nodes < 2 or left > nodes * pairs_per_node):
        return [f"the {left} replicas beyond {hot} experts on every node do not fit as second "
                f"copies on one node (a node has {topology.num_gpus // nodes} GPU(s) and "
                f"{replicas // nodes - hot} slot(s) beside the copies); choose num_replicas "
                f"with (num_replicas - num_experts) a multiple of num_nodes - 1, or "
                f"policy='global' with dispatch='nearest'"]
    return []


def locality_problems(
    topology: Topology, num_experts: int | None, has_dead_gpus: bool = False,
    has_speeds: bool = False,
) -> list[str]:
    """Why the locality policy cannot plan ``topology`` (empty: it can): what
    :func:`resolve_policy` raises for ``policy="locality"``, for callers that fall back."""
    nodes, groups = topology.num_nodes, topology.num_groups
    problems = []
    if nodes <= 1:
        problems.append("it needs num_nodes > 1")
    if topology.num_gpus % nodes:
        problems.append(f"num_gpus ({topology.num_gpus}) is not a multiple of num_nodes ({nodes})")
    if num_experts is not None and num_experts % groups:
        problems.append(f"num_experts ({num_experts}) is not a multiple of num_groups ({groups})")
    if groups > 1 and groups % nodes:
        problems.append(f"num_groups ({groups}) is not a multiple of num_nodes ({nodes})")
    if num_experts is not None:
        problems += _locality_room(topology, num_experts)
    if has_dead_gpus:
        problems.append("dead GPUs are not supported by the locality policy yet")
    if has_speeds:
        problems.append("GPU speeds are not supported by the locality policy")
    work = topology.num_gpus * topology.num_replicas
    if work > MAX_LOCALITY_WORK:
        problems.append(f"{topology.num_gpus} GPUs with {topology.slots_per_gpu} slots each "
                        f"(GPUs × all slots {work:,}) is more than it plans for "
                        f"({MAX_LOCALITY_WORK:,}; 58 real DeepSeek-V3 layers take about a "
                        "minute at 256 GPUs × 4 slots, 5 at 512 × 2, on one core)")
    return problems
