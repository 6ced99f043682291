"""Which policy the command line plans and scores with, and what it tells the user.

``eplb eval`` on an engine file (no recorded policy) must call a plan hierarchical when it
is, and score it against the hierarchical ceiling; ``--nodes``/``--groups`` that cannot be
honoured are a one-line warning, as the README promises.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import eplb
from eplb.cli import main
from eplb.core.bounds import balancedness_ceiling
from eplb.formats import write_placement

L, E, R, P, N, G = 3, 32, 48, 8, 4, 8


@pytest.fixture
def loads(tmp_path: Path) -> Path:
    """Skewed loads whose hot groups make the hierarchical ceiling clearly < 1."""
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(L, E, generator=gen, dtype=torch.float64) * 10
    w[:, :4] *= 40  # group 0 is hot: its node cannot shed the load
    path = tmp_path / "loads.npy"
    np.save(path, w.numpy())
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("eplb: warning: ")]


def test_eval_labels_an_sglang_file_hierarchical_with_its_ceiling(capsys, tmp_path,
                                                                   loads) -> None:
    w = torch.from_numpy(np.load(loads))
    placement = eplb.plan(w, R, P, N, G)
    assert placement.policy == "hierarchical"
    path = write_placement(placement, tmp_path / "p.sglang.json", "sglang")
    code, out, err = run(capsys, "eval", "--placement", str(path), str(loads), "-g", str(P),
                         "--nodes", str(N), "--groups", str(G), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["policy"] == "hierarchical"
    hier = balancedness_ceiling(w, R, P, N, G, policy="hierarchical")
    assert hier < 0.95  # the case the ceiling must not hide
    assert result["balancedness_ceiling"] == pytest.approx(hier)
    assert result["balancedness_after"] <= result["balancedness_ceiling"] + 1e-9
    assert warnings_in(err) == []
    code, out, _ = run(capsys, "eval", "--placement", str(path), str(loads), "-g", str(P),
                       "--nodes", str(N), "--groups", str(G), "--summary")
    # the file records no policy: the header says what it was scored as
    assert "(scored as hierarchical)" in out and "global" not in out


def test_eval_scores_a_group_spreading_plan_as_global_and_says_so(capsys, tmp_path,
                                                                   loads) -> None:
    w = torch.from_numpy(np.load(loads))
    placement = eplb.plan(w, R, P, policy="global")
    path = write_placement(placement, tmp_path / "g.sglang.json", "sglang")
    code, out, err = run(capsys, "eval", "--placement", str(path), str(loads), "-g", str(P),
                         "--nodes", str(N), "--groups", str(G), "--json")
    assert code == 0, err
    assert json.loads(out)["policy"] == "global"
    assert len(warnings_in(err)) == 1
    assert "does not hold the expert groups as the hierarchical policy does" in err
    assert "expected a single node" in warnings_in(err)[0]
    code, _, err = run(capsys, "eval", "--placement", str(path), str(loads), "-g", str(P),
                       "--nodes", str(N), "--groups", str(G), "--policy", "hierarchical")
    assert code == 2 and "is not hierarchical" in err and "Traceback" not in err


def test_eval_under_the_nearest_rule_scores_a_group_spreading_plan_as_global_quietly(
        capsys, tmp_path, loads) -> None:
    """New-user pass: plans for SGLang's nearest rule spread groups on purpose, and eval's
    own --help example for such a file warned that it "does not hold the expert groups"."""
    w = torch.from_numpy(np.load(loads))
    placement = eplb.plan(w, R, P, N, G, policy="global", dispatch="nearest")
    path = write_placement(placement, tmp_path / "near.sglang.json", "sglang")
    code, out, err = run(capsys, "eval", "--placement", str(path), str(loads), "-g", str(P),
                         "--nodes", str(N), "--groups", str(G), "--dispatch", "nearest",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["policy"] == "global"
    assert warnings_in(err) == []
    # a hierarchical plan scored under the rule keeps its hierarchical yardstick
    hier = write_placement(eplb.plan(w, R, P, N, G), tmp_path / "h.sglang.json", "sglang")
    code, out, err = run(capsys, "eval", "--placement", str(hier), str(loads), "-g", str(P),
                         "--nodes", str(N), "--groups", str(G), "--dispatch", "nearest",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["policy"] == "hierarchical"



def test_eval_keeps_a_hierarchical_sglang_file_of_moe_rows_hierarchical(capsys, tmp_path,
                                                                         loads) -> None:
    """A hierarchical plan of the MoE rows, written for SGLang with a row per model layer:
    the dense rows eplb adds hold SGLang's trivial map (``slot s -> expert s % E``), which
    spreads every group over the nodes. Scored on an SGLang dump (those rows all zero) it
    was called "not hierarchical" because of layer 0, and scored against the global
    ceiling (new-user pass): rows without load do not decide the policy."""
    w = torch.from_numpy(np.load(loads))
    placement = eplb.plan(w, R, P, N, G)
    assert placement.policy == "hierarchical"
    path = write_placement(placement, tmp_path / "moe.sglang.json", "sglang",
                           layer_ids=[3, 4, 5], num_model_layers=3 + L)
    dump = tmp_path / "dump.json"  # an SGLang dump: dense rows 0..2 all zero
    dump.write_text(json.dumps({"logical_count": [[0] * E] * 3 + w.tolist()}))
    code, out, err = run(capsys, "eval", "--placement", str(path), str(dump), "-g", str(P),
                         "--nodes", str(N), "--groups", str(G), "--json", "--summary")
    assert code == 0, err
    result = json.loads(out)
    assert result["policy"] == "hierarchical"
    hier = balancedness_ceiling(w, R, P, N, G, policy="hierarchical")
    assert result["balancedness_ceiling"] == pytest.approx(hier)
    assert "does not hold the expert groups" not in err
    code, _, err = run(capsys, "eval", "--placement", str(path), str(dump), "-g", str(P),
                       "--nodes", str(N), "--groups", str(G), "--policy", "hierarchical")
    assert code == 0, err

@pytest.mark.parametrize("command", ["plan", "eval"])
def test_groups_that_do_not_divide_over_nodes_warn(capsys, tmp_path, loads, command) -> None:
    w = torch.from_numpy(np.load(loads))
    path = write_placement(eplb.plan(w, R, P, N, G), tmp_path / "p.sglang.json", "sglang")
    if command == "plan":
        argv = ["plan", str(loads), "-r", str(R), "-g", str(P), "--nodes", "4", "--groups", "7",
                "-o", str(tmp_path / "out.json"), "--json"]
    else:
        argv = ["eval", "--placement", str(path), str(loads), "-g", str(P), "--nodes", "4",
                "--groups", "7", "--json"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert json.loads(out)["policy"] == "global"
    warned = warnings_in(err)
    assert len(warned) == 1, err
    assert "planning globally" in warned[0] and "--groups (7)" in warned[0]
    assert "--nodes (4)" in warned[0] and "Traceback" not in err


def test_forced_hierarchical_that_cannot_apply_names_the_flags(capsys, tmp_path, loads) -> None:
    code, _, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--nodes", "4",
                       "--groups", "7", "--policy", "hierarchical", "-o",
                       str(tmp_path / "out.json"))
    assert code == 2
    assert err.startswith("eplb: error: --policy hierarchical is impossible") and "--groups" in err


def test_dead_gpus_with_nodes_and_groups_warn_once(capsys, tmp_path, loads) -> None:
    code, out, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--nodes",
                         str(N), "--groups", str(G), "--dead-gpus", "3", "-o",
                         str(tmp_path / "out.json"), "--json")
    assert code == 0, err
    assert json.loads(out)["policy"] == "global"
    warned = warnings_in(err)
    assert len(warned) == 1 and "--dead-gpus" in warned[0]
    assert "RuntimeWarning" not in err and ".py:" not in err  # no Python warning format


def test_bench_labels_follow_the_same_resolution(capsys, loads) -> None:
    code, out, err = run(capsys, "bench", "--no-builtin", str(loads), "-r", str(R), "-g", str(P),
                         "--nodes", str(N), "--groups", str(G), "--repeats", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["scenarios"][0]["policy"] == "hierarchical"


def test_eval_of_an_sglang_file_with_dense_rows_keeps_its_hierarchical_policy(
        capsys, tmp_path, loads) -> None:
    """An SGLang file has a row per model layer; the dense layers' rows are SGLang's
    trivial map, which spreads groups over nodes. Only the rows the loads are scored on
    say whether the plan is hierarchical."""
    out = tmp_path / "p.sglang.json"
    code, _, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--nodes",
                       str(N), "--groups", str(G), "--first-layer", "3", "--num-model-layers",
                       str(L + 3), "-o", str(out), "--json")
    assert code == 0, err
    cluster = ["-g", str(P), "--nodes", str(N), "--groups", str(G), "--first-layer", "3"]
    code, text, err = run(capsys, "eval", "--placement", str(out), str(loads), *cluster,
                          "--json", "--summary")
    assert code == 0, err
    assert json.loads(text)["policy"] == "hierarchical"
    assert warnings_in(err) == []
    code, text, err = run(capsys, "eval", "--placement", str(out), str(loads), *cluster,
                          "--policy", "hierarchical", "--json", "--summary")
    assert code == 0, err
    assert json.loads(text)["policy"] == "hierarchical"


@pytest.mark.parametrize(("flags", "message"), [
    (["--nodes", "0"], "--nodes must be >= 1, got 0"),
    (["--groups", "0"], "--groups must be >= 1, got 0"),
    (["--nodes", "3"], f"--gpus ({P}) must be a multiple of --nodes (3)"),
])
def test_eval_refuses_a_cluster_that_cannot_exist(capsys, tmp_path, loads, flags,
                                                  message) -> None:
    """As plan does: --nodes/--groups 0 is not 'leave it out', and GPUs that do not split
    over the nodes are no cluster to score on."""
    w = torch.from_numpy(np.load(loads))
    path = write_placement(eplb.plan(w, R, P), tmp_path / "p.sglang.json", "sglang")
    code, out, err = run(capsys, "eval", "--placement", str(path), str(loads), "-g", str(P),
                         *flags)
    assert code == 2 and out == ""
    assert err.strip() == f"eplb: error: {message}"


@pytest.mark.parametrize(("groups", "said"), [
    ("3", "--groups (3) is not a multiple of --nodes (2)"),
    ("6", f"the {E} experts do not divide into --groups (6)"),
])
def test_simulate_warns_once_by_flag_like_plan(capsys, tmp_path, groups, said) -> None:
    """--nodes/--groups that hierarchical placement cannot honour: one warning in the
    flags' words (not silence, not the API's words once per planner call)."""
    trace = tmp_path / "trace.npy"
    gen = np.random.default_rng(0)
    np.save(trace, np.exp(gen.normal(0, 1, size=(8, L, E))) * 100)
    code, _, err = run(capsys, "simulate", str(trace), "--window", "2", "-r", str(R), "-g",
                       str(P), "--nodes", "2", "--groups", groups, "--json")
    assert code == 0, err
    warned = warnings_in(err)
    assert len(warned) == 1, err
    assert "planning globally" in warned[0] and said in warned[0]
    code, _, err = run(capsys, "simulate", str(trace), "--window", "2", "-r", str(R), "-g",
                       str(P), "--nodes", "2", "--groups", groups, "--policy", "hierarchical")
    assert code == 2 and err.startswith("eplb: error: --policy hierarchical is impossible")


@pytest.mark.parametrize("policy", ["auto", "hierarchical"])
def test_simulate_refuses_a_nearest_budget_outside_global_by_flag(capsys, tmp_path,
                                                                   policy) -> None:
    """--max-moves under --dispatch nearest budgets the global policy only: simulate
    refuses it for a hierarchical plan in the flags' words, as plan does, before any
    warning that suggests another policy (it said 'max_moves with dispatch='nearest'')."""
    trace = tmp_path / "trace.npy"
    gen = np.random.default_rng(0)
    np.save(trace, np.exp(gen.normal(0, 1, size=(8, L, E))) * 100)
    code, out, err = run(capsys, "simulate", str(trace), "--window", "2", "-r", str(R),
                         "-g", str(P), "--nodes", "2", "--groups", str(G), "--policy", policy,
                         "--dispatch", "nearest", "--incremental", "--max-moves", "4")
    assert code == 2 and out == ""
    assert err.strip() == ("eplb: error: --max-moves under --dispatch nearest on several "
                           "nodes budgets the global and locality policies with every GPU "
                           "live; with the hierarchical policy eplb re-plans and relabels onto "
                           "the old GPUs (no budget): add --policy global, or drop --max-moves")
    code, _, err = run(capsys, "simulate", str(trace), "--window", "2", "-r", str(R), "-g",
                       str(P), "--nodes", "2", "--groups", str(G), "--policy", "global",
                       "--dispatch", "nearest", "--incremental", "--max-moves", "4", "--json")
    assert code == 0, err


def test_plan_takes_a_locality_budget(capsys, tmp_path, loads) -> None:
    """--max-moves with --policy locality under --dispatch nearest caps the slots moved
    beyond the forced ones (it was refused: the policy took no budget)."""
    old = tmp_path / "old.json"
    assert run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(old))[0] == 0
    code, out, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--nodes",
                         str(N), "--groups", str(G), "--policy", "locality", "--dispatch",
                         "nearest", "--previous", str(old), "--max-moves", "4", "--json",
                         "-o", str(tmp_path / "p.json"))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["moved_slots_beyond_forced"] <= 4


def test_plan_refuses_a_move_price_the_nearest_replan_does_not_score(capsys, tmp_path,
                                                                      loads) -> None:
    """--move-price with --dispatch nearest and the hierarchical policy on several nodes:
    that plan re-plans and relabels, scoring no move, so the flag changed nothing."""
    w = torch.from_numpy(np.load(loads))
    old = write_placement(eplb.plan(w, R, P, N, G), tmp_path / "old.json")
    code, out, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--nodes",
                         str(N), "--groups", str(G), "--policy", "hierarchical", "--dispatch",
                         "nearest", "--previous", str(old), "--move-price", "0.5", "-o",
                         str(tmp_path / "new.json"))
    assert code == 2 and out == ""
    assert err.strip() == ("eplb: error: --move-price under --dispatch nearest prices the "
                           "global and locality policies' moves; with the hierarchical policy "
                           "eplb re-plans and relabels onto the old GPUs, scoring no moves: "
                           "drop --move-price")
    for policy in ("global", "locality"):  # (the locality policy prices its moves too)
        code, _, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--nodes",
                           str(N), "--groups", str(G), "--policy", policy, "--dispatch",
                           "nearest", "--previous", str(old), "--move-price", "0.5", "-o",
                           str(tmp_path / f"{policy}.json"))
        assert code == 0, err


@pytest.mark.parametrize("flag, value", [("--max-moves", "4"), ("--move-price", "0.5"),
                                         ("--drift", "0.05")])
def test_plan_and_simulate_refuse_a_nearest_move_knob_in_the_same_words(capsys, tmp_path, loads,
                                                                        flag, value) -> None:
    """--max-moves and --move-price under --dispatch nearest with the hierarchical policy on
    several nodes: plan and simulate refuse them by one check, in the same words (simulate
    kept its own copy of plan's check, and the two had drifted apart)."""
    w = torch.from_numpy(np.load(loads))
    old = write_placement(eplb.plan(w, R, P, N, G), tmp_path / "old.json")
    cluster = ("-r", str(R), "-g", str(P), "--nodes", str(N), "--groups", str(G), "--policy",
               "hierarchical", "--dispatch", "nearest", flag, value)
    code, out, planned = run(capsys, "plan", str(loads), *cluster, "--previous", str(old),
                             "-o", str(tmp_path / "new.json"))
    assert code == 2 and out == "", planned
    trace = tmp_path / "trace.npy"
    np.save(trace, np.exp(np.random.default_rng(0).normal(0, 1, size=(8, L, E))) * 100)
    code, out, simulated = run(capsys, "simulate", str(trace), "--window", "2", *cluster,
                               "--incremental")
    assert code == 2 and out == "", simulated
    assert simulated == planned and planned.startswith(f"eplb: error: {flag} under --dispatch")


@pytest.mark.parametrize("extra", [["--groups", "2", "--policy", "hierarchical"],
                                   ["--dead-gpus", "3"]])
def test_a_nearest_move_budget_on_one_node_is_taken(capsys, tmp_path, extra) -> None:
    """On one node eplb.plan budgets every plan under --dispatch nearest (the hierarchical
    policy, dead GPUs): plan and simulate refused --max-moves there, saying eplb re-plans
    and relabels with no budget (true on several nodes only), and the Rebalancer likewise."""
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(2, 16, generator=gen) * 100
    cluster = ("-r", "32", "-g", "8", "--dispatch", "nearest", *extra)
    np.save(tmp_path / "w.npy", w.numpy())
    np.save(tmp_path / "w2.npy", w.flip(1).numpy())
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    assert run(capsys, "plan", str(tmp_path / "w.npy"), *cluster, "-o", str(old))[0] == 0
    code, out, err = run(capsys, "plan", str(tmp_path / "w2.npy"), *cluster, "--previous",
                         str(old), "--max-moves", "3", "--json", "-o", str(new))
    assert code == 0, err
    assert json.loads(out)["moved_slots_total"] == 3
    trace = tmp_path / "trace.npy"
    np.save(trace, np.exp(np.random.default_rng(0).normal(0, 1, size=(8, 2, 16))) * 100)
    if "--dead-gpus" not in extra:  # (simulate takes no dead GPUs)
        code, _, err = run(capsys, "simulate", str(trace), "--window", "2", *cluster,
                           "--incremental", "--max-moves", "3", "--json")
        assert code == 0, err


def test_eval_previous_of_another_node_count_warns_once_its_inputs_are_checked(
        capsys, tmp_path, loads) -> None:
    """Attacker pass: ``eval --previous`` of an eplb file planned for one node, beside a
    plan for 4 nodes and 8 groups, was scored and its moves counted without a word, where
    ``plan --previous`` warns. The warning comes once every input is checked, so a refusal
    stays one line."""
    w = torch.from_numpy(np.load(loads))
    now, old = tmp_path / "now.json", tmp_path / "old.json"
    write_placement(eplb.plan(w, R, P, N, G), now)
    previous = eplb.plan(w * torch.linspace(2, 0.5, E), R, P)
    write_placement(previous, old)
    code, out, err = run(capsys, "eval", "--placement", str(now), "--previous", str(old),
                         str(loads), "--json", "--summary")
    assert code == 0, err
    (warned,) = warnings_in(err)
    assert f"--previous {old} was planned for 1 node and 1 group" in warned
    assert f"{now} for {N} and {G}" in warned
    moved = eplb.formats.read_placement(now).moved_slots(previous)
    assert json.loads(out)["moved_slots_total"] == int(moved.sum())
    # the same file as --placement's cluster: nothing to say
    code, _, err = run(capsys, "eval", "--placement", str(old), "--previous", str(old),
                       str(loads), "--json")
    assert code == 0 and warnings_in(err) == [], err
    # a mistake found later is the one line
    code, out, err = run(capsys, "eval", "--placement", str(now), "--previous", str(old),
                         str(loads), "--gpu-speed", "1,2")
    assert code == 2 and out == ""
    assert err.startswith("eplb: error: --gpu-speed") and len(err.splitlines()) == 1, err
