"""``eplb simulate`` and ``eplb generate``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from eplb.cli._checks import (
    check_nearest_moves,
    check_output,
    check_topology,
    default_shape,
)
from eplb.cli._common import (
    FORCED_MOVES,
    CliError,
    cluster_note,
    info,
    is_tty,
    prepare_report,
    print_json,
    print_table,
    progress,
    say_written,
)
from eplb.cli._initial import initial_placement
from eplb.cli._inputs import (
    all_zero_rows_note,
    check_reading_options,
    cli_policy,
    read_trace,
    trace_routing,
    warn,
    warn_guessed_experts,
)
from eplb.core import LoadTrace, Placement
from eplb.core.messages import counted
from eplb.formats import write_loads
from eplb.formats._files import name_suffix
from eplb.formats.trace_writer import (
    FORMAT_BY_SUFFIX,
    SUFFIX_BY_FORMAT,
    format_for,
    sglang_pt_refusal,
)
from eplb.tools.generator import PRESETS, check_trace_size, generate_trace, resolve_shape
from eplb.tools.report import Report, plot_balancedness_over_time
from eplb.tools.simulate import (
    CADENCES,
    DEEPSEEK_V3_EXPERT_BYTES,
    Cadence,
    SimulationResult,
    simulate,
)

#: what a replay under nearest dispatch on one node scores (tools.scoring.Realised)
ONE_NODE_REPLAY = (
    "--dispatch nearest with one node: every replica is on the token's node, and a GPU "
    "without a replica of an expert sends its tokens to one SGLang picks at random; every "
    "plan is scored by the table SGLang builds at a runtime rebalance (--enable-eplb), one "
    "draw of those picks per rebalance that changes the map (eplb's model of that table: "
    "BENCHMARKS.md §14)")

#: the ADRS benchmark's window (and interval), where --protocol adrs is given alone
ADRS_WINDOW = CADENCES["adrs"].window
PLANNER_LABEL = {"none": "no rebalancing", "greedy": "reference greedy", "eplb": "eplb"}


def run_simulation(trace: LoadTrace, planner: str, *, replicas: int, gpus: int, nodes: int = 1,
                   groups: int = 1, window: int, interval: int, score_window: int | None = None,
                   estimator: str | None = None, incremental: bool = False,
                   max_moves: int | None = None, policy: str = "auto", seed: int = 0,
                   oracle: bool = True, move_price: float | None = None,
                   drift: float | None = None, slack: float | None = None,
                   routing: list[torch.Tensor] | None = None,
                   initial: Placement | None = None,
                   expert_bytes: int = DEEPSEEK_V3_EXPERT_BYTES,
                   dispatch: str = "even") -> SimulationResult:
    """One :func:`eplb.tools.simulate.simulate` replay with a custom cadence; every
    planner's plans are scored as ``dispatch`` serves them (eplb plans for it)."""

    options = {}
    if planner == "eplb":
        options = {"policy": policy, "seed": seed}
        if move_price is not None:
            options["move_price"] = move_price
        if drift is not None:
            options["drift"] = drift
        if slack is not None:
            options["slack"] = slack
        if dispatch != "even":
            options["dispatch"] = dispatch
    elif planner == "greedy" and policy not in ("auto", "locality"):
        # a forced policy holds for the reference too (its "auto" is DeepSeek's own rule,
        # which it keeps beside the locality policy: it has none)
        options = {"policy": policy}
    return simulate(
        trace, planner, num_replicas=replicas, num_gpus=gpus, num_nodes=nodes,
        num_groups=groups, cadence=Cadence(window, interval, score_window),
        # (only an absent --estimator means the window sum: '' is refused by name)
        estimator="sum" if estimator is None else estimator, incremental=incremental,
        max_moves=max_moves, oracle=oracle, expert_bytes=expert_bytes,
        score_dispatch=dispatch, routing=routing, initial=initial, **options,
    )


