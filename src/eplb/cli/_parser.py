"""The ``eplb`` command's argument parser: the top-level options and one function per
subcommand (:func:`build_parser` puts them together; :mod:`eplb.cli` runs what it parses).
Each subcommand's parser names the function that runs it (``set_defaults(func=
"module:function")``), imported only when that command is asked for."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Sequence

from eplb._version import __version__
from eplb.cli._common import EXIT_USAGE, FORCED_MOVES
from eplb.cli._inputs import add_input_options
from eplb.cli._values import (
    count_type,
    drift_type,
    integer,
    named_file,
    price_type,
    slack_type,
    speed_spec,
)
from eplb.tools.simulate import MAX_EXPERT_BYTES

#: ``--drift``'s help, the same for plan and simulate
DRIFT_HELP = ("how far each expert's load is expected to move by the next rebalance, as "
              "the log-std D of a factor exp(D·N(0, 1)) (in [0, 2]); eplb values moves by "
              "the balance they keep on such a next window: a larger D makes it move less "
              "(default 0.2; real DeepSeek-V3 windows correlate at 0.9-0.99)")

__all__ = ["build_parser"]

_RAW = argparse.RawDescriptionHelpFormatter


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as the one ``eplb: error: ...`` line every other
    mistake gets (argparse printed its whole usage block, then ``eplb plan: error:``);
    the subcommands' parsers are made of this class too (``add_subparsers`` uses the
    parent's)."""

    def error(self, message: str) -> typing.NoReturn:
        command = self.prog.removeprefix("eplb").strip()
        where = f"{command}: " if command else ""
        self.exit(EXIT_USAGE, f"eplb: error: {where}{message} ('{self.prog} --help' lists "
                              f"the options)\n")

    def parse_args(  # type: ignore[override] (argparse's overloads)
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse's, but arguments no parser took are reported by the command's parser
        (argparse reports them from the top: without the command, pointing at the wrong
        help)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = self.commands().get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def commands(self) -> dict[str, argparse.ArgumentParser]:
        """The subcommands' parsers by name (none for a subcommand's own parser)."""
        return next((a.choices for a in self._actions
                     if isinstance(a, argparse._SubParsersAction)), {})


def _add_topology(p: argparse.ArgumentParser, *, required: bool = True,
                  replicas: int | None = None, gpus: int | None = None,
                  locality: bool = False) -> None:
    g = p.add_argument_group("topology")
    # optional: a file's own shape decides (eplb.cli._checks.default_shape)
    unset = "" if required else " (default: 32 GPUs, or E if fewer experts)"
    g.add_argument("-r", "--replicas", type=integer, required=required, default=replicas,
                   metavar="R", help="physical expert slots in the cluster (a multiple of "
                   "--gpus)" + ("" if required else " (default: E rounded up to a multiple "
                                "of --gpus, plus one slot per GPU)"))
    g.add_argument("-g", "--gpus", type=integer, required=required, default=gpus, metavar="P",
                   help="number of GPUs (expert-parallel ranks)" + unset)
    g.add_argument("--nodes", type=integer, default=1, metavar="N", help="nodes (default 1)")
    g.add_argument("--groups", type=integer, default=1, metavar="G",
                   help="expert groups for group-limited routing (default 1)")
    policies = ["auto", "global", "hierarchical"] + (["locality"] if locality else [])
    g.add_argument("--policy", choices=policies, default="auto",
                   help="auto = hierarchical when nodes > 1 and groups %% nodes == 0, "
                        "else global" + ("; locality (with --dispatch nearest) trades balance "
                                         "against cross-node traffic, see --slack"
                                         if locality else "") + " (default auto)")
    g.add_argument("--seed", type=integer, default=0,
                   help="seed of the packing's randomised starts (default 0); with the "
                        "default options a shape that takes one exact start plans alike "
                        "for every seed")


def _add_dispatch(p: argparse.ArgumentParser, *, planning: bool) -> None:
    g = p.add_argument_group("engine dispatch (SGLang)")
    g.add_argument("--dispatch", choices=["even", "nearest"],
                   default="even" if planning else None,
                   help="how the engine sends an expert's tokens to its replicas: even (vLLM; "
                        "default) or nearest (SGLang with DeepEP: same GPU, else same node, "
                        "else a fixed fair choice); " + (
                        "nearest plans for the loads as that rule realises them (eplb's own "
                        ".json/.pt output records it)" if planning
                        else "nearest scores the loads as that rule realises them (default: "
                        "the rule an eplb .json/.pt file records, else even)"))
    g.add_argument("--routing", type=named_file, metavar="FILE",
                   help="a top-k routing trace [tokens, layers, k], a layer for each "
                        "row of LOADS or for each row with load (a dump's dense rows then get "
                        "no tokens): " + (
                       "co-selection statistics for --policy locality" if planning else
                       "with --dispatch nearest, eval also reports remote nodes per token, "
                       "counted over all of FILE's tokens (--step-range and "
                       "--tokens-per-step cut LOADS only)"))
    g.add_argument("--routing-key", metavar="NAME[,NAME...]",
                   help="which arrays of a multi-array --routing file to read")
    if planning:
        g.add_argument("--fair", choices=["auto", "avoid", "expect", "divide"], default="auto",
                       help="nearest: avoid = hot experts on every node (one node: every "
                            "GPU), so no token needs SGLang's random fair choice; expect = "
                            "best in expectation; divide (one node) = counts that divide the "
                            "GPUs, which SGLang's runtime table splits exactly; auto = per "
                            "layer avoid, unless expect, uncapped or even-split counts serve "
                            "5%% better (default; one node: per layer the even split or "
                            "divide, for SGLang's runtime table; for an SGLang file, per "
                            "layer the even split or avoid)")
        g.add_argument("--slack", type=slack_type, default=None, metavar="X",
                       help="locality: node load allowed above the mean node load (default 0.03: "
                            "balancedness about 0.97, least cross-node traffic at that "
                            "balance; larger = less traffic, less balance)")


def _sub(sub: argparse._SubParsersAction, name: str, help_: str, epilog: str
         ) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_, epilog=epilog, formatter_class=_RAW)
    # SUPPRESS: a subcommand's default must not reset a top-level --debug
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks on errors")
    p.add_argument("--threads", type=_threads, default=argparse.SUPPRESS, metavar="N",
                   help=_THREADS_HELP)
    return p


