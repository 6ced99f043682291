"""The ``eplb`` command as a whole, run in-process through ``eplb.cli.main`` and once as a
subprocess: version, help and usage errors, ``demo``, the console script, output
encodings, ``--debug`` and ``--threads``, Ctrl-C and SIGTERM. Each command's own tests:
``test_cli_plan.py``, ``test_cli_eval.py`` (eval, bench), ``test_cli_generate.py``,
``test_cli_simulate.py``; the helpers they share (``run``, the small problem) are in
``helpers.py``, their fixtures (``loads``, ``trace_file``) in ``conftest.py``."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import E, L, P, R, run

from eplb.cli import main, sim

COMMANDS = ["demo", "plan", "eval", "bench", "simulate", "generate"]


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


# ------------------------------------------------------------------------ newcomer edges


def test_demo_empty_out_names_its_own_option(capsys) -> None:
    code, _, err = run(capsys, "demo", "--out", "")
    assert code == 2 and "--out needs a folder name" in err and "--report" not in err


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