def replay_windows(trace: LoadTrace, window: int, replicas: int, gpus: int, *,
                   seed: int = 0) -> dict:
    """The ADRS protocol for the demo: plan on window ``i``, score on window ``i + 1``.

    Returns ``{"window", "windows", "replicas", "gpus", "policy", "scored": [index of each
    scored window], "series": {label: [balancedness per scored window]}}``: windows that
    route no token are left out (as the means leave them out), so ``scored`` says which
    windows the values are. Every planner plans globally (one node, no groups); the
    cluster and policy are returned so that the demo's heading can say so.
    """
    series = {}
    num_windows = trace.num_steps // window
    scored: list[int] = []
    for planner in ("none", "greedy", "eplb"):
        result = run_simulation(trace, planner, replicas=replicas, gpus=gpus, window=window,
                                interval=window, score_window=window, seed=seed, oracle=False)
        bal = result.window_balancedness[result.scored]  # windows without tokens left out
        series[PLANNER_LABEL[planner]] = [float(x) for x in bal]
        # the same windows for every planner: they depend on the trace and the cadence
        scored = result.scored.nonzero()[:, 0].tolist()
    return {"window": window, "windows": num_windows, "replicas": replicas, "gpus": gpus,
            "policy": "global", "scored": scored, "series": series}


def _short_steps(trace: LoadTrace, tokens_per_step: int | None) -> str:
    """A note naming the steps of a top-k trace cut by ``--tokens-per-step`` that hold
    fewer tokens (each array's last): they count as whole steps, lightly loaded (found
    by a new-user pass: 8327 tokens cut into 256s made 33 steps, the last of 135)."""
    tokens = trace.meta.get("step_tokens") or []
    if trace.format != "topk" or tokens_per_step is None:
        return ""
    short = [(step, n) for step, n in enumerate(tokens) if n < tokens_per_step]
    if not short:
        return ""
    listed = ", ".join(f"step {step}: {n}" for step, n in short[:3])
    more = f" and {len(short) - 3} more" if len(short) > 3 else ""
    verb = "holds" if len(short) == 1 else "hold"
    return (f"note: {len(short)} of {len(tokens)} steps {verb} fewer than --tokens-per-step "
            f"{tokens_per_step} tokens ({listed}{more}; each array's last step)")


