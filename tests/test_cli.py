"""The ``eplb`` command, run in-process through ``eplb.cli.main`` and once as a subprocess."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from eplb.cli import main, sim
from eplb.formats import read_loads, write_loads

COMMANDS = ["demo", "plan", "eval", "bench", "simulate", "generate"]
L, E, R, P = 4, 16, 20, 4


def small_loads_file(tmp_path: Path) -> Path:
    """A small skewed ``[L, E]`` loads file (.npy)."""
    gen = np.random.default_rng(0)
    w = np.exp(gen.normal(0, 1, size=(L, E))) * 100
    path = tmp_path / "loads.npy"
    np.save(path, w)
    return path


@pytest.fixture
def loads(tmp_path: Path) -> Path:
    return small_loads_file(tmp_path)


def run(capsys, *argv: object) -> tuple[int, str, str]:
    """``eplb`` with ``argv`` (paths and numbers as text): ``(exit code, stdout, stderr)``."""
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("eplb: error: ")
    assert "Traceback" not in err


# ------------------------------------------------------------------------ framework


def test_version(capsys) -> None:
    import eplb

    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert eplb.__version__ in out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_every_command_has_an_example(capsys, command: str) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert f"eplb {command}" in out
    assert "example" in out


def test_no_command_is_a_usage_error(capsys) -> None:
    code, _, err = run(capsys)
    assert code == 2
    assert "COMMAND" in err


def test_unknown_option_is_a_usage_error(capsys, loads: Path) -> None:
    code, _, err = run(capsys, "plan", str(loads), "--bogus")
    assert code == 2
    assert "required" in err
    assert_one_line_error(err)
    code, _, err = run(capsys, "plan", str(loads), "-r", "20", "-g", "4", "-o", "x", "--bogus")
    assert code == 2
    assert "unrecognized arguments" in err
    assert_one_line_error(err)


@pytest.mark.parametrize("argv", [
    ("plan", "LOADS", "-r", "2.5", "-g", "4", "-o", "x.json"),
    ("plan", "LOADS", "-r", "20", "-g", "4", "-o", "x.json", "--max-moves", "-5"),
    ("plan", "LOADS", "-g", "4"),
    ("--threads", "0", "demo"),
    ("bogus",),
    ("eval", "LOADS", "--placement"),
    ("demo", "-r", "16"),
    (),
    ("--debug",),
])
def test_usage_mistakes_are_one_line_errors(capsys, loads: Path, argv) -> None:
    # argparse printed its whole usage block, then "eplb plan: error: ..." (new-user
    # pass), where the README promises one "eplb: error: ..." line and exit code 2
    code, out, err = run(capsys, *(str(loads) if a == "LOADS" else a for a in argv))
    assert code == 2 and not out
    assert_one_line_error(err)
    assert "--help' lists the options" in err or "--help' describes them" in err
    if argv and argv[0] in ("demo", "plan", "eval"):  # the command's own mistake names it
        assert err.startswith(f"eplb: error: {argv[0]}: ")


# ------------------------------------------------------------------------ plan


def test_plan_writes_a_valid_placement_and_prints_a_summary(capsys, tmp_path, loads) -> None:
    from eplb.formats import read_placement

    out_file = tmp_path / "p.json"
    code, out, _ = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o",
                       str(out_file))
    assert code == 0, out
    assert "balancedness" in out and "no rebalancing" in out
    placement = read_placement(out_file)
    placement.validate()
    assert placement.phy2log.shape == (L, R)


def test_plan_json_summary(capsys, tmp_path, loads) -> None:
    out_file = tmp_path / "p.json"
    code, out, _ = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o",
                       str(out_file), "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["emit"] == "json"
    assert summary["topology"]["num_replicas"] == R
    # planning with redundant slots beats one contiguous copy per expert on skewed loads
    assert summary["balancedness_after"] > summary["balancedness_before"]
    assert 0 < summary["balancedness_after"] <= 1


@pytest.mark.parametrize(("name", "emit"), [("p.yaml", "trtllm"), ("p.pt", "pt"),
                                             ("p.sglang.json", "sglang"), ("p.json", "json")])
def test_plan_infers_emit_from_the_output_name(capsys, tmp_path, loads, name, emit) -> None:
    from eplb.formats import read_placement

    out_file = tmp_path / name
    # a plain .npy does not name its model layers: SGLang's row count must be given
    extra = ["--num-model-layers", str(L)] if emit == "sglang" else []
    code, out, _ = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o",
                       str(out_file), "--json", *extra)
    assert code == 0
    assert json.loads(out)["emit"] == emit
    back = read_placement(out_file, num_gpus=P)  # SGLang files do not record the GPU count
    assert back.phy2log.shape[1] == R


def test_plan_first_layer_keys_trtllm_yaml(capsys, tmp_path, loads) -> None:
    import yaml

    out_file = tmp_path / "lb.yaml"
    code, _, _ = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o",
                     str(out_file), "--first-layer", "3")
    assert code == 0
    doc = yaml.safe_load(out_file.read_text())
    assert sorted(doc["initial_global_assignments"]) == [3, 4, 5, 6]


def test_plan_refuses_to_overwrite_without_force(capsys, tmp_path, loads) -> None:
    out_file = tmp_path / "p.json"
    out_file.write_text("keep me")
    code, _, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o",
                       str(out_file))
    assert code == 2
    assert_one_line_error(err)
    assert "--force" in err
    assert out_file.read_text() == "keep me"
    code, _, _ = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o",
                     str(out_file), "--force")
    assert code == 0
    assert out_file.read_text() != "keep me"


def test_plan_missing_loads_file(capsys, tmp_path) -> None:
    code, _, err = run(capsys, "plan", str(tmp_path / "nope.json"), "-r", "20", "-g", "4",
                       "-o", str(tmp_path / "p.json"))
    assert code == 2
    assert_one_line_error(err)
    assert "nope.json" in err and "not found" in err


@pytest.mark.parametrize(("replicas", "gpus", "word"), [(21, 4, "multiple"), (8, 4, "experts")])
def test_plan_impossible_topology(capsys, tmp_path, loads, replicas, gpus, word) -> None:
    code, _, err = run(capsys, "plan", str(loads), "-r", str(replicas), "-g", str(gpus), "-o",
                       str(tmp_path / "p.json"))
    assert code == 2
    assert_one_line_error(err)
    assert word in err
    assert not (tmp_path / "p.json").exists()


def test_plan_unreadable_loads_file(capsys, tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "plan", str(bad), "-r", "20", "-g", "4", "-o",
                       str(tmp_path / "p.json"))
    assert code == 2
    assert_one_line_error(err)


def test_plan_bad_dead_gpu_list(capsys, tmp_path, loads) -> None:
    code, _, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o",
                       str(tmp_path / "p.json"), "--dead-gpus", "9")
    assert code == 2
    assert_one_line_error(err)
    assert "--dead-gpus" in err


def test_plan_dead_gpus_take_ranges(capsys, tmp_path) -> None:
    """A node lost is a range of GPUs: ``--dead-gpus 4-7`` is GPUs 4, 5, 6 and 7."""
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps(torch.rand(2, 8).mul(100).round().tolist()))
    out = tmp_path / "p.json"
    code, _, err = run(capsys, "plan", loads, "-r", 32, "-g", 8, "--dead-gpus", "1, 4-6",
                       "-o", out)
    assert code == 0, err
    from eplb.formats import read_placement

    placement = read_placement(out)
    per_gpu = placement.phy2log.reshape(2, 8, 4)
    dead = [1, 4, 5, 6]
    assert bool((per_gpu[:, dead] < 0).all())
    assert bool((per_gpu[:, [0, 2, 3, 7]] >= 0).all())
    for spec, words in (("6-4", "runs down; write 4-6"), ("0-99999999999", "outside 0..7"),
                        ("2,1-3", "GPU 2 twice"), ("1,,2", "empty item"),
                        ("3-", "integers"), ("0-7", "every GPU dead"),
                        # an en dash, as word processors and chat apps write ranges: it
                        # was told "must be a comma-separated list of integers"
                        ("1,4\u20136", "'4\u20136' is neither a GPU id nor a range like 8-15")):
        code, _, err = run(capsys, "plan", loads, "-r", 32, "-g", 8, "--dead-gpus", spec,
                           "-o", tmp_path / "refused.json")
        assert code == 2, spec
        assert_one_line_error(err)
        assert words in err, (spec, err)
    assert not (tmp_path / "refused.json").exists()


def test_plan_max_moves_needs_previous(capsys, tmp_path, loads) -> None:
    code, _, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o",
                       str(tmp_path / "p.json"), "--max-moves", "2")
    assert code == 2
    assert_one_line_error(err)


def test_plan_and_eval_say_how_many_steps_they_summed(capsys, tmp_path) -> None:
    steps = np.random.default_rng(2).integers(0, 50, (3, L, E))
    loads = tmp_path / "steps.npy"
    np.save(loads, steps)
    out = tmp_path / "p.json"
    code, text, _ = run(capsys, "plan", loads, "-r", R, "-g", P, "-o", out)
    assert code == 0 and "(3 steps summed)" in text.splitlines()[0]
    code, text, _ = run(capsys, "eval", "--placement", out, loads, "--json", "--summary")
    assert code == 0 and json.loads(text)["steps_summed"] == 3
    code, text, _ = run(capsys, "plan", small_loads_file(tmp_path), "-r", R, "-g", P, "-o",
                        tmp_path / "q.json")
    assert code == 0 and "summed" not in text


def test_nearest_beyond_its_size_is_refused_in_the_clis_words(capsys, tmp_path, loads):
    code, _, err = run(capsys, "plan", loads, "-r", 2048, "-g", 2048, "--nodes", 2,
                       "--dispatch", "nearest", "-o", tmp_path / "p.json")
    assert code == 2
    assert_one_line_error(err)
    assert "--dispatch nearest" in err and "dispatch='nearest'" not in err
    assert not (tmp_path / "p.json").exists()


def test_forced_moves_beyond_the_budget_are_explained(capsys, tmp_path) -> None:
    """A global plan given to a hierarchical call: every layer whose groups straddle nodes
    is re-planned whatever --max-moves says; the CLI says why (it moved far more than 0
    slots and the balance fell, silently, in a new user's try)."""
    weight = np.exp(np.random.default_rng(1).normal(0, 1, (4, 32))) * 100
    loads = tmp_path / "w.npy"
    np.save(loads, weight)
    old, new = tmp_path / "g.json", tmp_path / "h.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 8, "-o", old)[0] == 0
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--nodes", 2, "--groups",
                       4, "--previous", old, "--max-moves", 0, "-o", new)
    assert code == 0
    assert "more than --max-moves 0" in err and "re-planned them whole" in err
    # every slot moved was forced (a budget of 0): the warning and the summary say so
    moved = int(err.split("moved ")[1].split(" slot")[0])
    assert f"{moved} were forced moves" in err and "and 0 changed beyond them" in err, err
    # within the budget and from a map that keeps groups on their nodes: nothing to say
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--nodes", 2, "--groups",
                       4, "--previous", new, "--max-moves", 0, "-o", tmp_path / "i.json")
    assert code == 0 and "forced" not in err and "re-planned" not in err


