"""``eplb bench`` and ``eplb demo``: planners side by side, with a report."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from eplb.cli._checks import check_topology, default_shape
from eplb.cli._common import (
    CliError,
    generated_trace,
    info,
    key_note,
    messages_held,
    prepare_report,
    print_json,
    print_table,
    progress,
    say_written,
)
from eplb.cli._compare import HEADERS, Comparison, add_to_report, compare, describe
from eplb.cli._inputs import (
    EmptyStepRange,
    all_zero_rows_note,
    check_reading_options,
    cli_policy,
    read_trace,
    warn_guessed_experts,
)
from eplb.cli.sim import replay_windows
from eplb.core.inputs import as_seed
from eplb.core.messages import counted
from eplb.core.trace import LoadTrace
from eplb.tools.report import Report, plot_balancedness_over_time

#: the most timing repeats ``eplb bench`` takes: medians settle long before
MAX_REPEATS = 1000


@dataclass(frozen=True)
class Scenario:
    """A built-in benchmark case: a generated preset and a cluster shape."""

    name: str
    preset: str
    replicas: int
    gpus: int
    nodes: int = 1
    groups: int = 1
    policy: str = "global"


# DeepSeek-V3 as deployed in DeepSeek's and SGLang's EP32 setups (256 + 32 redundant
# experts); kimi-k2 (384 experts, no groups) and qwen3-235b (128 experts, no groups) with
# one redundant slot per GPU.
BUILTIN = (
    Scenario("deepseek-v3 global", "deepseek-v3", 288, 32),
    Scenario("deepseek-v3 hierarchical", "deepseek-v3", 288, 32, 4, 8, "hierarchical"),
    Scenario("kimi-k2 global", "kimi-k2", 416, 32),
    Scenario("qwen3-235b global", "qwen3-235b", 160, 32),
)
BENCH_STEPS = 100


@dataclass(frozen=True)
class FileJob:
    """A LOADS file read for ``eplb bench``: its summed loads ``weight [L', E]`` (rows of
    no load left out), their model layers, the cluster it is planned for and the policy
    ``--policy`` resolves to there."""

    name: str
    weight: torch.Tensor
    layer_ids: list[int]
    replicas: int
    gpus: int
    policy: str


def _file_jobs(args: argparse.Namespace) -> list[FileJob]:
    """Each LOADS file read and checked, as its own scenario. ``--step-range`` applies to
    each file apart: the files it keeps no step of are named together in one error (it
    stopped at the first, after benchmarking the others before it)."""
    jobs, empty = [], []
    for job in args.loads:
        try:
            trace = read_trace(job, args)
        except EmptyStepRange as exc:
            empty.append(f"{job} ({counted(exc.steps, 'step')})")
            continue
        weight = trace.total()
        keep = weight.sum(1) > 0  # dense layers (all zero) say nothing about balance
        if not bool(keep.any()):
            raise CliError(f"{job}: every layer's loads are zero (no token routed): "
                           "nothing to benchmark")
        weight = weight[keep]
        ids = [i for i, k in zip(trace.layer_ids, keep.tolist(), strict=True) if k]
        replicas, gpus = default_shape(weight.shape[1], args.gpus, args.replicas)
        try:
            check_topology(replicas, gpus, args.nodes, args.groups, weight.shape[1],
                           weight.shape[0])
            # the policy too, before any benchmarking (attacker pass: a file whose experts
            # --groups does not divide stopped --policy hierarchical only once the builtins
            # and the files before it were timed, and the auto fallback's warning came
            # mid-run); each named, as files of several models may share one call
            policy = cli_policy(args.policy, replicas, gpus, args.nodes, args.groups,
                                weight.shape[1], where=f"{job}: ")
        except CliError as exc:
            raise CliError(f"{job}: {exc}") from None
        warn_guessed_experts(trace, job)  # (after the checks: a refusal stays one line)
        # plan counts them (an even placement); say why the counts differ
        name = (Path(job).name + key_note(getattr(args, "key", None))
                + all_zero_rows_note(int((~keep).sum())))
        jobs.append(FileJob(name, weight, ids, replicas, gpus, policy))
    if empty:
        raise CliError(f"--step-range {args.step_range} keeps none of the steps of "
                       f"{', '.join(empty)}: bench applies it to each LOADS file apart; give "
                       f"a range that keeps steps of every file, or leave "
                       f"{'that file' if len(empty) == 1 else 'those files'} out")
    return jobs


def cmd_bench(args: argparse.Namespace) -> int:
    # warnings held until every file is checked: a file's warning (the policy's fallback,
    # an expert count read off a trace) came before the error of a file after it
    with messages_held() as release:
        return _bench(args, release)


def _bench(args: argparse.Namespace, release: Callable[[], None]) -> int:
    """``eplb bench``; ``release()`` lets out the warnings held, once the files are checked."""
    if not 1 <= args.repeats <= MAX_REPEATS:  # 10**8 ran until killed (attacker pass)
        raise CliError(f"--repeats must be between 1 and {MAX_REPEATS}")
    if args.no_builtin and not args.loads:
        raise CliError("nothing to benchmark: give LOADS files or drop --no-builtin")
    check_reading_options(args)  # before an existing report is named
    report = prepare_report(args.report, args.force, "eplb benchmark")
    jobs: list[Scenario | FileJob] = [] if args.no_builtin else list(BUILTIN)
    # every file read and checked before any benchmarking: a mistake in the last file was
    # found after the builtins and the other files had been timed
    jobs += _file_jobs(args)
    release()  # every input checked
    comparisons: list[Comparison] = []
    with progress("benchmarking", len(jobs), enabled=not args.json) as advance:
        for job in jobs:
            if isinstance(job, Scenario):
                trace = generated_trace(job.preset, BENCH_STEPS, args.seed)
                weight = trace.total()
                c = compare(job.name, weight, job.replicas, job.gpus, job.nodes, job.groups,
                            policy=job.policy, seed=args.seed, repeats=args.repeats,
                            layer_ids=trace.layer_ids)
            else:
                c = compare(job.name, job.weight, job.replicas, job.gpus, args.nodes,
                            args.groups, policy=job.policy, seed=args.seed,
                            repeats=args.repeats, layer_ids=job.layer_ids)
            comparisons.append(c)
            advance()
    written = []
    if report is not None:
        report.text("Balancedness = Σ_layers mean GPU load / Σ_layers max GPU load (1.0 is "
                    "perfect; MoE time scales as 1 / balancedness). 'no rebalancing' puts expert "
                    "e on GPU e·P/E with no redundant copies. Plan times are medians of "
                    f"{args.repeats} runs on this machine.")
        for i, c in enumerate(comparisons):
            add_to_report(report, c, f"s{i}")
        written = report.write(args.report, force=args.force)
    if args.json:
        print_json({"scenarios": [c.as_dict() for c in comparisons],
                    "report": [str(p) for p in written]})
        return 0
    for c in comparisons:
        print_table(describe(c), HEADERS, c.rows())
    if written:
        say_written(written)
    return 0


# ---------------------------------------------------------------------------- demo

DEMO_STEPS = 200
QUICK_LAYERS = 6


def cmd_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    steps = args.steps if args.steps is not None else (20 if args.quick else DEMO_STEPS)
    if steps < 2:
        raise CliError(f"--steps must be >= 2, got {steps}")
    try:
        as_seed(args.seed)
    except (TypeError, ValueError) as exc:
        raise CliError(f"--seed: {exc}") from None
    report = None if args.no_report else prepare_report(
        args.out, args.force, "eplb demo: DeepSeek-V3-shaped workload", flag="--out")
    info(f"generating a DeepSeek-V3-shaped trace ({steps} steps) ...")
    trace = generated_trace("deepseek-v3", steps, args.seed)
    if args.quick:
        trace = trace.select_layers(trace.layer_ids[:QUICK_LAYERS])
    weight = trace.total()
    repeats = 1  # the demo shows one (cold) planning run; `eplb bench` reports medians
    jobs = [s for s in BUILTIN if s.preset == "deepseek-v3"]
    comparisons = []
    with progress("planning", len(jobs), enabled=not args.json) as advance:
        for job in jobs:
            comparisons.append(compare(job.name, weight, job.replicas, job.gpus, job.nodes,
                                       job.groups, policy=job.policy, seed=args.seed,
                                       repeats=repeats, layer_ids=trace.layer_ids))
            advance()
    simulation = _demo_simulation(trace, args.seed, quick=args.quick)

    written: list[Path] = []
    if report is not None:
        report.text(
            f"A synthetic DeepSeek-V3-shaped load trace ({trace.num_layers} MoE layers × "
            f"{trace.num_experts} experts, {steps} steps, seed {args.seed}) summed over time and "
            "planned for 288 expert slots on 32 GPUs. Balancedness = Σ mean GPU load / Σ max "
            "GPU load (1.0 is perfect; MoE time scales as 1 / balancedness). 'no rebalancing' "
            "puts expert e on GPU e·P/E with no redundant copies; 'reference greedy' is "
            "DeepSeek's EPLB; the ceiling is a proven bound no placement can pass (not always "
            "reachable)."
        )
        for i, c in enumerate(comparisons):
            add_to_report(report, c, f"demo{i}")
        if simulation is not None:
            _add_simulation(report, simulation)
        report.code("reproduce: eplb demo" + (f" --seed {args.seed}" if args.seed else "")
                    + (" --quick" if args.quick else ""))
        written = report.write(args.out, force=args.force)
    elapsed = time.perf_counter() - start
    if args.json:
        print_json({"scenarios": [c.as_dict() for c in comparisons],
                    "simulation": simulation, "report": [str(p) for p in written],
                    "seconds": elapsed})
        return 0
    for c in comparisons:
        print_table(describe(c), HEADERS, c.rows())
    if simulation is not None:
        print_table(
            f"online: plan on window i, score on window i+1 ({simulation['windows']} windows "
            f"of {simulation['window']} steps; {_simulation_cluster(simulation)})",
            ["planner", "mean balancedness"],
            [[k, float(torch.tensor(v).mean())] for k, v in simulation["series"].items()],
        )
    if written:
        say_written(written)
    print(f"done in {elapsed:.1f} s")
    return 0


def _demo_simulation(trace: LoadTrace, seed: int, *, quick: bool) -> dict | None:
    """Plan on window i, score on window i+1 (the ADRS protocol) for each planner."""

    window = max(1, trace.num_steps // (4 if quick else 8))
    return replay_windows(trace, window, 288, 32, seed=seed)


def _simulation_cluster(sim: dict) -> str:
    """The cluster and policy the demo's replay planned for, e.g. "288 slots on 32 GPUs,
    global policy": the tables above it show two policies, so its own heading names one."""
    return f"{sim['replicas']} slots on {sim['gpus']} GPUs, {sim['policy']} policy"


def _add_simulation(report: Report, sim: dict) -> None:

    report.heading("Online: planning on the last window, serving the next")
    report.text(
        f"The trace is cut into {sim['windows']} windows of {sim['window']} steps and planned "
        f"for {_simulation_cluster(sim)}. Each planner "
        "plans on window i and is scored on window i+1's loads, as a live system would be: "
        "the loads drift, so no plan is perfect on the next window."
    )
    report.table(["planner", "mean balancedness"],
                 [[k, f"{float(torch.tensor(v).mean()):.4f}"] for k, v in sim["series"].items()])
    series = {k: torch.tensor(v) for k, v in sim["series"].items()}
    report.figure(
        "online_over_time.png",
        "Balancedness of each planner on the next window's loads, window by window.",
        lambda path: plot_balancedness_over_time(
            # the windows the values are: an idle one (no token) has none, and
            # range(1, windows) then had more points than the series (a ValueError)
            series, path, x=sim["scored"],
            xlabel=f"scored window (each {sim['window']} steps; planned on the window before)",
            title="Balancedness over time (plan on window i, score on window i+1)"),
    )