def cmd_simulate(args: argparse.Namespace) -> int:
    files, args.trace = args.trace, " ".join(args.trace)  # several: steps, as in plan
    window_name, interval_name = "--window", "--interval"  # (or --cadence's, below)
    if args.cadence is not None:
        if args.protocol is not None:
            raise CliError(f"--cadence {args.cadence} and --protocol {args.protocol} each name a "
                           "cadence: give one")
        engine = CADENCES[args.cadence]  # the engine's defaults, where not given
        # the flags a message may name are the cadence's where not given (attacker pass:
        # "--interval 3000" named a flag the user never passed)
        if args.window is None:
            window_name = f"--cadence {args.cadence}'s window"
        if args.interval is None:
            interval_name = f"--cadence {args.cadence}'s interval"
        args.window = engine.window if args.window is None else args.window
        args.interval = engine.interval if args.interval is None else args.interval
    if args.window is None:
        if args.protocol != "adrs":
            raise CliError("simulate needs --window W (steps per window; --cadence vllm or "
                           f"sglang gives the engine's, --protocol adrs uses {ADRS_WINDOW} "
                           "when it is left out)")
        args.window = ADRS_WINDOW  # the ADRS benchmark's cadence
    if args.window < 1:
        raise CliError("--window must be >= 1")
    if args.interval is not None and args.interval < 1:
        raise CliError("--interval must be >= 1")
    interval = args.window if args.interval is None else args.interval
    score_window = args.window if args.protocol == "adrs" else None
    if args.protocol == "adrs":
        if args.interval is not None and args.interval != args.window:
            raise CliError(f"--protocol adrs rebalances every --window steps (plan on window "
                           f"i, score on window i + 1): --interval {args.interval} cannot apply "
                           f"with --window {args.window}; leave --interval out")
        interval = args.window  # plan on window i, score on window i + 1
    if ((args.incremental or args.max_moves is not None or args.move_price is not None
         or args.drift is not None) and args.planner != "eplb"):
        raise CliError("--incremental, --max-moves, --move-price and --drift need --planner "
                       "eplb")
    for flag, value in (("--max-moves", args.max_moves), ("--move-price", args.move_price),
                        ("--drift", args.drift)):
        if value is not None and not args.incremental:
            raise CliError(f"{flag} needs --incremental")
    if args.slack is not None and args.policy != "locality":
        raise CliError("--slack is the locality policy's knob: add --policy locality"
                       + ("" if args.dispatch == "nearest" else " --dispatch nearest"))
    if args.policy == "locality" and args.dispatch != "nearest":
        raise CliError("--policy locality plans for SGLang's nearest dispatch: add "
                       "--dispatch nearest")
    if args.planner == "none":
        # as --incremental: a flag no run would use is refused, not dropped without a word
        # (the estimator is the chosen planner's alone, even with --compare; a policy
        # holds for the planners --compare adds)
        unused = [flag for flag, given in (
            ("--estimator", args.estimator is not None),
            ("--policy", args.policy != "auto" and not args.compare),
            ("--slack", args.slack is not None and not args.compare)) if given]
        if unused:
            raise CliError(f"{' and '.join(unused)} shape{'s' if len(unused) == 1 else ''} "
                           "what a planner plans on, and --planner none never plans: give "
                           "--planner eplb" + ("" if args.policy == "locality" else
                                               " (or greedy)")
                           + f", or leave {' and '.join(unused)} out")
    if args.planner == "greedy" and args.policy == "locality" and not args.compare:
        # the greedy has no locality policy: it ran DeepSeek's own rule, --policy and
        # --slack dropped without a word (attacker pass); beside eplb (--compare) it is
        # the reference as it stands
        raise CliError("--policy locality" + (" and --slack are" if args.slack is not None
                                              else " is") + " eplb's: the greedy reference "
                       "has no locality policy (it keeps DeepSeek's own rule): give --planner "
                       "eplb, or --compare to see both")
    # (new-user pass: every model's moves were counted in DeepSeek-V3's bytes)
    expert_bytes = (DEEPSEEK_V3_EXPERT_BYTES if args.expert_bytes is None
                    else args.expert_bytes)
    check_reading_options(args)  # before an existing report is named
    report = prepare_report(args.report, args.force, "eplb simulation")
    trace = read_trace(files, args)
    short = _short_steps(trace, args.tokens_per_step)
    if short and not args.json:
        info(short)
    # a dump's dense layers (all zero in every step, as SGLang writes DeepSeek's 0..2) hold
    # no experts: replayed, their even placement replaced the trivial one at the first
    # rebalance and counted as moved expert weights. As bench does, they are left out
    left_out = []
    read = trace
    if bool(trace.counts.any()):  # an all-zero trace keeps its rows (warned of elsewhere)
        kept = trace.drop_empty_layers()
        left_out = [lid for lid in trace.layer_ids if lid not in set(kept.layer_ids)]
        trace = kept
    routing = trace_routing(files, args, read, trace)
    replicas, gpus = default_shape(trace.num_experts, args.gpus, args.replicas)
    check_topology(replicas, gpus, args.nodes, args.groups, trace.num_experts,
                   trace.num_layers)
    initial = initial_placement(args, trace, replicas, gpus)
    # before the warnings on the cluster and dispatch: a refusal stays one line (attacker
    # pass: --cadence vllm's 6000 steps refused a short trace after the one-node warning)
    needed = max(2 * args.window, interval + (score_window or interval))
    if trace.num_steps < needed:
        have = counted(trace.num_steps, "step")
        where = (f"--step-range {args.step_range} keeps {have} of {args.trace}"
                 if getattr(args, "step_range", None) is not None
                 else f"{args.trace} has {have}")
        raise CliError(f"{where}; the simulation needs at "
                       f"least {needed}: the first rebalance comes after "
                       f"{interval_name} {interval} "
                       f"steps and is scored on the {score_window or interval} after it, and "
                       f"the steps must hold two windows (2 × "
                       f"{window_name} {args.window})"
                       + (f"; a top-k routing trace is one step per array unless "
                          f"--tokens-per-step N cuts it (it holds "
                          f"{sum(trace.meta.get('step_tokens', ()))} tokens)"
                          if trace.format == "topk" and args.tokens_per_step is None else ""))
    # as plan and bench: --nodes/--groups that cannot be honoured warn once, by flag
    policy = cli_policy(args.policy, replicas, gpus, args.nodes, args.groups,
                        trace.num_experts)
    if args.dispatch == "nearest":
        # as plan refuses them, by flag (the Rebalancer's refusal named the API's keywords,
        # after a warning that suggested another policy the budget cannot hold either)
        check_nearest_moves(args, policy)
    if args.dispatch == "nearest" and args.nodes <= 1 and gpus > 1:
        # (one GPU serves every token itself: no pick, no table, nothing to warn of)
        warn(ONE_NODE_REPLAY)
    if args.dispatch == "nearest" and args.policy == "auto" and policy == "hierarchical":
        # as plan warns (new-user pass: 0.71 against 0.79 with --policy global, silently)
        warn("--policy auto plans hierarchically (groups on several nodes), which balances "
             "far worse under --dispatch nearest than --policy global: pass --policy global "
             "for balance, or --policy hierarchical to keep the groups together")
    warn_guessed_experts(trace)  # (once the replay will run: a refusal stays one line)
    planners = [args.planner]
    if args.compare:
        planners += [p for p in ("none", "greedy", "eplb") if p != args.planner]
    results = []
    with progress("simulating", len(planners), enabled=not args.json) as advance:
        for planner in planners:
            own = planner == args.planner
            results.append(run_simulation(
                trace, planner, replicas=replicas, gpus=gpus, nodes=args.nodes,
                groups=args.groups, window=args.window, interval=interval,
                score_window=score_window, estimator=args.estimator if own else None,
                incremental=args.incremental and own, max_moves=args.max_moves if own else None,
                policy=policy, seed=args.seed, expert_bytes=expert_bytes,
                move_price=args.move_price if own else None,
                drift=args.drift if own else None, slack=args.slack,
                dispatch=args.dispatch, routing=routing, initial=initial))
            advance()

    written: list[Path] = []
    if report is not None:
        _simulation_report(report, args, results, trace, (replicas, gpus, expert_bytes))
        written = report.write(args.report, force=args.force)
    if args.json:
        print_json({"trace": str(args.trace), "layers_left_out": left_out,
                    "dispatch": args.dispatch,
                    "runs": [r.to_dict() for r in results],
                    "report": [str(p) for p in written]})
        return 0
    cad = results[0].cadence
    cluster = cluster_note(args.nodes, args.groups)
    print_table(
        f"{args.trace}{all_zero_rows_note(len(left_out))}: {counted(trace.num_steps, 'step')}, "
        f"{counted(trace.num_layers, 'layer')} × {trace.num_experts} "
        f"experts on {replicas} slots / {gpus} GPUs{cluster}{f' ({policy})' if cluster else ''}"
        f"; plan on {counted(cad.window, 'step')} every "
        f"{cad.interval}, scored in windows of {cad.scoring}"
        + ("" if args.dispatch == "even" else " as SGLang's nearest dispatch serves them"),
        _summary_headers(results), _summary_rows(results))
    # the short headers need their meaning: which figure counts, and what 'moved' counts
    print(_column_notes(args, trace, replicas, gpus, expert_bytes,
                        any(r.remote_counted for r in results)))
    if args.max_moves is not None:
        for r in results:
            per = r.moved_slots.sum(1).tolist()
            over = [i for i, moved in enumerate(per) if moved > args.max_moves]
            if r.incremental and over:  # the mean above hides them
                print(f"forced moves: {len(over)} of {len(per)} rebalances moved more than "
                      f"--max-moves {args.max_moves} (the first: {per[over[0]]} slots at "
                      f"rebalance {over[0] + 1}); whatever the budget, eplb moves "
                      f"{FORCED_MOVES}")
    idle = results[0].summary()["idle_steps"]
    if idle:  # they read as balanced: say why the means leave them out
        print(f"idle steps: {idle} of {trace.num_steps} route no token (no MoE time); the "
              "means leave them, and windows of them alone, out")
    if written:
        say_written(written)
    return 0


