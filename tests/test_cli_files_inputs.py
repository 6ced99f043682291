"""The files ``plan`` and ``eval`` read beside a plain loads file: odd but valid arrays,
folders of SGLang dumps (and other files in them), a file read twice, GPU speed files,
and the speeds and GPU counts a placement records.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from test_cli_files import P, R

from eplb.cli import main
from eplb.formats import (
    FormatError,
    read_loads,
    read_placement,
)


def test_odd_but_valid_arrays_plan_and_odd_files_fail_clearly(tmp_path, capsys):
    np.save(tmp_path / "big_endian.npy", np.arange(16, dtype=">f8").reshape(2, 8) + 1)
    # distinct ids per top-k row, as a router's (a repeated one is refused)
    ids = np.random.default_rng(0).random((16, 2, 8)).argsort(2)[..., :2].astype(np.uint64)
    np.savez(tmp_path / "uint64.npz", x_topk_ids=ids)
    for name in ("big_endian.npy", "uint64.npz"):
        assert main(["plan", str(tmp_path / name), "-r", "16", "-g", "2", "-o",
                     str(tmp_path / f"{name}.json")]) == 0
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.rand(2, 8), 0.1, 0, torch.quint8)
    torch.save(quantized, tmp_path / "quantized.pt")
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    capsys.readouterr()
    for name, message in (("quantized.pt", "quantized tensor"), ("loop_a", "symbolic links")):
        code = main(["plan", str(tmp_path / name), "-r", "16", "-g", "2", "-o",
                     str(tmp_path / f"{name}.json")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err


def test_a_folder_of_sglang_dumps_and_other_files_is_refused_by_name(capsys, tmp_path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "x.json").write_text('{"logical_count": [[1, 2, 3, 4]]}')
    np.save(folder / "other.npy", np.ones((2, 4)))
    assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "other files (other.npy)" in err and "folder of such dumps only" in err


def test_a_folder_of_sglang_pt_dumps_and_other_files_is_refused_by_name(capsys,
                                                                      tmp_path) -> None:
    """Beside .pt recorder dumps, JSON dumps (or any data file) were left out without a
    word (attacker pass: 800 of 80,800 tokens read); a folder named like a dump is named
    as a folder (it read "found none")."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    torch.save({"rank": 0, "logical_count": torch.ones(1, 2, 4, dtype=torch.int32)},
               folder / "expert_distribution_recorder_1.pt")
    (folder / "x.json").write_text('{"logical_count": [[100, 200, 300, 400], [1, 2, 3, 4]]}')
    for format_flag in ([], ["--format", "sglang"]):
        code = main(["plan", str(folder), *format_flag, "-r", "4", "-g", "2", "-o",
                     str(tmp_path / "p.json")])
        err = capsys.readouterr().err
        assert code == 2 and "other files (x.json)" in err and "dumps only" in err, err
    # a placement planned from the folder and written into it is no load file
    (folder / "x.json").unlink()
    assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o",
                 str(folder / "placement.json")]) == 0
    assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o",
                 str(folder / "again.sglang.json")]) == 0
    for name in ("placement.pt", "third.sglang.pt"):  # (torch placements too)
        assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o", str(folder / name)]) == 0
    assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o", str(tmp_path / "p.json"),
                 "--force"]) == 0
    capsys.readouterr()
    (folder / "expert_distribution_recorder_2.pt").mkdir()
    for format_flag in ([], ["--format", "sglang"], ["--format", "sglang-per-pass"]):
        code = main(["plan", str(folder), *format_flag, "-r", "4", "-g", "2", "-o",
                     str(tmp_path / "q.json")])
        err = capsys.readouterr().err
        assert code == 2 and "expert_distribution_recorder_2.pt: is a folder" in err, err
    # dumps in a sub-folder are named, not skipped (second attacker pass)
    (folder / "expert_distribution_recorder_2.pt").rmdir()
    (folder / "node1").mkdir()
    torch.save({"rank": 0, "logical_count": torch.ones(1, 2, 4, dtype=torch.int32)},
               folder / "node1" / "expert_distribution_recorder_3.pt")
    code = main(["plan", str(folder), "-r", "4", "-g", "2", "-o", str(tmp_path / "q.json")])
    err = capsys.readouterr().err
    assert code == 2 and "a folder of more of them (node1)" in err, err
    (folder / "node1" / "expert_distribution_recorder_3.pt").unlink()
    (folder / "node1").rmdir()
    # a named per-pass format checks the files beside the dumps too (second attacker pass)
    (folder / "extra.pkl").write_bytes(b"x")
    code = main(["plan", str(folder), "--format", "sglang-per-pass", "-r", "4", "-g", "2",
                 "-o", str(tmp_path / "q.json")])
    err = capsys.readouterr().err
    assert code == 2 and "other files (extra.pkl)" in err, err


