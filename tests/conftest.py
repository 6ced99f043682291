"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from eplb.integrations._engines import FETCH_HINT, engine_root


def _engine(name: str) -> Path:
    root = engine_root(name)
    if root is None:
        pytest.skip(f"{name}: {FETCH_HINT}")
    return root


@pytest.fixture(scope="session")
def vllm_root() -> Path:
    """Extracted vLLM 0.33.0 EPLB sources (``scripts/fetch_engines.py``), else skip."""
    return _engine("vllm")


@pytest.fixture(scope="session")
def sglang_root() -> Path:
    """Extracted SGLang 0.5.23 EPLB sources (``scripts/fetch_engines.py``), else skip."""
    return _engine("sglang")