#: the columns of simulate's table, on the terminal and in its report
SUMMARY_HEADERS = ["planner", "window bal", "step bal", "oracle", "rebalances", "moved/rebal",
                   "GB/rebal", "GB/GPU", "plan ms"]


def _summary_headers(results: list[SimulationResult]) -> list[str]:
    """:data:`SUMMARY_HEADERS`, and "remote/token" where the runs model cross-node
    traffic (nearest dispatch on several nodes)."""
    traffic = any(r.remote_nodes is not None for r in results)
    return SUMMARY_HEADERS + (["remote/token"] if traffic else [])


def _summary_rows(results: list[SimulationResult]) -> list[list[object]]:
    """One row of :func:`_summary_headers` per run (balancedness as floats, the rest as
    text, ``None`` where a figure does not apply)."""
    traffic = any(r.remote_nodes is not None for r in results)
    rows: list[list[object]] = []
    for r in results:
        s = r.summary()
        label = PLANNER_LABEL.get(r.planner, r.planner)
        if r.incremental:
            label += " (incremental)"
        if s.get("estimator") not in (None, "sum"):  # the window sum is the default
            label += f", {s['estimator']}"
        rows.append([label, s["window_balancedness"], s["step_balancedness"],
                     s["oracle_balancedness"], s["rebalances"],
                     None if s["moved_slots_per_rebalance"] is None
                     else f"{s['moved_slots_per_rebalance']:.0f}",
                     # two decimals as GB/GPU: a total must not read below its part
                     None if s["moved_gb_per_rebalance"] is None
                     else f"{s['moved_gb_per_rebalance']:.2f}",
                     # every GPU copies at once: the busiest sets the stall
                     None if s["busiest_gpu_gb_per_rebalance"] is None
                     else f"{s['busiest_gpu_gb_per_rebalance']:.2f}",
                     None if s["plan_ms_median"] is None else f"{s['plan_ms_median']:.1f}"])
        if traffic:
            remote = s.get("remote_nodes_per_token")
            rows[-1].append(None if remote is None else f"{remote:.3f}")
    return rows


