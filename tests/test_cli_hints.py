"""What ``eplb plan`` / ``eplb eval`` tell a user who slips: messages found unclear or
missing by a newcomer pass with the real DeepSeek-V3 loads, checked here on small ones."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import skewed_loads_json
from test_cli import run

import eplb.formats
from eplb.cli import main


@pytest.fixture()
def loads(tmp_path):
    return skewed_loads_json(tmp_path, 4, 32, seed=7)[0]


def test_contradicting_gpu_speeds_are_shown_where_they_differ(tmp_path, capsys, loads):
    """The refusal used to show the recorded speeds cut after 8 values: for 16 slow GPUs
    then 16 fast ones it read '(1,1,1,1,1,1,1,1,...)', as if the file agreed with
    ``--gpu-speed 1,...,1``."""
    speeds = ",".join(["1"] * 8 + ["2"] * 8)
    out = tmp_path / "fast.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 16, "--gpu-speed", speeds,
               "-o", out)[0] == 0
    code, _, err = run(capsys, "eval", "--placement", out, loads, "--gpu-speed",
                       ",".join(["1"] * 16))
    assert code == 2
    assert "(8×1, 8×2)" in err and "gives 16×1" in err
    assert "first at GPU 8 (1 against 2)" in err


def test_eval_help_says_eplb_files_record_gpu_speeds(capsys):
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "placement files do not record them" not in text
    assert "eplb's own files planned with --gpu-speed record them" in text


def test_simulate_help_names_every_estimator_argument(capsys):
    """simulate --help listed robust:Z, multi:K and auto bare (new-user pass): the forms
    with their optional arguments, which the CLI accepts and labels its runs with, were
    nowhere in it."""
    assert main(["simulate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for form in ("ema:H", "robust:Z[:N]", "multi:K[:M]", "auto[:M[:F]]"):
        assert form in text, form


def test_simulate_help_says_a_topk_traces_remote_nodes_are_counted(capsys):
    """simulate --help called the remote nodes per token "modelled" (new-user pass): on a
    top-k trace they are counted from its own tokens, as its table's note says."""
    assert main(["simulate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "counted from a top-k trace's own tokens, else modelled" in text


def test_replanning_a_hierarchical_file_without_its_cluster_warns(tmp_path, capsys, loads):
    """A YAML planned for 4 nodes and 8 groups, re-planned with --previous but without
    --nodes/--groups, turned global without a word."""
    old = tmp_path / "lb.yaml"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 16, "--nodes", 4, "--groups", 8,
               "-o", old)[0] == 0
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--previous", old,
                       "-o", tmp_path / "next.yaml")
    assert code == 0
    assert "planned for 4 node(s) and 8 group(s) (hierarchical)" in err
    assert "pass --nodes 4 --groups 8" in err
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--nodes", 4, "--groups",
                       8, "--previous", old, "-o", tmp_path / "same.yaml")
    assert code == 0 and "node(s)" not in err


def test_eval_under_the_nearest_rule_labels_its_after_row(tmp_path, capsys, loads):
    out = tmp_path / "p.sglang.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 16, "-o", out)[0] == 0
    code, stdout, _ = run(capsys, "eval", "--placement", out, loads, "-g", 16, "--nodes", 4,
                          "--dispatch", "nearest", "--summary")
    assert code == 0 and "this placement (after, nearest rule)" in stdout
    code, stdout, _ = run(capsys, "eval", "--placement", out, loads, "-g", 16, "--summary")
    assert code == 0 and "this placement (after) " in stdout


def test_eval_summary_json_leaves_out_the_per_layer_list(tmp_path, capsys, loads):
    """``--summary`` skips the per-layer table; with ``--json`` it used to keep the
    per-layer list all the same."""
    out = tmp_path / "p.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 16, "-o", out)[0] == 0
    code, full, _ = run(capsys, "eval", "--placement", out, loads, "--json")
    assert code == 0 and len(json.loads(full)["layers"]) == 4
    code, short, _ = run(capsys, "eval", "--placement", out, loads, "--json", "--summary")
    summary = json.loads(short)
    assert code == 0 and "layers" not in summary
    assert summary["balancedness_after"] == json.loads(full)["balancedness_after"]


