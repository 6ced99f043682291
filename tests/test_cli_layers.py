"""The ``eplb`` command on model layer ids (SGLang files, TensorRT-LLM keys,
``--first-layer``), the clusters and GPU speeds that files record, and the outputs
engines read; in-process through ``eplb.cli.main`` as in ``test_cli.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from helpers import E, L, P, R, run, small_loads_file
from test_cli_inputs import assert_user_error


def test_eval_first_layer_scores_moe_rows_of_an_sglang_file(capsys, tmp_path, loads) -> None:
    out = tmp_path / "p.sglang.json"
    assert run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--first-layer", "1",
               "-o", str(out))[0] == 0
    code, _, err = run(capsys, "eval", "--placement", str(out), str(loads), "-g", str(P))
    assert code == 2 and "--first-layer" in err
    code, text, _ = run(capsys, "eval", "--placement", str(out), str(loads), "-g", str(P),
                        "--first-layer", "1", "--json")
    assert code == 0
    planned = json.loads(run(capsys, "eval", "--placement", str(out), str(loads), "-g",
                             str(P), "--first-layer", "1", "--json")[1])
    assert planned["balancedness_after"] == json.loads(text)["balancedness_after"] > 0.9
    code, _, err = run(capsys, "eval", "--placement", str(out), str(loads), "-g", str(P),
                       "--first-layer", "2")
    assert code == 2 and "no rows for model layers 5" in err and "model layers 0..4" in err


def test_an_sglang_file_paired_in_order_against_its_layers_says_so(capsys, tmp_path,
                                                                   loads) -> None:
    """SGLang reads an SGLang file's row r as model layer r: loads that --first-layer 2 puts
    on layers 2.. were paired with its rows 0.. in order without a word (attacker pass).
    They still are (files shorter than the model, written by other tools, pair their
    MoE rows so: second attacker pass), and it is said."""
    out = tmp_path / "p.sglang.json"
    assert run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--first-layer", "0",
               "-o", str(out))[0] == 0
    evaluate = ["eval", "--placement", str(out), str(loads), "-g", str(P)]
    replan = ["plan", str(loads), "-r", str(R), "-g", str(P), "--previous", str(out),
              "-o", str(tmp_path / "again.json"), "--force"]
    for argv in (evaluate, replan):
        code, _, err = run(capsys, *argv, "--first-layer", "2")
        assert code == 0, err
        assert "SGLang reads as model layers 0.." in err and "pairing their rows in order" in err
        code, _, err = run(capsys, *argv, "--first-layer", "0")
        assert code == 0 and "in order" not in err, err


def test_a_yaml_keyed_by_model_layer_is_scored_and_replanned_by_layer(capsys, tmp_path) -> None:
    """``--first-layer`` means the model layer of the loads' first row in eval as in plan,
    and a TensorRT-LLM YAML without the dense layers of an SGLang dump still matches it."""
    gen = np.random.default_rng(3)
    moe = np.exp(gen.normal(0, 1, size=(L, E))) * 100
    np.save(tmp_path / "moe.npy", moe)
    dump = tmp_path / "dump.json"  # SGLang's dump: a row per model layer, dense ones zero
    dump.write_text(json.dumps({"logical_count": [[0.0] * E] * 3 + moe.round().tolist()}))
    yaml_moe = tmp_path / "moe.yaml"
    assert run(capsys, "plan", str(tmp_path / "moe.npy"), "-r", str(R), "-g", str(P),
               "--first-layer", "3", "-o", str(yaml_moe))[0] == 0
    code, text, err = run(capsys, "eval", "--placement", str(yaml_moe),
                          str(tmp_path / "moe.npy"), "--first-layer", "3", "--json")
    assert code == 0, err
    scored = json.loads(text)
    assert [r["layer"] for r in scored["layers"]] == list(range(3, 3 + L))
    assert scored["balancedness_after"] > 0.9
    # without --first-layer the bare rows pair in order, labelled as the YAML's layers
    # (new-user pass: they were reported as 0..L-1 against keys 3..)
    code, text, err = run(capsys, "eval", "--placement", str(yaml_moe),
                          str(tmp_path / "moe.npy"), "--json")
    assert code == 0, err
    assert json.loads(text)["layers"] == scored["layers"]
    # the whole dump's plan, its dense keys deleted as the warning advises
    full = tmp_path / "full.yaml"
    assert run(capsys, "plan", str(dump), "-r", str(R), "-g", str(P), "-o", str(full))[0] == 0
    trimmed = tmp_path / "trimmed.yaml"
    trimmed.write_text("".join(line for line in full.read_text().splitlines(keepends=True)
                               if not line.startswith(("  0:", "  1:", "  2:"))))
    code, text, err = run(capsys, "eval", "--placement", str(trimmed), str(dump), "--json")
    assert code == 0, err
    assert [r["layer"] for r in json.loads(text)["layers"]] == list(range(3, 3 + L))
    out = tmp_path / "next.yaml"
    code, _, err = run(capsys, "plan", str(dump), "-r", str(R), "-g", str(P), "--previous",
                       str(trimmed), "-o", str(out))
    assert code == 0 and "rows 0..2 saw no tokens" in err and "left out" in err
    keys = [line.split(":")[0].strip() for line in out.read_text().splitlines()
            if line.startswith("  ") and line.strip()[:1].isdigit()]
    assert keys == [str(layer) for layer in range(3, 3 + L)]
    # a layer with load that the placement lacks is an error naming it
    dump.write_text(json.dumps({"logical_count": [[1.0] * E] + [[0.0] * E] * 2
                                + moe.round().tolist()}))
    code, _, err = run(capsys, "eval", "--placement", str(trimmed), str(dump))
    assert code == 2 and "no rows for model layers 0" in err and "holds model layers 3.." in err


def test_plan_previous_takes_the_loads_rows_of_an_sglang_file(capsys, tmp_path, loads) -> None:
    # an SGLang file has a row per model layer; loads of the MoE layers are its rows 1..L
    old = tmp_path / "old.sglang.json"
    assert run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--first-layer", "1",
               "-o", str(old))[0] == 0
    base = ["plan", str(loads), "-r", str(R), "-g", str(P), "--previous", str(old)]
    code, _, err = run(capsys, *base, "-o", str(tmp_path / "a.json"))
    assert code == 2 and "--first-layer K" in err and "Traceback" not in err
    code, text, err = run(capsys, *base, "--first-layer", "1", "-o", str(tmp_path / "b.json"))
    assert code == 0, err
    assert "moved 0 slots" in text  # the same loads: the placement in force stands
    named = tmp_path / "named.json"  # loads that name their model layers: picked by id
    named.write_text(json.dumps({"counts": np.load(loads).tolist(),
                                 "layers": list(range(1, L + 1))}))
    code, text, err = run(capsys, "plan", str(named), "-r", str(R), "-g", str(P),
                          "--previous", str(old), "-o", str(tmp_path / "c.json"))
    assert code == 0 and "moved 0 slots" in text, err


def test_sglang_output_on_several_nodes_names_the_dispatch_rule(capsys, tmp_path, loads) -> None:
    base = ["plan", str(loads), "-r", str(R), "-g", str(P), "--nodes", "2", "--groups", "4",
            "--first-layer", "0", "--num-model-layers", str(L)]
    code, _, err = run(capsys, *base, "-o", str(tmp_path / "a.sglang.json"))
    assert code == 0 and "plan with --dispatch nearest" in err, err
    code, _, err = run(capsys, *base, "--policy", "global", "--dispatch", "nearest",
                       "-o", str(tmp_path / "b.sglang.json"))
    assert code == 0 and "--dispatch nearest" not in err, err
    code, _, err = run(capsys, *base[:10], "-o", str(tmp_path / "c.json"))  # not for SGLang
    assert code == 0 and "--dispatch nearest" not in err, err


def test_sglang_output_on_one_node_names_the_dispatch_rule(capsys, tmp_path, loads) -> None:
    # on one node SGLang's static dispatch serves an even-split file by each rank's own
    # fair draw, well below its even-split figure: the warning is due there too
    base = ["plan", str(loads), "-r", str(R), "-g", str(P), "--first-layer", "0",
            "--num-model-layers", str(L)]
    code, _, err = run(capsys, *base, "-o", str(tmp_path / "a.sglang.json"))
    assert code == 0 and "static serves this file at" in err, err
    assert "plan with --dispatch nearest" in err, err
    code, _, err = run(capsys, *base, "--dispatch", "nearest",
                       "-o", str(tmp_path / "b.sglang.json"))
    assert code == 0 and "static serves this file" not in err, err
    code, _, err = run(capsys, *base[:-2], "-o", str(tmp_path / "c.json"))  # not for SGLang
    assert code == 0 and "static serves this file" not in err, err
    # from the map in force the plan is not one for the ranks' draws, nearest or not
    code, _, err = run(capsys, *base, "--previous", str(tmp_path / "a.sglang.json"),
                       "-o", str(tmp_path / "d.sglang.json"))
    assert code == 0 and "static serves this file" not in err, err


def test_dead_gpus_name_the_live_topology_for_an_engine_and_refuse_repeats(capsys, tmp_path,
                                                                           loads) -> None:
    base = ["plan", str(loads), "-r", "24", "-g", str(P), "--first-layer", "0"]
    code, _, err = run(capsys, *base, "--dead-gpus", "1,1", "-o", str(tmp_path / "a.json"))
    assert code == 2 and "names GPU 1 twice" in err
    for empty in ("", ",,"):  # given, but naming nothing: not silently "none dead"
        code, _, err = run(capsys, *base, "--dead-gpus", empty, "-o", str(tmp_path / "a.json"))
        assert code == 2 and "names no GPU" in err
    for slip in ("1,", "1,,2", ",1"):  # a number left out: not for eplb to guess which
        code, _, err = run(capsys, *base, "--dead-gpus", slip, "-o", str(tmp_path / "a.json"))
        assert code == 2 and "has an empty item" in err, err
    code, _, err = run(capsys, *base, "--dead-gpus", "1", "-o", str(tmp_path / "b.yaml"))
    assert code == 2 and "-g 3 -r 18, 6 slots per GPU" in err, err  # 16 experts on 3 GPUs
    assert run(capsys, "plan", str(loads), "-r", "18", "-g", "3", "-o",
               str(tmp_path / "b.yaml"))[0] == 0


def test_eval_gpu_speed_scores_time_not_load(capsys, tmp_path, loads) -> None:
    speeds = "2,1,1,1"
    # an engine file records no speeds: eval scores it as equal GPUs unless told
    out = tmp_path / "p.yaml"
    assert run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--gpu-speed", speeds,
               "-o", str(out))[0] == 0
    plain = json.loads(run(capsys, "eval", "--placement", str(out), str(loads), "--json")[1])
    timed = json.loads(run(capsys, "eval", "--placement", str(out), str(loads), "--json",
                           "--gpu-speed", speeds)[1])
    assert timed["balancedness_after"] > plain["balancedness_after"]
    assert timed["balancedness_ceiling"] is None
    # eplb's own file records them, and eval scores it with them
    own = tmp_path / "p.json"
    assert run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--gpu-speed", speeds,
               "-o", str(own))[0] == 0
    recorded = json.loads(run(capsys, "eval", "--placement", str(own), str(loads),
                              "--json")[1])
    assert recorded["balancedness_after"] == timed["balancedness_after"]


def test_before_is_scored_in_time_too_with_gpu_speeds(capsys, tmp_path, loads) -> None:
    # "before" and "after" are one measure: ideal time / actual time of each GPU
    speeds = "2,1,1,1"
    # no rebalancing: experts in order, E / P per GPU; time = load / speed
    gpu = torch.from_numpy(np.load(loads)).reshape(L, P, E // P).sum(2)
    speed = torch.tensor([2.0, 1.0, 1.0, 1.0])
    expected = float((gpu.sum(1) / speed.sum()).sum() / (gpu / speed).amax(1).sum())
    out = tmp_path / "p.json"
    planned = json.loads(run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P),
                             "--gpu-speed", speeds, "-o", str(out), "--json")[1])
    scored = json.loads(run(capsys, "eval", "--placement", str(out), str(loads), "--json",
                            "--gpu-speed", speeds)[1])
    assert planned["balancedness_before"] == pytest.approx(expected, rel=1e-12)
    assert scored["balancedness_before"] == pytest.approx(expected, rel=1e-12)
    for row in scored["layers"]:  # the per-layer worst is in time too
        for side in ("before", "after"):
            assert row[f"max_over_mean_{side}"] == pytest.approx(
                1 / row[f"balancedness_{side}"], rel=1e-12)


def test_first_layer_beyond_any_model_is_refused(capsys, tmp_path, loads) -> None:
    code, _, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--first-layer",
                       "100000000", "-o", str(tmp_path / "p.sglang.json"))
    assert code == 2 and "--first-layer must be a model layer" in err


def test_eval_scores_the_loads_own_model_layers(capsys, tmp_path) -> None:
    """Loads that name non-consecutive model layers, against an SGLang file with a row
    for every model layer: eval scores rows 0, 2 (not 0, 1)."""
    rows = (np.random.default_rng(1).random((2, 8)) * 100 + 1).tolist()
    loads = tmp_path / "counts.json"
    loads.write_text(json.dumps({"model/task": {"layers": [0, 2], "counts": rows}}))
    out = tmp_path / "p.sglang.json"
    assert run(capsys, "plan", str(loads), "--key", "model/task", "-r", "12", "-g", "4",
               "-o", str(out))[0] == 0
    code, text, _ = run(capsys, "eval", "--placement", str(out), str(loads), "--key",
                        "model/task", "-g", "4", "--json")
    assert code == 0 and json.loads(text)["balancedness_after"] > 0.95
    # --first-layer names the loads' first layer, as in plan: 0 agrees, 1 contradicts
    assert run(capsys, "eval", "--placement", str(out), str(loads), "--key", "model/task",
               "-g", "4", "--first-layer", "0", "--json")[1] == text
    code, _, err = run(capsys, "eval", "--placement", str(out), str(loads), "--key",
                       "model/task", "-g", "4", "--first-layer", "1")
    assert code == 2 and "contradicts" in err
    # the layers as the file names them, not a range, and no SGLang dump (new-user pass)
    code, _, err = run(capsys, "plan", str(loads), "--key", "model/task", "-r", "12", "-g",
                       "4", "--first-layer", "3", "-o", str(tmp_path / "q.json"))
    assert code == 2 and "model layers 0, 2 (the file names them)" in err
    assert "SGLang" not in err


def test_threads_beyond_any_machine_are_refused(capsys, tmp_path, loads) -> None:
    code, _, err = run(capsys, "--threads", "100000", "plan", str(loads), "-r", str(R), "-g",
                       str(P), "-o", str(tmp_path / "p.json"))
    assert code == 2 and "1..256" in err


def test_plan_shows_the_placement_in_force_and_refuses_one_from_another_cluster(
        capsys, tmp_path, loads) -> None:
    old = tmp_path / "old.json"
    assert run(capsys, "plan", str(loads), "-r", "24", "-g", "4", "-o", str(old))[0] == 0
    code, out, _ = run(capsys, "plan", str(loads), "-r", "24", "-g", "4", "--previous",
                       str(old), "-o", str(tmp_path / "new.json"), "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["balancedness_in_force"] > summary["balancedness_before"]
    code, out, _ = run(capsys, "plan", str(loads), "-r", "24", "-g", "4", "--previous",
                       str(old), "-o", str(tmp_path / "table.json"))
    assert code == 0 and "in force (--previous)" in out
    code, _, err = run(capsys, "plan", str(loads), "-r", "24", "-g", "8", "--previous",
                       str(old), "-o", str(tmp_path / "other.json"))
    assert code == 2
    assert "planned for 24 slots on 4 GPUs" in err and "24 on 8" in err
    # an SGLang file records no GPU count: its own slot count is named, not read as the
    # plan's ("num_replicas (24) must be a multiple of num_gpus (16)" blamed -r 32)
    sglang = tmp_path / "old.sglang.json"
    assert run(capsys, "plan", str(loads), "-r", "24", "-g", "4", "--first-layer", "0",
               "--num-model-layers", str(L), "-o", str(sglang))[0] == 0
    code, _, err = run(capsys, "plan", str(loads), "-r", "32", "-g", "16", "--previous",
                       str(sglang), "-o", str(tmp_path / "other.json"))
    assert code == 2 and "its 24 slots per layer do not fit" in err and "16 GPUs" in err


def test_slack_at_its_default_value_still_needs_the_locality_policy(capsys, tmp_path,
                                                                   loads) -> None:
    for extra in ([], ["--dispatch", "nearest", "--nodes", "2"]):
        code, _, err = run(capsys, "plan", str(loads), "-r", "24", "-g", "4", "--slack",
                           "0.03", *extra, "-o", str(tmp_path / "p.json"))
        assert code == 2 and "--slack" in err


def test_eval_refuses_flags_that_contradict_what_the_file_records(capsys, tmp_path,
                                                                   loads) -> None:
    # eplb's files (and its TensorRT-LLM YAML) record their cluster and policy; the flags
    # describe engine files, and were silently ignored (or half applied) for these
    for name in ("h.json", "h.yaml"):
        out = tmp_path / name
        assert run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--nodes", "2",
                   "--groups", "4", "--first-layer", "0", "-o", str(out))[0] == 0
        base = ["eval", "--placement", str(out), str(loads), "--json"]
        scored = json.loads(run(capsys, *base)[1])
        assert scored["policy"] == "hierarchical"
        assert scored["topology"]["num_nodes"] == 2
        # the same numbers with the flags that agree, refused with those that do not
        again = json.loads(run(capsys, *base, "-g", str(P), "--nodes", "2")[1])
        assert again["balancedness_after"] == scored["balancedness_after"]
        for flags, needle in ((["-g", "2"], "-g 2 contradicts"),
                              (["--nodes", "1"], "--nodes 1 contradicts"),
                              (["--groups", "8"], "--groups 8 contradicts"),
                              (["--policy", "global"], "--policy global contradicts")):
            code, _, err = run(capsys, *base, *flags)
            assert code == 2 and needle in err, (name, flags, err)


@pytest.mark.parametrize(("name", "said"), [
    ("plan.out", "'.out' names no placement format"),
    ("plan", "no suffix"),
    ("sglang.json", "SGLang does not read"),
])
def test_an_output_name_of_no_placement_format_is_warned_about(capsys, tmp_path, loads, name,
                                                              said) -> None:
    code, _, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o",
                       str(tmp_path / name))
    assert code == 0 and said in err and json.loads((tmp_path / name).read_text())


@pytest.mark.parametrize("name", ["plan.npy", "plan.NPZ", "plan.csv", "plan.json.gz",
                                  "plan.safetensors", "plan.pth"])
def test_an_output_name_of_another_format_is_refused(capsys, tmp_path, loads, name) -> None:
    """JSON written under a NumPy/CSV/archive name misled whatever trusts the name (it was
    written with a warning); refused before planning, as ``generate -o x.csv`` is, and
    ``--emit`` still writes that name on purpose."""
    out = tmp_path / name
    code, _, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(out))
    assert_user_error(code, err, f"'{name[name.rindex('.'):].lower()}' names", "--emit")
    assert not out.exists()
    code, _, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(out),
                       "--emit", "json")
    assert code == 0 and json.loads(out.read_text())


def test_plans_of_loads_without_layer_ids_pair_with_their_loads_in_order(capsys,
                                                                         tmp_path) -> None:
    """Found by a review: a plan of MoE-only rows records no layer ids, so it pairs with
    the same rows given --first-layer, and with a dump whose dense rows are all zero."""
    moe = np.exp(np.random.default_rng(4).normal(0, 1, size=(L, E))) * 100
    np.save(tmp_path / "moe.npy", moe)
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"logical_count": [[0.0] * E] * 3 + moe.round().tolist()}))
    old = tmp_path / "old.json"
    assert run(capsys, "plan", str(tmp_path / "moe.npy"), "-r", str(R), "-g", str(P), "-o",
               str(old))[0] == 0
    assert json.loads(old.read_text()).get("layer_ids") is None
    code, _, err = run(capsys, "plan", str(tmp_path / "moe.npy"), "--first-layer", "3",
                         "-r", str(R), "-g", str(P), "--previous", str(old), "-o",
                         str(tmp_path / "new.json"), "--json")
    assert code == 0, err
    code, text, err = run(capsys, "eval", "--placement", str(old), str(dump), "--json")
    assert code == 0 and "rows 0..2 saw no tokens" in err
    assert [r["layer"] for r in json.loads(text)["layers"]] == list(range(3, 3 + L))


def test_routing_follows_the_layers_planned_when_dense_rows_are_left_out(capsys,
                                                                          tmp_path) -> None:
    # found by a review: --previous without the dump's dense rows left the routing trace
    # with the dump's layer count, refused as a mismatch
    moe = np.exp(np.random.default_rng(6).normal(0, 1, size=(L, E))) * 100
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"logical_count": [[0.0] * E] * 2 + moe.round().tolist()}))
    ids = np.random.default_rng(7).integers(0, E, size=(64, L + 2, 2))
    ids[:, :, 1] = (ids[:, :, 0] + 1) % E  # two distinct experts per token
    np.savez(tmp_path / "routing.npz", topk=ids)
    full = tmp_path / "full.yaml"
    assert run(capsys, "plan", str(dump), "-r", str(R), "-g", str(P), "-o", str(full))[0] == 0
    trimmed = tmp_path / "trimmed.yaml"
    trimmed.write_text("".join(line for line in full.read_text().splitlines(keepends=True)
                               if not line.startswith(("  0:", "  1:"))))
    code, _, err = run(capsys, "plan", str(dump), "-r", str(R), "-g", str(P), "--nodes", "2",
                       "--policy", "locality", "--dispatch", "nearest", "--routing",
                       str(tmp_path / "routing.npz"), "--previous", str(trimmed),
                       "-o", str(tmp_path / "next.json"))
    assert code == 0, err


def test_first_layer_that_contradicts_the_placement_layers_is_refused(capsys, tmp_path,
                                                                      loads) -> None:
    """Found by an attacker pass: ``--first-layer K`` against a placement that records
    other model layers paired the rows in order with a warning; as in ``plan`` (where K
    contradicting the loads' own ids is refused) the contradiction is refused, in eval
    and plan --previous alike, naming both layer ranges."""
    old = tmp_path / "old.json"
    assert run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--first-layer", "3",
               "-o", str(old))[0] == 0
    assert json.loads(old.read_text())["layer_ids"] == list(range(3, 3 + L))
    last = 3 + L - 1
    for k in ("0", "5"):
        code, _, err = run(capsys, "eval", "--placement", str(old), str(loads),
                           "--first-layer", k)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"--first-layer {k} puts" in err and f"holds model layers 3..{last}" in err
        assert "pass --first-layer 3" in err and "Traceback" not in err
    code, _, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--previous",
                       str(old), "--first-layer", "0", "-o", str(tmp_path / "new.json"))
    assert code == 2 and "--previous" in err and f"holds model layers 3..{last}" in err
    # the K that agrees scores, and so does leaving it out (rows paired in order)
    assert run(capsys, "eval", "--placement", str(old), str(loads), "--first-layer", "3")[0] == 0
    code, _, err = run(capsys, "eval", "--placement", str(old), str(loads))
    assert code == 0 and "warning" not in err


def test_a_plan_of_bare_rows_from_a_placement_with_layer_ids_records_them(capsys,
                                                                          tmp_path) -> None:
    """Found by a newcomer pass: `plan d.npy --previous p.json` paired the bare rows with
    p.json's model layers 3.. in order, then recorded no layer ids, so the new file no
    longer said which layers it holds."""
    moe = np.exp(np.random.default_rng(5).normal(0, 1, size=(L, E))) * 100
    np.save(tmp_path / "moe.npy", moe)
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    assert run(capsys, "plan", str(tmp_path / "moe.npy"), "--first-layer", "3", "-r", str(R),
               "-g", str(P), "-o", str(old))[0] == 0
    assert json.loads(old.read_text())["layer_ids"] == list(range(3, 3 + L))
    code, _, err = run(capsys, "plan", str(tmp_path / "moe.npy"), "-r", str(R), "-g", str(P),
                       "--previous", str(old), "-o", str(new))
    assert code == 0, err
    assert json.loads(new.read_text())["layer_ids"] == list(range(3, 3 + L))
    # the ids carry on through further rounds
    again = tmp_path / "again.json"
    assert run(capsys, "plan", str(tmp_path / "moe.npy"), "-r", str(R), "-g", str(P),
               "--previous", str(new), "-o", str(again))[0] == 0
    assert json.loads(again.read_text())["layer_ids"] == list(range(3, 3 + L))


def test_an_sglang_file_pairs_by_layer_with_loads_that_name_its_layers_out_of_order(
        capsys, tmp_path) -> None:
    # an SGLang file's row r is model layer r; loads naming layers [2, 1, 0] were paired
    # with its rows in order: eval scored layer 2's loads on layer 0's map (0.51 where the
    # plan serves 0.93), and plan --previous moved slots of a placement that fits exactly
    hot = [[10, 1, 1, 1], [1, 10, 1, 1], [1, 1, 10, 1]]  # layer 2, 1, 0: hot expert 0, 1, 2
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps({"counts": hot, "layers": [2, 1, 0]}))
    shape = ["-r", "8", "-g", "4"]
    out = tmp_path / "p.sglang.json"
    assert run(capsys, "plan", str(loads), *shape, "-o", str(out))[0] == 0
    own = tmp_path / "p.json"
    code, text, _ = run(capsys, "plan", str(loads), *shape, "-o", str(own), "--json")
    assert code == 0
    planned = json.loads(text)
    code, text, err = run(capsys, "eval", "--placement", str(out), str(loads), "-g", "4",
                          "--json")
    assert code == 0, err
    scored = json.loads(text)
    assert scored["balancedness_after"] == pytest.approx(planned["balancedness_after"])
    assert [r["layer"] for r in scored["layers"]] == [2, 1, 0]
    code, text, err = run(capsys, "plan", str(loads), *shape, "--previous", str(out), "-o",
                          str(tmp_path / "next.json"), "--json")
    assert code == 0, err
    assert json.loads(text)["moved_slots_total"] == 0


def _sparse_counts_file(tmp_path):
    """Counts of model layers 0, 7 and 15 only, as OLMoE's published counts name them."""
    gen = np.random.default_rng(5)
    counts = (np.exp(gen.normal(0, 1, size=(3, E))) * 100).round().tolist()
    sparse = tmp_path / "counts.json"
    sparse.write_text(json.dumps({"counts": counts, "layers": [0, 7, 15]}))
    return sparse


def test_sglang_output_names_model_layers_between_rows_that_get_the_trivial_map(
        capsys, tmp_path) -> None:
    """Loads that name only some MoE layers (OLMoE's published counts: layers 0, 7, 15) make
    an SGLang file whose other rows are SGLang's trivial map: said, not left silent. The
    dense layers before the first row (DeepSeek-V3's 0..2 with --first-layer 3) are not."""
    sparse = _sparse_counts_file(tmp_path)
    code, _, err = run(capsys, "plan", str(sparse), "-r", str(R), "-g", str(P),
                       "-o", str(tmp_path / "a.sglang.json"))
    assert code == 0 and "layers 1..6, 8..14" in err and "trivial map" in err
    rows = json.loads((tmp_path / "a.sglang.json").read_text())["physical_to_logical_map"]
    assert len(rows) == 16 and rows[3] == [slot % E for slot in range(R)]
    # after the last row, through --num-model-layers, too
    code, _, err = run(capsys, "plan", str(sparse), "-r", str(R), "-g", str(P),
                       "--num-model-layers", "18", "-o", str(tmp_path / "b.sglang.json"))
    assert code == 0 and "layers 1..6, 8..14, 16..17" in err
    # a leading run of layers without rows is the dense layers' documented case: silent
    bare = small_loads_file(tmp_path)
    code, _, err = run(capsys, "plan", str(bare), "-r", str(R), "-g", str(P),
                       "--first-layer", "3", "-o", str(tmp_path / "c.sglang.json"))
    assert code == 0 and "trivial map" not in err


def test_trtllm_output_names_model_layers_between_rows_it_has_no_map_for(capsys,
                                                                         tmp_path) -> None:
    """TensorRT-LLM raises KeyError at start-up for a MoE layer missing from
    initial_global_assignments: a file from loads that name layers 0, 7, 15 lacks 1..6 and
    8..14, which is said. Contiguous rows (DeepSeek-V3's 3..60) are silent."""
    sparse = _sparse_counts_file(tmp_path)
    code, _, err = run(capsys, "plan", str(sparse), "-r", str(R), "-g", str(P),
                       "-o", str(tmp_path / "a.yaml"))
    assert code == 0 and "layers 1..6, 8..14" in err and "KeyError" in err, err
    doc = yaml.safe_load((tmp_path / "a.yaml").read_text())
    assert sorted(doc["initial_global_assignments"]) == [0, 7, 15]
    bare = small_loads_file(tmp_path)
    code, _, err = run(capsys, "plan", str(bare), "-r", str(R), "-g", str(P),
                       "--first-layer", "3", "-o", str(tmp_path / "c.yaml"))
    assert code == 0 and "KeyError" not in err, err


def test_simulate_leaves_a_dumps_dense_rows_out(capsys, tmp_path) -> None:
    """An SGLang trace has all-zero rows for the dense layers. ``simulate`` replayed them:
    their even placement replaced the trivial one at the first rebalance and was counted as
    moved expert weights (of slots that hold none). Left out, as ``bench`` does, the replay
    is the one of the MoE rows alone."""
    gen = torch.Generator().manual_seed(0)
    moe = torch.poisson(torch.rand(1, 3, 16, generator=gen).expand(60, 3, 16) * 50,
                        generator=gen)
    dump = tmp_path / "dump.sglang.json"
    dump.write_text(json.dumps({"logical_count": torch.cat(
        [torch.zeros(60, 2, 16), moe], 1).tolist()}))
    bare = tmp_path / "moe.npy"
    np.save(bare, moe.numpy())
    argv = ["-r", "20", "-g", "4", "--window", "10", "--json"]
    code, text, _ = run(capsys, "simulate", dump, *argv)
    assert code == 0
    dumped = json.loads(text)
    code, text, _ = run(capsys, "simulate", bare, *argv)
    assert code == 0
    alone = json.loads(text)
    assert dumped["layers_left_out"] == [0, 1] and alone["layers_left_out"] == []
    timeless = [{k: v for k, v in data["runs"][0]["summary"].items() if k != "plan_ms_median"}
                for data in (dumped, alone)]
    assert timeless[0] == timeless[1] and timeless[0]["moved_slots_per_rebalance"] > 0
    code, text, _ = run(capsys, "simulate", dump, *argv[:-1])
    assert code == 0 and "dump.sglang.json (2 all-zero rows left out): 60 steps, 3 layers" in text


def test_in_force_is_scored_on_the_gpus_that_serve_now(capsys, tmp_path, loads) -> None:
    """A map planned while GPU 1 was dead leaves it idle once it is live again: the "in
    force" row scores that on the cluster the new plan is for, as "after" is, not on the
    old map's live GPUs (which showed a near-perfect map the plan then seemed to worsen)."""
    from eplb.formats import read_loads, read_placement

    old = tmp_path / "degraded.json"
    assert run(capsys, "plan", str(loads), "-r", "24", "-g", "4", "--dead-gpus", "1",
               "-o", str(old))[0] == 0
    code, out, _ = run(capsys, "plan", str(loads), "-r", "24", "-g", "4", "--previous",
                       str(old), "-o", str(tmp_path / "revived.json"), "--json")
    assert code == 0
    summary = json.loads(out)
    weight = read_loads(loads).counts.sum(0)
    gpu_loads = read_placement(old).gpu_loads(weight)  # GPU 1's column is all zero
    assert not bool(gpu_loads[:, 1].any())
    on_all_four = float(gpu_loads.mean(1).sum() / gpu_loads.max(1).values.sum())
    assert summary["balancedness_in_force"] == pytest.approx(on_all_four)
    assert summary["balancedness_in_force"] <= 3 / 4 + 1e-9  # one GPU of four idle
    assert summary["balancedness_after"] > summary["balancedness_in_force"]


def test_an_sglang_file_from_bare_rows_says_which_model_layers_it_covers(capsys, tmp_path):
    """Found by a new-user pass: 37 bare rows with --first-layer 3 wrote a 40-row SGLang file
    and said only "40 model layers" (SGLang does not compare the rows with its model's
    layers); a model whose every layer is MoE (Qwen3) was told only of DeepSeek-V3's
    --first-layer 3. A warning on every such file was noise where it is complete (review
    pass): the written line says what to add."""
    rows = tmp_path / "moe_mid.npy"
    np.save(rows, np.random.default_rng(0).random((37, 16)) * 100)
    code, out, err = run(capsys, "plan", rows, "-r", 32, "-g", 8, "--first-layer", 3, "-o",
                         tmp_path / "short.sglang.json")
    # a complete file is as likely: no warning of its layers (the one of SGLang's static
    # dispatch, which serves this even-split plan below its figure, is another matter)
    assert code == 0 and "model layer" not in err
    assert ("(sglang, 40 model layers, 0..39: give --num-model-layers N where the model has "
            "more)") in out
    code, out, err = run(capsys, "plan", rows, "-r", 32, "-g", 8, "--first-layer", 3,
                         "--num-model-layers", 61, "-o", tmp_path / "full.sglang.json")
    assert code == 0 and "(sglang, 61 model layers)" in out
    code, _, err = run(capsys, "plan", rows, "-r", 32, "-g", 8, "-o", tmp_path / "q.sglang.json")
    assert code == 2 and "0 where every layer is MoE, as in Qwen3" in err


def test_plan_from_a_placement_of_another_grouping_warns_once(capsys, tmp_path, loads) -> None:
    """Found by a new-user pass: a hierarchical plan from a global placement printed "previous
    placement was planned for 1 node(s)..." twice, the second time from the plan of the
    forced moves alone that tells them apart."""
    old = tmp_path / "global.json"
    assert run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(old))[0] == 0
    code, _, err = run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "--nodes", "2",
                       "--groups", "4", "--previous", str(old), "-o", str(tmp_path / "h.json"))
    assert code == 0 and err.count("previous placement was planned for 1 node(s)") == 1, err


