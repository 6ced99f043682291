"""``eplb plan`` (``eplb eval`` is in :mod:`eplb.cli.evaluate`; it shares the row and
dispatch helpers here)."""

from __future__ import annotations

import argparse

import torch

from eplb.api import plan
from eplb.cli._checks import (
    check_nearest_flags,
    check_output,
    check_topology,
    existing_file,
    refuse_input_as_output,
    refuse_rows_past_model_layers,
)
from eplb.cli._common import (
    CliError,
    ceiling,
    cluster_note,
    print_json,
    print_table,
    static_gpu_loads,
    summed_note,
)
from eplb.cli._engine_files import check_engine_output, engine_rows, warn_idle_engine_rows
from eplb.cli._inputs import (
    check_reading_options,
    cli_policy,
    infer_emit,
    placement_name,
    read_trace,
    refuse_forced_hierarchy,
    require_loads_files,
    warn,
    warn_guessed_experts,
    warn_if_no_load,
    warn_revived,
)
from eplb.cli._moves import may_force, split_moves, warn_forced_moves
from eplb.cli._mtp import warn_dropped_mtp, with_mtp_layers
from eplb.cli._nearest import dispatch_options, plan_nearest, remote_nodes
from eplb.cli._values import active_gpus_from, gpu_speed_from
from eplb.core.dispatch import realised_gpu_loads
from eplb.core.inputs import scale_free
from eplb.core.map_tables import load_balance
from eplb.core.messages import counted, integer_runs
from eplb.core.placement import Placement
from eplb.core.planner import equal_speeds, planning_speeds
from eplb.core.rank_draws import split_draw_balancedness
from eplb.core.trace import MAX_MODEL_LAYERS, LoadTrace
from eplb.formats import read_placement_meta, write_placement
from eplb.formats.placement_writer import dead_gpus_message
from eplb.online.budget import takes_budget

MAX_FIRST_LAYER = MAX_MODEL_LAYERS - 1  # SGLang files get a row for each layer below


def dead_gpu_ids(active: torch.Tensor | None) -> list[int] | None:
    """The dead GPUs of a live mask, for plan's and eval's ``--json`` (``None``: no mask)."""
    return None if active is None else (~active.bool()).nonzero().flatten().tolist()


def dead_note(active: torch.Tensor | None) -> str:
    """``", GPUs 3,17 dead"`` for a table title (empty when every GPU is live): plan's and
    eval's, alike."""
    dead = dead_gpu_ids(active) or []
    return f", {_gpus(dead)} dead" if dead else ""


def _gpus(ids: list[int]) -> str:
    """``"GPU 3"`` or ``"GPUs 3,17"``."""
    return f"GPU{'s' if len(ids) > 1 else ''} {','.join(map(str, ids))}"


def as_serving(active: torch.Tensor | None, used: torch.Tensor | None = None) -> str:
    """``"; GPU 3 dead now, scored as serving"`` for a table row whose map (no rebalancing,
    or the map in force) holds slots on GPUs dead in ``active``: its score counts them as
    serving, which they cannot (new-user pass: the in-force row read better than the plan
    made for the GPUs left). ``used [P]``: the map's own live GPUs (``None``: all)."""
    if active is None:
        return ""
    dead = ~active.bool().cpu()
    if used is not None:
        dead &= used.bool().cpu()
    ids = dead.nonzero().flatten().tolist()
    return f"; {_gpus(ids)} dead now, scored as serving" if ids else ""