def test_forced_moves_are_told_apart_from_the_budgeted_ones(capsys, tmp_path) -> None:
    """A map in force that stacks replicas (DeepSeek's greedy does) forces moves beyond
    --max-moves; the CLI splits the slots it moved into those and the ones the budget
    bought, in its text and its JSON (new-user pass: "moved 238 slots, more than
    --max-moves 100", where 142 were forced)."""
    from eplb.core.baselines import plan_greedy
    from eplb.formats import write_placement

    rng = np.random.default_rng(3)
    weight = np.exp(rng.normal(0, 1.2, (6, 32))) * 100
    weight[:, 0] *= 40  # a hot expert: the greedy stacks its replicas on one GPU
    weight[0] = 0  # a dense layer of a dump: its forced moves are counted apart
    loads = tmp_path / "w.npy"
    np.save(loads, weight)
    old = tmp_path / "greedy.json"
    earlier = torch.from_numpy(np.exp(rng.normal(0, 1.2, (6, 32))) * 100)
    earlier[:, 0] *= 40  # the map in force was planned on other loads
    write_placement(plan_greedy(earlier, 64, 8), old, weight=earlier)
    code, out, err = run(capsys, "plan", loads, "-r", 64, "-g", 8, "--previous", old,
                         "--max-moves", 3, "-o", tmp_path / "p.json", "--json")
    assert code == 0
    summary = json.loads(out)
    forced, beyond = summary["moved_slots_forced"], summary["moved_slots_beyond_forced"]
    assert forced > 3 and 0 < beyond <= 3, summary
    # the two parts add up to the total (a slot the forced moves changed and the plan
    # changed again is counted once, as forced: new-user pass)
    assert summary["moved_slots_total"] == forced + beyond
    assert 0 < summary["moved_slots_forced_no_load"] < forced
    idle = summary["moved_slots_forced_no_load"]
    assert f"{forced} were forced moves ({idle} in rows with no load)" in err, err
    assert f"and {beyond} changed beyond" in err
    code, out, _ = run(capsys, "plan", loads, "-r", 64, "-g", 8, "--previous", old,
                       "--max-moves", 3, "-o", tmp_path / "q.json")
    assert code == 0 and (f"({forced} forced by the map in force, {idle} of them in rows with "
                          f"no load, {beyond} beyond them)") in out, out
    assert "ms for the forced moves alone" in out
    # from eplb's own map nothing can be forced: no second plan, every move is beyond
    new = tmp_path / "q.json"
    code, out, _ = run(capsys, "plan", loads, "-r", 64, "-g", 8, "--previous", new,
                       "--max-moves", 3, "-o", tmp_path / "s.json", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["moved_slots_forced"] == 0
    assert summary["moved_slots_beyond_forced"] == summary["moved_slots_total"] <= 3


def test_no_move_split_where_the_planner_takes_no_budget(capsys, tmp_path) -> None:
    """Nearest dispatch with the locality policy re-plans whole and relabels (no budget):
    the split is null whatever the map in force (attacker pass: 0 forced and every move
    'beyond' from a map that could force nothing, null from one that could)."""
    weight = np.exp(np.random.default_rng(8).normal(0, 1, (3, 32))) * 100
    loads = tmp_path / "w.npy"
    np.save(loads, weight)
    old = tmp_path / "old.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 8, "-o", old)[0] == 0
    code, out, err = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--nodes", 2, "--groups", 4,
                         "--policy", "locality", "--dispatch", "nearest", "--previous", old,
                         "--json", "-o", tmp_path / "p.json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["moved_slots_total"] > 0
    assert summary["moved_slots_forced"] is None and summary["moved_slots_beyond_forced"] is None


def test_move_price_sets_the_trade_off_from_the_command_line(capsys, tmp_path) -> None:
    """--move-price is the API's move_price (new-user pass: a CLI user could not change
    the trade-off): 0 moves wherever a move gains, a high price moves fewer slots; it
    needs --previous and a number >= 0."""
    rng = np.random.default_rng(4)
    weight = np.exp(rng.normal(0, 1, (6, 32))) * 100
    loads, earlier = tmp_path / "w.npy", tmp_path / "e.npy"
    np.save(loads, weight)
    np.save(earlier, np.exp(rng.normal(0, 1, (6, 32))) * 100)
    old = tmp_path / "old.json"
    assert run(capsys, "plan", earlier, "-r", 48, "-g", 8, "-o", old)[0] == 0
    moved = {}
    for price in ("0", "0.01", "0.2"):
        code, out, _ = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--previous", old,
                           "--move-price", price, "--json", "-o", tmp_path / f"p{price}.json")
        assert code == 0
        moved[price] = json.loads(out)["moved_slots_total"]
    assert moved["0"] >= moved["0.01"] >= moved["0.2"] and moved["0"] > moved["0.2"], moved
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--move-price", "0.1", "-o",
                       tmp_path / "q.json")
    assert code == 2 and "--move-price needs --previous" in err
    for bad in ("-1", "nan", "inf", "x", "1", "1e300"):
        code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--previous", old,
                           "--move-price", bad, "-o", tmp_path / "r.json")
        assert code == 2 and "--move-price: must be a number in [0, 1)" in err, (bad, err)


