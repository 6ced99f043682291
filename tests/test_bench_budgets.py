"""``benchmarks/bench_budgets.py``: its budgets section draws the line at the ladder's
reach the planner uses, whose steps follow the slots per GPU
(:meth:`eplb.IncrementalOptions.steps_for`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_budgets


def test_budgets_section_draws_the_line_at_the_ladders_reach(monkeypatch, capsys):
    # IncrementalOptions.steps defaults to None (chosen by the slots per GPU): the
    # section multiplied by it and stopped with a TypeError before printing a row
    old = bench_budgets.synthetic(0, "lognormal")
    new = bench_budgets.drifted(old, 0)
    monkeypatch.setattr(bench_budgets, "cases", lambda: [("lognormal 0", 40, 8, 1, 1, old, new)])
    bench_budgets.budgets_section()
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| lognormal 0 |"))
    # 5 slots per GPU: 8 steps of max(2, round(3/64 · 40)) = 2 slots, in each of 6 layers
    assert row.split("|")[3].strip() == str(8 * 2 * 6)
