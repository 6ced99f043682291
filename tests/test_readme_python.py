"""The README's Python examples run as written, in order, in one namespace.

The blocks that need a user's own data (an engine's step loop, an SGLang dump) are run
with small stand-ins for exactly those names, in a temporary folder.
"""

from __future__ import annotations

import importlib
import re
import textwrap
from pathlib import Path

import torch

from eplb.core import LoadTrace
from eplb.formats import read_loads, write_loads

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_imports_only_public_names() -> None:
    """A name the README tells users to import is in its package's ``__all__``: the rest is
    internal and may change (it quoted ``from eplb.core.rank_draws import
    plan_for_start_up_file``, a module no ``__all__`` lists; review pass)."""
    text = " ".join(README.read_text(encoding="utf-8").split())
    quoted = re.findall(r"from (eplb[\w.]*) import ([\w]+(?:, [\w]+)*)", text)
    assert len(quoted) >= 5
    private = [f"{module}.{name}" for module, names in quoted for name in names.split(", ")
               if name not in getattr(importlib.import_module(module), "__all__", ())]
    assert not private, f"the README imports names outside the public API: {private}"


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 4
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    # an SGLang-style dump of DeepSeek-V3: 61 layers, the first 3 dense (no load)
    counts = torch.cat([torch.zeros(1, 3, 256), torch.rand(1, 58, 256).mul(100).round()], 1)
    write_loads(LoadTrace(counts, list(range(61))), "dump.pt")
    # a stand-in for what only a deployment has: the engine's steps
    namespace = {"engine_steps": lambda: (torch.rand(58, 256) * 100 for _ in range(4))}
    for block in blocks:
        # (a block inside a list item is indented with it)
        exec(compile(textwrap.dedent(block), str(README), "exec"), namespace)
    placement = namespace["p"]
    assert placement.validate() is placement
    assert read_loads("moe.npz").layer_ids == list(range(3, 61))  # the MoE rows, kept