def _column_notes(args: argparse.Namespace, trace: LoadTrace, replicas: int, gpus: int,
                  expert_bytes: int, counted: bool = False) -> str:
    """What each of :func:`_summary_headers` counts (printed under the table, and in the
    report)."""
    return ("window bal / step bal: mean balancedness (Σ mean / Σ max GPU load, 1.0 is "
            "perfect)\n  of the scoring windows / of single steps, from the first rebalance on;\n"
            "oracle: the same planner given the scored window itself, a fresh plan even with "
            "--incremental\n  (foresight, not a bound);\n"
            "moved/rebal: slots whose expert changed per rebalance, of "
            f"{trace.num_layers * replicas} ({trace.num_layers} layers × {replicas} slots);\n"
            f"GB/rebal, GB/GPU: the expert weights they copy, in all and into the busiest "
            f"of the {gpus} GPUs\n  (every GPU copies at once: the busiest sets the stall), at "
            f"{expert_bytes:,} bytes per expert"
            + ("" if args.expert_bytes is not None
               else " (DeepSeek-V3 in FP8; --expert-bytes for another model)"
               if trace.num_experts == 256
               else f" (DeepSeek-V3's 256 experts in FP8, but this trace has "
                    f"{trace.num_experts}: give --expert-bytes for your model)")
            + (";\nremote/token: distinct remote nodes a token's experts reach per MoE layer, "
               + ("counted from the trace's\n  own tokens under the nearest rule, as eplb "
                  "eval --routing counts them" if counted else
                  "modelled from the loads\n  and the groups (DeepSeek-V3's routing: 8 "
                  "experts of half the groups), as the locality policy\n  plans with it (a "
                  "model, not counted tokens: a top-k trace's own are counted)")
               if args.dispatch == "nearest" and args.nodes > 1 else "")
            # (new-user pass: under --policy locality the greedy row changed policy unsaid)
            + (";\nreference greedy: DeepSeek's own rule (hierarchical where the groups "
               "divide over the nodes), as it has\n  no locality policy"
               if args.compare and args.policy == "locality" else ""))


