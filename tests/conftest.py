"""Shared pytest configuration and fixtures.

Helpers that test modules import directly (the independent contract checker, the real
data location) are in ``helpers.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from engines import ENGINES, FETCH_HINT, VLLM_RELEASES, engine_root
from helpers import MISSING_REAL, REAL_DATA, run, small_loads_file
from hypothesis import settings

# planner calls are cheap but the CI machine is shared: no per-example deadline. The
# default profile draws the same examples on every run, so a landing never depends on
# luck; EPLB_HYPOTHESIS_PROFILE=explore draws new ones each run, to hunt for bugs.
settings.register_profile("eplb", deadline=None, derandomize=True)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("EPLB_HYPOTHESIS_PROFILE", "eplb"))

# one torch thread, as eplb's CLI and benchmarks run: its many small operations are
# fastest there, and on a shared 2-core machine torch's default thread count made
# single tensor reductions take milliseconds under contention (a hypothesis test took 8 s
# instead of 1 s). Thread counts are tested in subprocesses (test_determinism.py)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real`` (or ``$EPLB_REAL_DATA``); the test skips visibly without it."""
    if not REAL_DATA.is_dir():
        pytest.skip(MISSING_REAL)
    return REAL_DATA


def _engine(name: str) -> Path:
    root = engine_root(name)
    if root is None:
        pytest.skip(f"{name}: {FETCH_HINT}")
    return root


@pytest.fixture(scope="session", params=VLLM_RELEASES,
                ids=[ENGINES[key].version for key in VLLM_RELEASES])
def vllm_root(request: pytest.FixtureRequest) -> Path:
    """Extracted EPLB sources of each tested vLLM release (0.33.0, 0.34.0; fetched by
    ``scripts/fetch_engines.py``), else skip: every test taking it runs once per release."""
    return _engine(request.param)


@pytest.fixture(scope="session")
def sglang_root() -> Path:
    """Extracted SGLang 0.5.23 EPLB sources (``scripts/fetch_engines.py``), else skip."""
    return _engine("sglang")


@pytest.fixture
def loads(tmp_path: Path) -> Path:
    """The CLI tests' small skewed loads file (``helpers.small_loads_file``)."""
    return small_loads_file(tmp_path)


@pytest.fixture
def trace_file(capsys, tmp_path) -> Path:
    """A 40-step Mixtral trace that ``eplb generate`` wrote (the CLI's generate and
    simulate tests)."""
    path = tmp_path / "trace.pt"
    code, out, _ = run(capsys, "generate", "--preset", "mixtral-8x7b", "--steps", "40", "-o",
                       str(path), "--json")
    assert code == 0, out
    assert json.loads(out)["steps"] == 40
    return path


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)
