"""``--step-range``: the commands that read loads use only some of their steps, so a trace
can be planned on one part and scored on the rest from the command line (new-user pass:
the trace had to be cut with NumPy first)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import E, L, P, R
from test_cli_inputs import assert_user_error, run

from eplb.core import LoadTrace
from eplb.formats import write_loads

STEPS = 10


def _trace(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A ``[10, L, E]`` trace whose steps differ (skew moves from expert to expert)."""
    gen = torch.Generator().manual_seed(5)
    counts = torch.rand(STEPS, L, E, generator=gen) * 5
    for step in range(STEPS):
        counts[step, :, step % E] += 100 * (step + 1)
    counts = counts.round().to(torch.int64)
    path = tmp_path / "trace.pt"
    write_loads(LoadTrace(counts, list(range(L))), path)
    return path, counts


def _part(tmp_path: Path, counts: torch.Tensor, name: str) -> Path:
    path = tmp_path / name
    write_loads(LoadTrace(counts, list(range(L))), path)
    return path


def _phy2log(path: Path) -> list:
    return json.loads(path.read_text())["phy2log"]


@pytest.mark.parametrize(("text", "kept"), [(":50%", slice(0, 5)), ("50%:", slice(5, 10)),
                                             ("2:7", slice(2, 7)), (":-3", slice(0, 7)),
                                             ("33.3%:", slice(3, 10)), ("0:1", slice(0, 1))])
def test_plan_of_a_range_is_the_plan_of_those_steps(capsys, tmp_path, text, kept):
    path, counts = _trace(tmp_path)
    cut = _part(tmp_path, counts[kept], "cut.pt")
    args = ["-r", R, "-g", P]
    code, out, err = run(capsys, "plan", str(path), f"--step-range={text}", *map(str, args),
                         "-o", str(tmp_path / "a.json"))
    assert code == 0, err
    steps = kept.stop - kept.start
    assert (f"({steps} steps summed)" in out) if steps > 1 else ("steps summed" not in out)
    code, _, err = run(capsys, "plan", str(cut), *map(str, args), "-o", str(tmp_path / "b.json"))
    assert code == 0, err
    assert _phy2log(tmp_path / "a.json") == _phy2log(tmp_path / "b.json")


def test_plan_on_one_half_and_eval_on_the_other(capsys, tmp_path):
    path, counts = _trace(tmp_path)
    plan = tmp_path / "first.json"
    code, _, err = run(capsys, "plan", str(path), "--step-range", ":50%", "-r", str(R), "-g",
                       str(P), "-o", str(plan))
    assert code == 0, err
    scores = {}
    for text, file in (("50%:", path), (None, _part(tmp_path, counts[5:], "second.pt"))):
        extra = [] if text is None else ["--step-range", text]
        code, out, err = run(capsys, "eval", str(file), "--placement", str(plan), "--json",
                             *extra)
        assert code == 0, err
        report = json.loads(out)
        assert report["steps_summed"] == 5
        scores[text] = report["balancedness_after"]
    assert scores["50%:"] == scores[None]
    code, out, err = run(capsys, "eval", str(path), "--placement", str(plan), "--json")
    assert json.loads(out)["balancedness_after"] != scores[None]  # the whole trace scores otherwise


@pytest.mark.parametrize(("text", "words"), [
    ("x", "must be START:STOP"), ("1:2:3", "must be START:STOP"), ("::", "must be START:STOP"),
    ("5:2", "keeps none of the 10 step(s)"), ("20:", "keeps none of the 10 step(s)"),
    ("150%:", "at most 100%"), ("-1%:", "must be START:STOP")])
def test_bad_ranges_are_named(capsys, tmp_path, text, words):
    path, _ = _trace(tmp_path)
    code, _, err = run(capsys, "plan", str(path), f"--step-range={text}", "-r", str(R), "-g",
                       str(P), "-o", str(tmp_path / "out.json"))
    assert_user_error(code, err, "--step-range", words)
    assert not (tmp_path / "out.json").exists()