def _simulation_report(report: Report, args: argparse.Namespace,
                       results: list[SimulationResult], trace: LoadTrace,
                       cluster: tuple[int, int, int]) -> None:
    """The report of a simulation; ``cluster``: ``(slots, GPUs, bytes per expert)``."""
    replicas, gpus, expert_bytes = cluster

    cad = results[0].cadence
    report.text(
        f"Trace {args.trace}: {trace.num_steps} steps, {trace.num_layers} layers × "
        f"{trace.num_experts} experts. Every {cad.interval} steps the planner plans on the "
        f"last {cad.window} steps; balancedness is scored on windows of {cad.scoring} steps "
        "with the placement in force. 'oracle' plans on the scored window itself (what "
        "foresight would buy this planner, not a bound)."
    )
    averages = {PLANNER_LABEL.get(r.planner, r.planner): r.summary()["window_balancedness"]
                for r in results}
    # the terminal's table and its notes: the moves and bytes a rebalance costs too
    report.table(_summary_headers(results), [[f"{c:.4f}" if isinstance(c, float)
                                              else "n/a" if c is None
                                     else c for c in row] for row in _summary_rows(results)])
    report.text(_column_notes(args, trace, replicas, gpus, expert_bytes,
                              any(r.remote_counted for r in results)).replace("\n  ", " ")
                .replace("\n", " "))
    # windows without a token read 1 but take no MoE time: gaps in the picture, as they
    # are left out of the means
    series = {PLANNER_LABEL.get(r.planner, r.planner):
              r.window_balancedness.masked_fill(r.idle_windows, float("nan")) for r in results}
    first = results[0]
    if first.oracle_balancedness is not None:
        label = f"oracle ({PLANNER_LABEL.get(first.planner, first.planner)} on the scored window)"
        series[label] = first.oracle_balancedness.masked_fill(first.idle_windows, float("nan"))
        averages[label] = first.summary()["oracle_balancedness"]
    xs = first.window_starts.tolist()
    rebal = first.rebalance_steps.tolist()
    report.figure(
        "simulation_over_time.png",
        "Balancedness of each scoring window under the placement in force; grey lines mark "
        "rebalances; windows that route no token are gaps. The legend's figures are the "
        "table's: means over the windows from the first rebalance on.",
        lambda path: plot_balancedness_over_time(
            series, path, x=xs, rebalance_at=rebal, averages=averages,
            average_label="mean after the first rebalance",
            xlabel=f"step (start of each {cad.scoring}-step scoring window)",
            title="Balancedness over time in the simulator"),
    )
    traffic = {PLANNER_LABEL.get(r.planner, r.planner): r for r in results
               if r.remote_nodes is not None}
    if traffic:
        report.figure(
            "simulation_traffic_over_time.png",
            "Remote nodes per token of each scoring window under the placement in force "
            "(counted from a top-k trace's own tokens, else modelled from the window's "
            "loads and groups: the notes above say which); grey lines mark rebalances. The "
            "legend's figures are the table's remote/token.",
            lambda path: plot_balancedness_over_time(
                {label: r.remote_nodes.masked_fill(r.idle_windows, float("nan"))
                 for label, r in traffic.items()}, path, x=xs, rebalance_at=rebal,
                averages={label: r.summary()["remote_nodes_per_token"]
                          for label, r in traffic.items()},
                average_label="mean after the first rebalance",
                xlabel=f"step (start of each {cad.scoring}-step scoring window)",
                title="Cross-node traffic over time in the simulator", remote=True),
        )


# ------------------------------------------------------------------------ generate

TRACE_FORMAT_ALIASES = {"load_history": "vllm-history"}


def trace_format(path: Path, fmt: str | None) -> str:
    """The format ``generate`` writes: ``--format`` (aliases allowed), else from the name
    (``*.sglang.json``: SGLang's, as ``plan -o`` reads that name).
    A ``--format`` whose container another known suffix of the name contradicts (JSON
    into ``t.npz``) is refused: other tools open the file by its name."""
    suffix = name_suffix(path)  # ('.pt' alone names pt: it was "cannot tell the format")
    stem = path.name[: len(path.name) - len(suffix)]
    # *.sglang.json: SGLang's, as plan -o names its SGLang output
    implied = ("sglang" if path.name.lower().endswith(".sglang.json")
               else FORMAT_BY_SUFFIX.get(suffix))
    if fmt is None and path.name.lower().endswith(".sglang.pt"):
        raise CliError(sglang_pt_refusal(path))
    if fmt is not None:
        fmt = TRACE_FORMAT_ALIASES.get(fmt, fmt)
        want = SUFFIX_BY_FORMAT.get(fmt)
        if want is not None and implied is not None and suffix != want:
            # (without --format a *.sglang.pt name is refused: pt is asked for there)
            instead = ("pass --format pt" if path.name.lower().endswith(".sglang.pt")
                       else "drop --format")
            raise CliError(f"--format {fmt} writes a {want} file, but the name {path.name!r} "
                           f"says {suffix}: name it {stem}{want}, or {instead} to "
                           f"write {implied}")
    else:
        fmt = implied
    if fmt is None:
        raise CliError(f"cannot tell the trace format from {path.name!r}; use .pt, .json, "
                       ".npz or .npy, or pass --format")
    try:  # the library's own refusals (a .safetensors or .csv name), before the work too:
        format_for(path, fmt)  # they came after a long trace was generated
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return fmt