def test_eval_previous_scores_the_map_in_force_and_counts_what_moved(capsys, tmp_path):
    """eval --previous OLD: OLD scored beside the placement, and the slots whose expert
    changed from it, as plan --previous reported them when it made the plan (new-user
    pass: eval had no view of what moved); files of another cluster are refused."""
    rng = np.random.default_rng(6)
    earlier, now = (np.exp(rng.normal(0, 1, (5, 32))) * 100 for _ in range(2))
    loads_old, loads = tmp_path / "old.npy", tmp_path / "w.npy"
    np.save(loads_old, earlier)
    np.save(loads, now)
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    assert run(capsys, "plan", loads_old, "-r", 48, "-g", 8, "-o", old)[0] == 0
    code, out, _ = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--previous", old, "-o", new,
                       "--json")
    planned = json.loads(out)
    code, out, _ = run(capsys, "eval", "--placement", new, "--previous", old, loads, "--json",
                       "--summary")
    scored = json.loads(out)
    assert code == 0
    for key in ("moved_slots_total", "moved_slots_max_layer"):
        assert scored[key] == planned[key], key
    assert scored["balancedness_in_force"] == pytest.approx(planned["balancedness_in_force"])
    # plan --json gives the map in force's worst max/mean too, as its table row does
    assert scored["worst_max_over_mean_in_force"] == pytest.approx(
        planned["worst_max_over_mean_in_force"])
    assert 0 < scored["moved_slots_busiest_gpu"] <= scored["moved_slots_total"]
    code, out, _ = run(capsys, "eval", "--placement", new, "--previous", old, loads,
                       "--summary")
    assert code == 0 and "in force (--previous" in out
    assert f"moved from --previous: {planned['moved_slots_total']} slots" in out
    other = tmp_path / "other.json"
    assert run(capsys, "plan", loads_old, "-r", 64, "-g", 8, "-o", other)[0] == 0
    code, _, err = run(capsys, "eval", "--placement", new, "--previous", other, loads)
    assert code == 2 and "64 slots on 8 GPUs" in err and "not the other's" in err, err
    assert_one_line_error(err)
    code, _, err = run(capsys, "eval", "--placement", new, "--previous", tmp_path / "no.json",
                       loads)
    assert code == 2 and "no.json" in err


