"""The Python files under examples/ run as the README and their docstrings say.

Found by the twelfth-session deployer pass: no test ran them, and
``examples/sglang/plan_for_sglang.py`` planned before it learnt that SGLang could not read
the output's name (a traceback after the work).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("VLLM_EPLB_POLICY", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_vllm_policy_demo_runs_without_vllm() -> None:
    done = _run(str(EXAMPLES / "vllm" / "policy_demo.py"))
    assert done.returncode == 0, done.stderr
    assert "phy2log (58, 288) torch.int64" in done.stdout
    assert "slots changed per layer" in done.stdout


@pytest.fixture
def sglang_dump(tmp_path: Path) -> Path:
    # an SGLang {"logical_count"} dump of DeepSeek-V3's shape: dense rows 0-2 empty
    gen = torch.Generator().manual_seed(0)
    counts = torch.exp(torch.randn(61, 256, generator=gen)).mul(100).round()
    counts[:3] = 0
    path = tmp_path / "dump.json"
    path.write_text(json.dumps({"logical_count": counts.tolist()}))
    return path


def test_plan_for_sglang_writes_a_file_sglang_reads(sglang_dump: Path, tmp_path: Path) -> None:
    out = tmp_path / "placement.json"
    done = _run(str(EXAMPLES / "sglang" / "plan_for_sglang.py"), str(sglang_dump), str(out))
    assert done.returncode == 0, done.stderr
    assert "--init-expert-location" in done.stdout
    phy2log = json.loads(out.read_text())["physical_to_logical_map"]
    assert len(phy2log) == 61 and {len(row) for row in phy2log} == {288}


def test_plan_for_sglang_refuses_a_name_sglang_cannot_read_before_planning(
    sglang_dump: Path, tmp_path: Path
) -> None:
    out = tmp_path / "placement.txt"
    done = _run(str(EXAMPLES / "sglang" / "plan_for_sglang.py"), str(sglang_dump), str(out))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "placement.txt" in done.stderr and "*.json" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT))
                                          for p in EXAMPLES.rglob("*.sh")))
def test_shell_examples_parse(script: str) -> None:
    done = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("content", [None, "not json {", "zeros"])
def test_plan_for_sglang_names_a_bad_loads_file_without_a_traceback(
    tmp_path: Path, content: str | None
) -> None:
    """A missing, malformed or all-zero loads file is one line naming it, not a traceback
    (found by a new-user pass: each of these printed a Python traceback)."""
    loads = tmp_path / "dump.json"
    if content == "zeros":
        loads.write_text(json.dumps({"logical_count": [[0] * 256] * 61}))
    elif content is not None:
        loads.write_text(content)
    out = tmp_path / "placement.json"
    done = _run(str(EXAMPLES / "sglang" / "plan_for_sglang.py"), str(loads), str(out))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "dump.json" in done.stderr
    assert not out.exists()