@contextmanager
def step_progress(description: str, total: int, enabled: bool
                  ) -> Iterator[Callable[[int, int], None]]:
    """``update(done, total)`` for a long loop: a rich bar on a terminal; elsewhere (logs,
    CI) a line on stderr at most every 5 s, so a long run is never silent."""
    if not enabled:
        yield lambda done, total: None
        return
    if is_tty(sys.stderr):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        with bar:
            task = bar.add_task(description, total=total)
            yield lambda done, total: bar.update(task, completed=done)
        return
    last = [time.monotonic()]

    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 5.0 and done < total:
            last[0] = now
            info(f"{description}: {done}/{total} steps ({100 * done // total}%)")

    yield update


def cmd_generate(args: argparse.Namespace) -> int:
    if args.list:
        # a flag the listing never uses is refused, not dropped without a word (attacker
        # pass: --list --preset x listed the presets, silent on the unknown preset)
        unused = [flag for flag, given in (
            ("--preset", args.preset != "deepseek-v3"), ("--steps", args.steps != 1000),
            ("--seed", args.seed != 0), ("-o", args.output is not None),
            ("--format", args.format is not None), ("--force", args.force)) if given]
        if unused:
            raise CliError(f"--list lists the presets and generates nothing: drop "
                           f"{', '.join(unused)}")
        rows = []
        for name, shape in PRESETS.items():
            rows.append([name, getattr(shape, "num_layers", "?"),
                         getattr(shape, "num_experts", "?"), getattr(shape, "num_groups", "?"),
                         getattr(shape, "top_k", "?")])
        if args.json:
            print_json({"presets": [dict(zip(["name", "layers", "experts", "groups", "top_k"],
                                             r, strict=True)) for r in rows]})
        else:
            print_table("presets", ["preset", "layers", "experts", "groups", "top-k"], rows)
        return 0
    if not args.output:
        raise CliError("generate needs -o FILE (or --list)")
    if args.steps < 1:
        raise CliError("--steps must be >= 1")
    if args.preset not in PRESETS:  # the input first, as plan checks its loads first
        raise CliError(f"unknown preset {args.preset!r}; choose from {', '.join(sorted(PRESETS))}")
    out = check_output(args.output, args.force)
    fmt = trace_format(out, args.format)  # before the work, not after
    shape = resolve_shape(args.preset)
    try:  # before saying "generating" (new-user pass: it said so, then refused)
        check_trace_size(args.steps, shape.num_layers, shape.num_experts)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    chatty = not (args.json or args.quiet)
    if chatty:
        info(f"generating {args.steps} steps of {args.preset} ...")
    with step_progress(f"generating {args.preset}", args.steps, chatty) as update:
        trace = generate_trace(args.preset, args.steps, seed=args.seed, progress=update)
    write_loads(trace, out, format=fmt, force=args.force)
    summary = {"output": str(out), "format": fmt, "preset": args.preset, "steps": trace.num_steps,
               "layers": trace.num_layers, "experts": trace.num_experts, "seed": args.seed,
               "layer_ids": list(trace.layer_ids)}
    if args.json:
        print_json(summary)
    else:
        rows = max(trace.layer_ids) + 1
        # SGLang's layout has a row per model layer, the dense ones all zero (new-user pass:
        # "58 layers" for a file of 61 rows)
        layout = (f" (SGLang's layout: {rows} rows, model layers 0..{rows - 1}, the dense ones "
                  "all zero)" if fmt == "sglang" and rows != trace.num_layers else "")
        print(f"wrote {out} ({fmt}): {trace.num_steps} steps × {trace.num_layers} MoE layers × "
              f"{trace.num_experts} experts{layout}")
    return 0