def test_rows_of_maps_on_gpus_dead_now_say_they_are_scored_as_serving(capsys, tmp_path):
    """With --dead-gpus, no rebalancing and a map in force that holds slots on a dead GPU
    are scored as if it served, and their rows say so (new-user pass: the in-force row
    read better than the plan for the GPUs left); a map in force planned without the dead
    GPU says nothing."""
    rng = np.random.default_rng(8)
    loads = tmp_path / "w.npy"
    np.save(loads, np.exp(rng.normal(0, 1, (4, 32))) * 100)
    old, dead_old = tmp_path / "old.json", tmp_path / "dead_old.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 8, "-o", old)[0] == 0
    assert run(capsys, "plan", loads, "-r", 48, "-g", 8, "--dead-gpus", 3, "-o", dead_old)[0] == 0
    code, out, _ = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--previous", old,
                       "--dead-gpus", 3, "-o", tmp_path / "new.json")
    assert code == 0
    assert "no rebalancing (before; GPU 3 dead now, scored as serving)" in out
    assert "in force (--previous; GPU 3 dead now, scored as serving)" in out
    code, out, _ = run(capsys, "eval", "--placement", tmp_path / "new.json", "--previous", old,
                       loads, "--summary")
    assert code == 0 and f"in force (--previous {old}; GPU 3 dead now" in out
    code, out, _ = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--previous", dead_old,
                       "--dead-gpus", 3, "-o", tmp_path / "again.json")
    assert code == 0 and "in force (--previous)" in out
    code, out, _ = run(capsys, "plan", loads, "-r", 48, "-g", 8, "-o", tmp_path / "live.json")
    assert code == 0 and "no rebalancing (before)" in out and "dead now" not in out


def test_eval_previous_pairs_an_sglang_file_with_eplbs_file_of_the_moe_rows(capsys, tmp_path):
    """An SGLang file has a row per model layer, eplb's file the MoE rows only: on a dump
    whose other rows carry no load they compare by the rows both cover (attacker pass:
    refused, where plan --previous paired them)."""
    rng = np.random.default_rng(7)
    dump = np.zeros((6, 32), np.int64)
    dump[2:] = np.rint(np.exp(rng.normal(0, 1, (4, 32))) * 100)
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"logical_count": dump.tolist()}))
    moe = tmp_path / "moe.npy"
    np.save(moe, dump[2:].astype(np.float64))
    ours, theirs = tmp_path / "p.json", tmp_path / "p.sglang.json"
    assert run(capsys, "plan", moe, "--first-layer", 2, "-r", 48, "-g", 8, "-o", ours)[0] == 0
    assert run(capsys, "plan", moe, "--first-layer", 2, "-r", 48, "-g", 8, "-o", theirs,
               "--num-model-layers", 6)[0] == 0
    for placement, previous in ((theirs, ours), (ours, theirs)):
        code, out, err = run(capsys, "eval", "--placement", placement, "--previous", previous,
                             stats, "-g", 8, "--json", "--summary")
        assert code == 0, err
        result = json.loads(out)
        assert result["moved_slots_total"] == 0
        assert result["balancedness_in_force"] == pytest.approx(result["balancedness_after"])


def test_gpu_speed_with_previous_is_refused_in_the_flags_words(capsys, tmp_path) -> None:
    """Incremental planning plans for equal GPUs: unequal --gpu-speed with --previous is
    refused before any planning, naming the flags (it named the API's gpu_speed and
    previous: new-user pass); equal speeds are equal GPUs and plan."""
    weight = np.exp(np.random.default_rng(2).normal(0, 1, (3, 16))) * 100
    loads = tmp_path / "w.npy"
    np.save(loads, weight)
    old = tmp_path / "old.json"
    assert run(capsys, "plan", loads, "-r", 24, "-g", 4, "-o", old)[0] == 0
    code, _, err = run(capsys, "plan", loads, "-r", 24, "-g", 4, "--previous", old,
                       "--gpu-speed", "1,1,2,2", "-o", tmp_path / "p.json")
    assert code == 2 and "--gpu-speed cannot be combined with --previous" in err, err
    assert "gpu_speed" not in err.replace("--gpu-speed", "")
    assert_one_line_error(err)
    assert not (tmp_path / "p.json").exists()
    assert run(capsys, "plan", loads, "-r", 24, "-g", 4, "--previous", old, "--gpu-speed",
               "2,2,2,2", "-o", tmp_path / "q.json")[0] == 0


def test_rows_with_no_load_are_counted_apart_when_forced_moves_re_plan_them(capsys, tmp_path):
    """A dump's dense layers (all-zero rows) whose old global map straddles nodes are
    re-planned too, but have no balance to lose: the warning counts them apart (new-user
    pass: "61 layer(s) keep expert groups on several nodes" counted 3 dense rows)."""
    weight = np.exp(np.random.default_rng(1).normal(0, 1, (4, 32))) * 100
    weight[0] = 0
    loads = tmp_path / "w.npy"
    np.save(loads, weight)
    old, new = tmp_path / "g.json", tmp_path / "h.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 8, "-o", old)[0] == 0
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--nodes", 2, "--groups",
                       4, "--previous", old, "-o", new)
    assert code == 0
    assert "3 layer(s)" in err and "(rows 1..3)" in err, err
    assert "1 more, rows 0, carry no load" in err, err


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_negative_max_moves_is_refused_by_its_flag(capsys, tmp_path, loads, command) -> None:
    extra = ["-o", str(tmp_path / "p.json")] if command == "plan" else ["--incremental"]
    code, _, err = run(capsys, command, str(loads), "-r", str(R), "-g", str(P), *extra,
                       "--max-moves", "-1")
    assert code == 2 and "--max-moves" in err and "max_moves" not in err


# ------------------------------------------------------------------------ eval