def test_a_folder_of_json_dumps_planned_into_stays_readable(capsys, tmp_path) -> None:
    """A JSON placement written into a folder of {"logical_count"} JSON dumps is no dump:
    the folder read "found none" of them after it (second attacker pass)."""
    folder = tmp_path / "dumps"
    folder.mkdir()
    for k in range(2):
        (folder / f"d{k}.json").write_text(json.dumps(
            {"logical_count": [[100 + k, 200, 300, 400], [1, 2, 3, 4 + k]]}))
    for name in ("placement.json", "again.sglang.json", "third.json"):
        assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o", str(folder / name)]) == 0
    capsys.readouterr()
    assert main(["plan", str(folder), "--format", "sglang", "-r", "4", "-g", "2", "-o",
                 str(tmp_path / "p.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps_summed"] == 2


def test_notes_beside_sglang_dumps_do_not_stop_the_folder_being_read(capsys, tmp_path) -> None:
    folder = tmp_path / "dumps"
    folder.mkdir()
    for k in range(2):
        (folder / f"d{k}.json").write_text('{"logical_count": [[1, 2, 3, 4]]}')
    (folder / "SOURCE.md").write_text("where these came from")
    assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o", str(tmp_path / "p.json")]) == 0


def test_a_plan_for_unequal_gpus_records_its_speeds_and_eval_uses_them(tmp_path, capsys):
    """A plan made with --gpu-speed used to be scored by eval as if every GPU were equal
    (no warning), and its file recorded that score."""
    loads = tmp_path / "loads.json"
    weight = torch.exp(torch.randn(4, 16, generator=torch.Generator().manual_seed(5)))
    loads.write_text(json.dumps({"logical_count": weight.tolist()}))
    speeds = [1.0] * 4 + [2.0] * 4
    out = tmp_path / "fast.json"
    assert main(["plan", str(loads), "-r", "24", "-g", "8", "--gpu-speed",
                 ",".join(map(str, speeds)), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["gpu_speed"] == speeds
    timed = read_placement(out).balancedness(weight, gpu_speed=speeds)
    assert doc["balancedness"] == pytest.approx(timed)
    assert doc["ceiling"] is None  # the bounds are for equal GPUs
    capsys.readouterr()
    assert main(["eval", "--placement", str(out), str(loads), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["balancedness_after"] == pytest.approx(timed)
    assert main(["eval", "--placement", str(out), str(loads), "--gpu-speed",
                 ",".join(["1"] * 8)]) == 2
    assert "records the GPU speeds" in capsys.readouterr().err
    # re-planning from it for equal GPUs is allowed, and said
    assert main(["plan", str(loads), "-r", "24", "-g", "8", "--previous", str(out),
                 "-o", str(tmp_path / "again.json")]) == 0
    said = capsys.readouterr().err
    # its advice can be followed: --gpu-speed with --previous is refused (new-user pass)
    assert "planned for unequal GPU speeds" in said and "plan without --previous" in said
    assert "pass --gpu-speed as it was" not in said
    # a hostile speed field is a clear format error
    doc["gpu_speed"][0] = -1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    assert main(["eval", "--placement", str(bad), str(loads)]) == 2
    assert "gpu_speed must be null or 8 positive" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["plan", "eval"])
def test_a_loads_file_named_twice_is_refused(capsys, tmp_path, loads, command):
    # several loads files are steps one after another: the same file twice (also through
    # another spelling of its path) doubled its loads without a word
    again = tmp_path / "." / loads.name
    out = tmp_path / "p.json"
    if command == "plan":
        argv = ["plan", str(loads), str(again), "-r", str(R), "-g", str(P), "-o", str(out)]
    else:
        assert main(["plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(out)]) == 0
        capsys.readouterr()
        argv = ["eval", "--placement", str(out), str(loads), str(again)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is given twice" in err and len(err.strip().splitlines()) == 1, err
    assert out.exists() == (command == "eval")


def test_a_dump_read_twice_through_a_folder_is_refused(capsys, tmp_path):
    # a folder and a file in it, a "latest" link beside the dumps, two folders holding one
    # dump: each summed it twice without a word (attacker pass)
    dumps, linked, other = tmp_path / "a", tmp_path / "e", tmp_path / "b"
    for folder in (dumps, linked, other):
        folder.mkdir()
    for name in ("d1", "d2"):
        (dumps / f"{name}.json").write_text(json.dumps({"logical_count": [[1, 2, 3, 4]]}))
    (linked / "d1.json").write_text(json.dumps({"logical_count": [[1, 2, 3, 4]]}))
    (linked / "latest.json").symlink_to("d1.json")
    (other / "x.json").symlink_to(dumps / "d1.json")
    out = str(tmp_path / "p.json")
    for loads, said in (([dumps, dumps / "d1.json"], "is read from the folder"),
                        ([linked], "are the same file"),
                        ([dumps, other], "both hold one file (d1.json, x.json")):
        assert main(["plan", *map(str, loads), "-r", "8", "-g", "4", "-o", out]) == 2
        err = capsys.readouterr().err
        assert said in err and "count twice" in err and len(err.strip().splitlines()) == 1, err
    assert main(["plan", str(dumps), "-r", "8", "-g", "4", "-o", out]) == 0
    with pytest.raises(FormatError, match="same file"):
        read_loads(linked)
    # hard links are the same file too (second attacker pass); equal content is not
    hard, equal = tmp_path / "hard", tmp_path / "equal"
    hard.mkdir(), equal.mkdir()
    os.link(dumps / "d1.json", hard / "d1.json")
    os.link(dumps / "d1.json", hard / "d9.json")
    for loads in ([hard], [dumps, hard / "d1.json"], [dumps / "d1.json", hard / "d9.json"]):
        assert main(["plan", *map(str, loads), "-r", "8", "-g", "4", "-o", out, "--force"]) == 2
        assert "count twice" in capsys.readouterr().err
    for name in ("x1.json", "x2.json"):
        (equal / name).write_text((dumps / "d1.json").read_text())
    assert main(["plan", str(equal), "-r", "8", "-g", "4", "-o", out, "--force"]) == 0
    # a link to itself is named as the reader names it, not as an internal error
    loop = tmp_path / "loop"
    loop.mkdir()
    name = "expert_distribution_recorder_1.0.pt"
    (loop / name).symlink_to(name)
    assert main(["plan", str(loop), "-r", "8", "-g", "4", "-o", out, "--force"]) == 2
    err = capsys.readouterr().err
    assert "symbolic links" in err and "RuntimeError" not in err, err


def test_equal_gpu_speeds_plan_as_equal_gpus(tmp_path, capsys):
    """--gpu-speed 1,1,... took the speed path: no count search, no ceiling, and a
    hierarchical plan refused as if the speeds differed (attacker pass)."""
    loads = tmp_path / "loads.json"
    weight = torch.exp(torch.randn(4, 16, generator=torch.Generator().manual_seed(5)))
    loads.write_text(json.dumps({"logical_count": weight.tolist()}))
    plain, even = tmp_path / "plain.json", tmp_path / "even.json"
    assert main(["plan", str(loads), "-r", "24", "-g", "8", "-o", str(plain)]) == 0
    assert main(["plan", str(loads), "-r", "24", "-g", "8", "--gpu-speed", ",".join(["2"] * 8),
                 "-o", str(even)]) == 0
    doc = json.loads(even.read_text())
    assert doc["gpu_speed"] is None and doc["ceiling"] is not None
    assert doc["phy2log"] == json.loads(plain.read_text())["phy2log"]
    assert main(["plan", str(loads), "-r", "24", "-g", "8", "--nodes", "2", "--groups", "4",
                 "--policy", "hierarchical", "--gpu-speed", ",".join(["1"] * 8),
                 "-o", str(tmp_path / "hier.json")]) == 0
    capsys.readouterr()
    # eval too scores equal speeds as equal GPUs, with the ceiling; and a file that earlier
    # eplb wrote with equal speeds is not called "planned for unequal GPU speeds"
    assert main(["eval", "--placement", str(plain), str(loads), "--gpu-speed",
                 ",".join(["2"] * 8), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["balancedness_ceiling"] is not None
    doc["gpu_speed"] = [2.0] * 8
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    assert main(["plan", str(loads), "-r", "24", "-g", "8", "--gpu-speed", ",".join(["2"] * 8),
                 "--previous", str(old), "-o", str(tmp_path / "next.json")]) == 0
    assert "unequal" not in capsys.readouterr().err


@pytest.mark.parametrize("where", ["flag", "file"])
def test_eval_refuses_gpu_speeds_beyond_the_ratio_plan_takes(tmp_path, capsys, where):
    """Speeds 1e-308 apart made a GPU's time overflow: eval printed balancedness 0.0000
    beside a worst max/mean of 1.0000, and ``Infinity`` (not JSON) with --json, where
    plan refuses such speeds (attacker pass). Now both refuse them, naming the source."""
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps({"logical_count": [[1, 2, 3, 4], [4, 3, 2, 1]]}))
    out = tmp_path / "p.json"
    assert main(["plan", str(loads), "-r", "8", "-g", "4", "-o", str(out)]) == 0
    speeds = [1e308, 1e308, 1e-308, 1.0]
    flags = ["--gpu-speed", ",".join(map(str, speeds))]
    if where == "file":
        doc = json.loads(out.read_text())
        doc["gpu_speed"] = speeds
        out.write_text(json.dumps(doc))
        flags = []
    capsys.readouterr()
    code = main(["eval", "--placement", str(out), str(loads), "--json", *flags])
    captured = capsys.readouterr()
    assert code == 2 and "Infinity" not in captured.out, captured.out
    assert "times slower than the fastest" in captured.err
    assert ("--gpu-speed" if where == "flag" else "p.json's gpu_speed") in captured.err


def test_an_sglang_file_without_gpus_names_the_flag_not_the_keyword(tmp_path, capsys):
    # an SGLang file records no GPU count: eval asks for -g, not the API's num_gpus=
    # (the keyword came first and misled a newcomer)
    loads = tmp_path / "w.npy"
    np.save(loads, np.arange(1, 17, dtype=np.float64).reshape(2, 8))
    placement = tmp_path / "p.sglang.json"
    assert main(["plan", str(loads), "-r", "12", "-g", "4", "-o", str(placement),
                 "--first-layer", "0"]) == 0
    capsys.readouterr()
    assert main(["eval", "--placement", str(placement), str(loads)]) == 2
    err = capsys.readouterr().err
    assert "give the EP size with -g/--gpus (12 slots must divide evenly)" in err
    assert "num_gpus=" not in err
