"""The benchmark scripts' output options (``benchmarks/_harness.py``): every output a run
would fail to write stops the script before the run, and missing folders are made."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _harness import add_output_options, refuse_existing_outputs, write_output


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--json")
    add_output_options(parser, "out", "json")
    return parser.parse_args(argv)


def test_one_file_named_by_two_options_is_refused(tmp_path):
    # the second write would fail after the run (or, with --force, replace the first)
    with pytest.raises(SystemExit, match="--out and --json both name"):
        refuse_existing_outputs(_args("--out", str(tmp_path / "r"), "--json",
                                      str(tmp_path / "." / "r"), "--force"))


def test_force_does_not_pass_a_folder_or_a_link(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    for name in ("folder", "link"):
        with pytest.raises(SystemExit, match="replaces only regular files"):
            refuse_existing_outputs(_args("--json", str(tmp_path / name), "--force"))
    (tmp_path / "file").write_text("old")
    refuse_existing_outputs(_args("--json", str(tmp_path / "file"), "--force"))


def test_missing_folders_are_made_and_a_file_in_the_way_is_named(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    args = _args("--json", str(target))
    refuse_existing_outputs(args)
    write_output(target, "{}", args.force)
    assert target.read_text() == "{}"
    (tmp_path / "plain").write_text("")
    with pytest.raises(SystemExit, match="plain is not a folder"):
        refuse_existing_outputs(_args("--out", str(tmp_path / "plain" / "x.md")))