def _plan(capsys, tmp_path: Path, loads: Path) -> Path:
    out_file = tmp_path / "p.json"
    assert run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(out_file))[0] == 0
    return out_file


def test_eval_reports_per_layer_and_summary(capsys, tmp_path, loads) -> None:
    placement = _plan(capsys, tmp_path, loads)
    code, out, _ = run(capsys, "eval", "--placement", str(placement), str(loads))
    assert code == 0
    assert "per layer" in out and "this placement (after)" in out
    code, out, _ = run(capsys, "eval", "--placement", str(placement), str(loads), "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["layers"]) == L
    w = torch.from_numpy(np.load(loads))
    from eplb.formats import read_placement

    expected = read_placement(placement).balancedness(w)
    assert result["balancedness_after"] == pytest.approx(expected)
    for row in result["layers"]:
        assert row["max_over_mean_after"] == pytest.approx(1 / row["balancedness_after"])


def test_eval_says_a_placement_stacks_replicas_and_scores_it(capsys, tmp_path) -> None:
    # attacker pass: an eplb JSON file with two replicas of an expert on one GPU was
    # scored without a word (engines' maps may stack, so it is a warning, not an error)
    from eplb.core import plan_greedy
    from eplb.formats import write_placement

    weight = torch.tensor([[91.0, 35, 10, 78, 27, 50, 1, 4]])
    stacked = plan_greedy(weight, 12, 4)  # GPU 3 holds two of expert 0's three replicas
    assert stacked.phy2log[0, 9:].tolist() == [0, 0, 5]
    path = tmp_path / "stacked.json"
    write_placement(stacked, path)
    loads = tmp_path / "w.npy"
    np.save(loads, weight.numpy())
    code, out, err = run(capsys, "eval", "--placement", path, loads, "--json")
    assert code == 0
    assert "breaks eplb's anti-affinity (layer 0 GPU" in err and "scored as it is" in err
    assert json.loads(out)["balancedness_after"] == pytest.approx(
        float(stacked.balancedness(weight)))


def test_eval_shape_mismatch(capsys, tmp_path, loads) -> None:
    placement = _plan(capsys, tmp_path, loads)
    other = tmp_path / "other.npy"
    np.save(other, np.ones((L + 1, E)))
    code, _, err = run(capsys, "eval", "--placement", str(placement), str(other))
    assert code == 2
    assert_one_line_error(err)


def test_eval_missing_placement(capsys, tmp_path, loads) -> None:
    code, _, err = run(capsys, "eval", "--placement", str(tmp_path / "x.json"), str(loads))
    assert code == 2
    assert_one_line_error(err)


# ------------------------------------------------------------------------ bench


def test_bench_on_a_file_with_report(capsys, tmp_path, loads) -> None:
    report = tmp_path / "rep"
    code, out, _ = run(capsys, "bench", str(loads), "--no-builtin", "-r", str(R), "-g", str(P),
                       "--repeats", "1", "--json", "--report", str(report))
    assert code == 0
    result = json.loads(out)
    (scenario,) = result["scenarios"]
    names = [r["planner"] for r in scenario["results"]]
    assert names == ["no rebalancing", "reference greedy", "eplb"]
    for r in scenario["results"]:
        assert 0 < r["balancedness"] <= 1
    assert (report / "report.md").exists() and (report / "report.html").exists()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == ["s0_heatmap.png", "s0_layers.png"]
    # a second run refuses to overwrite the report
    code, _, err = run(capsys, "bench", str(loads), "--no-builtin", "-r", str(R), "-g", str(P),
                       "--report", str(report))
    assert code == 2
    assert_one_line_error(err)


def test_bench_table_output(capsys, loads) -> None:
    code, out, _ = run(capsys, "bench", str(loads), "--no-builtin", "--repeats", "1")
    assert code == 0
    assert "reference greedy" in out and "ceiling" in out


def test_bench_nothing_to_do(capsys) -> None:
    code, _, err = run(capsys, "bench", "--no-builtin")
    assert code == 2
    assert_one_line_error(err)


# ------------------------------------------------------------------------ generate / simulate


@pytest.fixture
def trace_file(capsys, tmp_path) -> Path:
    path = tmp_path / "trace.pt"
    code, out, _ = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "40", "-o",
                       str(path), "--json")
    assert code == 0, out
    assert json.loads(out)["steps"] == 40
    return path


def test_generate_round_trips_through_read_loads(trace_file) -> None:
    from eplb.formats import read_loads

    trace = read_loads(trace_file)
    assert tuple(trace.counts.shape) == (40, 32, 8)


@pytest.mark.parametrize("name", ["t.npz", "t.npy", "t.json", "t.sglang"])
def test_generate_writes_every_trace_format_plan_reads(capsys, tmp_path, trace_file,
                                                       name) -> None:
    from eplb.formats import read_loads

    path = tmp_path / name
    extra = ["--format", "sglang"] if name.endswith(".sglang") else []
    code, _, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "40", "-o",
                       str(path), "-q", *extra)
    assert code == 0, err
    assert torch.equal(read_loads(path).counts, read_loads(trace_file).counts)


@pytest.mark.parametrize(("fmt", "name", "says"), [
    ("sglang", "t.npz", "a .json file"), ("npz", "t.json", "a .npz file"),
    ("pt", "t.npy", "a .pt file")])
def test_generate_refuses_a_format_the_name_contradicts(capsys, tmp_path, fmt, name,
                                                        says) -> None:
    # --format sglang -o t.npz wrote JSON into a file named .npz without a word: other
    # tools open it by its name (found by the fifteenth-session newcomer pass)
    code, _, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "2", "-o",
                       tmp_path / name, "-q", "--format", fmt)
    assert code == 2 and says in err and name in err
    assert not (tmp_path / name).exists()


def test_generate_refusal_names_the_format_the_name_gives(capsys, tmp_path) -> None:
    """--format pt -o t.sglang.json: the hint said dropping --format writes vllm-history,
    but a name ending .sglang.json writes SGLang's format (new-user pass); the hint now
    names what dropping it writes, and doing so writes that."""
    path = tmp_path / "t.sglang.json"
    code, _, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "2", "-o",
                       path, "-q", "--format", "pt")
    assert code == 2 and "drop --format to write sglang" in err, err
    code, out, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "2", "-o",
                         path, "-q")
    assert code == 0 and "(sglang)" in out, (out, err)