def row_layer_ids(trace: LoadTrace, first_layer: int | None, loads: str) -> list[int]:
    """The model layer of every row: the file's own ids win; ``--first-layer`` names them
    for files that only have row numbers, and must agree with a file that names them."""
    ids = list(trace.layer_ids)
    if trace.meta.get("model_layer_ids"):
        if first_layer is not None and first_layer != ids[0]:
            # (new-user pass: OLMoE's layers 0, 7, 15 were called 0..15, and an SGLang dump)
            why = (" (an SGLang dump has a row for every layer, dense ones all zero)"
                   if str(trace.format).startswith("sglang") else " (the file names them)")
            raise CliError(
                f"--first-layer {first_layer} contradicts {loads}, whose rows are model layers "
                f"{integer_runs(ids)}{why}; drop --first-layer"
            )
        return ids
    if first_layer is not None:
        if not 0 <= first_layer <= MAX_FIRST_LAYER:
            raise CliError(f"--first-layer must be a model layer in 0..{MAX_FIRST_LAYER}, got "
                           f"{first_layer}")
        if first_layer + len(ids) > MAX_MODEL_LAYERS:
            raise CliError(f"--first-layer {first_layer}: {loads} has {len(ids)} rows, so its "
                           f"last would be layer {first_layer + len(ids) - 1}; model layers "
                           f"are 0..{MAX_MODEL_LAYERS - 1}")
        return list(range(first_layer, first_layer + len(ids)))
    return ids