def test_more_bare_rows_than_model_layers_plan_in_eplbs_format_only(capsys, tmp_path) -> None:
    """A file of 4,097 rows without layer ids was refused for an ``--mtp-layers`` no one
    passed ("must be in 0..-1 ..., got 0"), though eplb's own files take it; an engine file,
    whose keys are model layers 0..4095, is refused in those words, before the planning
    (a TensorRT-LLM YAML failed only after it; attacker pass)."""
    loads = tmp_path / "rows.npy"
    np.save(loads, np.arange(1, 4097 * 2 + 1, dtype=np.float32).reshape(4097, 2))
    out = tmp_path / "p.json"
    code, _, err = run(capsys, "plan", str(loads), "-r", "2", "-g", "2", "-o", str(out))
    assert code == 0 and "mtp" not in err, err
    assert json.loads(out.read_text())["num_layers"] == 4097
    for name in ("p.yaml", "p.sglang.json"):
        code, _, err = run(capsys, "plan", str(loads), "-r", "2", "-g", "2", "-o",
                           str(tmp_path / name))
        assert code == 2 and "4097 rows" in err and "model layers 0..4095" in err, err
        assert "mtp" not in err and not (tmp_path / name).exists()


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_a_bad_slack_is_refused_by_its_flag(capsys, tmp_path, loads, command) -> None:
    """--slack nan / inf / -1 / x: refused by flag at parsing, in plan and simulate alike
    (the API's refusal named its keyword, ``slack``; attacker pass)."""
    for bad in ("nan", "inf", "-1", "x", "１"):
        code, out, err = run(capsys, command, str(loads), "-r", "24", "-g", "4", "--slack", bad,
                             *(["--window", "1"] if command == "simulate" else
                               ["-o", str(tmp_path / "p.json")]))
        assert code == 2 and out == "" and "--slack: must be a finite number >= 0" in err, (
            bad, err)
