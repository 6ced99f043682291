"""``eplb simulate``: replaying a trace through the planners, its tables, JSON and report,
and the flags it refuses; in-process through ``eplb.cli.main`` as in ``test_cli.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import L, run
from test_cli import assert_one_line_error


def test_simulate_json_and_report(capsys, tmp_path, trace_file) -> None:
    report = tmp_path / "sim"
    code, out, _ = run(capsys, "simulate", str(trace_file), "--window", "10", "--interval", "10",
                       "-r", "16", "-g", "8", "--compare", "--json", "--report", str(report))
    assert code == 0
    runs = json.loads(out)["runs"]
    assert [r["summary"]["planner"] for r in runs] == ["eplb", "none", "greedy"]
    assert (report / "simulation_over_time.png").exists()
    # the report holds the terminal's table: what a rebalance moves and copies too (it had
    # balancedness and rebalances only)
    text = (report / "report.md").read_text()
    assert "| planner | window bal | step bal | oracle | rebalances | moved/rebal | GB/rebal |" \
        in text
    greedy = runs[2]["summary"]
    row = next(line for line in text.splitlines() if line.startswith("| reference greedy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{greedy['window_balancedness']:.4f}"
    assert cells[5] == f"{greedy['moved_slots_per_rebalance']:.0f}"
    assert cells[6] == f"{greedy['moved_gb_per_rebalance']:.2f}"
    assert "moved/rebal: slots whose expert changed per rebalance" in text


def test_simulate_scores_every_planner_as_the_dispatch_named(capsys, trace_file) -> None:
    """--dispatch nearest: eplb plans for SGLang's rule and every planner of --compare is
    scored as that rule serves its plans (the library's score_dispatch); before, the CLI
    had no such flag and scored the even split only."""
    from eplb.formats import read_loads
    from eplb.tools.simulate import Cadence, simulate

    args = ("simulate", trace_file, "--window", 10, "-r", 16, "-g", 8, "--nodes", 2,
            "--compare", "--json")
    code, out, _ = run(capsys, *args, "--dispatch", "nearest")
    assert code == 0
    found = json.loads(out)
    assert found["dispatch"] == "nearest"
    by_planner = {r["summary"]["planner"]: r["summary"] for r in found["runs"]}
    counts = read_loads(trace_file).counts
    for planner, options in (("greedy", {}), ("eplb", {"dispatch": "nearest",
                                                      "policy": "global"})):
        want = simulate(counts, planner, num_replicas=16, num_gpus=8, num_nodes=2,
                        cadence=Cadence(10, 10), score_dispatch="nearest", **options)
        assert by_planner[planner]["window_balancedness"] == pytest.approx(
            want.summary()["window_balancedness"], rel=1e-12)
    code, out, _ = run(capsys, *args)
    assert json.loads(out)["dispatch"] == "even"
    even = {r["summary"]["planner"]: r["summary"] for r in json.loads(out)["runs"]}
    assert even["greedy"]["window_balancedness"] != by_planner["greedy"]["window_balancedness"]
    # on one node the figures are SGLang's runtime table's: said once
    code, out, err = run(capsys, "simulate", trace_file, "--window", 10, "-r", 16, "-g", 8,
                         "--dispatch", "nearest", "--compare", "--json")
    assert code == 0
    assert err.count("--dispatch nearest with one node") == 1
    assert "table SGLang builds at a runtime rebalance" in err
    one_node = {r["summary"]["planner"]: r["summary"] for r in json.loads(out)["runs"]}
    want = simulate(counts, "greedy", num_replicas=16, num_gpus=8, cadence=Cadence(10, 10),
                    score_dispatch="nearest")
    assert one_node["greedy"]["window_balancedness"] == pytest.approx(
        want.summary()["window_balancedness"], rel=1e-12)
    code, out, err = run(capsys, "simulate", trace_file, "--window", 10, "-r", 16, "-g", 8,
                         "--dispatch", "nearest")
    assert code == 0 and "as SGLang's nearest dispatch serves them" in out
    # one GPU serves every token itself: no random pick, no table to warn of (attacker
    # pass: the warning said a GPU without a replica sends its tokens to a random one)
    code, out, err = run(capsys, "simulate", trace_file, "--window", 10, "-r", 8, "-g", 1,
                         "--dispatch", "nearest")
    assert code == 0 and "with one node" not in err, err
    # auto going hierarchical under the nearest rule is said, as plan says it (new-user pass)
    code, out, err = run(capsys, "simulate", trace_file, "--window", 10, "-r", 16, "-g", 8,
                         "--nodes", 2, "--groups", 2, "--dispatch", "nearest")
    assert code == 0 and "(hierarchical)" in out
    assert "--policy auto plans hierarchically" in err


def test_simulate_incremental_table(capsys, trace_file) -> None:
    code, out, _ = run(capsys, "simulate", str(trace_file), "--window", "10", "-r", "16", "-g",
                       "8", "--incremental", "--estimator", "ema:5", "--max-moves", "4")
    assert code == 0
    assert "incremental" in out


def test_simulate_move_price(capsys, trace_file) -> None:
    # `eplb plan` had --move-price and `eplb simulate` did not (attacker pass): a dearer
    # price moves fewer slots per rebalance than the default, and it needs --incremental
    args = ("simulate", trace_file, "--window", 10, "-r", 16, "-g", 8, "--incremental",
            "--json")
    moved = [json.loads(run(capsys, *args, *extra)[1])["runs"][0]["summary"][
        "moved_slots_per_rebalance"] for extra in ((), ("--move-price", "0.5"))]
    assert moved[1] < moved[0]
    code, _, err = run(capsys, "simulate", trace_file, "--window", 10, "-r", 16, "-g", 8,
                       "--move-price", "0.5")
    assert code == 2 and "--move-price needs --incremental" in err
    code, _, err = run(capsys, "simulate", trace_file, "--window", 10, "-r", 16, "-g", 8,
                       "--incremental", "--move-price", "1.5")
    assert code == 2 and "move-price" in err


def test_simulate_drift(capsys, trace_file) -> None:
    # as plan --drift: the incremental planner's drift, refused without --incremental,
    # with another planner, or outside [0, 2]
    args = ("simulate", trace_file, "--window", 10, "-r", 16, "-g", 8, "--incremental",
            "--json")
    moved = [json.loads(run(capsys, *args, "--drift", drift)[1])["runs"][0]["summary"][
        "moved_slots_per_rebalance"] for drift in ("0", "2")]
    assert moved[1] < moved[0]
    for extra, message in ((("--drift", "0.1"), "--drift needs --incremental"),
                           (("--incremental", "--drift", "3"), "--drift: must be a number"),
                           (("--planner", "greedy", "--drift", "0.1"), "need --planner eplb")):
        code, _, err = run(capsys, "simulate", trace_file, "--window", 10, "-r", 16, "-g", 8,
                           *extra)
        assert code == 2 and message in err, (extra, err)


def test_simulate_says_when_forced_moves_pass_the_budget(capsys, trace_file) -> None:
    # the first hierarchical rebalance re-plans the start's straddling groups whatever
    # --max-moves says; the table's mean hid it (new-user pass: 2914 per rebalance shown
    # under --max-moves 2000, the first one 13714)
    args = ("simulate", trace_file, "--window", 10, "-r", 16, "-g", 8, "--incremental",
            "--max-moves", 0)
    code, out, _ = run(capsys, *args, "--nodes", 2, "--groups", 2)
    assert code == 0 and "forced moves: 1 of 3 rebalances" in out
    code, out, _ = run(capsys, *args)
    assert code == 0 and "forced moves" not in out


def test_simulate_table_says_what_its_columns_mean(capsys, trace_file) -> None:
    # found by the twelfth-session newcomer pass: 'window bal', 'step bal', 'oracle' and
    # 'moved/rebal' were printed with no word on which counts or what was moved
    code, out, _ = run(capsys, "simulate", str(trace_file), "--window", "10", "-r", "16",
                       "-g", "8")
    assert code == 0
    assert "1.0 is perfect" in out and "not a bound" in out
    # the mixtral-8x7b trace: 32 layers × 16 slots
    assert "slots whose expert changed per rebalance, of 512 (32 layers × 16 slots)" in out


def test_simulate_counts_moved_weights_in_the_models_bytes(capsys, trace_file) -> None:
    # (new-user pass: every model's moves were counted in DeepSeek-V3's 44 MB experts, with
    # no flag to change it, and a hierarchical replay's title read as a global one's)
    args = ("simulate", trace_file, "--window", 10, "-r", 16, "-g", 8, "--json")
    default = json.loads(run(capsys, *args)[1])["runs"][0]
    code, out, err = run(capsys, *args, "--expert-bytes", 1_000_000)
    assert code == 0, err
    given = json.loads(out)["runs"][0]
    assert default["expert_bytes"] == 3 * 7168 * 2048 and given["expert_bytes"] == 1_000_000
    moved = given["summary"]["moved_slots_per_rebalance"]
    assert given["summary"]["moved_gb_per_rebalance"] == pytest.approx(moved * 1e6 / 1e9)
    code, out, _ = run(capsys, *args[:-1], "--expert-bytes", 2_000_000, "--nodes", 2,
                       "--groups", 2)
    assert code == 0
    assert "GB/rebal" in out and "at 2,000,000 bytes per expert" in out
    # what the busiest GPU receives, which sets the stall (new-user passes: the README
    # quotes it per GPU, and the mean share understated it)
    header = next(line.split() for line in out.splitlines() if "GB/GPU" in line)
    assert header[-4:] == ["GB/rebal", "GB/GPU", "plan", "ms"]
    row = next(line.split() for line in out.splitlines() if line.startswith("eplb"))
    total, per_gpu = float(row[-3]), float(row[-2])
    assert total / 8 - 0.01 <= per_gpu <= total + 0.01
    busiest = given["rebalances"]["busiest_gpu_bytes"]
    assert given["summary"]["busiest_gpu_gb_per_rebalance"] == pytest.approx(
        sum(busiest) / len(busiest) / 1e9)
    assert all(b * 8 >= m for b, m in zip(busiest, given["rebalances"]["moved_bytes"],
                                          strict=True))
    assert "in 2 nodes, 2 groups (hierarchical)" in out
    # the default size is DeepSeek-V3's: another model's trace is told so (new-user pass)
    code, out, _ = run(capsys, *args[:-1])
    assert code == 0
    assert "DeepSeek-V3's 256 experts in FP8, but this trace has 8: give --expert-bytes" in out
    # (an expert of no bytes: every rebalance free; beyond 1 TiB the int64 bytes moved
    # overflowed into wrong and negative figures, or a raw OverflowError: attacker pass)
    for bad in ("-1", "0", "1099511627777", "100000000000000000", "9" * 26):
        code, _, err = run(capsys, *args, "--expert-bytes", bad)
        assert code == 2 and "--expert-bytes: must be an integer in 1..1099511627776" in err
    code, out, err = run(capsys, *args, "--expert-bytes", 1 << 40)
    assert code == 0, err
    runs = json.loads(out)["runs"][0]
    assert runs["summary"]["moved_gb_per_rebalance"] == pytest.approx(
        runs["summary"]["moved_slots_per_rebalance"] * 2**40 / 1e9)
    assert min(runs["rebalances"]["moved_bytes"]) >= 0


def test_simulate_too_short_trace(capsys, trace_file) -> None:
    code, _, err = run(capsys, "simulate", str(trace_file), "--window", "30", "-r", "16", "-g", "8")
    assert code == 2
    assert_one_line_error(err)
    assert "needs at least 60" in err
    # two windows fit, but nothing is scored after a rebalance at step 30
    code, _, err = run(capsys, "simulate", str(trace_file), "--window", "10", "--interval", "30",
                       "-r", "16", "-g", "8")
    assert code == 2
    assert "needs at least 60" in err
    code, _, err = run(capsys, "simulate", str(trace_file), "--window", "10", "--interval", "0",
                       "-r", "16", "-g", "8")
    assert code == 2
    assert_one_line_error(err)
    assert "--interval must be >= 1" in err


def test_simulate_warns_when_nodes_and_groups_cannot_be_used(capsys, trace_file) -> None:
    # plan and bench warn that --nodes/--groups are dropped; simulate planned globally silently
    code, _, err = run(capsys, "simulate", str(trace_file), "--window", "10", "-r", "16", "-g",
                       "8", "--nodes", "2", "--groups", "3")
    assert code == 0
    assert "eplb: warning: planning globally" in err and "--groups (3)" in err, err
    code, _, err = run(capsys, "simulate", str(trace_file), "--window", "10", "-r", "16", "-g",
                       "8", "--nodes", "2", "--groups", "3", "--policy", "hierarchical")
    assert code == 2
    assert_one_line_error(err)
    assert "--policy hierarchical is impossible: --groups (3)" in err


def test_simulate_holds_the_reference_greedy_to_a_forced_policy(capsys, tmp_path) -> None:
    # --policy was passed to eplb only: `--compare --policy global` set eplb's global plans
    # beside the greedy's hierarchical ones
    from eplb.tools import simulate

    gen = torch.Generator().manual_seed(0)
    counts = torch.exp(torch.randn(40, 4, 16, generator=gen) * 1.5).mul(100).round()
    path = tmp_path / "trace.pt"
    torch.save(counts, path)
    shape = {"num_replicas": 20, "num_gpus": 4, "num_nodes": 2, "num_groups": 4,
             "cadence": "adrs", "window": 10, "interval": 10, "score_window": 10}
    expected = {policy: simulate(counts, "greedy", policy=policy, **shape).summary()
                for policy in ("global", "hierarchical")}
    assert expected["global"]["window_balancedness"] != \
        expected["hierarchical"]["window_balancedness"]
    for policy in ("global", "hierarchical"):
        code, out, err = run(capsys, "simulate", path, "--window", 10, "-r", 20, "-g", 4,
                             "--nodes", 2, "--groups", 4, "--policy", policy, "--compare",
                             "--json")
        assert code == 0, err
        greedy = next(r for r in json.loads(out)["runs"] if r["summary"]["planner"] == "greedy")
        assert greedy["summary"]["window_balancedness"] == \
            expected[policy]["window_balancedness"], policy


def test_simulate_refuses_an_interval_the_adrs_protocol_would_ignore(capsys, trace_file) -> None:
    # --protocol adrs replaced --interval by --window without a word
    code, _, err = run(capsys, "simulate", str(trace_file), "--window", "10", "--interval", "5",
                       "--protocol", "adrs", "-r", "16", "-g", "8")
    assert code == 2
    assert_one_line_error(err)
    assert "--interval 5 cannot apply" in err
    code, out, _ = run(capsys, "simulate", str(trace_file), "--window", "10", "--interval", "10",
                       "--protocol", "adrs", "-r", "16", "-g", "8", "--json")
    assert code == 0
    assert json.loads(out)["runs"][0]["rebalances"]["step"] == [10, 20, 30]


def test_simulate_adrs_protocol_defaults_the_window_and_plain_runs_ask_for_it(
    capsys, tmp_path
) -> None:
    # found by a new-user pass: --protocol adrs names a cadence (100-step windows), yet
    # argparse still demanded --window
    path = tmp_path / "trace.pt"
    code, out, _ = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "300", "-o",
                       str(path), "--json")
    assert code == 0, out
    code, out, err = run(capsys, "simulate", str(path), "--protocol", "adrs", "-r", "16",
                         "-g", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["runs"][0]["rebalances"]["step"] == [100, 200]
    code, _, err = run(capsys, "simulate", str(path), "-r", "16", "-g", "8")
    assert code == 2
    assert_one_line_error(err)
    assert "simulate needs --window W" in err and "--protocol adrs uses 100" in err
    assert "--cadence vllm or sglang" in err


def test_simulate_cadence_gives_an_engines_window_and_interval(capsys, tmp_path) -> None:
    """--cadence vllm / sglang: the engine's default window and interval (vLLM's
    --eplb-config window_size 1000, step_interval 3000; SGLang's
    --eplb-rebalance-num-iterations 1000), each part overridable; with --protocol it is
    refused (both name a cadence)."""
    path = tmp_path / "trace.pt"
    code, out, _ = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "7000",
                       "-o", str(path), "--json")
    assert code == 0, out
    base = ["simulate", str(path), "-r", "16", "-g", "8", "--planner", "greedy", "--json"]
    for cadence, window, interval, steps in (("vllm", 1000, 3000, [3000, 6000]),
                                             ("sglang", 1000, 1000, [1000 * k for k in
                                                                     range(1, 7)])):
        code, out, err = run(capsys, *base, "--cadence", cadence)
        assert code == 0, err
        result = json.loads(out)["runs"][0]
        assert result["cadence"]["window"] == window
        assert result["cadence"]["interval"] == interval
        assert result["rebalances"]["step"] == steps
    code, out, err = run(capsys, *base, "--cadence", "vllm", "--interval", "2000")
    assert code == 0, err
    assert json.loads(out)["runs"][0]["rebalances"]["step"] == [2000, 4000, 6000]
    # a trace too short names the cadence's parts, not flags the user never gave
    code, _, err = run(capsys, *base[:1], str(path), "--step-range", ":5000", *base[2:],
                       "--cadence", "vllm", "--window", "500")
    assert code == 2
    assert_one_line_error(err)
    assert "after --cadence vllm's interval 3000 steps" in err and "2 × --window 500" in err
    code, _, err = run(capsys, *base, "--cadence", "sglang", "--protocol", "adrs")
    assert code == 2
    assert_one_line_error(err)
    assert "--cadence sglang and --protocol adrs each name a cadence" in err
    # a trace too short for the cadence is refused in one line, before the warnings on the
    # cluster and dispatch (attacker pass: the one-node warning came first)
    code, _, err = run(capsys, "simulate", str(path), "-r", "16", "-g", "8", "--cadence",
                       "vllm", "--step-range", ":5000", "--dispatch", "nearest")
    assert code == 2
    assert_one_line_error(err)
    assert "keeps 5000 steps" in err and "needs at least 6000" in err


def test_simulate_refuses_planner_flags_with_planner_none(capsys, trace_file) -> None:
    """Found by an attacker pass: --planner none dropped --estimator without a word (as
    it did --policy); as --incremental with another planner, they are refused."""
    base = ["simulate", str(trace_file), "--window", "10", "-r", "16", "-g", "8",
            "--planner", "none"]
    for extra, named in ((["--estimator", "ema:5"], "--estimator shapes"),
                         (["--estimator", "ema:5", "--compare"], "--estimator shapes"),
                         (["--policy", "global"], "--policy shapes"),
                         (["--estimator", "ema:5", "--policy", "global"],
                          "--estimator and --policy shape")):
        code, _, err = run(capsys, *base, *extra)
        assert code == 2, extra
        assert_one_line_error(err)
        assert named in err and "--planner none never plans" in err
    # what the other runs use stays: --policy with --compare, --estimator with a planner
    assert run(capsys, *base, "--policy", "global", "--compare", "--json")[0] == 0
    assert run(capsys, *base[:-1], "greedy", "--estimator", "ema:5", "--json")[0] == 0


def test_simulate_names_the_default_gpu_count(capsys, tmp_path: Path) -> None:
    trace = tmp_path / "trace.npy"
    np.save(trace, np.random.default_rng(0).random((8, L, 40)) * 100)
    code, _, err = run(capsys, "simulate", trace, "--window", 2, "-r", 50)
    assert code == 2
    assert "defaults to 32" in err and "-g/--gpus" in err
    assert_one_line_error(err)


@pytest.mark.parametrize("command", ["simulate", "bench"])
@pytest.mark.parametrize("flag", ["-r", "-g"])
def test_a_zero_replica_or_gpu_count_is_refused_not_defaulted(capsys, tmp_path: Path,
                                                              command: str, flag: str) -> None:
    # 0 is no "leave it out": it ran on the default cluster (-g 0: 32 GPUs) without a word
    trace = tmp_path / "trace.npy"
    np.save(trace, np.random.default_rng(0).random((8, L, 40)) * 100)
    extra = ["--window", 2] if command == "simulate" else []
    code, _, err = run(capsys, command, trace, *extra, flag, 0)
    assert code == 2 and "must be >= 1, got 0" in err
    assert_one_line_error(err)


def test_simulate_the_locality_policy_and_its_traffic(capsys, tmp_path) -> None:
    # simulate had no --policy locality, and no view of cross-node traffic: under
    # --dispatch nearest on several nodes the table has a remote/token column (modelled),
    # and JSON its per-window figures
    from eplb.tools.generator import generate_trace

    trace = tmp_path / "trace.npy"  # [T, L, E]: two DeepSeek-V3-like layers
    np.save(trace, generate_trace("deepseek-v3", 30, seed=0, num_layers=2).counts.numpy())
    cluster = ("-r", 288, "-g", 32, "--nodes", 4, "--groups", 8, "--window", 10)
    code, out, err = run(capsys, "simulate", trace, *cluster, "--policy", "locality",
                         "--dispatch", "nearest", "--slack", "0.05", "--incremental",
                         "--compare")
    assert code == 0, err
    assert "remote/token" in out and "modelled from the loads" in out
    assert "reference greedy: DeepSeek's own rule" in out  # it has no locality policy
    report = tmp_path / "report"
    code, _, err = run(capsys, "simulate", trace, *cluster, "--policy", "locality",
                       "--dispatch", "nearest", "--compare", "--report", report)
    assert code == 0, err
    pytest.importorskip("matplotlib")  # (the pictures are an extra)
    assert (report / "simulation_traffic_over_time.png").is_file()
    assert "simulation_traffic_over_time.png" in (report / "report.md").read_text()
    code, out, err = run(capsys, "simulate", trace, *cluster, "--policy", "locality",
                         "--dispatch", "nearest", "--json")
    assert code == 0, err
    run_ = json.loads(out)["runs"][0]
    assert run_["summary"]["remote_nodes_per_token"] > 0
    assert len(run_["windows"]["remote_nodes"]) == len(run_["windows"]["start"])
    code, out, _ = run(capsys, "simulate", trace, *cluster)  # even dispatch: no column
    assert code == 0 and "remote/token" not in out
    for extra, message in ((("--policy", "locality"), "add --dispatch nearest"),
                           (("--slack", "0.05"), "--slack is the locality policy's knob"),
                           (("--dispatch", "nearest", "--policy", "global", "--slack", "0.1"),
                            "add --policy locality")):
        code, out, err = run(capsys, "simulate", trace, *cluster, *extra)
        assert code == 2 and out == "" and message in err, (extra, err)


def test_the_greedy_alone_refuses_the_locality_policy(capsys, tmp_path) -> None:
    # the greedy has no locality policy: --planner greedy --policy locality [--slack X]
    # replayed DeepSeek's own rule, the flags dropped without a word (attacker pass);
    # with --compare the greedy stays the reference beside eplb's locality plans
    trace = tmp_path / "trace.npy"
    np.save(trace, np.random.default_rng(0).random((20, L, 16)) * 100)
    cluster = ("-r", 20, "-g", 4, "--nodes", 2, "--groups", 4, "--window", 5,
               "--dispatch", "nearest", "--policy", "locality")
    for extra, named in (((), "--policy locality is eplb's"),
                         (("--slack", "0.1"), "--policy locality and --slack are eplb's")):
        code, out, err = run(capsys, "simulate", trace, *cluster, "--planner", "greedy",
                             *extra)
        assert code == 2 and out == "" and named in err, err
        assert_one_line_error(err)
    code, out, err = run(capsys, "simulate", trace, *cluster, "--planner", "none")
    assert code == 2 and "give --planner eplb, or leave --policy out" in err
    code, out, err = run(capsys, "simulate", trace, *cluster, "--planner", "greedy",
                         "--compare", "--json")
    assert code == 0, err
    assert sorted(r["summary"]["planner"] for r in json.loads(out)["runs"]) == [
        "eplb", "greedy", "none"]


def _two_layer_files(tmp_path: Path) -> tuple[Path, Path]:
    """``(trace.npy [T, L, E], loads.npy [L, E])``: 30 steps of two DeepSeek-V3-like layers
    (generated), and their sum, in ``tmp_path``."""
    from eplb.tools.generator import generate_trace

    counts = generate_trace("deepseek-v3", 30, seed=0, num_layers=2).counts
    trace, loads = tmp_path / "trace.npy", tmp_path / "loads.npy"
    np.save(trace, counts.numpy())
    np.save(loads, counts.sum(0).numpy())
    return trace, loads


def test_simulate_starts_from_an_initial_placement_file(capsys, tmp_path) -> None:
    # SGLang deployments start from --init-expert-location FILE and rebalance from there:
    # --initial FILE replays that start (the replay always began at SGLang's trivial map),
    # rows paired with the trace's layers as eval pairs them (--first-layer for a trace
    # that does not name them); "none" then keeps that file, its oracle too
    trace, loads = _two_layer_files(tmp_path)
    start = tmp_path / "start.sglang.json"  # rows 0..2 of SGLang's file: layers 1, 2 loaded
    cluster = ("-r", 288, "-g", 32, "--nodes", 4, "--groups", 8)
    assert run(capsys, "plan", loads, *cluster, "--first-layer", 1, "--num-model-layers", 3,
               "-o", start)[0] == 0
    own = tmp_path / "start.json"  # eplb's own file records its cluster (SGLang's do not)
    assert run(capsys, "plan", loads, *cluster, "-o", own)[0] == 0
    replay = ("simulate", trace, *cluster, "--window", 10, "--planner", "none", "--json")
    code, out, err = run(capsys, *replay, "--initial", start, "--first-layer", 1)
    assert code == 0, err
    windows = json.loads(out)["runs"][0]["windows"]
    code, out, err = run(capsys, *replay)
    trivial = json.loads(out)["runs"][0]["windows"]
    assert min(windows["balancedness"]) > max(trivial["balancedness"])  # a plan, kept
    assert windows["oracle"] == windows["balancedness"]  # no rebalancing's own foresight
    for extra, message in (
            (("--first-layer", 1), "--first-layer says which model layers"),
            (("--initial", own, "-g", 16), "holds 288 slots on 32 GPUs"),
            (("--initial", tmp_path / "missing.json"), "missing.json")):
        code, out, err = run(capsys, *replay, *extra)
        assert code == 2 and out == "" and message in err, (extra, err)


def test_simulate_replays_an_initial_file_of_another_cluster(capsys, tmp_path) -> None:
    # an eplb file records the nodes and groups it was planned for: replayed on others it
    # met the rebalancer's "initial placement is for Topology(num_replicas=288, ...)";
    # its map is one the replay's GPUs hold, so it is replayed there, with plan
    # --previous's warning naming the flags of its own cluster
    trace, loads = _two_layer_files(tmp_path)
    own = tmp_path / "start.json"
    assert run(capsys, "plan", loads, "-r", 288, "-g", 32, "--nodes", 4, "--groups", 8,
               "-o", own)[0] == 0
    replay = ("simulate", trace, "-r", 288, "-g", 32, "--window", 10, "--planner", "none",
              "--json", "--initial", own)
    code, out, err = run(capsys, *replay, "--nodes", 4, "--groups", 8)
    assert code == 0 and "warning" not in err, err
    on_its_own = json.loads(out)["runs"][0]["windows"]["balancedness"]
    for cluster in ((), ("--nodes", 2), ("--nodes", 4, "--groups", 4)):
        code, out, err = run(capsys, *replay, *cluster)
        assert code == 0, err
        assert "Topology(" not in err
        assert "was planned for 4 node(s) and 8 group(s)" in err
        assert "pass --nodes 4 --groups 8" in err
        # (the even split scores GPUs, whatever the nodes: the same map, the same figures)
        assert json.loads(out)["runs"][0]["windows"]["balancedness"] == on_its_own
    code, out, err = run(capsys, "simulate", trace, "-r", 288, "-g", 32, "--window", 10,
                         "--incremental", "--initial", own, "--json")
    assert code == 0 and "was planned for 4 node(s)" in err, err


def test_simulate_says_it_fills_the_dead_gpus_of_an_initial_file(capsys, tmp_path) -> None:
    # an eplb file keeps dead GPUs (-1 slots); simulate plans for every GPU of -g, so the
    # first rebalance filled them without a word (attacker pass): said, as plan --previous
    # says it of GPUs it revives; no rebalancing keeps them empty and has nothing to say
    trace, loads = _two_layer_files(tmp_path)
    dead = tmp_path / "dead.json"
    assert run(capsys, "plan", loads, "-r", 288, "-g", 32, "--dead-gpus", "3,17",
               "-o", dead)[0] == 0
    replay = ("simulate", trace, "-r", 288, "-g", 32, "--window", 10, "--json",
              "--initial", dead)
    said = "GPUs 3,17 hold nothing in --initial"
    for extra, warned in ((), True), (("--planner", "none"), False), (
            ("--planner", "none", "--compare"), True):
        code, _, err = run(capsys, *replay, *extra)
        assert code == 0, err
        assert (said in err) == warned, (extra, err)
        assert "plan for all 32 GPUs (-g)" in err or not warned


def test_simulate_says_an_initial_file_stacks_replicas(capsys, tmp_path) -> None:
    # eval says a map that stacks two replicas of an expert on one GPU breaks eplb's
    # anti-affinity; simulate --initial replayed such a file without a word (attacker pass)
    trace, loads = _two_layer_files(tmp_path)
    start = tmp_path / "start.sglang.json"
    cluster = ("-r", 288, "-g", 32)
    assert run(capsys, "plan", loads, *cluster, "--first-layer", 1, "--num-model-layers", 3,
               "-o", start)[0] == 0
    replay = ("simulate", trace, *cluster, "--window", 10, "--planner", "none",
              "--initial", start, "--first-layer", 1)
    code, _, err = run(capsys, *replay)
    assert code == 0 and "anti-affinity" not in err, err
    data = json.loads(start.read_text())
    row = data["physical_to_logical_map"][1]  # model layer 1; GPU 0 holds slots 0..8
    # a replica on GPU 0 of an expert with another replica elsewhere, moved in beside it
    mine, other = next((k, s) for k in range(9) for s in range(9, len(row))
                       if row[s] == row[k])
    spare = (mine + 1) % 9
    row[spare], row[other] = row[other], row[spare]  # GPU 0 now holds that expert twice
    start.write_text(json.dumps(data))
    code, _, err = run(capsys, *replay)
    assert code == 0 and "breaks eplb's anti-affinity" in err, err