@pytest.mark.parametrize("name", ["lb.yaml", "init.sglang.json"])
def test_engine_output_with_dead_gpus_is_refused_before_planning(tmp_path, capsys, loads,
                                                                  name):
    """An engine file cannot hold dead GPUs' empty slots: refused up front, with no
    warning about the file it would have been (the TensorRT-LLM layer-key warning used
    to come first) and nothing written."""
    rows = json.loads(loads.read_text())["logical_count"]
    rows[0] = [0] * len(rows[0])  # a dense layer of an SGLang dump: TRT-LLM warns of it
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"logical_count": rows}))
    out = tmp_path / name
    code, _, err = run(capsys, "plan", dump, "-r", 48, "-g", 16, "--dead-gpus", "3",
                       "-o", out)
    assert code == 2 and not out.exists()
    assert "warning" not in err
    assert "GPUs [3] are dead" in err and "-g 15 -r 45" in err


def test_huge_table_cells_print_in_significant_digits(tmp_path, capsys, loads):
    """A GPU 1e300 times slower than the rest made ``eval`` print 300-digit cells (such
    speeds are refused now; a million times slower still prints 7-digit cells)."""
    speeds = ",".join(["1e-6"] + ["1"] * 15)
    out = tmp_path / "slow.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 16, "--gpu-speed", speeds,
               "-o", out)[0] == 0
    code, text, _ = run(capsys, "eval", "--placement", out, loads)
    assert code == 0
    numbers = [token for token in text.split() if token[:1].isdigit() and "/" not in token]
    assert any("e+" in token for token in numbers) and max(map(len, numbers)) < 12


def test_every_option_with_a_default_says_it_in_its_help():
    """--help is where a user looks for defaults: generate --seed had no help at all,
    simulate --planner none, and generate --preset and eval --policy hid theirs."""
    import argparse

    from eplb.cli import build_parser

    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            quiet = action.default in (None, False, argparse.SUPPRESS)
            if not action.help or (not quiet and "default" not in action.help):
                missing.append(f"{name} {action.option_strings[-1]}")
    assert missing == []


def test_a_gpu_speed_folder_is_named_as_such(tmp_path, capsys, loads):
    """Found by a newcomer pass: `--gpu-speed DIR` answered 'Is a directory: spd'."""
    (tmp_path / "spd").mkdir()
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--gpu-speed",
                       tmp_path / "spd", "-o", tmp_path / "x.json")
    assert code == 2
    assert "--gpu-speed" in err and "a folder; expected 16 comma-separated numbers" in err
    assert not (tmp_path / "x.json").exists()


def test_eval_says_which_gpus_a_placement_leaves_dead(tmp_path, capsys, loads):
    """``plan --dead-gpus 3,17`` titles its table '(global, GPUs 3,17 dead)' and its JSON
    has ``dead_gpus``; ``eval`` of that file said only '(global)' and its JSON had no word
    of the dead GPUs, though it scores the live ones alone."""
    out = tmp_path / "degraded.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 16, "--dead-gpus", "3,7",
               "-o", out)[0] == 0
    code, text, _ = run(capsys, "eval", "--placement", out, loads, "--summary")
    assert code == 0 and "(global, GPUs 3,7 dead)" in text
    code, text, _ = run(capsys, "eval", "--placement", out, loads, "--json")
    assert code == 0 and json.loads(text)["dead_gpus"] == [3, 7]
    whole = tmp_path / "whole.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 16, "-o", whole)[0] == 0
    code, text, _ = run(capsys, "eval", "--placement", whole, loads, "--json")
    assert code == 0 and json.loads(text)["dead_gpus"] is None