_THREADS_HELP = ("torch threads (default 1: eplb's many small operations run fastest on one "
                 "thread, and its timings are quoted at one)")


MAX_THREADS = 256  # torch's OpenMP pool fails (or crashes) far above the cores there are


def _threads(text: str) -> int:
    try:
        value = integer(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be an integer in 1..{MAX_THREADS}, got {text!r}")
    return value


_slots = count_type("slots")
# an expert of no bytes would report every rebalance as free (a slip for the default)
_expert_bytes = count_type(
    "bytes of one expert's weights, e.g. 44040192 for DeepSeek-V3 in FP8", least=1,
    most=MAX_EXPERT_BYTES)


def build_parser() -> _Parser:
    """The ``eplb`` parser: top-level options, then every subcommand's."""
    parser = _Parser(
        prog="eplb",
        description="Plan where Mixture-of-Experts experts live on GPUs "
                    "(a fast, near-optimal drop-in for DeepSeek's EPLB).",
        epilog="examples:\n  eplb demo\n"
               "  eplb plan loads.json --replicas 288 --gpus 32 -o placement.json\n"
               "  eplb eval --placement placement.json loads.json\n"
               "  eplb bench --report bench-report/\n\n"
               "Run 'eplb COMMAND --help' for a command's options.",
        formatter_class=_RAW,
    )
    parser.add_argument("--version", action="version", version=f"eplb {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--threads", type=_threads, default=1, metavar="N", help=_THREADS_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_demo, _add_plan, _add_eval, _add_bench, _add_simulate, _add_generate):
        add(sub)
    return parser


def _add_demo(sub: argparse._SubParsersAction) -> None:
    """``eplb demo``."""
    p = _sub(sub, "demo", "Plan a built-in DeepSeek-V3-shaped workload and write a report.",
             "example:\n  eplb demo                      # report in ./eplb-demo-report/\n"
             "  eplb demo --out /tmp/demo --force\n\n"
             "Generates a synthetic DeepSeek-V3 load trace (58 MoE layers × 256 experts), plans\n"
             "it for 288 slots on 32 GPUs (global, and hierarchical with 4 nodes / 8 groups),\n"
             "compares no rebalancing, DeepSeek's reference greedy, eplb and the ceiling, and\n"
             "writes report.md, report.html and PNG pictures. Existing report files are not\n"
             "overwritten unless --force is given.")
    p.add_argument("--out", default="eplb-demo-report", metavar="DIR",
                   help="report directory (default ./eplb-demo-report)")
    p.add_argument("--force", action="store_true", help="overwrite existing report files")
    p.add_argument("--steps", type=integer, default=None, metavar="T",
                   help="trace length in steps (default 200; 20 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller model shape for a fast smoke test")
    p.add_argument("--no-report", action="store_true", help="print the table only")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--seed", type=integer, default=0, help="workload and planner seed (default 0)")
    p.set_defaults(func="bench:cmd_demo")


def _add_plan(sub: argparse._SubParsersAction) -> None:
    """``eplb plan``."""
    p = _sub(sub, "plan", "Plan a placement from a loads file and write it for an engine.",
             "examples:\n"
             "  eplb plan stats.json -r 288 -g 32 -o placement.json\n"
             "  eplb plan stats.json -r 288 -g 32 -o lb.yaml   # TRT-LLM (global: see the README)\n"
             "  eplb plan stats.json -r 288 -g 32 -o init.json --emit sglang\n"
             "  eplb plan new.json -r 288 -g 32 --previous old.json --max-moves 40 -o next.json\n"
             "  eplb plan dumps/expert_distribution_recorder_*.pt -r 288 -g 32 -o p.sglang.pt\n"
             "  eplb plan stats.json -r 288 -g 32 --nodes 4 --groups 8 --policy locality \\\n"
             "      --dispatch nearest -o local.sglang.json      # SGLang + DeepEP\n\n"
             "--emit is inferred from OUT: .yaml/.yml -> trtllm, .pt -> pt, *.sglang.json or\n"
             "*.sglang.pt -> sglang; a name of another format (.npy, .npz, .csv, .pth, ...)\n"
             "is refused; anything else -> json (with a warning unless .json). SGLang output\n"
             "must be asked for (--emit sglang or a *.sglang.json/*.sglang.pt name) because a\n"
             "plain .json or .pt is eplb's own format; SGLang parses a .json OUT as JSON and\n"
             "torch.loads a .pt OUT, and eplb writes each so.\n"
             "SGLang needs a row for every model layer: the count comes from the loads' own layer\n"
             "ids (SGLang dumps, TensorRT-LLM statistics, eplb traces) or --num-model-layers.\n"
             "A trace [T, L, E] is summed over its T steps before planning; several LOADS files\n"
             "(e.g. SGLang dumps) are steps one after another. A folder of SGLang dumps works too.")
    p.add_argument("loads", metavar="LOADS", nargs="+",
                   help="loads file(s) or folder (any format eplb reads)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="placement file to write")
    p.add_argument("--emit", choices=["json", "sglang", "trtllm", "pt"], default=None,
                   help="output format (default: inferred from OUT)")
    add_input_options(p)
    p.add_argument("--first-layer", type=integer, default=None, metavar="K",
                   help="model layer index of the first row (e.g. 3 for DeepSeek-V3), for loads "
                        "files that do not name their layers; default: the ids stored in the "
                        "loads file, else 0")
    p.add_argument("--num-model-layers", type=integer, default=None, metavar="N",
                   help="SGLang output: the model's layer count (61 for DeepSeek-V3); rows of "
                        "dense layers get SGLang's trivial map (default: from the layer ids)")
    p.add_argument("--mtp-layers", type=integer, default=0, metavar="N",
                   help="TensorRT-LLM output: also write the N multi-token-prediction layers "
                        "it builds after the last one (DeepSeek-V3: 1, layer 61), planned as "
                        "layers without tokens; it fails at start-up on a missing layer")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    _add_topology(p, locality=True)
    o = p.add_argument_group("online rebalancing")
    o.add_argument("--previous", type=named_file, metavar="OLD",
                   help="the placement in service now (a file)")
    o.add_argument("--max-moves", type=_slots, metavar="N",
                   help="move at most N slots in total (over all layers) relative to "
                        f"--previous, beyond the forced moves: {FORCED_MOVES}; a cap on "
                        "the moves that pay on the next window, never a reason for more "
                        "(default: no cap)")
    o.add_argument("--move-price", type=price_type, default=None, metavar="X",
                   help="with --previous: the expected next-window balancedness (in [0, 1)) a "
                        "layer must gain to move all its slots at 9 slots per GPU (X × S / 9 "
                        "at S slots per GPU, as the weights each GPU receives; a part of it "
                        "for a part of the slots): higher moves fewer slots, 0 takes every "
                        "candidate move that gains (the candidates are warm-start steps, and "
                        "a fresh plan where those fall short; default 0.01, about where "
                        "moving a DeepSeek-V3 layer breaks even)")
    o.add_argument("--drift", type=drift_type, default=None, metavar="D",
                   help=f"with --previous: {DRIFT_HELP}")
    o.add_argument("--dead-gpus", metavar="LIST",
                   help="comma-separated failed GPU ids or ranges, e.g. 3,17 or 8-15")
    o.add_argument("--gpu-speed", type=speed_spec, metavar="FILE_OR_LIST",
                   help="relative GPU speeds: comma list of P numbers, or a file with them")
    _add_dispatch(p, planning=True)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func="commands:cmd_plan")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    """``eplb eval``."""
    p = _sub(sub, "eval", "Score a placement file on a loads file.",
             "example:\n  eplb eval --placement placement.json stats.json\n"
             "  eplb eval --placement placement.json stats.json --json\n"
             "  eplb eval --placement init.sglang.json stats.json -g 32 --nodes 4 --groups 8\n"
             "  eplb eval --placement next.json --previous old.json new.json  # what moved\n"
             "  eplb eval --placement local.sglang.json stats.json -g 32 --nodes 4 --groups 8 \\\n"
             "      --dispatch nearest\n\n"
             "Reports each layer's balancedness (mean / max GPU load, 1.0 = perfect) before\n"
             "(no rebalancing: expert e on GPU e*P//E, one copy) and after, the ceiling, and\n"
             "the worst GPU's load relative to the mean.")
    p.add_argument("loads", metavar="LOADS", nargs="+",
                   help="loads file(s); several files (e.g. SGLang dumps) are steps one after "
                        "another, as in plan")
    p.add_argument("--placement", required=True, type=named_file, metavar="FILE",
                   help="placement file")
    p.add_argument("--previous", type=named_file, metavar="OLD",
                   help="a placement in service before it (a file of the same cluster, read "
                        "as --placement is): also score OLD, and count the slots whose "
                        "expert changed from OLD, in all and into the busiest GPU")
    add_input_options(p)
    p.add_argument("--summary", action="store_true",
                   help="skip the per-layer table (with --json: the per-layer list)")
    p.add_argument("-g", "--gpus", type=integer, default=None, metavar="P",
                   help="GPUs, for engine files that do not record it (SGLang JSON)")
    p.add_argument("--nodes", type=integer, default=None, metavar="N",
                   help="nodes (engine files; default 1)")
    p.add_argument("--groups", type=integer, default=None, metavar="G",
                   help="groups (engine files; default 1)")
    p.add_argument("--policy", choices=["auto", "global", "hierarchical"], default="auto",
                   help="engine files, which do not record it: auto = hierarchical when the "
                        "cluster allows it and the placement keeps every group on one node "
                        "(default auto)")
    p.add_argument("--gpu-speed", type=speed_spec, metavar="FILE_OR_LIST",
                   help="relative GPU speeds the placement was planned for (as in plan); "
                        "for engine files, which cannot record them: eplb's own files "
                        "planned with --gpu-speed record them, and eval uses those")
    p.add_argument("--first-layer", type=integer, default=None, metavar="K",
                   help="model layer of the loads' first row, for loads files that do not "
                        "name their layers (as in plan; 3 for DeepSeek-V3's MoE rows). Rows "
                        "are matched by model layer: the ids the placement records (eplb's "
                        "files, TensorRT-LLM YAML), else its row index (SGLang files)")
    _add_dispatch(p, planning=False)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func="evaluate:cmd_eval")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """``eplb bench``."""
    p = _sub(sub, "bench", "Compare eplb, DeepSeek's greedy, no rebalancing and the ceiling.",
             "examples:\n  eplb bench                          # built-in scenarios\n"
             "  eplb bench stats.json -r 288 -g 32  # plus your own loads\n"
             "  eplb bench --report bench-report/ --json > bench.json\n\n"
             "Built-in scenarios are generated (eplb.tools.generator): deepseek-v3 at 288\n"
             "slots / 32 GPUs (global and hierarchical 4 nodes / 8 groups), kimi-k2 and\n"
             "qwen3-235b.\n"
             "Files use --replicas/--gpus (default: 32 GPUs, or E if fewer experts, and one\n"
             "redundant slot per GPU). Plan times are medians of --repeats runs.")
    p.add_argument("loads", nargs="*", metavar="LOADS", help="extra loads files to benchmark")
    p.add_argument("--no-builtin", action="store_true", help="skip the built-in scenarios")
    add_input_options(p)
    p.add_argument("--repeats", type=integer, default=3, metavar="N",
                   help="timing repeats (default 3)")
    p.add_argument("--report", metavar="DIR", help="also write a report with pictures into DIR")
    p.add_argument("--force", action="store_true", help="overwrite existing report files")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_topology(p, required=False)
    p.set_defaults(func="bench:cmd_bench")


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    """``eplb simulate``."""
    p = _sub(sub, "simulate", "Replay a load trace with periodic rebalancing.",
             "examples:\n  eplb simulate trace.pt --window 100 --interval 100 -r 288 -g 32\n"
             "  eplb simulate trace.pt --window 100 --interval 100 -r 288 -g 32 \\\n"
             "      --incremental --estimator ema:50 --max-moves 2500 --report sim/\n"
             "  eplb simulate routing.npz --key law_topk_ids --tokens-per-step 256 --window 4 \\\n"
             "      -r 80 -g 16\n\n"
             "Each rebalance plans on the last --window steps; the placement is then scored\n"
             "on the following steps until the next rebalance (--interval steps later).\n"
             "--protocol adrs: sum --window steps per window, plan on window i, score on i+1.\n"
             "Without --replicas/--gpus: 32 GPUs (or E if fewer experts) and one redundant\n"
             "slot per GPU.")
    p.add_argument("trace", metavar="TRACE", nargs="+",
                   help="load trace [T, L, E]: a file in any format eplb reads, several files "
                        "(e.g. SGLang per-pass dumps) or a folder of SGLang dumps (steps one "
                        "after another)")
    add_input_options(p, "TRACE")
    p.add_argument("--window", type=integer, default=None, metavar="W",
                   help="steps per window (required, but with --cadence or --protocol adrs: "
                        "theirs by default)")
    p.add_argument("--interval", type=integer, default=None, metavar="I",
                   help="steps between rebalances (default: --cadence's, else --window)")
    p.add_argument("--cadence", choices=["vllm", "sglang"], default=None,
                   help="an engine's default cadence: vllm = window 1000, interval 3000 "
                        "(--eplb-config window_size, step_interval), sglang = 1000 and 1000 "
                        "(--eplb-rebalance-num-iterations); --window and --interval override "
                        "its parts")
    p.add_argument("--planner", choices=["eplb", "greedy", "none"], default="eplb",
                   help="who rebalances: eplb, greedy (DeepSeek's reference) or none (no "
                        "rebalancing) (default eplb)")
    p.add_argument("--compare", action="store_true",
                   help="also run the other planners and show them side by side")
    p.add_argument("--protocol", choices=["adrs"], default=None,
                   help="a named benchmark protocol: adrs = plan on each --window steps, "
                        "score on the next --window (--interval is --window; --window "
                        "defaults to 100, the ADRS benchmark's)")
    p.add_argument("--incremental", action="store_true",
                   help="rebalance incrementally from the placement in service")
    p.add_argument("--initial", type=named_file, metavar="FILE",
                   help="the placement in force before the first rebalance, e.g. the "
                        "start-up file SGLang loads with --init-expert-location (default: "
                        "SGLang's trivial map, slot i holding expert i %% E)")
    p.add_argument("--first-layer", type=integer, default=None, metavar="K",
                   help="with --initial: model layer of the trace's first row, for traces "
                        "that do not name their layers (3 for DeepSeek-V3's MoE rows), as "
                        "in eval")
    p.add_argument("--estimator", default=None, metavar="SPEC",
                   help="load estimator of the --planner run (not none): sum (default, what "
                        "the engines do), ema:H (half-life H steps), robust:Z[:N] (mean + Z "
                        "std over N sub-windows, default 4), multi:K[:M] (the last M windows, "
                        "default 1, as K scenarios), auto[:M[:F]] (sum or EMA per layer, "
                        "backtested on F windows)")
    p.add_argument("--max-moves", type=_slots, default=None, metavar="N",
                   help="most slots moved per rebalance, in total over all layers (with "
                        "--incremental): a cap on the moves that pay (default: no cap, "
                        "eplb moves what pays)")
    p.add_argument("--move-price", type=price_type, default=None, metavar="X",
                   help="with --incremental: the move price of eplb plan's --move-price "
                        "(default 0.01): higher moves fewer slots")
    p.add_argument("--drift", type=drift_type, default=None, metavar="D",
                   help=f"with --incremental: {DRIFT_HELP}")
    p.add_argument("--expert-bytes", type=_expert_bytes, default=None, metavar="N",
                   help="bytes of one expert's weights, for the weights moved per rebalance "
                        "(default 44040192: DeepSeek-V3 in FP8, 3 x 7168 x 2048; e.g. "
                        "Qwen3-30B-A3B in BF16: 3 x 2048 x 768 x 2 = 9437184)")
    p.add_argument("--dispatch", choices=["even", "nearest"], default="even",
                   help="how the engine sends an expert's tokens to its replicas: even (vLLM; "
                        "default) or nearest (SGLang with DeepEP); eplb plans for it, and "
                        "every planner is scored as that rule serves its plans; on several "
                        "nodes the table also shows the remote nodes per token, counted from "
                        "a top-k trace's own tokens, else modelled from the loads")
    p.add_argument("--slack", type=slack_type, default=None, metavar="X",
                   help="--policy locality: node load allowed above the mean node load "
                        "(eplb plan's --slack, default 0.03)")
    _add_topology(p, required=False, replicas=None, gpus=None, locality=True)
    p.add_argument("--report", metavar="DIR", help="write a report with pictures into DIR")
    p.add_argument("--force", action="store_true", help="overwrite existing report files")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func="sim:cmd_simulate")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    """``eplb generate``."""
    p = _sub(sub, "generate", "Write a synthetic load trace shaped like a real model.",
             "examples:\n  eplb generate --preset deepseek-v3 --steps 1000 -o trace.pt\n"
             "  eplb generate --preset qwen3-235b --steps 200 -o trace.json --format load_history\n"
             "  eplb generate --list\n\n"
             "The output format follows --format, else the extension (.pt -> a [T, L, E] tensor\n"
             "dict with the model layer ids, .npz -> the same as numpy arrays, .npy -> the bare\n"
             "array (no layer ids), .json -> vLLM/ADRS load_history). --format sglang (or a name\n"
             "ending .sglang.json) writes SGLang's {\"logical_count\": [T][L][E]} JSON, a row per\n"
             "model layer as SGLang does (dense layers all zero); a *.sglang.pt name is\n"
             "refused (SGLang's layout is written as JSON).")
    p.add_argument("--preset", default="deepseek-v3",
                   help="model preset (see --list; default deepseek-v3)")
    p.add_argument("--steps", type=integer, default=1000, metavar="T", help="steps (default 1000)")
    p.add_argument("--seed", type=integer, default=0, help="generator seed (default 0)")
    p.add_argument("-o", "--output", metavar="FILE", help="trace file to write")
    p.add_argument("--format", default=None, metavar="FMT",
                   choices=["pt", "npz", "npy", "load_history", "vllm-history", "sglang"],
                   help="trace format to write: pt, npz, npy, load_history (= vllm-history), "
                        "sglang (default: from FILE's name)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func="sim:cmd_generate")
