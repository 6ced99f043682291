"""Every ``eplb`` command line shown in README.md and in the ``--help`` texts works.

The examples are extracted from the README's ``bash`` blocks and from every help epilog
(continuation lines joined, comments dropped, shell globs expanded) and run, each in a
fresh folder holding small inputs under the names the examples use (an SGLang-style
``stats.json`` with dense rows 0-2, a bare-rows ``moe.npy``, SGLang recorder dumps, a
TensorRT-LLM statistics folder, a top-k routing ``.npz``, a trace, placements).

To keep the suite fast, three things are changed, and only these: ``--steps`` of
``eplb generate`` is cut to 12; ``eplb bench`` with files gets ``--no-builtin --repeats
1``; ``eplb demo`` and ``eplb bench`` without files (each tens of seconds) are only parsed
here, their runs are covered by ``tests/test_cli.py`` (demo) and ``tests/test_cli_eval.py``
(bench). Absolute ``/tmp/`` paths are rewritten into the example's folder.
"""

from __future__ import annotations

import glob
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import eplb
from eplb.cli import build_parser, main
from eplb.formats import LoadTrace, write_loads, write_placement

ROOT = Path(__file__).resolve().parents[1]
LAYERS, MOE_FROM, E = 6, 3, 256  # a DeepSeek-V3-like model cut to 6 layers (3 dense)


