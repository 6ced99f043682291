"""Helpers shared by the test modules: the independent contract checker and where the
real expert-load data lives.

Test modules import them (``from helpers import assert_contract``); fixtures built on
them are in ``conftest.py``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

import eplb
from eplb import Placement
from eplb.cli import main
from eplb.tools.generator import generate_loads

#: Real expert-load data (read-only, never copied into the repository): ``$EPLB_REAL_DATA``
#: or ``../shared/data/real`` next to the repository. Tests that need it skip visibly.
REAL_DATA = Path(
    os.environ.get("EPLB_REAL_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
)
#: The 12 SGLang DeepSeek-V3/R1 workloads (``{"logical_count": [61][256]}``, MoE rows 3..60).
DEEPSEEK_DIR = REAL_DATA / "sglang_deepseek_ep_statistics"
DEEPSEEK_FILES = sorted(DEEPSEEK_DIR.glob("*.json")) if DEEPSEEK_DIR.is_dir() else []
MISSING_REAL = (f"real expert-load data not found at {REAL_DATA} (read-only, not in the "
                "repository; set EPLB_REAL_DATA to its folder)")
#: The CLI tests' small problem (``test_cli.py`` and the ``test_cli_*`` files): ``L`` layers
#: of ``E`` experts (``small_loads_file``), planned onto ``R`` slots on ``P`` GPUs.
L, E, R, P = 4, 16, 20, 4


def read_pyproject() -> dict:
    """The repository's pyproject.toml, parsed: ``tomllib`` from Python 3.11, ``tomli``
    (the dev extras bring it) on 3.10, which ``requires-python`` still supports (a
    newcomer pass: ``import tomllib`` failed two tests there)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    root = Path(__file__).resolve().parents[1]
    return tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))


