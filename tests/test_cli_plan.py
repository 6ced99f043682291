"""``eplb plan`` on the command line: outputs, refusals, dead GPUs, ``--previous`` and the move
budget, in-process through ``eplb.cli.main`` as in ``test_cli.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import E, L, P, R, run, small_loads_file
from test_cli import assert_one_line_error

import eplb
from eplb.formats import read_placement


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
    """Nearest dispatch with the hierarchical policy on several nodes re-plans whole and
    relabels (no budget): the split is null whatever the map in force (attacker pass: 0
    forced and every move 'beyond' from a map that could force nothing, null from one
    that could; the locality policy takes a budget since the fifty-fifth session)."""
    weight = np.exp(np.random.default_rng(8).normal(0, 1, (3, 32))) * 100
    loads = tmp_path / "w.npy"
    np.save(loads, weight)
    old = tmp_path / "old.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 8, "-o", old)[0] == 0
    code, out, err = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--nodes", 2, "--groups", 4,
                         "--policy", "hierarchical", "--dispatch", "nearest", "--previous",
                         old, "--json", "-o", tmp_path / "p.json")
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


def test_plan_drift_reaches_the_planner(capsys, tmp_path):
    """--drift D: the API's ``drift`` (README: ``"drift": 0.05`` tells eplb the loads move
    little, and the CLI had no way to say it): a larger drift values in-sample gains less
    and moves fewer slots; it needs --previous and a number in [0, 2]."""
    rng = np.random.default_rng(7)
    weight = np.exp(rng.normal(0, 1, (6, 32))) * 100
    loads, earlier = tmp_path / "w.npy", tmp_path / "e.npy"
    np.save(loads, weight)
    np.save(earlier, weight * np.exp(rng.normal(0, 0.3, (6, 32))))
    old = tmp_path / "old.json"
    assert run(capsys, "plan", earlier, "-r", 48, "-g", 8, "-o", old)[0] == 0
    moved = {}
    for drift in ("0", "2"):
        code, out, err = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--previous", old,
                             "--drift", drift, "--json", "-o", tmp_path / f"p{drift}.json")
        assert code == 0, err
        moved[drift] = json.loads(out)["moved_slots_total"]
    in_force = read_placement(old)
    expected = [int(eplb.plan(torch.from_numpy(weight), 48, 8, previous=in_force,
                              drift=float(d)).moved_slots(in_force).sum()) for d in ("0", "2")]
    assert [moved["0"], moved["2"]] == expected and moved["0"] > moved["2"], (moved, expected)
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--drift", "0.1", "-o",
                       tmp_path / "q.json")
    assert code == 2 and "--drift needs --previous" in err
    for bad in ("-1", "nan", "inf", "x", "2.5"):
        code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 8, "--previous", old,
                           "--drift", bad, "-o", tmp_path / "r.json")
        assert code == 2 and "--drift: must be a number in [0, 2]" in err, (bad, err)


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


def test_eval_previous_counts_the_slots_that_cross_nodes(capsys, tmp_path):
    """On several nodes eval --previous counts the moved slots whose expert is new to its
    node (weights over the network; the others copy within a node): the README's locality
    figures had no command that printed it (new-user pass). One node: no such count."""
    rng = np.random.default_rng(9)
    loads = tmp_path / "w.npy"
    np.save(loads, np.exp(rng.normal(0, 1, (3, 32))) * 100)
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 8, "-o", old)[0] == 0
    assert run(capsys, "plan", loads, "-r", 48, "-g", 8, "--nodes", 2, "--groups", 4,
               "--dispatch", "nearest", "-o", new)[0] == 0
    code, out, err = run(capsys, "eval", "--placement", new, "--previous", old, loads,
                         "--json", "--summary")
    assert code == 0, err
    scored = json.loads(out)
    before = np.array(json.loads(old.read_text())["phy2log"])
    after = np.array(json.loads(new.read_text())["phy2log"])
    node = np.arange(48) // 24
    want = sum(int(after[layer, s] not in set(before[layer, node == node[s]]))
               for layer in range(3) for s in range(48))
    assert 0 < scored["moved_slots_across_nodes"] == want <= scored["moved_slots_total"]
    code, out, _ = run(capsys, "eval", "--placement", new, "--previous", old, loads,
                       "--summary")
    assert f"({want} across nodes: an expert new to its node)" in out
    code, out, _ = run(capsys, "eval", "--placement", old, "--previous", old, loads, "--json",
                       "--summary")
    assert "moved_slots_across_nodes" not in json.loads(out)


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


def test_all_zero_loads_warn_on_plan_and_eval(capsys, tmp_path: Path) -> None:
    # an SGLang dump taken before any traffic: every plan scores 1.0 on it, say so
    zero = tmp_path / "zero.npy"
    np.save(zero, np.zeros((L, E)))
    out = tmp_path / "p.json"
    code, _, err = run(capsys, "plan", zero, "-r", R, "-g", P, "-o", out)
    assert code == 0 and "every layer's loads are zero" in err
    code, _, err = run(capsys, "eval", "--placement", out, zero)
    assert code == 0 and "every layer's loads are zero" in err