def test_a_topk_trace_is_cut_into_steps_first(capsys, tmp_path):
    """With ``--tokens-per-step`` the range counts the cut steps (here 3 of 300 tokens)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.rand(900, L, E, generator=gen).argsort(2)[..., :2].numpy().astype(np.int8)
    path = tmp_path / "routing.npz"
    np.savez(path, topk_ids=ids)
    code, out, err = run(capsys, "plan", str(path), "--tokens-per-step", "300",
                         "--step-range", "1:", "-r", str(R), "-g", str(P),
                         "-o", str(tmp_path / "out.json"))
    assert code == 0, err
    assert "(2 steps summed)" in out


def test_simulate_and_bench_take_the_range(capsys, tmp_path):
    path, _ = _trace(tmp_path)
    code, out, err = run(capsys, "simulate", str(path), "--step-range", "2:", "--window", "2",
                         "-r", str(R), "-g", str(P), "--json")
    assert code == 0, err
    whole = run(capsys, "simulate", str(path), "--window", "2", "-r", str(R), "-g", str(P),
                "--json")
    assert whole[0] == 0, whole[2]
    assert json.loads(out) != json.loads(whole[1])
    code, out, err = run(capsys, "bench", str(path), "--no-builtin", "--step-range", ":3",
                         "-r", str(R), "-g", str(P), "--repeats", "1")
    assert code == 0, err


def test_a_percentage_is_counted_exactly(capsys, tmp_path):
    """18.4 % of 375 steps is 69 (``375 * 18.4`` is 6899.999... in floating point: 68 were
    kept, and the other side began one step early; attacker pass)."""
    counts = torch.ones(375, L, E, dtype=torch.int64)
    path = _part(tmp_path, counts, "long.pt")
    for text, steps in ((":18.4%", 69), ("18.4%:", 375 - 69)):
        code, out, err = run(capsys, "plan", str(path), "--step-range", text, "-r", str(R),
                             "-g", str(P), "-o", str(tmp_path / f"{steps}.json"))
        assert code == 0, err
        assert f"({steps} steps summed)" in out


def test_simulate_notes_the_short_steps_of_the_range_only(capsys, tmp_path):
    """A top-k trace of 1,000 tokens cut by 300: its last step (100 tokens) is short. In
    ':2' there is none to note, in '2:' it is step 1 of 2 (the note named "step 3" of the
    whole trace in both; attacker pass)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.rand(1000, L, E, generator=gen).argsort(2)[..., :2].numpy().astype(np.int8)
    path = tmp_path / "routing.npz"
    np.savez(path, topk_ids=ids)
    notes = {}
    for text in (":2", "2:"):
        code, out, err = run(capsys, "simulate", str(path), "--tokens-per-step", "300",
                             "--step-range", text, "--window", "1", "-r", str(R),
                             "-g", str(P))
        assert code == 0, err
        notes[text] = [line for line in (out + err).splitlines() if "fewer than" in line]
    assert notes[":2"] == []
    assert len(notes["2:"]) == 1 and "1 of 2 steps" in notes["2:"][0]
    assert "(step 1: 100;" in notes["2:"][0]


def test_a_negative_start_needs_no_equals_sign(capsys, tmp_path):
    """``--step-range -3:`` is the last 3 steps, as ``--step-range=-3:`` (argparse took
    the value for an option: "expected one argument"; attacker pass); a negative
    percentage is still named as a bad range."""
    path, counts = _trace(tmp_path)
    code, out, err = run(capsys, "plan", str(path), "--step-range", "-3:", "-r", str(R),
                         "-g", str(P), "-o", str(tmp_path / "a.json"))
    assert code == 0, err
    assert "(3 steps summed)" in out
    cut = _part(tmp_path, counts[-3:], "cut.pt")
    code, _, err = run(capsys, "plan", str(cut), "-r", str(R), "-g", str(P),
                       "-o", str(tmp_path / "b.json"))
    assert code == 0, err
    assert _phy2log(tmp_path / "a.json") == _phy2log(tmp_path / "b.json")
    code, _, err = run(capsys, "plan", str(path), "--step-range", "-5%:-1", "-r", str(R),
                       "-g", str(P), "-o", str(tmp_path / "c.json"))
    assert_user_error(code, err, "--step-range", "must be START:STOP", "'-5%:-1'")


@pytest.mark.parametrize("text", ["-10%", "-3", "-3%"])
def test_a_negative_bound_without_a_colon_is_named(capsys, tmp_path, text):
    """``--step-range -10%`` (no colon) was argparse's "expected one argument"; the range
    check now names the value (fifty-fourth session's note)."""
    path, _ = _trace(tmp_path)
    code, _, err = run(capsys, "plan", str(path), "--step-range", text, "-r", str(R),
                       "-g", str(P), "-o", str(tmp_path / "a.json"))
    assert_user_error(code, err, "--step-range must be START:STOP", repr(text))
    assert not (tmp_path / "a.json").exists()


def test_simulate_says_the_range_kept_too_few_steps(capsys, tmp_path):
    """(attacker pass: it said the file had the steps the range kept)"""
    path, _ = _trace(tmp_path)
    code, _, err = run(capsys, "simulate", str(path), "--step-range", ":5", "--window", "3",
                       "-r", str(R), "-g", str(P))
    assert_user_error(code, err, "--step-range :5 keeps 5 steps of", "needs at least 6")
    assert f"{path} has" not in err