def test_generate_sglang_keeps_model_layers(capsys, tmp_path) -> None:
    # DeepSeek-V3's MoE layers are 3..60; an SGLang dump's rows are model layers, so the
    # file has a row for every layer (dense ones zero), as SGLang's recorder writes it:
    # written as rows 0..57 they were planned and keyed as layers 0..57, and a YAML from
    # it named the wrong layers
    pt, dump, yaml_out = tmp_path / "t.pt", tmp_path / "t.json", tmp_path / "lb.yaml"
    for path, extra in ((pt, []), (dump, ["--format", "sglang"])):
        code, _, err = run(capsys, "generate", "--steps", "2", "-o", path, "-q", *extra)
        assert code == 0, err
    from eplb.formats import read_loads

    trace, back = read_loads(pt), read_loads(dump)
    assert trace.layer_ids == list(range(3, 61)) and back.layer_ids == list(range(61))
    assert torch.equal(back.counts[:, 3:], trace.counts) and back.counts[:, :3].eq(0).all()
    code, _, err = run(capsys, "plan", dump, "-r", 288, "-g", 32, "-o", yaml_out)
    assert code == 0, err
    assert "layers 0..2 saw no tokens" in err
    assert "\n  60: [" in yaml_out.read_text()


def test_dense_rows_are_said_to_carry_no_load(capsys, tmp_path) -> None:
    # (new-user pass: generate said "58 layers" of a 61-row SGLang file, eval showed a
    # dense layer as balanced 1.0000 like any other, plan said "1 layers")
    dump = tmp_path / "t.json"
    code, out, _ = run(capsys, "generate", "--steps", "2", "-o", dump, "--format", "sglang")
    assert code == 0
    assert "58 MoE layers" in out and "SGLang's layout: 61 rows, model layers 0..60" in out
    plan = tmp_path / "p.json"
    assert run(capsys, "plan", dump, "-r", 288, "-g", 32, "-o", plan)[0] == 0
    code, out, _ = run(capsys, "eval", "--placement", plan, dump)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line[:1].isdigit()}
    assert "(no load)" in rows["2"] and "(no load)" not in rows["3"]
    one = tmp_path / "one.npy"
    np.save(one, np.arange(1, 9, dtype=np.float64))
    code, out, _ = run(capsys, "plan", one, "-r", 8, "-g", 4, "-o", tmp_path / "o.json")
    assert code == 0 and out.startswith("1 layer × 8 experts"), out
    # bench's header and simulate's title too ("1 layers", "plan on 1 steps": new-user pass)
    code, out, err = run(capsys, "bench", one, "--no-builtin", "-r", 8, "-g", 4)
    assert code == 0, err
    assert "1 layer × 8 experts" in out and "1 layers" not in out
    trace = tmp_path / "trace.npy"
    np.save(trace, np.random.default_rng(0).integers(1, 9, (8, 1, 8)).astype(np.float64))
    code, out, err = run(capsys, "simulate", trace, "--window", 1, "--interval", 2, "-r", 8,
                         "-g", 4)
    assert code == 0, err
    assert "8 steps, 1 layer × 8 experts" in out and "plan on 1 step every 2" in out


@pytest.mark.parametrize(("flag", "value"), [("-r", "３２"), ("-g", "٨"), ("--dead-gpus", "١"),
                                           ("--first-layer", "３"), ("--seed", "²"),
                                           ("-r", "2_0"), ("--threads", "４"),
                                           ("--gpu-speed", "1,1,1,２")])
def test_integers_are_ascii_digits(capsys, tmp_path, loads, flag, value) -> None:
    # int() reads other scripts' digits: '-g ８' and '--dead-gpus ١' planned (GPU 1 dead),
    # where eplb's own files refuse them (attacker pass)
    argv = {"-r": "20", "-g": "4", flag: value}
    code, _, err = run(capsys, "plan", loads, *[x for kv in argv.items() for x in kv],
                       "-o", tmp_path / "o.json")
    assert code == 2 and value in err and "Traceback" not in err, err
    assert not (tmp_path / "o.json").exists()


def test_generate_list_and_errors(capsys, tmp_path) -> None:
    code, out, _ = run(capsys, "generate", "--list")
    assert code == 0 and "deepseek-v3" in out
    code, _, err = run(capsys, "generate", "--preset", "nope", "-o", str(tmp_path / "t.pt"))
    assert code == 2
    assert_one_line_error(err)


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


# ------------------------------------------------------------------------ demo


def test_demo_quick(capsys, tmp_path) -> None:
    code, out, _ = run(capsys, "demo", "--quick", "--out", str(tmp_path / "d"), "--json")
    assert code == 0
    result = json.loads(out)
    assert [s["policy"] for s in result["scenarios"]] == ["global", "hierarchical"]
    assert (tmp_path / "d" / "report.md").exists()
    code, _, err = run(capsys, "demo", "--quick", "--out", str(tmp_path / "d"))
    assert code == 2
    assert_one_line_error(err)


def test_demo_online_table_names_its_cluster_and_policy(capsys, tmp_path) -> None:
    # the two tables above it are global and hierarchical; the replay plans globally, and
    # its heading said neither (new-user pass)
    code, out, _ = run(capsys, "demo", "--quick", "--out", str(tmp_path / "d"))
    assert code == 0
    online = next(line for line in out.splitlines() if line.startswith("online:"))
    assert "288 slots on 32 GPUs, global policy" in online
    report = (tmp_path / "d" / "report.md").read_text()
    assert "planned for 288 slots on 32 GPUs, global policy" in report


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--steps", "0", "--steps must be >= 2, got 0"),
    ("--seed", str(2**70), "seed must be in"),
])
def test_demo_refuses_bad_numbers_before_writing(capsys, tmp_path, flag, value, message) -> None:
    code, _, err = run(capsys, "demo", "--quick", "--out", str(tmp_path / "d"), flag, value)
    assert code == 2 and message in err
    assert_one_line_error(err)
    assert flag == "--seed" or not (tmp_path / "d").exists()


