"""Every benchmark script (``benchmarks/``, ``scripts/``) still imports and builds its
parser: ``--help`` exits 0 with a usage line. It runs none of their work, so that the API
changes that rot them (a moved name, a renamed option) fail here, in a few seconds, and
not in the next session that re-runs a figure of BENCHMARKS.md. The commands its
"Current figures" quote are read by their scripts' parsers too."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the harness (``_harness.py``) has no command line of its own; every script imports it
SCRIPTS = sorted(path for folder in ("benchmarks", "scripts")
                 for path in (REPO / folder).glob("*.py") if not path.name.startswith("_"))


def test_the_scripts_are_found():
    assert len(SCRIPTS) > 30 and REPO / "benchmarks" / "bench_planner.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_help_imports_the_script_and_builds_its_parser(script, monkeypatch, capsys):
    # as ``python benchmarks/x.py --help`` would: the script's folder first on the path
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(script), run_name="__main__")
    assert stopped.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


class _Parsed(Exception):
    """Raised in place of running a script once its parser has read the command line."""


def _current_figure_commands() -> list[str]:
    """The ``python benchmarks/...`` commands quoted in BENCHMARKS.md's "Current figures"
    (a command may wrap over lines there)."""
    text = (REPO / "BENCHMARKS.md").read_text()
    section = text.split("## Current figures", 1)[1].split("\n## ", 1)[0]
    return [" ".join(found.split())
            for found in re.findall(r"`(python\s+benchmarks/[^`]*)`", section)]


def test_the_current_figures_commands_still_parse(monkeypatch, capsys):
    commands = _current_figure_commands()
    assert len(commands) >= 5

    def parse_and_stop(parser, args=None, namespace=None):
        _, unknown = parser.parse_known_args(args, namespace)
        raise _Parsed(unknown)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    for command in commands:
        _, script, *argv = shlex.split(command)
        monkeypatch.setattr(sys, "path", [str(REPO / "benchmarks"), *sys.path])
        monkeypatch.setattr(sys, "argv", [script, *argv])
        with pytest.raises(_Parsed) as parsed:  # SystemExit(2): an option that is gone
            runpy.run_path(str(REPO / script), run_name="__main__")
        assert parsed.value.args[0] == [], f"{command}: unknown {parsed.value.args[0]}"