@pytest.mark.parametrize("text", ["١٢:", "٥٠%:", ":３", "2:۵"])
def test_other_scripts_digits_are_refused(capsys, tmp_path, text):
    """ASCII digits only, as every other integer option (``-g ١٢`` is refused): Python's
    ``int`` read '١٢:' as '12:', so the range kept steps nobody typed in ASCII."""
    path, _ = _trace(tmp_path)
    code, _, err = run(capsys, "plan", str(path), f"--step-range={text}", "-r", str(R), "-g",
                       str(P), "-o", str(tmp_path / "out.json"))
    assert_user_error(code, err, "--step-range", "ASCII digits", repr(text))
    assert not (tmp_path / "out.json").exists()


def test_a_plus_sign_is_taken_as_by_the_integer_options(capsys, tmp_path):
    """'+3:' is '3:' (Python's slice, and ``-g +4``, take the sign)."""
    path, _ = _trace(tmp_path)
    outs = []
    for text in ("+3:", "3:"):
        out = tmp_path / f"{text}.json"
        code, _, err = run(capsys, "plan", str(path), f"--step-range={text}", "-r", str(R),
                           "-g", str(P), "-o", str(out))
        assert code == 0, err
        outs.append(_phy2log(out))
    assert outs[0] == outs[1]


@pytest.mark.parametrize(("flags", "words"), [
    (["--step-range", "abc"], "must be START:STOP"), (["--step-range=200%:"], "at most 100%"),
    (["--tokens-per-step", "0"], "--tokens-per-step must be >= 1"),
    (["--num-experts", "0"], "--num-experts must be >= 1")])
def test_a_bad_reading_option_is_named_before_an_existing_output(capsys, tmp_path, flags,
                                                                 words):
    """(new-user pass: ``plan --step-range abc -o x.json`` said only that x.json existed;
    the real mistake came once the user had cleared it.) Before any reading, so the
    output check still comes before the planning."""
    path, _ = _trace(tmp_path)
    out = tmp_path / "x.json"
    out.write_text("{}")
    code, _, err = run(capsys, "plan", str(path), *flags, "-r", str(R), "-g", str(P),
                       "-o", str(out))
    assert_user_error(code, err, words)
    assert out.read_text() == "{}"
    code, _, err = run(capsys, "plan", str(path), "--step-range", "20:", "-r", str(R),
                       "-g", str(P), "-o", str(out))  # a range that needs the file: after
    assert_user_error(code, err, "already exists")
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("kept")
    for argv in (["simulate", str(path), "--window", "2", "-r", str(R), "-g", str(P)],
                 ["bench", str(path), "--no-builtin", "-r", str(R), "-g", str(P)]):
        code, _, err = run(capsys, *argv, *flags, "--report", str(report))
        assert_user_error(code, err, words)
    assert (report / "report.md").read_text() == "kept"


def test_bench_names_every_file_a_range_keeps_no_step_of_before_benchmarking(capsys,
                                                                             tmp_path):
    """bench takes each file as its own scenario and cuts each by the range: it stopped at
    the first file the range kept nothing of, once the files before it were timed; now
    every such file is named in one error, before any benchmarking."""
    path, counts = _trace(tmp_path)
    short = [_part(tmp_path, counts[:n], f"short{n}.pt") for n in (3, 2)]
    code, out, err = run(capsys, "bench", str(path), str(short[0]), str(short[1]),
                         "--no-builtin", "--step-range", "5:", "-r", str(R), "-g", str(P),
                         "--repeats", "1")
    assert_user_error(code, err, f"--step-range 5: keeps none of the steps of {short[0]} "
                                 f"(3 steps), {short[1]} (2 steps)", "leave those files out")
    assert out == ""  # no scenario printed before the error
    code, out, err = run(capsys, "bench", str(path), str(short[0]), "--no-builtin",
                         "--step-range", ":2", "-r", str(R), "-g", str(P), "--repeats", "1")
    assert code == 0, err
    assert "trace.pt" in out and "short3.pt" in out


def test_an_abbreviated_option_takes_a_negative_start_too(capsys, tmp_path):
    """``--step-r -3:`` (argparse's abbreviation of --step-range) was "expected one
    argument", where the full name took the value (new-user pass); so was
    ``--gpu-sp -1,1`` beside ``--gpu-speed -1,1``, which eplb's own check now names."""
    path, _ = _trace(tmp_path)
    code, out, err = run(capsys, "plan", str(path), "--step-r", "-3:", "-r", str(R),
                         "-g", str(P), "-o", str(tmp_path / "a.json"))
    assert code == 0, err
    assert "(3 steps summed)" in out
    code, _, err = run(capsys, "plan", str(path), "--gpu-sp", "-1,1", "-r", str(R),
                       "-g", str(P), "-o", str(tmp_path / "b.json"))
    assert code == 2 and "expected one argument" not in err and "--gpu-speed" in err, err
