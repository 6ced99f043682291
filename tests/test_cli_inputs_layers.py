"""Model layer ids in the files handed to the ``eplb`` command: a one-record JSON file keeps
its ids, ids are whole distinct numbers, and several loads files are read as steps and
matched by model layer.

Runs through ``test_cli_inputs.py``'s ``run`` (a thread timeout).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli_inputs import E, assert_user_error, plan_args, run

from eplb.formats import read_loads


def test_a_json_file_that_is_one_count_record_keeps_its_layer_ids(capsys, tmp_path) -> None:
    # the README's {"counts": [[...]], "layers": [...]} record, as the whole file
    rows = [[1, 2, 3, 4], [5, 6, 7, 8]]
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"counts": rows, "layers": [3, 4]}))
    assert read_loads(path).layer_ids == [3, 4]
    out = tmp_path / "plan.json"
    code, _, err = run(capsys, "plan", str(path), "-r", "4", "-g", "2", "-o", str(out))
    assert code == 0, err
    assert json.loads(out.read_text())["layer_ids"] == [3, 4]
    path.write_text(json.dumps({"counts": rows, "layer_ids": [3]}))
    code, _, err = run(capsys, "plan", str(path), "-r", "4", "-g", "2", "-o", str(out),
                       "--force")
    assert_user_error(code, err, "counts has 1 layer ids for 2 rows")
    # a record beside another array is one of two arrays: the key still chooses
    path.write_text(json.dumps({"counts": rows, "layers": [3, 4], "other": rows}))
    code, _, err = run(capsys, "plan", str(path), "-r", "4", "-g", "2", "-o", str(out),
                       "--force")
    assert_user_error(code, err, "--key")


@pytest.mark.parametrize(("name", "write"), [
    ("ids.npz", lambda p: np.savez(p, counts=np.ones((1, 2, 4)), layer_ids=np.array([3.7, 5.2]))),
    ("ids.csv", lambda p: p.write_text("layer,a,b\n3.5,1,2\n4,3,4\n")),
    ("twice.csv", lambda p: p.write_text("layer,a,b\n3,1,2\n3,3,4\n")),
])
def test_layer_ids_are_whole_distinct_numbers_never_truncated(capsys, tmp_path, name,
                                                               write) -> None:
    path = tmp_path / name
    write(path)
    code, _, err = run(capsys, "plan", str(path), "-r", "4", "-g", "2", "-o",
                       str(tmp_path / "o.json"))
    assert_user_error(code, err, name, "layer id")


def test_eval_and_simulate_read_several_loads_files_as_steps_as_plan_does(capsys,
                                                                          tmp_path) -> None:
    """A shell glob of SGLang dumps (README: plan, eval and simulate read them) names
    several files: eval and simulate read them as steps one after another, as plan does,
    instead of stopping at argparse's 'unrecognized arguments'."""
    from test_cli import E, L, P, R, run

    gen = np.random.default_rng(7)
    steps = np.exp(gen.normal(0, 1, size=(4, L, E))) * 100
    files = []
    for i, step in enumerate(steps):
        files.append(tmp_path / f"dump{i}.npy")
        np.save(files[-1], step)
    whole = tmp_path / "whole.npy"
    np.save(whole, steps)
    out = tmp_path / "p.json"
    assert run(capsys, "plan", *files, "-r", R, "-g", P, "-o", out)[0] == 0
    code, text, err = run(capsys, "eval", "--placement", out, *files, "--json")
    assert code == 0, err
    alone = json.loads(run(capsys, "eval", "--placement", out, whole, "--json")[1])
    assert json.loads(text)["balancedness_after"] == alone["balancedness_after"]
    code, text, err = run(capsys, "simulate", *files, "--window", "1", "-r", R, "-g", P,
                          "--json")
    assert code == 0, err
    steps_of = json.loads(text)["runs"][0]["summary"]
    whole_of = json.loads(run(capsys, "simulate", whole, "--window", "1", "-r", R, "-g", P,
                              "--json")[1])["runs"][0]["summary"]
    assert steps_of["steps"] == 4
    assert steps_of["window_balancedness"] == whole_of["window_balancedness"]


