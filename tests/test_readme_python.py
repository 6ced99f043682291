"""The README's Python examples run as written, in order, in one namespace.

The block that needs a user's own data (an engine's step loop) is run with a small
stand-in for exactly that name.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_python_blocks_run_in_order() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 4
    torch.manual_seed(0)
    # a stand-in for what only a deployment has: the engine's steps
    namespace = {"engine_steps": lambda: (torch.rand(58, 256) * 100 for _ in range(4))}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    placement = namespace["p"]
    assert placement.validate() is placement