def _join_continuations(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += [line.strip() for line in _join_continuations(block)
                  if line.strip().startswith("eplb ")]
    return lines


def help_examples() -> list[str]:
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    lines = []
    for epilog in [parser.epilog, *(p.epilog for p in subparsers.values())]:
        lines += [line.strip() for line in _join_continuations(epilog or "")
                  if line.strip().startswith("eplb ")]
    return lines


EXAMPLES = sorted({*(("README", c) for c in readme_examples()),
                   *(("help", c) for c in help_examples())})


def test_examples_were_found() -> None:
    commands = {shlex.split(c, comments=True)[1] for _, c in EXAMPLES}
    assert commands == {"demo", "plan", "eval", "bench", "simulate", "generate"}
    assert len([1 for src, _ in EXAMPLES if src == "README"]) >= 15


# ------------------------------------------------------------------------- inputs
def _stats(seed: int) -> np.ndarray:
    gen = np.random.default_rng(seed)
    w = np.rint(np.exp(gen.normal(0, 1.0, size=(LAYERS, E))) * 200).astype(np.int64)
    w[:MOE_FROM] = 0  # dense layers, as SGLang dumps them
    return w


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    stats = _stats(0)
    for name, w in (("stats.json", stats), ("loads.json", stats), ("new.json", _stats(1))):
        (d / name).write_text(json.dumps({"logical_count": w.tolist()}))
    np.save(d / "moe.npy", stats[MOE_FROM:].astype(np.float64))  # bare MoE rows, no ids
    placement = eplb.plan(torch.from_numpy(stats).double(), 288, 32)
    for name in ("placement.json", "old.json"):
        write_placement(placement, d / name, weight=torch.from_numpy(stats))
    new = torch.from_numpy(_stats(1)).double()  # new.json's loads, planned from the old map
    write_placement(eplb.plan(new, 288, 32, previous=placement), d / "next.json", weight=new)
    hier = eplb.plan(torch.from_numpy(stats).double(), 288, 32, 4, 8)
    write_placement(hier, d / "init.sglang.json", "sglang")
    local = eplb.plan(torch.from_numpy(stats).double(), 288, 32, 4, 8, policy="locality",
                      dispatch="nearest")
    write_placement(local, d / "local.sglang.json", "sglang")
    gen = torch.Generator().manual_seed(2)
    rates = torch.from_numpy(stats).double().clamp(min=1)[None] / 100
    counts = torch.poisson(rates.expand(640, -1, -1).contiguous(), generator=gen)
    write_loads(LoadTrace(counts, list(range(LAYERS))), d / "trace.pt")
    # distinct ids per top-k row, as a router's (a repeated one is refused); 8,400 tokens,
    # about the real ESFT tasks' 8.2-8.5k, so the README's half-and-half split has two steps
    ids = {k: torch.rand(8400, 4, 64, generator=gen).argsort(2)[..., :6].to(torch.int8).numpy()
           for k in ("law_topk_ids", "code_topk_ids")}
    for name in ("esft_topk_ids.npz", "routing.npz"):
        np.savez(d / name, **ids)
    # the plan of the first half that the README's eval of the second half reads
    assert main(["plan", str(d / "esft_topk_ids.npz"), "--key", "law_topk_ids",
                 "--tokens-per-step", "256", "--step-range", ":50%", "-r", "80", "-g", "16",
                 "--nodes", "2", "--dispatch", "nearest", "-o", str(d / "law.json")]) == 0
    (d / "dumps").mkdir()
    for i, stamp in enumerate(("1700000000.5", "1700000100.25")):
        dump = {"rank": 0, "logical_count": torch.from_numpy(_stats(3 + i))[None].to(torch.int32),
                "average_utilization_rate_over_window": None}
        for folder in (d, d / "dumps"):
            torch.save(dump, folder / f"expert_distribution_recorder_{stamp}.pt")
    st = pytest.importorskip("safetensors.torch")
    trt = d / "expert_statistic"
    trt.mkdir()
    (trt / "meta_info.json").write_text(json.dumps({"num_experts": E,
                                                     "num_experts_per_token": 8}))
    st.save_file({f"{it}_{layer}": torch.from_numpy(_stats(5 + it)[layer])
                  for it in range(3) for layer in range(MOE_FROM, LAYERS)},
                 str(trt / "rank0.safetensors"))
    return d


# ------------------------------------------------------------------------- running
OUTPUT_FLAGS = ("-o", "--output", "--report", "--out")


def _argv(command: str, where: Path) -> tuple[list[str], str | None, bool]:
    """``(argv, stdout file, run)`` for one example, with the documented substitutions."""
    words = shlex.split(command.replace("/tmp/", ""), comments=True)[1:]
    redirect = None
    if ">" in words:
        at = words.index(">")
        words, redirect = words[:at], words[at + 1]
    expanded = []
    for word in words:
        matches = sorted(glob.glob(str(where / word))) if "*" in word else []
        expanded += [str(Path(m).relative_to(where)) for m in matches] or [word]
    words = expanded
    run = True
    if words[0] == "generate" and "--steps" in words:
        words[words.index("--steps") + 1] = "12"
    if words[0] == "demo":
        run = False
    if words[0] == "bench":
        has_files = any(not w.startswith("-") and not words[i - 1].startswith("-")
                        for i, w in enumerate(words) if i > 0)
        if has_files:
            words += ["--no-builtin", "--repeats", "1"]
        else:
            run = False
    return words, redirect, run


@pytest.mark.parametrize(("source", "command"), EXAMPLES,
                         ids=[f"{s}: {c}" for s, c in EXAMPLES])
def test_example_runs(inputs, tmp_path, monkeypatch, capsys, source, command) -> None:
    where = tmp_path / "run"
    shutil.copytree(inputs, where)
    monkeypatch.chdir(where)
    argv, redirect, run = _argv(command, where)
    args = build_parser().parse_args(argv)  # every example parses (argparse exits 2 else)
    assert args.command == argv[0]
    if not run:
        return
    for flag in OUTPUT_FLAGS:  # the example's own output must not be a leftover input
        if flag in argv:
            target = where / argv[argv.index(flag) + 1]
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"{source} example failed: {command}\n{err}"
    assert "Traceback" not in err
    if redirect is not None:
        json.loads(out)  # `--json > file` must give JSON


def test_the_files_readme_commands_write_are_git_ignored() -> None:
    """Every file a README command or snippet writes, run from the repository's root, is
    in .gitignore's list of them (a newcomer pass found ``even.json``, named in prose
    across a line break, and ``moe.npz``, written by a Python snippet, missing)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    outputs = set(re.findall(r"(?:-o|--report)\s+([\w.\-]+/?)(?=[\s`]|$)", text))
    outputs |= set(re.findall(r'^\s*write_\w+\(.*"([\w.\-]+)"\)', text, re.M))
    outputs -= {"DIR", "FILE", "OUT"}  # placeholders of the command table
    assert {"even.json", "moe.npz", "placement.json", "sim/"} <= outputs
    ignored = {line.strip().lstrip("/") for line in
               (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()}
    assert sorted(name for name in outputs if name not in ignored) == []