def test_several_loads_files_are_matched_by_model_layer(capsys, tmp_path) -> None:
    """An SGLang dump (a row per model layer, the dense ones zero) and a trace of the MoE
    layers alone, or bare rows that --first-layer names beside a trace that names them,
    are one model's steps (new-user pass: both were refused, the message naming no layer);
    files whose layers differ where they carry load are refused, naming the layers."""
    gen = np.random.default_rng(3)
    moe = np.exp(gen.normal(0, 1, size=(3, E))) * 100  # 3 MoE layers, model layers 2..4
    dump = tmp_path / "dump.json"  # SGLang's layout: layers 0..4, dense 0 and 1 all zero
    dump.write_text(json.dumps({"logical_count": [[[0] * E] * 2 + moe.round().tolist()]}))
    trace = tmp_path / "trace.npz"
    np.savez(trace, counts=moe[None], layer_ids=np.array([2, 3, 4]))
    bare = tmp_path / "bare.npy"
    np.save(bare, moe)
    out = tmp_path / "p.json"
    code, _, err = run(capsys, "plan", str(dump), str(trace), "-r", "20", "-g", "4", "-o",
                       str(out))
    assert code == 0, err
    assert json.loads(out.read_text())["layer_ids"] == [2, 3, 4]
    code, _, err = run(capsys, "plan", str(bare), str(trace), "--first-layer", "2", "-r",
                       "20", "-g", "4", "-o", str(out), "--force")
    assert code == 0, err
    assert json.loads(out.read_text())["layer_ids"] == [2, 3, 4]
    # bare rows of the MoE layers beside the dump, whose dense rows are zero
    code, _, err = run(capsys, "plan", str(dump), str(bare), "-r", "20", "-g", "4", "-o",
                       str(out), "--force")
    assert code == 0, err
    assert json.loads(out.read_text())["layer_ids"] == [2, 3, 4]
    # the layers disagree where they carry load: named, not matched
    other = tmp_path / "other.npz"
    np.savez(other, counts=moe[None], layer_ids=np.array([5, 6, 7]))
    code, _, err = run(capsys, "plan", str(trace), str(other), *plan_args(trace, tmp_path)[2:])
    assert_user_error(code, err, "no model layer in common")
    shifted = tmp_path / "shifted.npz"
    np.savez(shifted, counts=moe[None], layer_ids=np.array([3, 4, 5]))
    code, _, err = run(capsys, "plan", str(trace), str(shifted), *plan_args(trace, tmp_path)[2:])
    assert_user_error(code, err, "trace.npz has load in layers the others lack",
                      "trace.npz: 2..4", "shifted.npz: 3..5")
    # bare rows of another count than the named layers', and bare files of unequal rows
    np.save(tmp_path / "two.npy", moe[:2])
    code, _, err = run(capsys, "plan", str(tmp_path / "two.npy"), str(trace),
                       *plan_args(trace, tmp_path)[2:])
    assert_user_error(code, err, "2 rows without model layer ids", "2..4")
    code, _, err = run(capsys, "plan", str(tmp_path / "two.npy"), str(bare),
                       *plan_args(trace, tmp_path)[2:])
    assert_user_error(code, err, "must describe the same model")
    # a file that lists its layers high to low: bare rows still go lowest layer first
    # (attacker pass: bare row 0 was summed into layer 4)
    down = tmp_path / "down.npz"
    np.savez(down, counts=moe[None, ::-1], layer_ids=np.array([4, 3, 2]))
    code, _, err = run(capsys, "plan", str(down), str(bare), "-r", "20", "-g", "4", "-o",
                       str(out), "--force", "--json")
    assert code == 0, err
    assert json.loads(out.read_text())["layer_ids"] == [2, 3, 4]
    code, _, err = run(capsys, "plan", str(trace), str(bare), "-r", "20", "-g", "4", "-o",
                       str(tmp_path / "up.json"))
    assert code == 0, err
    assert (json.loads(out.read_text())["phy2log"]
            == json.loads((tmp_path / "up.json").read_text())["phy2log"])