def divisors(n: int) -> list[int]:
    """Every positive divisor of ``n``, ascending (node and group counts to draw from)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def deepseek_loads(path: Path) -> torch.Tensor:
    """``[58, 256]`` float64 MoE-layer loads of one real DeepSeek-V3 workload file."""
    return torch.tensor(json.loads(path.read_text())["logical_count"], dtype=torch.float64)[3:]


def assert_contract(
    placement: Placement,
    *,
    device: torch.device | str | None = None,
    anti_affinity: bool = True,
) -> None:
    """Check the whole output contract with plain numpy loops (not with ``validate``).

    - int64 ``phy2log [L, R]``, ``log2phy [L, E, maxcnt]``, ``logcnt [L, E]`` on ``device``;
    - dead GPUs' slots hold -1, live slots hold an expert in ``[0, E)``;
    - ``logcnt`` counts ``phy2log``, every entry >= 1, rows sum to the live slots;
    - ``log2phy`` lists each expert's slots ascending, then -1;
    - anti-affinity: at most ``ceil(c / H)`` replicas of an expert per GPU, ``H`` the GPUs
      that may hold it (live GPUs; the node's GPUs under the hierarchical policy);
    - hierarchical: every replica of a group's experts on one node.
    """
    topo = placement.topology
    phy2log, log2phy, logcnt = placement.as_tuple()
    for name, t in (("phy2log", phy2log), ("log2phy", log2phy), ("logcnt", logcnt)):
        assert isinstance(t, torch.Tensor), name
        assert t.dtype == torch.int64, f"{name} dtype {t.dtype}"
        if device is not None:
            assert t.device.type == torch.device(device).type, f"{name} on {t.device}"
    assert phy2log.dim() == 2 and log2phy.dim() == 3 and logcnt.dim() == 2
    num_layers, num_slots = phy2log.shape
    num_experts = logcnt.shape[1]
    assert num_slots == topo.num_replicas
    assert logcnt.shape[0] == num_layers
    assert log2phy.shape[:2] == (num_layers, num_experts)
    slots_per_gpu = num_slots // topo.num_gpus
    assert placement.policy in ("global", "hierarchical", "locality")

    p2l = phy2log.cpu().numpy()
    l2p = log2phy.cpu().numpy()
    cnt = logcnt.cpu().numpy()
    if placement.active_gpus is None:
        live = np.ones(topo.num_gpus, dtype=bool)
    else:
        live = placement.active_gpus.cpu().numpy().astype(bool)
    live_slot = np.repeat(live, slots_per_gpu)
    num_live_slots = int(live_slot.sum())
    if placement.policy == "hierarchical":
        holders = topo.num_gpus // topo.num_nodes
    else:
        holders = int(live.sum())

    for layer in range(num_layers):
        row = p2l[layer]
        assert (row[~live_slot] == -1).all(), f"layer {layer}: dead GPU slot not -1"
        assert ((row[live_slot] >= 0) & (row[live_slot] < num_experts)).all(), (
            f"layer {layer}: live slot out of range: {row.tolist()}"
        )
        counts = np.bincount(row[live_slot], minlength=num_experts)
        assert (counts == cnt[layer]).all(), f"layer {layer}: logcnt {cnt[layer]} vs {counts}"
        assert (cnt[layer] >= 1).all(), f"layer {layer}: an expert has no replica"
        assert cnt[layer].sum() == num_live_slots
        for expert in range(num_experts):
            slots = np.nonzero(row == expert)[0]
            listed = l2p[layer, expert]
            assert (listed[: len(slots)] == slots).all(), (
                f"layer {layer} expert {expert}: log2phy {listed.tolist()} vs slots {slots}"
            )
            assert (listed[len(slots):] == -1).all()
            gpus = slots // slots_per_gpu
            assert live[gpus].all()
            if anti_affinity and len(gpus):
                cap = math.ceil(len(slots) / holders)
                assert np.bincount(gpus).max() <= cap, (
                    f"layer {layer} expert {expert}: {np.bincount(gpus).max()} replicas on one "
                    f"GPU, {len(slots)} replicas over {holders} GPUs"
                )
        if placement.policy == "hierarchical":
            group_size = num_experts // topo.num_groups
            slots_per_node = num_slots // topo.num_nodes
            for group in range(topo.num_groups):
                mine = np.nonzero((row >= 0) & (row // group_size == group))[0]
                assert len(set((mine // slots_per_node).tolist())) == 1, (
                    f"layer {layer} group {group} spans nodes {set(mine // slots_per_node)}"
                )


def generated_drift(seed: int, drift: float, layers: int = 12, experts: int = 64
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, drifted) [layers, experts]``: generated DeepSeek-V3-like loads and the
    next window, every expert × exp(drift·Z) (seeded by ``seed``)."""
    weight = generate_loads("deepseek-v3", seed=seed, num_layers=layers, num_experts=experts)
    g = torch.Generator().manual_seed(seed)
    return weight, weight * torch.exp(drift * torch.randn(weight.shape, generator=g,
                                                          dtype=torch.float64))


def replan_drifted(seed: int, drift: float, replicas: int, gpus: int, nodes: int,
                   groups: int, experts: int = 64) -> tuple[torch.Tensor, Placement, Placement]:
    """``(drifted, old, new)``: a fresh plan of :func:`generated_drift`'s first window and
    the incremental plan of its next window from it (checked against the contract)."""
    weight, drifted = generated_drift(seed, drift, experts=experts)
    old = eplb.plan(weight, replicas, gpus, nodes, groups)
    new = eplb.plan(drifted, replicas, gpus, nodes, groups, previous=old)
    assert_contract(new)
    return drifted, old, new


def counts_tle(seed: int = 0, steps: int = 4, layers: int = 3, experts: int = 8) -> torch.Tensor:
    """``[steps, layers, experts]`` int64 random token counts (the format tests' traces)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (steps, layers, experts), generator=g).to(torch.int64)


def skewed_loads_json(directory: Path, layers: int, experts: int, seed: int
                      ) -> tuple[Path, torch.Tensor]:
    """``(path, weight [layers, experts])``: log-normal integer loads written as an SGLang
    ``{"logical_count": ...}`` file ``stats.json`` in ``directory`` (the CLI tests' input)."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.exp(torch.randn(layers, experts, generator=g, dtype=torch.float64))
              * 100).round()
    path = directory / "stats.json"
    path.write_text(json.dumps({"logical_count": weight.tolist()}))
    return path, weight


def run_ranks(commands: list[list[str]], env: dict[str, str], reports: list[Path],
              timeout_s: float) -> list[dict]:
    """Start one process per rank (``commands[r]``), wait for all, and return each rank's
    JSON report (``reports[r]``) with its output under ``"log"``. A rank still running
    after ``timeout_s`` is killed; a rank that wrote no report, or reported an
    ``"error"``, fails the calling test with its output."""
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for command in commands]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout_s)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    out = []
    for rank, (path, log) in enumerate(zip(reports, logs, strict=True)):
        assert path.is_file(), f"rank {rank} wrote no report ({path.name}):\n{log[-3000:]}"
        report = json.loads(path.read_text())
        assert "error" not in report, f"rank {rank} failed ({path.name}):\n{report['error']}"
        report["log"] = log
        out.append(report)
    return out


def small_loads_file(tmp_path: Path) -> Path:
    """A small skewed ``[L, E]`` loads file (.npy)."""
    gen = np.random.default_rng(0)
    w = np.exp(gen.normal(0, 1, size=(L, E))) * 100
    path = tmp_path / "loads.npy"
    np.save(path, w)
    return path


def run(capsys, *argv: object) -> tuple[int, str, str]:
    """``eplb`` with ``argv`` (paths and numbers as text): ``(exit code, stdout, stderr)``."""
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def best_packing(x: list[float], gpus: int) -> float:
    """Smallest max GPU load over every partition of ``x`` into ``gpus`` groups of equal size."""
    slots = len(x) // gpus
    best = float("inf")

    def fill(left: list[int], peak: float) -> None:
        nonlocal best
        if peak >= best:
            return
        if not left:
            best = peak
            return
        first, rest = left[0], left[1:]
        for others in itertools.combinations(range(len(rest)), slots - 1):
            group = [first] + [rest[i] for i in others]
            remaining = [v for i, v in enumerate(rest) if i not in others]
            fill(remaining, max(peak, sum(x[g] for g in group)))

    fill(list(range(len(x))), 0.0)
    return best
