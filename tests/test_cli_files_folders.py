"""Report and output folders are checked before the work: links, FIFOs, folders that
cannot be made or written, read-only file systems, empty names.

The work a command does is made to fail (``forbid_work`` of ``test_cli_files.py``), so a
folder found bad only after it would fail these tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_cli_files import P, R, forbid_work

from eplb.cli import main


def test_a_link_in_a_report_folder_is_refused_before_the_work(capsys, tmp_path) -> None:
    trace = tmp_path / "trace.pt"
    torch.save(torch.rand(40, 4, 16) * 100, trace)
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.html").symlink_to(tmp_path / "nowhere")  # dangling
    argv = ["simulate", str(trace), "-r", "20", "-g", "4", "--window", "10", "--report",
            str(report)]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert sorted(p.name for p in report.iterdir()) == ["report.html"]  # nothing written


@pytest.mark.parametrize("command", ["simulate", "bench"])
@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_a_report_folder_that_cannot_be_made_is_refused_before_the_work(
        command, where, capsys, tmp_path, monkeypatch) -> None:
    # "--report X" where X (or a folder above it) is a file was found only when the report
    # was written, after the whole simulation or benchmark had run
    import eplb.cli.bench
    import eplb.cli.sim

    forbid_work(monkeypatch, "--report", (eplb.cli.sim, "simulate"),
                (eplb.cli.bench, "compare"))
    trace = tmp_path / "trace.pt"
    torch.save(torch.rand(40, 4, 16) * 100, trace)
    (tmp_path / "file").write_text("not a folder")
    argv = ([command, str(trace), "-r", "20", "-g", "4"]
            + (["--window", "10"] if command == "simulate" else ["--no-builtin"])
            + ["--report", str(tmp_path / where)])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'file'} exists and is not a directory" in err, err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_an_empty_report_folder_name_is_refused(capsys, tmp_path, monkeypatch) -> None:
    """``--report ""`` wrote the report into the current folder."""
    monkeypatch.chdir(tmp_path)
    trace = tmp_path / "trace.pt"
    torch.save(torch.rand(40, 4, 16) * 100, trace)
    assert main(["simulate", str(trace), "-r", "20", "-g", "4", "--window", "10",
                 "--report", ""]) == 2
    assert "--report needs a folder name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.pt"]


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
@pytest.mark.parametrize("command", ["bench", "simulate", "demo"])
def test_a_report_folder_that_cannot_be_written_is_refused_before_the_work(
        capsys, tmp_path, monkeypatch, command, case) -> None:
    """A report folder that is a file, lies under one, or is not writable failed only in
    Report.write, after the whole benchmark, simulation or demo had run."""
    import eplb.cli._common as common
    import eplb.cli.bench as bench
    import eplb.cli.sim as sim

    forbid_work(monkeypatch, "the report folder", (bench, "compare"),
                (bench, "generated_trace"), (sim, "run_simulation"))
    trace = tmp_path / "trace.pt"
    torch.save(torch.rand(40, 4, 16) * 100, trace)
    folder = {"a file": trace, "under a file": trace / "report",
              "read-only": tmp_path / "ro" / "report"}[case]
    if case == "read-only":
        (tmp_path / "ro").mkdir()
        real_access = os.access
        monkeypatch.setattr(common.os, "access", lambda path, mode: (
            False if Path(path) == tmp_path / "ro" else real_access(path, mode)))
    argv = {"bench": ["bench", "--no-builtin", str(trace), "--report", str(folder)],
            "simulate": ["simulate", str(trace), "-r", "20", "-g", "4", "--window", "10",
                         "--report", str(folder)],
            "demo": ["demo", "--quick", "--out", str(folder)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("eplb: error: ") and len(err.strip().splitlines()) == 1, err
    assert {"a file": "is not a directory", "under a file": "is not a directory",
            "read-only": "permission denied"}[case] in err


@pytest.mark.parametrize("command", ["plan", "generate"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(
        capsys, tmp_path, loads, monkeypatch, command) -> None:
    import eplb.cli._checks as checks
    import eplb.cli.commands as commands
    import eplb.cli.sim as sim

    forbid_work(monkeypatch, "the output folder", (commands, "read_trace"),
                (sim, "generate_trace"))
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(checks.os, "access", lambda path, mode: (
        False if Path(path) == locked else real_access(path, mode)))
    out = locked / ("p.json" if command == "plan" else "t.pt")
    argv = (["plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(out)]
            if command == "plan" else ["generate", "--steps", "2", "-o", str(out), "-q"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"eplb: error: cannot write {out}: permission denied in '{locked}'"


@pytest.mark.parametrize("command", ["plan", "generate", "demo"])
def test_a_read_only_file_system_is_named_as_one(capsys, tmp_path, loads, monkeypatch,
                                                 command) -> None:
    """Attacker pass (a tmpfs mounted read-only): the early check said "permission denied",
    which sends the user to chmod a folder whose mode is fine; the mount is the cause."""
    import eplb.cli.bench as bench
    import eplb.cli.commands as commands
    import eplb.cli.sim as sim

    forbid_work(monkeypatch, "the output folder", (commands, "read_trace"),
                (sim, "generate_trace"), (bench, "generated_trace"))
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    real_access, real_statvfs = os.access, os.statvfs

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda path, mode: (
        False if Path(path) == mounted else real_access(path, mode)))
    monkeypatch.setattr(os, "statvfs", lambda path: (
        ReadOnly() if Path(path) == mounted else real_statvfs(path)))
    out = mounted / {"plan": "p.json", "generate": "t.pt", "demo": "report"}[command]
    argv = {"plan": ["plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(out)],
            "generate": ["generate", "--steps", "2", "-o", str(out), "-q"],
            "demo": ["demo", "--quick", "--out", str(out)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{mounted}' is on a read-only file system" if command != "demo" else
                        f"{mounted} is on a read-only file system"), err
    assert "permission denied" not in err and len(err.splitlines()) == 1


def test_a_fifo_in_a_report_folder_is_refused_in_the_clis_words(capsys, tmp_path):
    """Attacker pass: the refusal read "even with --force (force=True)", the API's word."""
    folder = tmp_path / "report"
    folder.mkdir()
    os.mkfifo(folder / "report.html")
    assert main(["demo", "--out", str(folder), "--force", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "not a regular file" in err and "force=True" not in err, err