def cmd_plan(args: argparse.Namespace) -> int:
    # the inputs first: a missing loads file is the mistake to hear about, not an output
    # that a --force would have cleared before the run then failed anyway
    require_loads_files(args.loads)
    if args.previous:
        existing_file(args.previous, "previous placement")
    # the flags that need no file too (new-user pass: a bad --dead-gpus was reported only
    # once an existing output had been cleared)
    _refuse_flag_mistakes(args)
    active = active_gpus_from(args.dead_gpus, args.gpus)
    speed = gpu_speed_from(args.gpu_speed, args.gpus)
    if speed is not None:  # equal live speeds are equal GPUs, as eplb.plan takes them
        try:
            speed = planning_speeds(speed, None if active is None else active.bool())
        except ValueError as exc:
            raise CliError(str(exc).replace("gpu_speed:", "--gpu-speed:", 1)) from None
    if speed is not None and args.previous is not None and not equal_speeds(speed):
        # refused in the CLI's words before any reading (the API's named gpu_speed and
        # previous: new-user pass)
        raise CliError("--gpu-speed cannot be combined with --previous: incremental planning "
                       "plans for equal GPUs; plan without --previous for a fresh plan in time")
    refuse_forced_hierarchy(args.policy, active is not None and not bool(active.all()),
                            speed is not None)
    out = check_output(args.output, args.force)
    refuse_input_as_output(out, [*(("the loads file", path) for path in args.loads),
                                 ("--gpu-speed", args.gpu_speed), ("--routing", args.routing)])
    emit = infer_emit(args.emit, out)
    check_engine_output(args, emit, out)
    loads = " ".join(args.loads)
    trace = read_trace(args.loads, args)
    weight = trace.total()
    loaded = weight.sum(1) > 0  # [L] the loads' rows with load (weight may be cut to keep)
    warn_if_no_load(weight, loads)
    num_layers, num_experts = weight.shape
    check_topology(args.replicas, args.gpus, args.nodes, args.groups, num_experts,
                   num_layers)
    warn_guessed_experts(trace)
    if emit in ("sglang", "trtllm") and active is not None and not bool(active.all()):
        # refused before planning (and before any warning about the file it would be)
        raise CliError(dead_gpus_message(emit, (~active).nonzero().flatten().tolist(),
                                         args.gpus, args.replicas // args.gpus, num_experts))
    layer_ids = row_layer_ids(trace, args.first_layer, loads)
    # the model layer the --mtp-layers follow: the loads' last, even where --previous
    # leaves out an idle last row (the MTP layer took that row's id)
    last_layer = max(layer_ids)
    refuse_rows_past_model_layers(layer_ids, emit, loads)
    if args.mtp_layers and not 0 <= args.mtp_layers <= MAX_MODEL_LAYERS - 1 - last_layer:
        raise CliError(f"--mtp-layers must be in 0..{MAX_MODEL_LAYERS - 1 - last_layer} "
                       f"(model layers after the last row, {last_layer}, up to "
                       f"{MAX_MODEL_LAYERS - 1}), got {args.mtp_layers}")
    model_layers = engine_rows(args, emit, trace, layer_ids, loads)
    options: dict = {}
    if active is not None:
        options["active_gpus"] = active
    if speed is not None:
        options["gpu_speed"] = speed
    previous, kept_rows, inherited_ids = None, None, False
    if args.previous:
        previous, previous_meta = read_placement_meta(
            existing_file(args.previous, "previous placement"), num_gpus=args.gpus,
            num_nodes=args.nodes, num_groups=args.groups)
        recorded = previous.topology
        if (recorded.num_gpus, recorded.num_replicas) != (args.gpus, args.replicas):
            raise CliError(
                f"--previous {args.previous} was planned for {recorded.num_replicas} slots on "
                f"{recorded.num_gpus} GPUs; this plan is for {args.replicas} on {args.gpus}. "
                "Slots would be read as other GPUs': plan without --previous"
            )
        # e.g. an SGLang file (a row per model layer) and loads of the MoE layers, or a
        # YAML without the dense layers an SGLang dump has: the rows picked as eval does
        what, sglang = placement_name(previous_meta, f"--previous {args.previous}")
        previous, keep = rows_of_loads(previous, previous_meta.get("layer_ids"), trace, weight,
                                       args.first_layer, what, f"loads {loads}", sglang)
        if keep is not None:  # said by rows_of_loads: planning the other layers only
            weight, layer_ids, kept_rows = weight[keep], [layer_ids[i] for i in keep], keep
            num_layers = len(keep)
        recorded_ids = previous_meta.get("layer_ids")
        if emit == "trtllm" and recorded_ids:
            warn_dropped_mtp(recorded_ids, last_layer, args)
        if (not trace.meta.get("model_layer_ids") and args.first_layer is None
                and keep is None and recorded_ids and len(recorded_ids) == num_layers
                and emit in ("json", "pt")):
            # bare rows paired in order with a placement that names its layers: the plan's
            # rows are those layers (its file recorded none, and the next --previous or
            # eval then paired by row index only)
            layer_ids, inherited_ids = list(recorded_ids), True
        options["previous"] = previous
        warn_revived(previous, active, args)
        if (previous_meta.get("topology") and (args.nodes, args.groups) == (1, 1)
                and (recorded.num_nodes, recorded.num_groups) != (1, 1)):
            # a file that records several nodes or groups (eplb's, the YAML eplb writes)
            # re-planned without --nodes/--groups: the plan turns global and spreads every
            # group over the nodes, with no other sign of it
            warn(f"{args.previous} was planned for {recorded.num_nodes} node(s) and "
                 f"{recorded.num_groups} group(s) ({previous.policy}); this plan is for one "
                 f"node and one group: pass --nodes {recorded.num_nodes} --groups "
                 f"{recorded.num_groups} to keep planning for its cluster")
        recorded = previous_meta.get("gpu_speed")
        if recorded is not None and equal_speeds(recorded):
            recorded = None  # equal speeds (written by earlier eplb): equal GPUs
        if recorded is not None:
            # (--gpu-speed with --previous is refused: incremental plans are for equal
            # GPUs; the advice "pass --gpu-speed as it was" could not be followed)
            warn(f"{args.previous} was planned for unequal GPU speeds; this plan is for "
                 "equal GPUs (--previous plans for equal GPUs: plan without --previous, "
                 "with --gpu-speed, for a fresh plan in time)")
    warn_idle_engine_rows(emit, trace, weight, layer_ids, loads)
    if args.max_moves is not None:  # (with --previous: _refuse_flag_mistakes)
        options["max_moves"] = args.max_moves
    if args.move_price is not None:  # (with --previous: _refuse_flag_mistakes)
        options["move_price"] = args.move_price
    if args.drift is not None:  # (with --previous: _refuse_flag_mistakes)
        options["drift"] = args.drift

    dead = active is not None and not bool(active.all())
    policy = cli_policy(args.policy, args.replicas, args.gpus, args.nodes, args.groups,
                        num_experts, dead=dead, speeds=speed is not None)
    if args.dispatch == "nearest":  # refused by the API in its keywords' names
        check_nearest_flags(args, policy, num_experts, num_layers, dead)
    # read after the flags' checks, so a note on the trace never comes before their refusal
    options.update(dispatch_options(args, trace.num_layers, num_experts, kept_rows, loaded))
    if options.get("dispatch") == "nearest" and args.policy == "auto" and policy == "hierarchical":
        warn("--policy auto plans hierarchically (groups on several nodes), which keeps each "
             "group on one node but balances far worse under --dispatch nearest than "
             "--policy global (0.75-0.89 against 0.997 on real DeepSeek-V3 loads, "
             "BENCHMARKS.md §14): pass --policy global for balance, or --policy hierarchical "
             "to keep the groups together")
    placement, drawn, seconds = plan_nearest(
        args, policy, emit, options, lambda **kw: plan(
            weight, args.replicas, args.gpus, args.nodes, args.groups, policy=policy,
            seed=args.seed, **kw), weight)
    placement.validate()
    # one node, nearest, every GPU live: what SGLang's runtime rebalancing table serves
    runtime = (split_draw_balancedness(weight, placement.phy2log, args.gpus)
               if args.dispatch == "nearest" and args.nodes <= 1
               and placement.active_gpus is None else None)
    split = None
    # the forced moves told apart from the others, where the planner takes a budget
    # (attacker pass: a split of 0 forced read as if it did where it takes none)
    if previous is not None and takes_budget(args.dispatch, args.nodes, placement.policy,
                                             dead):
        split = split_moves((lambda: plan(
            weight, args.replicas, args.gpus, args.nodes, args.groups, policy=policy,
            seed=args.seed, **{**options, "max_moves": 0}))
            if may_force(previous, placement, args) else None, previous, placement,
            weight)
    # eplb's own files record layer ids only where the loads or --first-layer named them:
    # a row index is no claim (eval and --previous then pair rows in order)
    named = (bool(trace.meta.get("model_layer_ids")) or args.first_layer is not None
             or inherited_ids)
    if speed is not None and emit in ("sglang", "trtllm"):
        warn(f"the {emit} file cannot record --gpu-speed: eval scores it as equal GPUs unless "
             "given --gpu-speed again")
    written, written_ids = placement, layer_ids
    if args.mtp_layers:
        written, written_ids = with_mtp_layers(placement, layer_ids, last_layer, args)
    write_placement(written, out, emit=emit, weight=weight,
                    layer_ids=written_ids if named or emit in ("trtllm", "sglang") else None,
                    num_model_layers=model_layers,
                    gpu_speed=speed if emit in ("json", "pt") else None,
                    dispatch=args.dispatch if emit in ("json", "pt") else None, force=args.force)

    live = placement.live_gpus()
    # no rebalancing, scored as the plan is (in time where GPU speeds are given)
    _, before, before_worst = load_balance(static_gpu_loads(weight, args.gpus), None, speed)
    after_loads = placement.scaled_gpu_loads(weight)
    if args.dispatch == "nearest" and args.nodes > 1:  # as SGLang's rule will realise it
        # (for ratios: scaled as scaled_gpu_loads scales, so huge loads sum finitely)
        after_loads = realised_gpu_loads(scale_free(weight), placement.phy2log, args.gpus,
                                         args.nodes, active_gpus=placement.active_gpus)
    _, after, after_worst = load_balance(after_loads, live, speed)
    if (drawn is not None and args.dispatch != "nearest" and previous is None
            and drawn < after - 0.01):
        # one node (several: warned above): the ranks' own fair draws serve an even-split
        # file well below its even-split figure, which alone led (new-user pass: 0.8805
        # beside 0.9996 on the real prefill_in4096 at 32 GPUs, and no word of what to do).
        # Not with --previous: a plan from it is not made for those draws (0.8905 with
        # --dispatch nearest against 0.8918 without, on the real prefill_in2048)
        warn(f"SGLang's --ep-dispatch-algorithm static serves this file at {drawn:.4f} (each "
             f"rank's own fair draw, eplb's model), not {after:.4f}: for static dispatch plan "
             "with --dispatch nearest; this plan is for an even split (SGLang's dynamic "
             "dispatch)")
    policy = placement.policy
    ceil = ceiling(weight, args.replicas, args.gpus, args.nodes, args.groups, policy,
                   active=placement.active_gpus, speed=speed is not None)
    moved = in_force = in_force_worst = None
    if previous is not None:
        moved = placement.moved_slots(previous)
        in_force_loads = previous.scaled_gpu_loads(weight)
        if args.dispatch == "nearest" and args.nodes > 1:  # scored as "after" is
            in_force_loads = realised_gpu_loads(scale_free(weight), previous.phy2log,
                                                args.gpus, args.nodes,
                                                active_gpus=previous.active_gpus)
        # scored on the cluster the plan is for, as "after" is: a GPU live again counts,
        # idle under the old map, and one dead since still carries the old map's load. On
        # the old map's live GPUs alone it looked balanced, and the plan seemed to worsen it
        in_force_live = previous.live_gpus().to(live.device) | live
        _, in_force, in_force_worst = load_balance(in_force_loads, in_force_live, speed)
        warn_forced_moves(previous, placement, moved, split, args, weight)
    # the map in force under the runtime table too: what the plan was chosen against
    runtime_in_force = (split_draw_balancedness(weight, previous.phy2log, args.gpus)
                        if runtime is not None and previous is not None
                        and previous.active_gpus is None else None)
    # --routing (the locality policy): the traffic it trades, of the plan and the map in force
    remote = remote_nodes(options, placement)
    remote_in_force = remote_nodes(options, previous, args.nodes)  # (on this plan's nodes)
    summary = {
        "output": str(out),
        "emit": emit,
        "layers": num_layers,
        "steps_summed": trace.num_steps,
        "experts": num_experts,
        "layer_ids": layer_ids,
        # the TensorRT-LLM file's multi-token-prediction layers after them (--mtp-layers)
        "mtp_layer_ids": written_ids[len(layer_ids):],
        "model_layers": model_layers,
        "topology": placement.topology.as_dict(),
        "policy": policy,
        "dispatch": args.dispatch,
        # an SGLang file on one node: each rank's own draw, as from the file (or None)
        "balancedness_rank_draws": drawn,
        # one node, nearest: SGLang's runtime rebalancing table, eplb's model (or None)
        "balancedness_runtime_table": runtime,
        "balancedness_runtime_table_in_force": runtime_in_force,
        "plan_seconds": seconds,
        "balancedness_before": before,
        "balancedness_in_force": in_force,
        "balancedness_after": after,
        "balancedness_ceiling": ceil.overall,
        "worst_max_over_mean_before": before_worst,
        "worst_max_over_mean_after": after_worst,
        "worst_max_over_mean_in_force": in_force_worst,  # --previous, as its table row
        "remote_nodes_per_token": remote,  # --routing: eval --routing's figure
        "remote_nodes_per_token_in_force": remote_in_force,
        "dead_gpus": dead_gpu_ids(active),
        "moved_slots_total": None if moved is None else int(moved.sum()),
        "moved_slots_max_layer": None if moved is None else int(moved.max()),
        # of moved_slots_total: those the map in force forced (made whatever --max-moves
        # says; those in rows with no load apart too), and the rest (--max-moves caps them)
        **(split.summary() if split is not None else {
            "moved_slots_forced": None, "moved_slots_forced_no_load": None,
            "moved_slots_beyond_forced": None}),
    }
    if args.json:
        print_json(summary)
        return 0
    rows = [[f"no rebalancing (before{as_serving(active)})", before, before_worst]]
    if in_force is not None:
        rows.append([f"in force (--previous{as_serving(active, previous.live_gpus())})",
                     in_force, in_force_worst])
    expectation = ", in expectation" if drawn is not None and args.dispatch == "nearest" else ""
    rows += [
        [f"eplb {policy} (after{', nearest rule' if args.dispatch == 'nearest' else ''}"
         f"{expectation})", after, after_worst],
        *([["SGLang's static dispatch from this file (each rank's own draw, eplb's model)",
            drawn, None]] if drawn is not None else []),
        *([["SGLang's runtime rebalancing table (one stream, eplb's model)", runtime, None]]
          if runtime is not None else []),
        *([["  the map in force under that table (--previous)", runtime_in_force, None]]
          if runtime_in_force is not None else []),
        ["ceiling (upper bound)", ceil.overall, ceil.worst],
    ]
    idle = int((weight.sum(1) == 0).sum())  # a dump's dense layers: planned, kept as rows
    print_table(
        f"{num_layers} layer{'s' if num_layers != 1 else ''}"
        f"{f' ({idle} all-zero)' if idle else ''} × {num_experts} experts"
        f"{summed_note(trace)} -> {args.replicas} slots on {args.gpus} GPUs"
        f"{cluster_note(args.nodes, args.groups)} ({policy}{dead_note(active)})",
        ["placement", "balancedness", "worst max/mean"], rows,
    )
    if remote is not None:
        print(f"remote nodes per token (--routing trace): {remote:.4f}"
              + ("" if remote_in_force is None else f" (in force: {remote_in_force:.4f})"))
    if moved is not None:
        parts = "" if split is None else split.parts()
        print(f"moved {counted(int(moved.sum()), 'slot')} in total{parts}, at most "
              f"{int(moved.max())} in one layer")
    if ceil.note and ceil.overall is None:
        print(f"({ceil.note})")
    written = f"{emit}, {model_layers} model layers" if model_layers is not None else emit
    if args.mtp_layers:
        mtp = range(last_layer + 1, last_layer + 1 + args.mtp_layers)
        written += (f", multi-token-prediction layer{'s' if len(mtp) > 1 else ''} "
                    f"{integer_runs(mtp)} spread evenly")
    skips_layers = len(set(layer_ids)) <= max(layer_ids) - min(layer_ids)
    if (model_layers is not None and args.num_model_layers is None
            and (not trace.meta.get("model_layer_ids") or skips_layers)):
        # bare rows, or rows that skip layers (Mixtral's published counts: 0, 7, 15 of 32):
        # the layers after the last row are the user's to say (SGLang does not compare the
        # rows with its model's layers; new-user passes)
        written += (f", 0..{model_layers - 1}: give --num-model-layers N where the model has "
                    "more")
    split_time = (f" (and {split.seconds * 1e3:.1f} ms for the forced moves alone, to tell "
                  "them apart)" if split is not None and split.seconds else "")
    print(f"planned in {seconds * 1e3:.1f} ms{split_time}; wrote {out} ({written})")
    return 0


def _refuse_flag_mistakes(args: argparse.Namespace) -> None:
    """The flag mistakes that need no file, before any file is read or an existing
    output reported (new-user and attacker passes: "already exists; pass --force" came
    first, and the real mistake only once the user had cleared the output)."""
    check_topology(args.replicas, args.gpus, args.nodes, args.groups, 0)
    check_reading_options(args)
    for flag, value in (("--max-moves", args.max_moves), ("--move-price", args.move_price),
                        ("--drift", args.drift)):
        if value is not None and not args.previous:
            raise CliError(f"{flag} needs --previous (the placement in service)")
    if args.routing_key is not None and args.routing is None:
        # (new-user pass: alone, it was ignored wherever the dispatch was even)
        raise CliError("--routing-key needs --routing FILE")
    nearest_only = {"--fair": args.fair != "auto", "--slack": args.slack is not None,
                    "--routing": args.routing is not None,
                    "--policy locality": args.policy == "locality"}
    if args.slack is not None and args.policy != "locality":
        # checked first: told to add --dispatch nearest alone, the user was then told to
        # add --policy locality (new-user pass)
        also = "" if args.dispatch == "nearest" else " --dispatch nearest"
        raise CliError(f"--slack is the locality policy's knob: add --policy locality{also}")
    if args.dispatch != "nearest":
        given = [flag for flag, on in nearest_only.items() if on]
        if given:
            raise CliError(f"{', '.join(given)} {'describe' if len(given) > 1 else 'describes'} "
                           "SGLang's nearest dispatch: add --dispatch nearest")
        return
    if args.gpu_speed:
        raise CliError("--gpu-speed cannot be combined with --dispatch nearest")
    if args.routing is not None and args.policy != "locality":
        # before the policy is worked out (auto is never locality): a warning on it came
        # first, then this refusal, a two-line error (attacker pass, with --dead-gpus)
        raise CliError(f"--routing gives the locality policy its co-selection statistics, "
                       f"and --policy {args.policy} plans without them: add --policy "
                       "locality, or drop --routing")


def rows_of_loads(placement: Placement, placement_ids: list[int] | None, trace: LoadTrace,
                  weight: torch.Tensor, first_layer: int | None, what: str,
                  loads: str, sglang: bool = False) -> tuple[Placement, list[int] | None]:
    """The rows of ``placement`` that the loads' rows are (``eval``, ``plan --previous``),
    and the loads' rows to keep (``None``: all).

    Rows are matched by model layer where both sides say which layers they are: the loads
    by their own ids or ``--first-layer K`` (the model layer of their first row, as in
    ``plan``), the placement by the ids it records (eplb's files, TensorRT-LLM YAML), else
    by row index where it has more rows than the loads (an SGLang file has a row per
    model layer). Loads rows of layers the placement lacks are left out when they carry no
    load (the dense layers of an SGLang dump). A placement without ids and with as many
    rows as the loads (after leaving out their all-zero rows, if that is what it takes)
    is paired in order; so is one whose ids do not match the loads' own ids, with a
    warning, but ids that ``--first-layer K`` gives the loads are the user's claim and a
    placement whose ids contradict them is refused. ``what`` and ``loads`` name the two
    in messages; ``sglang``: the placement is an SGLang file, whose rows SGLang reads as
    model layers 0.., so pairing them in order with loads that name other layers is said
    (a file shorter than the model is not SGLang's own: such files were paired in order
    and still are, as a second attacker pass asked)."""
    rows = weight.shape[0]
    num_rows = placement.num_layers
    idle = (weight <= 0).all(1)
    keep = None
    named = bool(trace.meta.get("model_layer_ids")) or first_layer is not None
    # an SGLang file's row r is model layer r: loads that name exactly its layers, in
    # another order (a {"counts", "layers"} record, a CSV's layer column), pair by layer;
    # in order they paired layer 2's loads with layer 0's row without a word
    by_index = (named and placement_ids is None and num_rows == rows
                and sorted(row_layer_ids(trace, first_layer, loads)) == list(range(rows)))
    if not named or (placement_ids is None and num_rows <= rows and not by_index):
        # in order: loads that do not name their layers, or a placement whose row index
        # is no claim about layers; the loads' rows that carry load where that makes the
        # counts agree (a dump's dense rows left out)
        if placement_ids is None and rows > num_rows and rows - int(idle.sum()) == num_rows:
            keep = (~idle).nonzero()[:, 0].tolist()
        if sglang and named:
            ids = row_layer_ids(trace, first_layer, loads)
            paired = ids if keep is None else [ids[i] for i in keep]
            if paired != list(range(num_rows)):
                warn(f"{what} has {num_rows} rows, which SGLang reads as model layers "
                     f"0..{num_rows - 1}; {loads} name model layers {integer_runs(paired)}: "
                     "pairing their rows in order")
    else:
        ids = row_layer_ids(trace, first_layer, loads)
        have = list(placement_ids) if placement_ids is not None else list(range(num_rows))
        row_of = {layer: row for row, layer in enumerate(have)}
        absent = [i for i, layer in enumerate(ids) if layer not in row_of]
        if absent and bool(idle[absent].all()) and len(absent) < rows:
            left_out = set(absent)
            keep = [i for i in range(rows) if i not in left_out]
            absent = []
        if not absent:
            picked = [row_of[ids[i]] for i in (range(rows) if keep is None else keep)]
            if picked != list(range(num_rows)):
                placement = select_rows(placement, picked)
        elif num_rows == rows and first_layer is not None:
            # --first-layer is the user's word on the loads' layers, as in plan: one the
            # placement's recorded layers contradict is refused, not paired in order
            consecutive = list(range(have[0], have[0] + num_rows))
            hint = (f"pass --first-layer {have[0]} if the loads' first row is model layer "
                    f"{have[0]}, or drop --first-layer to pair the rows in order"
                    if have == consecutive else "drop --first-layer to pair the rows in order")
            raise CliError(f"--first-layer {first_layer} puts {loads} on model layers "
                           f"{integer_runs(ids)}, but {what} holds model layers "
                           f"{integer_runs(have)}: {hint}")
        elif num_rows == rows:
            warn(f"{what} holds model layers {integer_runs(have)} and {loads} layers "
                 f"{integer_runs(ids)}; pairing their rows in order")
        else:
            where = (f"it holds model layers {integer_runs(sorted(have))}"
                     if placement_ids is not None
                     else f"it records no layer ids, so its rows are read as model layers "
                     f"0..{num_rows - 1}")
            hint = (" (--first-layer K is the model layer of the loads' first row)"
                    if first_layer is not None else "")
            raise CliError(f"{what} has no rows for model layers "
                           f"{integer_runs([ids[i] for i in absent])} of {loads}: {where}{hint}")
    if keep is not None:
        kept_set = set(keep)
        dropped = [i for i in range(rows) if i not in kept_set]
        warn(f"{loads}: rows {integer_runs(dropped)} saw no tokens and {what} has no rows for "
             f"them: left out")
    kept = rows if keep is None else len(keep)
    if (kept, weight.shape[1]) != (placement.num_layers, placement.num_experts):
        hint = ""
        if kept < placement.num_layers and weight.shape[1] == placement.num_experts:
            # (its layers say which K: a TensorRT-LLM file from loads without layer ids
            # and --mtp-layers holds rows 0.. and its MTP layers, so K is 0 there)
            held = ("" if placement_ids is None
                    else f" (it holds model layers {integer_runs(sorted(placement_ids))})")
            hint = (f"{held}; if the loads are its model layers K and on (e.g. the MoE layers "
                    "of an SGLang file), pass --first-layer K")
        # the placement's own layer count, not that of the rows picked for the loads'
        # layers (new-user pass: OLMoE's layers 0, 7 and 15 against a 61-layer
        # DeepSeek-V3 file said "has 3 × 256", hiding that only the experts differ)
        raise CliError(
            f"{loads} have {rows} layers × {weight.shape[1]} experts but {what} has "
            f"{num_rows} × {placement.num_experts}{hint}"
        )
    return placement, keep


def select_rows(placement: Placement, rows: list[int]) -> Placement:
    """``placement`` cut to its layers ``rows`` (in that order), cluster, policy and live
    GPUs kept."""
    picked = placement.phy2log[torch.tensor(rows, dtype=torch.long)]
    return Placement.from_phy2log(picked, placement.num_experts, placement.topology,
                                  placement.policy, placement.active_gpus)
