"""``eplb generate``: synthetic traces in every format ``plan`` reads, and the formats a file
name gives; in-process through ``eplb.cli.main`` as in ``test_cli.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run
from test_cli import assert_one_line_error

from eplb.core import LoadTrace
from eplb.formats import read_loads, write_loads


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


@pytest.mark.parametrize(("name", "fmt", "other"), [
    (".pt", "pt", "npy"), (".json", "vllm-history", "pt"), (".npz", "npz", "pt"),
    (".npy", "npy", "npz")])
def test_a_name_that_is_a_suffix_alone_names_its_format(capsys, tmp_path, name, fmt,
                                                        other) -> None:
    """``--format pt -o .json`` wrote a torch archive into a file named '.json' (Python
    reads '.json' as a stem without a suffix), and ``-o .pt`` alone said it could not
    tell the format: such a name names its format, as ``t.json`` does (attacker pass)."""
    path = tmp_path / name
    code, _, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "2", "-o",
                       path, "-q", "--format", other)
    assert code == 2 and f"a .{other} file" in err and f"'{name}' says {name}" in err, err
    assert not path.exists()
    with pytest.raises(ValueError, match=f"says {name}"):  # the API alike
        write_loads(LoadTrace(torch.ones(2, 4, 8)), path, format=other)
    assert not path.exists()
    code, out, err = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "2", "-o",
                         path, "-q")
    assert code == 0 and f"({fmt})" in out, (out, err)
    assert tuple(read_loads(path).counts.shape) == (2, 32, 8)


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
    # --list with a flag it never uses (an unknown preset among them) is refused by flag
    code, out, err = run(capsys, "generate", "--list", "--preset", "x", "-o",
                         str(tmp_path / "u.pt"))
    assert code == 2 and out == "" and "drop --preset, -o" in err
    assert_one_line_error(err)
    assert not (tmp_path / "u.pt").exists()


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


@pytest.mark.parametrize(("name", "fmt", "instead"), [
    ("x.json.gz", None, "x.json"), ("x.gz", None, "x.pt"), ("x.json.gz", "pt", "x.pt"),
    ("x.npz.xz", "npz", "x.npz"), (".gz", None, ".pt")])
def test_a_compressed_archive_name_is_refused(capsys, tmp_path, name, fmt, instead) -> None:
    # write_loads wrote a torch archive under a gzip name, which gunzip and every reader
    # that trusts the name fail on (attacker pass); the CLI with --format did the same
    with pytest.raises(ValueError, match=f"names a .* archive.*name the file {instead} "):
        write_loads(LoadTrace(torch.ones(2, 3, 4)), tmp_path / name, format=fmt)
    assert not (tmp_path / name).exists()
    if fmt is not None:
        code, _, err = run(capsys, "generate", "--steps", "3", "--format", fmt, "-o",
                           str(tmp_path / name))
        assert code == 2
        assert_one_line_error(err)
        assert f"name the file {instead} " in err
