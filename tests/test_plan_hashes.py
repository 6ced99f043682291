"""``benchmarks/plan_hashes.py``, the check that a speed change keeps the plans: its
hashes repeat run to run, and ``--compare`` fails on a group that differs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_hashes.py"


def hashes(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--only", "fresh,variants", *extra],
                          capture_output=True, text=True, check=False, cwd=tmp_path)


def test_plan_hashes_repeat_and_compare_catches_a_difference(tmp_path):
    first = tmp_path / "before.json"
    assert hashes(tmp_path, "--json", str(first)).returncode == 0
    recorded = json.loads(first.read_text())
    assert set(recorded) == {"inputs", "fresh", "variants"}
    same = hashes(tmp_path, "--compare", str(first))
    assert same.returncode == 0 and "same plans in every group compared" in same.stdout
    recorded["variants"] = "0" * 16
    first.write_text(json.dumps(recorded))
    differ = hashes(tmp_path, "--compare", str(first))
    assert differ.returncode == 1
    assert "DIFFERENT: variants" in differ.stdout and "DIFFERENT: fresh" not in differ.stdout


def test_unknown_group_is_named(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--only", "fresh,bogus"],
                         capture_output=True, text=True, check=False, cwd=tmp_path)
    assert out.returncode == 2 and "unknown group(s) bogus" in out.stderr


def test_a_comparison_across_other_inputs_is_refused(tmp_path):
    # a baseline made without the real files is not compared with a run that has them
    first = tmp_path / "before.json"
    first.write_text(json.dumps({"inputs": "no such inputs", "fresh": "0" * 16}))
    out = hashes(tmp_path, "--compare", str(first))
    assert out.returncode == 2 and "INPUTS DIFFER" in out.stdout


def test_an_output_that_cannot_be_written_stops_the_run_before_it(tmp_path):
    # with --force a link (or a folder) at the name is still not replaced: said before the
    # run, not in a traceback after it
    (tmp_path / "link.json").symlink_to(tmp_path / "elsewhere.json")
    out = hashes(tmp_path, "--json", "link.json", "--force")
    assert out.returncode == 1 and "replaces only regular files" in out.stderr
    assert "variants" not in out.stdout  # no group ran
    (tmp_path / "file").write_text("")
    out = hashes(tmp_path, "--json", "file/hashes.json")
    assert out.returncode == 1 and "file is not a folder" in out.stderr
    assert "variants" not in out.stdout
