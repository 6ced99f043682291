"""An empty value for an option that names a file or lists GPU speeds is a usage error
named by its flag: ``--previous ""`` (an unset shell variable) used to plan fresh without a
word, moving nearly every slot, and ``--gpu-speed ""`` to plan for equal GPUs; the other
file options read the current folder and named it '.' (attacker pass)."""

from __future__ import annotations

import pytest
from helpers import skewed_loads_json
from test_cli import run


@pytest.fixture()
def loads(tmp_path):
    return skewed_loads_json(tmp_path, 4, 32, seed=7)[0]


@pytest.mark.parametrize("flag", ["--previous", "--gpu-speed"])
@pytest.mark.parametrize("value", ["", "  "])
def test_plan_refuses_an_empty_value(tmp_path, capsys, loads, flag, value):
    out = tmp_path / "new.json"
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "-o", out, flag, value)
    assert code == 2
    assert flag in err and ("file name" in err or "number per GPU" in err)
    assert not out.exists()


def test_plan_refuses_an_empty_routing(tmp_path, capsys, loads):
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--nodes", 2, "--groups", 4,
                       "--dispatch", "nearest", "--policy", "locality", "--routing", "",
                       "-o", tmp_path / "new.json")
    assert code == 2
    assert "--routing" in err and "file name" in err


@pytest.mark.parametrize("flag", ["--previous", "--gpu-speed", "--routing"])
def test_eval_refuses_an_empty_value(tmp_path, capsys, loads, flag):
    placement = tmp_path / "p.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 16, "-o", placement)[0] == 0
    code, _, err = run(capsys, "eval", "--placement", placement, loads, flag, "")
    assert code == 2
    assert flag in err


def test_eval_refuses_an_empty_placement(capsys, loads):
    code, _, err = run(capsys, "eval", "--placement", "", loads)
    assert code == 2
    assert "--placement" in err and "file name" in err


@pytest.mark.parametrize("command", [["plan", "-r", 48, "-g", 16, "-o", "new.json"],
                                     ["bench", "-r", 48, "-g", 16],
                                     ["simulate", "--window", 2]])
def test_an_empty_loads_file_name_is_refused_by_name(tmp_path, capsys, command, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Path("") is this folder: it was read as one of dumps
    code, _, err = run(capsys, command[0], "", *command[1:])
    assert code == 2 and "a loads file name is empty ('')" in err


def test_eval_reads_an_sglang_previous_on_the_placements_cluster(tmp_path, capsys, loads):
    """An SGLang file records no GPU count: eval took it only with -g, though --placement
    (eplb's file) had said it (attacker pass); plan --previous took it already."""
    new, old = tmp_path / "new.json", tmp_path / "old.sglang.json"
    assert run(capsys, "plan", loads, "-r", 48, "-g", 16, "-o", new)[0] == 0
    assert run(capsys, "plan", loads, "-r", 48, "-g", 16, "-o", old, "--seed", 1)[0] == 0
    code, out, err = run(capsys, "eval", "--placement", new, "--previous", old, loads)
    assert code == 0, err
    with_g = run(capsys, "eval", "--placement", new, "--previous", old, loads, "-g", 16)
    assert with_g[0] == 0 and with_g[1] == out


def test_a_binary_gpu_speed_file_is_told_what_a_speed_file_holds(tmp_path, capsys, loads):
    # (attacker pass: a .npy of speeds was told only that it "is not UTF-8 text")
    import numpy as np

    speeds = tmp_path / "s.npy"
    np.save(speeds, np.ones(16))
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--gpu-speed", speeds,
                       "-o", tmp_path / "p.json")
    assert code == 2 and "give a text file of 16 numbers" in err


@pytest.mark.parametrize(("content", "message"), [
    ("\ufeff" + ",".join(["1"] * 16), None),
    ("# speeds\n" + ",".join(["1"] * 16), "'#' is not a number"),
    ("[" + ",".join(["1"] * 15) + ', "x"]', "'x' is not a number"),
    ('{"gpu_speed": [1, 2]}', "holds {'gpu_speed': [1, 2]}"),
])
def test_a_gpu_speed_file_is_read_past_a_bom_and_its_wrong_value_named(tmp_path, capsys, loads,
                                                                       content, message):
    """A speed file a Windows editor saved (a UTF-8 BOM first) was refused, and a file
    holding a word was told "expected 16 comma-separated numbers or a file of them, got
    's.txt'": the file was read, and the error did not say what in it was wrong (attacker
    pass)."""
    speeds = tmp_path / "s.txt"
    speeds.write_text(content, encoding="utf-8")
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--gpu-speed", speeds,
                       "-o", tmp_path / "p.json")
    if message is None:
        assert code == 0, err
    else:
        assert code == 2 and f"--gpu-speed file {speeds}" in err
        assert message in err and "or a file of them" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("entry", ["true", "null"])
def test_a_json_true_is_no_gpu_speed(tmp_path, capsys, loads, entry):
    """``[true, 1, ...]`` planned with GPU 0 at speed 1 (``float(True)``); the loads and
    placement readers refuse a JSON boolean where a number belongs (attacker pass)."""
    speeds = tmp_path / "s.json"
    speeds.write_text("[" + ", ".join([entry] + ["1"] * 15) + "]")
    out = tmp_path / "p.json"
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--gpu-speed", speeds, "-o", out)
    assert code == 2 and f"--gpu-speed file {speeds}: {entry} is not a number" in err
    assert not out.exists()


def test_a_huge_gpu_speed_file_is_refused_before_it_is_read(tmp_path, capsys, loads):
    # (attacker pass: a sparse 50 GB file was read whole: "MemoryError: unknown error",
    # exit 1, or an out-of-memory kill where the memory was there to try)
    speeds = tmp_path / "speeds.txt"
    speeds.write_text(",".join(["1"] * 16))
    with open(speeds, "r+b") as handle:
        handle.truncate(50 << 30)  # sparse: no disk taken
    out = tmp_path / "p.json"
    code, _, err = run(capsys, "plan", loads, "-r", 48, "-g", 16, "--gpu-speed", speeds,
                       "-o", out)
    assert code == 2, err
    assert "--gpu-speed file" in err and "one number per GPU" in err
    assert not out.exists()