def test_plan_and_eval_titles_name_the_nodes_and_groups(tmp_path, capsys, loads):
    """A newcomer pass: with ``--nodes 4 --groups 8 --policy global`` the plan's title read
    '48 slots on 16 GPUs (global)', no sign that the flags were taken (simulate's said)."""
    out = tmp_path / "p.json"
    code, text, _ = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--nodes", 4, "--groups",
                        8, "--policy", "global", "-o", out)
    assert code == 0 and "48 slots on 16 GPUs in 4 nodes, 8 groups (global)" in text
    code, text, _ = run(capsys, "eval", "--placement", out, loads, "--summary")
    assert code == 0 and "48 slots on 16 GPUs in 4 nodes, 8 groups (global)" in text
    one = tmp_path / "one.json"
    code, text, _ = run(capsys, "plan", loads, "-r", 48, "-g", 16, "-o", one)
    assert code == 0 and "48 slots on 16 GPUs (global)" in text
    # only the side given (review pass: "in 2 nodes, 1 group" named a count never given)
    code, text, _ = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--nodes", 2, "-o",
                        tmp_path / "two.json")
    assert code == 0 and "48 slots on 16 GPUs in 2 nodes (global)" in text
    code, text, _ = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--groups", 4, "-o",
                        tmp_path / "four.json")
    assert code == 0 and "48 slots on 16 GPUs with 4 groups (global)" in text


def test_eval_of_a_multi_node_sglang_file_points_at_the_nearest_rule(tmp_path, capsys, loads):
    """An SGLang file records no dispatch rule, so eval scores it on the even split; a
    newcomer pass scored a plan made for the nearest rule that way without a word."""
    out = tmp_path / "p.sglang.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 16, "--nodes", 4, "--groups", 8,
               "--policy", "global", "--dispatch", "nearest", "-o", out)[0] == 0
    code, _, err = run(capsys, "eval", "--placement", out, loads, "-g", 16, "--nodes", 4)
    assert code == 0 and "add --dispatch nearest" in err
    for given in ("even", "nearest"):  # a rule the user named: nothing to point at
        code, _, err = run(capsys, "eval", "--placement", out, loads, "-g", 16, "--nodes", 4,
                           "--dispatch", given)
        assert code == 0 and "add --dispatch nearest" not in err
    code, _, err = run(capsys, "eval", "--placement", out, loads, "-g", 16)  # one node
    assert code == 0 and "add --dispatch nearest" not in err


def test_generate_refuses_a_huge_trace_before_saying_it_generates(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--preset", "deepseek-v3", "--steps", 40000,
                       "-o", tmp_path / "big.pt")
    assert code == 2 and "GiB of counts" in err
    assert "generating 40000 steps" not in err and not (tmp_path / "big.pt").exists()


def test_an_emit_the_output_name_cannot_be_read_as_is_refused_before_planning(tmp_path,
                                                                             capsys, loads):
    """Found by an attacker pass: ``--emit trtllm -o lb.json`` planned, warned about layer
    keys, and wrote YAML with comments into a .json file that ``json.load`` failed on."""
    out = tmp_path / "lb.json"
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--emit", "trtllm",
                       "-o", out)
    assert code == 2 and not out.exists()
    assert err.strip().splitlines() == [
        "eplb: error: emit='trtllm' writes YAML with comments, but a file named 'lb.json' is "
        "read as JSON: name it for its content (e.g. lb.yaml) or pick the emit its name "
        "implies ('json')"]
    assert run(capsys, "plan", loads, "-r", 48, "-g", 16, "--emit", "trtllm", "-o",
               tmp_path / "lb.yaml")[0] == 0


def test_a_map_with_unequal_group_shares_per_node_is_not_hierarchical(tmp_path, capsys):
    """Found by an attacker pass: every group on one node, but 2 groups on one node and 4
    on the other, passed as hierarchical: eval scored it above the hierarchical ceiling
    (0.5198 against 0.5147), and a plan from it with --max-moves 0 reported its forced
    re-plan as 6 moves beyond the budget. The policy places G/N groups on every node."""
    import eplb
    from eplb import Placement, PlacementError, Topology

    old = [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    with pytest.raises(PlacementError, match="layer 0 node 0 holds 2 expert groups, "
                                             "expected 3"):
        Placement.from_phy2log(eplb.plan(torch.rand(1, 12), 16, 4).phy2log.new_tensor(old),
                               12, Topology(16, 4, 2, 6), "hierarchical").validate()
    placement = tmp_path / "uneq.sglang.json"
    placement.write_text(json.dumps({"physical_to_logical_map": old}))
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps({"logical_count": [[100, 100] + [1] * 10]}))
    code, out, err = run(capsys, "eval", "--placement", placement, loads, "-g", 4, "--nodes", 2,
                         "--groups", 6, "--summary")
    assert code == 0 and "(scored as global)" in out
    assert "does not hold the expert groups as the hierarchical policy does" in err
    after = next(line for line in out.splitlines() if line.startswith("this placement"))
    ceiling = next(line for line in out.splitlines() if line.startswith("ceiling"))
    assert float(after.split()[-2]) <= float(ceiling.split()[-2])
    code, _, err = run(capsys, "plan", loads, "-r", 16, "-g", 4, "--nodes", 2, "--groups", 6,
                       "--previous", placement, "--max-moves", 0, "-o", tmp_path / "new.json")
    assert code == 0 and "6 were forced moves" in err and "0 changed beyond them" in err


