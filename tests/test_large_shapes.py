"""Shapes far from DeepSeek-V3's: many expert groups, many experts. Each plan must finish in
seconds or be refused with a message, never run for hours."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def _finishes(code: str, timeout_s: float = 120.0) -> str:
    """Run ``code`` in a fresh interpreter; its stdout, or a failure when it runs too long."""
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout_s:.0f} s:\n{code}")
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(("groups", "nodes"), [(32, 4), (64, 8), (256, 4)])
def test_locality_with_many_groups_per_node_plans_in_seconds(groups, nodes):
    # the group→node splits are enumerated only when there are at most 20 000 of them;
    # the count was found by running the enumeration, whose loops went on for hours past
    # the cut-off (64 groups on 8 nodes: C(63, 7) = 5.5e8 combinations at the first level)
    out = _finishes(f"""
        import torch, eplb
        torch.set_num_threads(1)
        weight = torch.randint(0, 1000, (1, 256), generator=torch.Generator().manual_seed(0))
        p = eplb.plan(weight, 512, 32, {nodes}, {groups}, policy="locality",
                      dispatch="nearest").validate()
        print(p.policy, tuple(p.phy2log.shape))
    """)
    assert out.split() == ["locality", "(1,", "512)"]
