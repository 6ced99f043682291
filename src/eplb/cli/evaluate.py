"""``eplb eval``: score a placement file on a loads file (the row and dispatch helpers
are :mod:`eplb.cli.commands`', shared with ``eplb plan``)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

import torch

from eplb.cli._checks import check_cluster_flags, existing_file
from eplb.cli._common import (
    CliError,
    ceiling,
    cluster_note,
    info,
    key_note,
    messages_held,
    print_json,
    print_table,
    static_gpu_loads,
    summed_note,
)
from eplb.cli._inputs import (
    anti_affinity_breach,
    cli_policy,
    placement_name,
    read_trace,
    warn,
    warn_if_no_load,
)
from eplb.cli._nearest import (
    distinct_rows,
    loaded_rows_hint,
    pad_dense_rows,
    read_routing_flag,
    routed_layers_mean,
)
from eplb.cli._values import eval_gpu_speed
from eplb.cli.commands import (
    as_serving,
    dead_gpu_ids,
    dead_note,
    row_layer_ids,
    rows_of_loads,
    select_rows,
)
from eplb.core.dispatch import realised_gpu_loads, remote_nodes_per_token
from eplb.core.inputs import scale_free
from eplb.core.map_tables import load_balance
from eplb.core.messages import counted
from eplb.core.placement import Placement, PlacementError
from eplb.core.planner import MAX_SPEED_RATIO, equal_speeds, planning_speeds
from eplb.core.rank_draws import rank_draw_balancedness, split_draw_balancedness
from eplb.core.trace import LoadTrace
from eplb.formats import read_placement_meta


def _eval_policy(placement: Placement, meta: dict, args: argparse.Namespace,
                 loaded: torch.Tensor) -> Placement:
    """The placement to score, with the policy it satisfies.

    eplb's files record their policy. Engine files (SGLang JSON, foreign YAML) do not:
    ``--policy auto`` resolves the cluster's policy as ``eplb plan`` would and, when that
    is hierarchical, keeps it if the placement really holds every expert group on one
    node (then the hierarchical ceiling is the right yardstick), else scores it as global.
    ``loaded [L]`` (bool) marks the placement's rows whose loads carry tokens: only those
    are checked, as rows without load score alike under either policy.
    """

    if meta.get("policy") is not None:
        return placement
    topo = placement.topology
    policy = cli_policy(args.policy, topo.num_replicas, topo.num_gpus, topo.num_nodes,
                        topo.num_groups, placement.num_experts)
    if policy == "global":
        return placement
    hier = Placement.from_phy2log(placement.phy2log, placement.num_experts, topo, "hierarchical",
                                  placement.active_gpus)
    # an SGLang file's rows for layers the planned loads lacked (a dump's dense layers)
    # hold SGLang's trivial map, which spreads every group over the nodes whatever the
    # plan of the MoE rows (new-user pass: such a file was "not hierarchical" by layer 0)
    rows = (loaded.nonzero()[:, 0].tolist() if bool(loaded.any())
            else list(range(placement.num_layers)))
    try:
        select_rows(hier, rows).validate(anti_affinity=False)
    except PlacementError as exc:
        # the message counts the rows checked: name the placement's own
        why = re.sub(r"\blayer (\d+)", lambda m: f"layer {rows[int(m.group(1))]}", str(exc))
        if args.policy == "hierarchical":
            raise CliError(f"{args.placement} is not hierarchical: {why}") from None
        if args.dispatch == "nearest":
            # plans for SGLang's nearest rule are global or locality ones, which spread
            # groups on purpose: scored as global without a word (new-user pass: eval's own
            # --help example for such a file warned as if something were wrong)
            return placement
        warn(f"{args.placement} does not hold the expert groups as the hierarchical policy "
             f"does ({why.removeprefix('hierarchical locality: ')}), so it is scored as a "
             "global placement (against the global ceiling)")
        return placement
    return hier


def _check_recorded(meta: dict, args: argparse.Namespace, what: str) -> None:
    """Refuse flags that contradict the cluster and policy a file records (eplb's files):
    ``-g``/``--nodes``/``--groups``/``--policy`` describe engine files, which do not."""
    recorded = meta.get("topology") or {}
    given = (("-g", "num_gpus", args.gpus), ("--nodes", "num_nodes", args.nodes),
             ("--groups", "num_groups", args.groups))
    for flag, key, value in given:
        if recorded and value is not None and value != recorded.get(key, 1):
            hint = ("delete its '# eplb-topology:' line to score it on another cluster"
                    if meta.get("format") == "trtllm" else
                    f"leave {flag} out, it describes engine files, which record none")
            raise CliError(f"{what} records its cluster ({key.split('_')[1]}: "
                           f"{recorded.get(key, 1)}); {flag} {value} contradicts it: {hint}")
    if meta.get("policy") is not None and args.policy not in ("auto", meta["policy"]):
        raise CliError(f"{what} records the {meta['policy']} policy; --policy {args.policy} "
                       "contradicts it (leave --policy out)")


def cmd_eval(args: argparse.Namespace) -> int:
    # warnings held until every input is checked (attacker pass: a stacked map's, or the
    # one-node nearest rule's, warning came before the error of a missing loads file or a
    # --gpu-speed of the wrong length)
    with messages_held() as release:
        return _eval(args, release)


def _eval(args: argparse.Namespace, release: Callable[[], None]) -> int:
    """``eplb eval``; ``release()`` lets out the warnings held, once the inputs are checked."""
    files, args.loads = args.loads, " ".join(args.loads)  # several: steps, as in plan
    check_cluster_flags(gpus=args.gpus, nodes=args.nodes, groups=args.groups)
    placement, meta = read_placement_meta(
        existing_file(args.placement, "placement file"), num_gpus=args.gpus,
        num_nodes=args.nodes or 1, num_groups=args.groups or 1)
    _check_recorded(meta, args, args.placement)
    why = anti_affinity_breach(placement, meta.get("layer_ids"))
    if why is not None:
        # scored as it is, but said (attacker pass: a stacked eplb JSON file was scored
        # without a word)
        warn(f"{args.placement} breaks eplb's anti-affinity ({why}); scored as it is: the "
             "engines accept such maps (DeepSeek's greedy makes them), eplb's plans never "
             "hold them")
    dispatch_given = args.dispatch is not None
    if args.dispatch is None:  # the rule the plan was made for, where eplb's file says
        args.dispatch = meta.get("dispatch") or "even"
    check_cluster_flags(gpus=placement.topology.num_gpus, nodes=placement.topology.num_nodes)
    # from here on, the cluster the placement is on (recorded, or as the flags describe)
    args.nodes, args.groups = placement.topology.num_nodes, placement.topology.num_groups
    if args.routing is not None and args.dispatch != "nearest":
        raise CliError("--routing scores cross-node traffic under SGLang's nearest dispatch: "
                       "add --dispatch nearest (and --nodes N)")
    trace = read_trace(files, args)
    weight = trace.total()
    loaded = weight.sum(1) > 0  # [L] the loads' rows with load (weight may be cut to keep)
    warn_if_no_load(weight, args.loads)
    what, sglang = placement_name(meta, f"the placement {args.placement}")
    if sglang and not dispatch_given and args.nodes > 1:
        # an SGLang file records no dispatch rule (new-user pass: a plan made for the
        # nearest rule was scored on the even split without a word; plan says the converse)
        info(f"{args.placement} is scored on the even split over replicas; SGLang with "
             "DeepEP sends each token to its nearest replica: add --dispatch nearest to "
             "score it as SGLang serves it")
    placement, keep = rows_of_loads(placement, meta.get("layer_ids"), trace, weight,
                                    args.first_layer, what, f"loads {args.loads}", sglang)
    compared = _previous_rows(args, placement, trace, weight, keep)
    # the policy of the rows scored: an SGLang file's dense layers hold SGLang's trivial
    # map, which spreads every group over the nodes whatever the plan of the MoE rows
    paired = weight if keep is None else weight[keep]  # the loads of placement's rows
    placement = _eval_policy(placement, meta, args, paired.any(1))
    layer_ids = row_layer_ids(trace, args.first_layer, args.loads)
    if keep is not None:
        weight, layer_ids = weight[keep], [layer_ids[i] for i in keep]
    placement_ids = meta.get("layer_ids")
    if (not trace.meta.get("model_layer_ids") and args.first_layer is None
            and placement_ids is not None and len(placement_ids) == len(layer_ids)
            and placement.num_layers == len(placement_ids)):
        # loads that name no layers, paired in order with a placement that does: its rows
        # are those layers (new-user pass: a YAML keyed 3..60 was reported as 0..57)
        layer_ids = list(placement_ids)
    topo = placement.topology
    live = placement.live_gpus()
    after_loads = placement.scaled_gpu_loads(weight)
    nearest = drawn = runtime = None
    if args.dispatch == "nearest" and topo.num_nodes <= 1 and args.routing is None:
        # as plan says: on one node every replica is on the token's node; what SGLang's
        # start-up file realises is eplb's model of each rank's own draw, what its runtime
        # rebalancing's table realises eplb's model of that table (core/rank_draws)
        if placement.active_gpus is None:
            drawn = rank_draw_balancedness(weight, placement.phy2log, topo.num_gpus)
            runtime = split_draw_balancedness(weight, placement.phy2log, topo.num_gpus)
        # eplb's own files record their one node (new-user pass: n.json was called "an
        # engine file")
        recorded = ("records one node: plan with --nodes N for several"
                    if meta.get("topology") else
                    "is scored as one: an engine file records no node count, --nodes N "
                    "gives it")
        warn(f"--dispatch nearest with one node ({args.placement} {recorded}): every "
             "replica is on the token's node, so it is "
             "scored as the even split, the expectation of SGLang's random choice for the "
             "GPUs without a replica (SGLang's own tables can realise below it: BENCHMARKS.md "
             "§14)" + ("" if drawn is None else
                      f"; each rank drawing its own choice, as from an --init-expert-location "
                      f"file (eplb's model, within 0.01 of SGLang's table): {drawn:.4f}; "
                      f"SGLang's runtime rebalancing table (one stream, eplb's model): "
                      f"{runtime:.4f}"))
    elif args.dispatch == "nearest":
        nearest = _nearest_scores(args, placement, weight, trace.num_layers, keep, loaded)
        after_loads = nearest.pop("gpu_loads")
    speed = eval_gpu_speed(args.gpu_speed, meta, topo.num_gpus, args.placement)
    if speed is not None and args.dispatch == "nearest":
        raise CliError("--gpu-speed cannot be combined with --dispatch nearest (as in plan)")
    if speed is not None and equal_speeds(speed):
        speed = None  # equal GPUs, as plan takes them: the same scores, and the ceiling
    if speed is not None:
        # the ratio plan refuses is refused here too: beyond it a GPU's time (load over a
        # speed near 1e-308) overflowed, and eval printed balancedness 0.0000 beside a
        # worst max/mean of 1.0000, and Infinity in --json (attacker pass)
        try:
            planning_speeds(speed, placement.active_gpus)
        except ValueError:
            source = "--gpu-speed" if args.gpu_speed else f"{args.placement}'s gpu_speed"
            raise CliError(f"{source}: a live GPU is more than {MAX_SPEED_RATIO:.0e} times "
                           "slower than the fastest, beyond what eplb plans and scores for: "
                           "give relative speeds within that ratio") from None
    release()  # every input checked
    # no rebalancing, scored as the placement is (in time where GPU speeds are given)
    before_layer, before, before_worst = load_balance(static_gpu_loads(weight, topo.num_gpus),
                                                      None, speed)
    after_layer, after, after_worst = load_balance(after_loads, live, speed)
    ceil = ceiling(weight, topo.num_replicas, topo.num_gpus, topo.num_nodes, topo.num_groups,
                   placement.policy, active=placement.active_gpus, speed=speed is not None)
    # busiest GPU over the ideal, per layer: by time where GPU speeds are given, as the
    # overall worst is (1 / the layer's balancedness; 1.0 for a layer without load)
    in_force = None
    if compared is not None:
        in_force = _in_force(args, *compared, speed)
    ratio_b = (1 / before_layer).tolist()
    ratio_a = (1 / after_layer).tolist()
    per_layer = [
        {
            "layer": lid,
            "balancedness_before": float(before_layer[i]),
            "balancedness_after": float(after_layer[i]),
            "ceiling": None if ceil.per_layer is None else float(ceil.per_layer[i]),
            "max_over_mean_before": ratio_b[i],
            "max_over_mean_after": ratio_a[i],
        }
        for i, lid in enumerate(layer_ids)
    ]
    result = {
        "placement": str(args.placement),
        "loads": str(args.loads),
        "steps_summed": trace.num_steps,
        "topology": topo.as_dict(),
        "policy": placement.policy,
        "balancedness_before": before,
        "balancedness_after": after,
        "balancedness_ceiling": ceil.overall,
        "worst_max_over_mean_before": before_worst,
        "worst_max_over_mean_after": after_worst,
        "dispatch": args.dispatch,
        # one node, nearest: each rank's own draw, as from SGLang's start-up file (or None)
        "balancedness_rank_draws": drawn,
        # one node, nearest: SGLang's runtime rebalancing table, eplb's model (or None)
        "balancedness_runtime_table": runtime,
        # as plan's summary: the GPUs the placement leaves empty (None: every GPU is live)
        "dead_gpus": dead_gpu_ids(placement.active_gpus),
        "layers": per_layer,
    }
    if nearest is not None:
        result.update(nearest)
    if in_force is not None:
        result.update(in_force)
    if args.json:
        if args.summary:  # the figures without the per-layer list
            del result["layers"]
        print_json(result)
        return 0
    if not args.summary:
        # a layer without load (a dump's dense layer) reads 1.0: say why (new-user pass)
        loaded = weight.any(1).tolist()
        print_table(
            "per layer (balancedness = mean / max GPU load; max/mean = worst GPU vs mean)",
            ["layer", "bal before", "bal after", "ceiling", "max/mean before", "max/mean after"],
            [[r["layer"] if loaded[i] else f"{r['layer']} (no load)", r["balancedness_before"],
              r["balancedness_after"], r["ceiling"], r["max_over_mean_before"],
              r["max_over_mean_after"]] for i, r in enumerate(per_layer)],
        )
    print_table(
        f"{args.placement} on {args.loads}{key_note(getattr(args, 'key', None))}"
        f"{summed_note(trace)}: {topo.num_replicas} slots on "
        f"{topo.num_gpus} GPUs{cluster_note(topo.num_nodes, topo.num_groups)} "
        # an engine file records no policy: say what it was scored as (new-user pass: a
        # locality plan read "(global)")
        f"({placement.policy if meta.get('policy') else f'scored as {placement.policy}'}"
        f"{dead_note(placement.active_gpus)})",
        ["", "balancedness", "worst max/mean"],
        [[f"no rebalancing (before{as_serving(placement.active_gpus)})", before, before_worst],
         *([[f"in force (--previous {args.previous}"
             f"{as_serving(placement.active_gpus, compared[0].live_gpus())})",
             in_force["balancedness_in_force"],
             in_force["worst_max_over_mean_in_force"]]] if in_force is not None else []),
         [f"this placement (after{', nearest rule' if nearest is not None else ''}"
          f"{', nearest rule, in expectation' if drawn is not None else ''})", after,
          after_worst],
         # the two tables SGLang builds on one node, as plan's table gives them (new-user
         # pass: the start-up file's figure was in a warning only, under an expectation)
         *([["SGLang's static dispatch from this file (each rank's own draw, eplb's model)",
             drawn, None],
            ["SGLang's runtime rebalancing table (one stream, eplb's model)", runtime, None]]
           if drawn is not None else []),
         ["ceiling (upper bound)", ceil.overall, ceil.worst]],
    )
    if in_force is not None:
        across = in_force.get("moved_slots_across_nodes")
        print(f"moved from --previous: {counted(in_force['moved_slots_total'], 'slot')}"
              + (f" ({across} across nodes: an expert new to its node)"
                 if across is not None else "")
              + f", at most {in_force['moved_slots_max_layer']} in one layer; the busiest GPU "
              f"receives {counted(in_force['moved_slots_busiest_gpu'], 'expert')}' weights")
    if ceil.note and ceil.overall is None:
        info(f"({ceil.note})")
    if nearest is not None:
        rows = [["balancedness, even split (vLLM)", nearest["balancedness_even_split"]],
                ["balancedness, nearest rule (SGLang)", after]]
        if "remote_nodes_per_token" in nearest:
            rows.append(["remote nodes per token (routing trace)",
                         nearest["remote_nodes_per_token"]])
        print_table("under SGLang's nearest dispatch (tokens arising evenly on the GPUs)",
                    ["", "value"], rows)
    return 0


def _previous_rows(args: argparse.Namespace, placement: Placement, trace: LoadTrace,
                   weight: torch.Tensor, keep: list[int] | None
                   ) -> tuple[Placement, Placement, torch.Tensor] | None:
    """``(previous, placement, loads)`` for ``--previous`` (``None`` without it): both
    placements' rows for the rows of ``weight [T, E]`` (the loads as read) that both
    cover, and those rows; a file recording other nodes or groups than ``placement``'s is
    warned of (held, as every eval warning, until the inputs are checked). ``--previous``
    is read and paired with the loads as ``--placement`` is (``keep``: the loads rows
    ``placement`` was paired with, ``None``: all). The two must be on one cluster (the
    same slots and GPUs); rows only one of them covers must carry no load (an SGLang
    file's dense rows beside eplb's file of the MoE rows: attacker pass), or a slot of one
    is not the other's."""
    if args.previous is None:
        return None
    topo = placement.topology
    # an engine file that records no cluster takes --placement's (attacker pass: -g was
    # asked for, though --placement had said it)
    previous, meta = read_placement_meta(
        existing_file(args.previous, "--previous placement file"),
        num_gpus=topo.num_gpus if args.gpus is None else args.gpus,
        num_nodes=args.nodes or topo.num_nodes, num_groups=args.groups or topo.num_groups)
    old = previous.topology
    if (old.num_replicas, old.num_gpus) != (topo.num_replicas, topo.num_gpus):
        raise CliError(f"--previous {args.previous} holds {old.num_replicas} slots on "
                       f"{old.num_gpus} GPUs, {args.placement} {topo.num_replicas} on "
                       f"{topo.num_gpus}: a slot of one is not the other's")
    if previous.num_experts != placement.num_experts:
        raise CliError(f"--previous {args.previous} places {previous.num_experts} experts, "
                       f"{args.placement} {placement.num_experts}")
    if meta.get("topology") and (old.num_nodes, old.num_groups) != (topo.num_nodes,
                                                                    topo.num_groups):
        # plan --previous says so; eval took such a file without a word (attacker pass):
        # its in-force score and the moves across nodes are on --placement's nodes
        warn(f"--previous {args.previous} was planned for "
             f"{counted(old.num_nodes, 'node')} and {counted(old.num_groups, 'group')}, "
             f"{args.placement} for {topo.num_nodes} and {topo.num_groups}: its map is "
             f"scored and compared as the slots hold it, on {args.placement}'s cluster")
    _, sglang = placement_name(meta, f"--previous {args.previous}")
    previous, kept = rows_of_loads(previous, meta.get("layer_ids"), trace, weight,
                                   args.first_layer, f"--previous {args.previous}",
                                   f"loads {args.loads}", sglang)
    ours = list(range(weight.shape[0])) if keep is None else keep
    theirs = list(range(weight.shape[0])) if kept is None else kept
    common = sorted(set(ours) & set(theirs))
    alone = sorted(set(ours) ^ set(theirs))
    if not common or bool(weight[alone].any()):
        raise CliError(f"--previous {args.previous} and {args.placement} cover different "
                       f"rows of {args.loads} ({previous.num_layers} and "
                       f"{placement.num_layers} layers, not only rows with no load apart): "
                       "compare placements of the same layers")
    at_ours, at_theirs = {r: i for i, r in enumerate(ours)}, {r: i for i, r in enumerate(theirs)}
    return (select_rows(previous, [at_theirs[r] for r in common]),
            select_rows(placement, [at_ours[r] for r in common]), weight[common])


def _in_force(args: argparse.Namespace, previous: Placement, placement: Placement,
              weight: torch.Tensor, speed: torch.Tensor | None) -> dict:
    """``--previous``'s scores on ``weight [L, E]``, the rows both placements hold (as
    ``plan --previous`` scores the map in force: on the cluster the placement is for,
    under the same dispatch rule), and the slots whose expert changed from it."""
    live = placement.live_gpus()
    if args.dispatch == "nearest" and placement.topology.num_nodes > 1:
        loads = realised_gpu_loads(scale_free(weight), previous.phy2log,
                                   placement.topology.num_gpus, placement.topology.num_nodes,
                                   active_gpus=previous.active_gpus)
    else:
        loads = previous.scaled_gpu_loads(weight)
    _, balance, worst = load_balance(loads, previous.live_gpus().to(live.device) | live, speed)
    moved = placement.moved_slots(previous)
    scores = {"previous": str(args.previous), "balancedness_in_force": balance,
              "worst_max_over_mean_in_force": worst, "moved_slots_total": int(moved.sum()),
              "moved_slots_max_layer": int(moved.max()),
              "moved_slots_busiest_gpu": int(placement.moved_slots(previous,
                                                                   per_gpu=True).max())}
    if placement.topology.num_nodes > 1:
        scores["moved_slots_across_nodes"] = int(
            placement.moved_slots(previous, across_nodes=True).sum())
    return scores


def _nearest_scores(args: argparse.Namespace, placement: Placement, weight: torch.Tensor,
                    num_rows: int, keep: list[int] | None, loaded: torch.Tensor) -> dict:
    """Realised GPU loads under the nearest rule, and remote nodes per token. The routing
    trace has the loads file's ``num_rows`` layers, as in ``plan`` (``keep``: the rows the
    placement has), those of its rows with load (``loaded [num_rows]`` bool), or the
    placement's."""
    topo = placement.topology
    if topo.num_nodes <= 1:
        # reached with --routing only: on one node eval scores the rule without it (new-user
        # pass: "--dispatch nearest needs several nodes" contradicted the runs that did)
        raise CliError(f"--routing counts remote nodes per token, which needs several nodes, "
                       f"and {args.placement} is for one: drop --routing to score the nearest "
                       "rule on one node (eplb files record their cluster, --nodes N (N > 1) "
                       "applies to engine files)")
    active = placement.active_gpus
    # (for ratios only: scaled as scaled_gpu_loads scales, so huge loads sum finitely)
    loads = realised_gpu_loads(scale_free(weight), placement.phy2log, topo.num_gpus,
                               topo.num_nodes, active_gpus=active)
    out = {"gpu_loads": loads,
           "balancedness_even_split": placement.balancedness(weight)}
    routing = read_routing_flag(args)
    if routing is not None:
        note, read = None, routing
        if routing.shape[1] != num_rows:
            # a trace of the MoE rows beside an SGLang dump (61 rows, 3 dense): its layers
            # go to the rows with load, as plan pairs them (also where the placement covers
            # some rows only: a review found plan --previous took it there and eval not)
            routing, note = pad_dense_rows(routing, loaded, args.routing)
        if keep is not None and routing.shape[1] == num_rows:
            routing = routing[:, keep]  # the loads' layers, paired as plan pairs them
        if routing.shape[1] != placement.num_layers:
            raise CliError(f"--routing {args.routing} has {read.shape[1]} layers, the "
                           f"loads {num_rows}"
                           + (f" (the placement {placement.num_layers})" if keep else
                              loaded_rows_hint(loaded)))
        if int(routing.max()) >= placement.num_experts:
            raise CliError(f"--routing {args.routing} names experts beyond the placement's "
                           f"{placement.num_experts}")
        # on the trace as read: its message names a layer of the file, where the cut or
        # padded trace's index was the placement's row (attacker pass)
        distinct_rows(read, args)
        if note:  # once the trace is taken: a refusal stays one line (attacker pass)
            info(note)
        remote = remote_nodes_per_token(placement.phy2log, routing, placement.num_experts,
                                        topo.num_gpus, topo.num_nodes, active_gpus=active)
        out["remote_nodes_per_token"] = routed_layers_mean(remote, routing)
    return out