@pytest.mark.parametrize(("name", "code_wanted"), [("x.npy", 2), ("x.txt", 0)])
def test_output_name_hints_name_the_sglang_torch_file(tmp_path, capsys, loads, name,
                                                      code_wanted):
    """``plan -o x.npy`` (refused) and ``-o x.txt`` (JSON with a warning) listed the OUT
    names that pick a format without ``*.sglang.pt``, the torch file SGLang reads
    (new-user pass, an SGLang operator)."""
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "-o", tmp_path / name)
    assert code == code_wanted, err
    assert "*.sglang.json or *.sglang.pt" in " ".join(err.split())


@pytest.mark.parametrize("name", [".npy", ".CSV"])
def test_an_output_named_by_a_suffix_alone_is_refused_too(tmp_path, capsys, loads, name):
    """``-o .npy`` wrote JSON to a hidden file '.npy' with a warning, where ``-o x.npy`` is
    refused (Python reads '.npy' as a name without a suffix; attacker pass)."""
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "-o", tmp_path / name)
    assert code == 2 and f"'{name.lower()}' names" in err, err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("name, emit", [(".pt", "pt"), (".yaml", "trtllm"), (".json", "json"),
                                        (".PT", "pt")])
def test_an_output_named_by_a_suffix_alone_gets_that_format(tmp_path, capsys, loads, name,
                                                            emit):
    """``-o .pt`` wrote eplb's JSON into a hidden file named '.pt' ("no suffix"), which a
    torch.load (SGLang's reader of that name) fails on, and ``-o .yaml`` JSON that
    TensorRT-LLM cannot use: a name that is a suffix alone names that format, as ``x.pt``
    does (attacker pass)."""
    out = tmp_path / name
    code, stdout, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "-o", out)
    assert code == 0 and "no suffix" not in err, err
    assert f"({emit})" in stdout
    assert eplb.formats.read_placement(out, num_gpus=16).num_experts == 32
    head = out.read_bytes()[:2]
    assert (head == b"PK") == (emit == "pt")  # a torch.save zip archive, else text
    # and an --emit the name contradicts is refused as under 'x.pt', before anything is written
    other = tmp_path / "b" / name
    other.parent.mkdir()
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "-o", other,
                       "--emit", "pt" if emit != "pt" else "json")
    assert code == 2 and "a file named" in err, err
    assert not other.exists()


@pytest.mark.parametrize("name", [".pt", ".json"])
def test_sglang_output_named_by_a_suffix_alone(tmp_path, capsys, loads, name):
    """SGLang tests ``--init-expert-location`` with ``str.endswith('.pt')``, so it reads a
    file named '.pt' with torch.load; eplb refused that name for ``--emit sglang``."""
    out = tmp_path / name
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--first-layer", 0,
                       "-o", out, "--emit", "sglang")
    assert code == 0, err
    assert eplb.formats.read_placement(out, num_gpus=16).num_layers == 4


def test_plan_help_says_other_formats_names_are_refused(capsys):
    """``plan --help`` said every name but TensorRT-LLM's, eplb's .pt and SGLang's gave
    JSON ("anything else -> json"), where ``-o x.npy`` is refused (new-user pass)."""
    assert main(["plan", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "anything else -> json. " not in text
    assert "a name of another format (.npy, .npz, .csv, .pth, ...) is refused" in text
