"""Pictures and the Markdown/HTML report (eplb.tools.report)."""

from __future__ import annotations

import errno
import html
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eplb.tools.report as report_mod
from eplb.tools.report import (
    INSTALL_HINT,
    Report,
    normalised_loads,
    plot_balancedness_over_time,
    plot_gpu_heatmaps,
    plot_layer_balancedness,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _loads(seed: int = 0, layers: int = 5, gpus: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(layers, gpus, generator=gen, dtype=torch.float64) * 10


def test_normalised_loads_have_unit_layer_mean() -> None:
    loads = _loads()
    loads[2] = 0  # an empty layer counts as perfectly balanced
    norm = normalised_loads(loads)
    assert torch.allclose(norm.mean(1), torch.ones(5, dtype=torch.float64))
    assert torch.equal(norm[2], torch.ones(8, dtype=torch.float64))


def _is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


def test_pictures_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    before, after = _loads(0), torch.ones(5, 8, dtype=torch.float64)
    assert _is_png(plot_gpu_heatmaps([("before", before), ("after", after)],
                                     tmp_path / "h.png", layer_ids=[3, 4, 5, 6, 7],
                                     dead_gpus=[1]))
    assert _is_png(plot_layer_balancedness({"eplb": torch.full((5,), 0.99)}, tmp_path / "l.png",
                                           ceiling=torch.ones(5)))
    assert _is_png(plot_balancedness_over_time({"eplb": [0.9, 0.95, 0.97]}, tmp_path / "t.png",
                                               rebalance_at=[1]))


def _sample_report() -> Report:
    rep = Report("title <x>")
    rep.heading("section")
    rep.text("some text & more")
    rep.table(["a", "b"], [[1, 0.5]])
    rep.figure("pic.png", "a caption", lambda path: plot_balancedness_over_time(
        {"eplb": [0.9, 0.95]}, path))
    return rep


def test_report_writes_markdown_html_and_pictures(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = _sample_report().write(tmp_path / "r")
    names = sorted(p.name for p in written)
    assert names == ["pic.png", "report.html", "report.md"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| a | b |" in md and "![a caption](pic.png)" in md
    page = (tmp_path / "r" / "report.html").read_text()
    assert "title &lt;x&gt;" in page and "<img src='pic.png'" in page
    assert _is_png(tmp_path / "r" / "pic.png")


def test_report_refuses_to_overwrite(tmp_path: Path) -> None:
    _sample_report().write(tmp_path)
    with pytest.raises(FileExistsError, match="--force"):
        _sample_report().write(tmp_path)
    _sample_report().write(tmp_path, force=True)


def test_a_report_that_loses_the_race_for_a_folder_changes_none_of_its_files(
        tmp_path: Path) -> None:
    # two runs write a report into one new folder: both pass the check that it is free,
    # then the other run publishes first (here: while this one draws its picture). This
    # one must fail without --force and leave the winner's picture as it was, not
    # replace it (README: outputs are never overwritten without --force, not even by two
    # runs at once). A new folder is staged beside the target and renamed into place, so
    # the loser finds the folder taken when it publishes, and leaves no staging behind
    pytest.importorskip("matplotlib")
    out = tmp_path / "r"

    def draw_after_the_winner(path: Path) -> None:
        _sample_report().write(out)  # the winner publishes its whole report meanwhile
        plot_balancedness_over_time({"greedy": [0.5, 0.6, 0.7]}, path)

    loser = Report("the other run")
    loser.figure("pic.png", "its own picture", draw_after_the_winner)
    with pytest.raises(FileExistsError, match="appeared while the report was written"):
        loser.write(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    reference = tmp_path / "alone"
    _sample_report().write(reference)
    assert (out / "pic.png").read_bytes() == (reference / "pic.png").read_bytes()
    assert "title &lt;x&gt;" in (out / "report.html").read_text()


def _no_matplotlib():
    raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")


def test_report_without_matplotlib_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(report_mod, "_pyplot", _no_matplotlib)
    written = _sample_report().write(tmp_path)
    assert sorted(p.name for p in written) == ["report.html", "report.md"]
    assert not list(tmp_path.glob("*.png"))
    md = (tmp_path / "report.md").read_text()
    assert INSTALL_HINT in md and "pic.png" not in md
    assert html.escape(INSTALL_HINT) in (tmp_path / "report.html").read_text()


def test_a_matplotlib_that_fails_to_import_skips_the_pictures_and_says_why(tmp_path: Path):
    """An MPLBACKEND naming a backend that is not installed (as a Jupyter session leaves
    it) made matplotlib's import raise ValueError, and every report command failed after
    all its planning, naming no variable (attacker pass)."""
    pytest.importorskip("matplotlib")
    env = {**os.environ, "MPLBACKEND": "no_such_backend", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "eplb", "demo", "--quick", "--out",
                           str(tmp_path / "rep")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "pictures skipped: matplotlib cannot be imported" in done.stdout
    assert "MPLBACKEND='no_such_backend' is set" in done.stdout
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["report.html", "report.md"]
    assert "MPLBACKEND" in (tmp_path / "rep" / "report.md").read_text()


def test_install_hints_name_the_extras_requirements_not_an_indexed_eplb(monkeypatch) -> None:
    # eplb is on no package index (README): a hint "pip install 'eplb[plot]'" fails on a
    # serving node, or fetches another project named eplb. The hints name what the
    # extras in pyproject.toml require. (Found by the twelfth-session deployer pass.)
    import builtins

    from helpers import read_pyproject

    from eplb.formats._files import SAFETENSORS_HINT, import_safetensors_torch

    extras = read_pyproject()["project"]["optional-dependencies"]
    assert f"pip install '{extras['plot'][0]}'" == INSTALL_HINT
    assert f"pip install '{extras['safetensors'][0]}'" == SAFETENSORS_HINT
    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(ImportError) as err:
        import_safetensors_torch()
    assert SAFETENSORS_HINT in str(err.value) and "eplb[" not in str(err.value)


def test_a_new_report_folder_appears_whole(tmp_path: Path, monkeypatch) -> None:
    """A run killed while writing left pictures without report.md (attacker pass): a new
    folder is written aside and renamed into place, so it is complete or absent."""
    out = tmp_path / "deep" / "r"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for the kill: the run stops before its text

    monkeypatch.setattr(report_mod, "atomic_write", killed)
    with pytest.raises(KeyboardInterrupt):
        _sample_report().write(out)
    assert not out.exists()
    assert list((tmp_path / "deep").iterdir()) == []
    monkeypatch.undo()
    written = _sample_report().write(out)
    assert {p.name for p in written} <= {p.name for p in out.iterdir()}
    assert (out / "report.md").exists()


def test_a_full_disk_names_the_report_folder_not_the_hidden_one(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Attacker pass: a full disk while a new report folder was written said "cannot write
    .eplb-report-1a2b3c4d.tmp/report.md: No space left on device", a hidden folder that
    is gone when the user reads it. Now the folder asked for is named."""
    out = tmp_path / "r"

    write = report_mod.atomic_write

    def full(path, *args, **kwargs):  # the report's disk is full (the pictures are drawn
        if Path(path).parent.parent == tmp_path:  # in another folder, on another disk)
            raise OSError(errno.ENOSPC, f"cannot write {path}: No space left on device")
        write(path, *args, **kwargs)

    monkeypatch.setattr(report_mod, "atomic_write", full)
    with pytest.raises(OSError) as err:
        _sample_report().write(out)
    assert err.value.errno == errno.ENOSPC
    assert ".eplb-report" not in str(err.value) and f"cannot write {out}{os.sep}" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_report_staging_edge_cases(tmp_path: Path, monkeypatch) -> None:
    """Review pass: a name near the file system's limit fit before staging; a dangling
    link at the target was told the folder "appeared"; with force, a folder another run
    made meanwhile is written into, as any existing folder is."""
    long_name = tmp_path / ("r" * 250)
    _sample_report().write(long_name)
    assert (long_name / "report.md").exists()
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError) as caught:
        _sample_report().write(dangling)
    assert "appeared" not in str(caught.value)
    out = tmp_path / "raced"
    real_write = Report._write_files

    def other_run_first(self, directory, force):
        written = real_write(self, directory, force)
        if not out.exists():  # the other run publishes while this one writes its staging
            out.mkdir()
            (out / "theirs.txt").write_text("the other run's")
        return written

    monkeypatch.setattr(Report, "_write_files", other_run_first)
    written = _sample_report().write(out, force=True)
    assert (out / "theirs.txt").read_text() == "the other run's"
    assert all(path.parent == out and path.exists() for path in written)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_report_folder_that_cannot_be_made_is_named_not_its_hidden_staging(tmp_path,
                                                                          monkeypatch):
    """The hidden staging folder failing to appear (a full disk, /proc) was reported as
    ``No such file or directory: /proc/.eplb-report-5aec9cb3.tmp``, a folder the user
    never named (attacker pass)."""
    import errno

    real_mkdir = os.mkdir

    def full_disk(path, *args, **kwargs):
        if ".eplb-report-" in os.fspath(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(report_mod.os, "mkdir", full_disk)
    target = tmp_path / "sim"
    with pytest.raises(OSError) as caught:
        Report("t").write(target)
    assert str(target) in str(caught.value) and ".eplb-report-" not in str(caught.value)
    assert not target.exists()