def test_demo_full_default(capsys, tmp_path, monkeypatch) -> None:
    """The real ``eplb demo`` with its defaults (writes ./eplb-demo-report)."""
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "demo")
    assert code == 0
    assert "deepseek-v3 global" in out and "deepseek-v3 hierarchical" in out
    written = sorted(p.name for p in (tmp_path / "eplb-demo-report").iterdir())
    assert "report.md" in written and "report.html" in written
    assert sum(name.endswith(".png") for name in written) == 5


# ------------------------------------------------------------------------ subprocess


def _eplb_cmd() -> list[str]:
    script = Path(sys.executable).parent / "eplb"
    return [str(script)] if script.exists() else [sys.executable, "-m", "eplb"]


def test_subprocess_entry_point_and_module(tmp_path, loads) -> None:
    # python -m eplb and python -m eplb.cli (the package holding main) alike
    for module in ("eplb", "eplb.cli"):
        done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0 and "eplb" in done.stdout, (module, done.stderr)
    done = subprocess.run([*_eplb_cmd(), "plan", str(tmp_path / "missing.json"), "-r", "20",
                           "-g", "4", "-o", str(tmp_path / "p.json")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert_one_line_error(done.stderr)
    done = subprocess.run([*_eplb_cmd(), "plan", str(loads), "-r", str(R), "-g", str(P), "-o",
                           str(tmp_path / "p.json"), "--json"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["layers"] == L


def test_a_stdout_that_cannot_encode_the_summary_does_not_fail_the_plan(monkeypatch, tmp_path,
                                                                       loads) -> None:
    # under PYTHONIOENCODING=ascii the summary's "×" raised UnicodeEncodeError after the
    # placement was written: "eplb: error: 'ascii' codec can't encode ..." and exit 2
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stream)
    code = main(["plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(tmp_path / "p.json")])
    stream.flush()
    assert code == 0 and f"{L} layers \\xd7 {E} experts" in stream.buffer.getvalue().decode()
    assert stream.errors == "strict"  # the caller's stream is left as it was


def test_help_on_a_stdout_that_cannot_encode_it(monkeypatch) -> None:
    # demo's help holds "×": under PYTHONIOENCODING=ascii "eplb demo --help" crashed with a
    # 40-line UnicodeEncodeError traceback and exit 1 (attacker pass)
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(["demo", "--help"]) == 0
    stream.flush()
    assert "58 MoE layers \\xd7 256 experts" in stream.buffer.getvalue().decode()
    assert stream.errors == "strict"


def test_plan_says_when_gpus_dead_in_previous_come_back(capsys, tmp_path, loads) -> None:
    old = tmp_path / "degraded.json"
    assert run(capsys, "plan", str(loads), "-r", "24", "-g", "4", "--dead-gpus", "2",
               "-o", str(old))[0] == 0
    code, _, err = run(capsys, "plan", str(loads), "-r", "24", "-g", "4", "--previous",
                       str(old), "-o", str(tmp_path / "back.json"))
    assert code == 0
    assert "GPU 2 holds nothing" in err and "--dead-gpus 2" in err
    code, _, err = run(capsys, "plan", str(loads), "-r", "24", "-g", "4", "--previous",
                       str(old), "--dead-gpus", "2", "-o", str(tmp_path / "still.json"))
    assert code == 0 and "hold nothing" not in err


def test_debug_shows_the_traceback_and_keeps_the_exit_code(capsys, tmp_path) -> None:
    code, _, err = run(capsys, "--debug", "plan", str(tmp_path / "missing.npy"), "-r", "8",
                       "-g", "2", "-o", str(tmp_path / "p.json"))
    assert code == 2
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("eplb: error: ")


def test_threads_option(capsys, tmp_path, loads) -> None:
    code, _, err = run(capsys, "--threads", "0", "plan", str(loads), "-r", str(R), "-g",
                       str(P), "-o", str(tmp_path / "p.json"))
    assert code == 2 and "--threads" in err
    code, _, _ = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--threads", "2",
                     "-o", str(tmp_path / "p.json"))
    assert code == 0 and torch.get_num_threads() == 2
    torch.set_num_threads(1)


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


# ------------------------------------------------------------------------ newcomer edges


def test_all_zero_loads_warn_on_plan_and_eval(capsys, tmp_path: Path) -> None:
    # an SGLang dump taken before any traffic: every plan scores 1.0 on it, say so
    zero = tmp_path / "zero.npy"
    np.save(zero, np.zeros((L, E)))
    out = tmp_path / "p.json"
    code, _, err = run(capsys, "plan", zero, "-r", R, "-g", P, "-o", out)
    assert code == 0 and "every layer's loads are zero" in err
    code, _, err = run(capsys, "eval", "--placement", out, zero)
    assert code == 0 and "every layer's loads are zero" in err


def test_demo_empty_out_names_its_own_option(capsys) -> None:
    code, _, err = run(capsys, "demo", "--out", "")
    assert code == 2 and "--out needs a folder name" in err and "--report" not in err


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


def test_eval_nearest_on_one_node_scores_the_even_split(capsys, loads: Path,
                                                        tmp_path: Path) -> None:
    # as plan does: on one node every replica is on the token's node
    out = tmp_path / "p.json"
    assert run(capsys, "plan", loads, "-r", R, "-g", P, "-o", out)[0] == 0
    code, even, _ = run(capsys, "eval", "--placement", out, loads, "--summary", "--json")
    assert code == 0
    code, near, err = run(capsys, "eval", "--placement", out, loads, "--summary", "--json",
                          "--dispatch", "nearest")
    assert code == 0 and "one node" in err
    assert json.loads(near)["balancedness_after"] == json.loads(even)["balancedness_after"]


def test_generate_writes_sglangs_format_to_a_name_ending_sglang_json(capsys, tmp_path) -> None:
    # plan -o x.sglang.json writes SGLang's format; generate wrote vLLM's load_history to
    # such a name (found by the seventeenth-session newcomer pass)
    path = tmp_path / "t.sglang.json"
    code, _, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "3", "-o",
                       str(path), "-q")
    assert code == 0, err
    assert "logical_count" in json.loads(path.read_text())


def test_generate_refuses_a_name_ending_sglang_pt(capsys, tmp_path) -> None:
    # plan -o x.sglang.pt writes SGLang's file; generate wrote eplb's own .pt trace to
    # such a name, which SGLang's --init-expert-location refused at start-up
    # (integrations pass). It is refused, naming the two names that work; --format pt
    # still writes eplb's trace there when asked
    path = tmp_path / "t.sglang.pt"
    code, _, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "3", "-o",
                       str(path), "-q")
    assert code == 2 and "t.sglang.json (SGLang reads it), or t.pt" in err, err
    assert not path.exists()
    code, _, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "3", "-o",
                       str(path), "-q", "--format", "pt")
    assert code == 0, err
    with pytest.raises(ValueError, match=r"u\.sglang\.json"):
        write_loads(read_loads(path), tmp_path / "u.sglang.pt")
    assert not (tmp_path / "u.sglang.pt").exists()


def test_a_format_contradicting_a_sglang_pt_name_is_told_to_ask_for_pt(capsys,
                                                                       tmp_path) -> None:
    # the refusal of --format sglang into t.SGLANG.PT said "drop --format to write pt",
    # and without --format that name is refused (above): it says how pt is asked for
    path = tmp_path / "t.SGLANG.PT"
    code, _, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "3", "-o",
                       str(path), "-q", "--format", "sglang")
    assert code == 2 and "name it t.SGLANG.json, or pass --format pt to write pt" in err, err
    assert run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "3", "-o",
               str(tmp_path / "t.pt"), "-q")[0] == 0
    with pytest.raises(ValueError, match="or give format 'pt' to write pt"):
        write_loads(read_loads(tmp_path / "t.pt"), path, "sglang")
    assert not path.exists()


