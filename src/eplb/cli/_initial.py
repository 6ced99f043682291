"""``eplb simulate --initial FILE``: the placement in force before the replay's first
rebalance, read and paired with the trace's layers as ``eval`` pairs them."""

from __future__ import annotations

import argparse

from eplb.cli._checks import existing_file
from eplb.cli._common import CliError
from eplb.cli._inputs import anti_affinity_breach, placement_name, revived_gpus, warn
from eplb.cli.commands import rows_of_loads
from eplb.core import LoadTrace, Placement, Topology
from eplb.formats import read_placement_meta


def initial_placement(args: argparse.Namespace, trace: LoadTrace, replicas: int,
                      gpus: int) -> Placement | None:
    """``--initial FILE``: the placement in force before the first rebalance (e.g. the
    start-up file SGLang loads with ``--init-expert-location``), ``[L, replicas]`` slots on
    ``gpus`` GPUs, its rows those of the trace's layers as ``eval`` pairs them, on the
    replay's cluster (``--nodes``/``--groups``); ``None`` without it (SGLang's trivial
    map)."""
    if args.initial is None:
        if args.first_layer is not None:
            raise CliError("--first-layer says which model layers the trace's rows are, for "
                           "--initial: add --initial FILE, or drop --first-layer")
        return None
    placement, meta = read_placement_meta(
        existing_file(args.initial, "--initial placement"), num_gpus=gpus,
        num_nodes=args.nodes, num_groups=args.groups)
    topo = placement.topology
    if (topo.num_replicas, topo.num_gpus) != (replicas, gpus):
        raise CliError(f"--initial {args.initial} holds {topo.num_replicas} slots on "
                       f"{topo.num_gpus} GPUs; the replay is of {replicas} on {gpus} "
                       "(-r/-g)")
    if placement.num_experts != trace.num_experts:
        raise CliError(f"--initial {args.initial} places {placement.num_experts} experts, "
                       f"the trace has {trace.num_experts}")
    if (topo.num_nodes, topo.num_groups) != (args.nodes, args.groups):
        # a file that records its cluster (eplb's, the YAML eplb writes) planned for other
        # nodes or groups: its map (slot -> expert) is one the replay's GPUs hold as it
        # stands, so it is replayed on the replay's cluster, said as plan --previous says
        # it. The rebalancer refused it with its API's words: "initial placement is for
        # Topology(num_replicas=288, ...)" (attacker pass)
        warn(f"--initial {args.initial} was planned for {topo.num_nodes} node(s) and "
             f"{topo.num_groups} group(s) ({placement.policy}); the replay is on "
             f"{args.nodes} node(s) and {args.groups} group(s): its map is replayed as it "
             f"stands there; pass --nodes {topo.num_nodes} --groups {topo.num_groups} to "
             "replay on its cluster")
        # (its policy described the old cluster: the map is read as any engine file is)
        placement = Placement.from_phy2log(
            placement.phy2log, placement.num_experts,
            Topology(replicas, gpus, args.nodes, args.groups), "global",
            placement.active_gpus)
    dead = revived_gpus(placement)
    if dead and (args.planner != "none" or args.compare):
        # simulate plans for every GPU of -g (it has no --dead-gpus): the first rebalance
        # filled the file's dead GPUs without a word, its moves counted into them
        # (attacker pass); said, as plan --previous says GPUs it revives
        many = len(dead) > 1
        warn(f"GPU{'s' if many else ''} {','.join(map(str, dead))} hold"
             f"{'' if many else 's'} nothing in --initial {args.initial} (dead there); the "
             f"replay's rebalances plan for all {gpus} GPUs (-g), so they fill "
             f"{'their' if many else 'its'} slots")
    why = anti_affinity_breach(placement, meta.get("layer_ids"))
    if why is not None:
        # replayed as it is, but said, as eval says it (attacker pass: a stacked file was
        # replayed without a word); an eplb rebalance from it spreads the stacked replicas
        warn(f"--initial {args.initial} breaks eplb's anti-affinity ({why}); replayed as it "
             "is until the first rebalance")
    what, sglang = placement_name(meta, f"--initial {args.initial}")
    placement, keep = rows_of_loads(placement, meta.get("layer_ids"), trace, trace.total(),
                                    args.first_layer, what, f"the loads of {args.trace}", sglang)
    if keep is not None or placement.num_layers != trace.num_layers:
        raise CliError(f"--initial {args.initial} has {placement.num_layers} rows for the "
                       f"trace's {trace.num_layers} layers")
    return placement