def test_a_report_file_name_held_by_a_folder_is_named_as_such(capsys, tmp_path) -> None:
    # the first answer was "already exists; pass --force", and --force then said "is a
    # directory" (attacker pass): a folder cannot be replaced, so that is said first
    (tmp_path / "out" / "report.html").mkdir(parents=True)
    for extra in ([], ["--force"]):
        code, _, err = run(capsys, "demo", "--out", str(tmp_path / "out"), *extra)
        assert code == 2 and "is a folder where the report writes a file" in err, err
        assert "--force" not in err


def test_a_ctrl_c_inside_a_cpp_writer_is_reported_as_an_interrupt(capsys, tmp_path,
                                                                   monkeypatch) -> None:
    """Attacker pass: a Ctrl-C while torch's C++ writer saved a ``.pt`` came out as
    'eplb: error: RuntimeError: [enforce fail at inline_container.cc:672] ... unexpected
    pos' with exit 1. Here the writer gets a real SIGINT and fails as torch's does."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default here (ignored in a background run, or a "
                    "runner's own handler): a real one cannot be sent safely")

    def interrupted_write(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected "
                               "pos 832 vs 726") from None
        raise AssertionError("no SIGINT arrived")

    monkeypatch.setattr(sim, "write_loads", interrupted_write)
    code, _, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", 3,
                       "-o", tmp_path / "g.pt", "-q")
    assert code == 130 and err.strip() == "eplb: interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # under a handler of the caller's own (review pass: the tracker stood aside), which
    # still runs and is back afterwards
    calls = []

    def own(signum, frame):
        calls.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, own)
    try:
        code, _, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", 3,
                           "-o", tmp_path / "g2.pt", "-q")
        assert code == 130 and err.strip() == "eplb: interrupted" and len(calls) == 1
        assert signal.getsignal(signal.SIGINT) is own
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # a RuntimeError without a Ctrl-C is still a failure while running
    monkeypatch.setattr(sim, "write_loads", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("disk on fire")))
    code, _, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", 3,
                       "-o", tmp_path / "h.pt", "-q")
    assert code == 1 and "RuntimeError: disk on fire" in err


@pytest.mark.parametrize(("sent_name", "code_said"), [
    ("SIGTERM", (143, "eplb: terminated")),
    pytest.param("SIGHUP", (129, "eplb: hung up"), marks=pytest.mark.skipif(
        not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this system"))])
def test_a_sigterm_while_a_report_is_written_cleans_up(capsys, tmp_path, trace_file,
                                                       monkeypatch, sent_name,
                                                       code_said) -> None:
    """Attacker pass: SIGTERM (``kill``, ``timeout``) and SIGHUP (the terminal closed)
    ended the process on the spot and left the report's hidden staging folder
    ``.eplb-report-*.tmp`` beside the output. Now they stop it like a Ctrl-C: clean-ups
    run, one line, exit 128 + the signal. The writer gets a real signal here, and one
    that torch's C++ writer turns into its own error."""
    sent = getattr(signal, sent_name)
    if signal.getsignal(sent) != signal.SIG_DFL:
        pytest.skip(f"{sent_name} is not the system's default here: a real one cannot be "
                    "sent safely")
    from eplb.tools import report as report_mod

    def terminated_write(*args, **kwargs):
        if signal.getsignal(sent) == signal.SIG_DFL:  # (it would end pytest too)
            raise AssertionError(f"a {sent_name} here would end the process without clean-up")
        os.kill(os.getpid(), sent)
        time.sleep(1)  # the handler runs here
        raise AssertionError(f"no {sent_name} arrived")

    def terminated_cpp_write(*args, **kwargs):
        try:
            terminated_write()
        except BaseException:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected "
                               "pos 832 vs 726") from None

    out = tmp_path / "reports" / "sim"
    out.parent.mkdir()
    for writer in (terminated_write, terminated_cpp_write):
        monkeypatch.setattr(report_mod, "atomic_write", writer)
        code, _, err = run(capsys, "simulate", trace_file, "--window", "10", "--interval", "10",
                           "-r", "16", "-g", "8", "--report", out)
        assert (code, err.strip().splitlines()[-1]) == code_said, err
        assert list(out.parent.iterdir()) == []  # no report, no hidden staging folder
        assert signal.getsignal(sent) == signal.SIG_DFL
