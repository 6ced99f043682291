"""Worker for the determinism checks: plan a list of cases, print one hash per case.

Run in a fresh interpreter by ``tests/test_determinism.py`` and
``benchmarks/bench_determinism.py`` under different settings (torch threads,
``ATEN_CPU_CAPABILITY``, NumPy CPU features, the order of the cases), which compare
the hashes. Every case calls eplb the way an engine does (vLLM's plugin entry point with
int32 loads, with and without the map in force), so identical hashes across settings
mean every rank of a deployment computes the same placement.

    python tests/_determinism_worker.py --threads 2 --cases real-hier-fresh,zeros-global
    python tests/_determinism_worker.py --list

Output: one JSON object ``{"capability": ..., "threads": ..., "hashes": {case: sha256}}``
on stdout. Real DeepSeek-V3 loads are read from ``$EPLB_REAL_DATA`` (default
``../shared/data/real`` next to the repository); cases needing them are reported as
``"missing"`` when the data is absent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO.parent / "shared/data/real"
DEEPSEEK = "sglang_deepseek_ep_statistics"
MOE_ROWS = slice(3, 61)  # DeepSeek-V3: rows 0-2 are dense layers


def real_dir() -> Path:
    """Folder of the real loads: ``$EPLB_REAL_DATA`` or ``../shared/data/real``."""
    return Path(os.environ.get("EPLB_REAL_DATA", DEFAULT_REAL)) / DEEPSEEK


class Missing(Exception):
    """The case needs data that is not there."""


def _real(name: str):
    import torch

    path = real_dir() / f"{name}.json"
    if not path.is_file():
        raise Missing(str(path))
    counts = json.loads(path.read_text())["logical_count"]
    # vLLM's load window is int32
    return torch.tensor(counts, dtype=torch.int64)[MOE_ROWS].to(torch.int32)


def _synthetic(kind: str, layers: int, experts: int, seed: int):
    """``[layers, experts]`` loads. ``int``: int32 lognormal counts (vLLM's dtype);
    ``float``: float32 non-integer loads; ``zeros``: a profile run; ``ties``: every
    expert equal; ``few``: int32 counts 1–5, so many experts (and their pieces) tie."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return torch.zeros(layers, experts, dtype=torch.int32)
    if kind == "ties":
        return torch.full((layers, experts), 1000, dtype=torch.int32)
    if kind == "few":
        return torch.from_numpy(rng.integers(1, 6, size=(layers, experts)).astype(np.int32))
    raw = rng.lognormal(0.0, 1.2, size=(layers, experts)) * 1000
    if kind == "float":
        return torch.from_numpy(raw.astype(np.float32))
    return torch.from_numpy(np.rint(raw).astype(np.int32))


def _initial_map(layers: int, replicas: int, experts: int):
    """vLLM's first map: slot i → expert i % E, every layer."""
    import torch

    return (torch.arange(replicas) % experts).expand(layers, -1).contiguous()


def _drift(weight, seed: int):
    """The next window: every expert × exp(0.15·N(0,1)), rounded (int32 stays int32)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    factor = np.exp(0.15 * rng.standard_normal(tuple(weight.shape)))
    out = weight.double().numpy() * factor
    if weight.is_floating_point():
        return torch.from_numpy(out.astype(np.float32))
    return torch.from_numpy(np.rint(out).astype(np.int32))


# DeepSeek-V3 on 32 GPUs: (num_groups, num_nodes) as vLLM passes them
HIER, GLOBAL = (8, 4), (8, 1)


def _call(weight, replicas: int, topo: tuple[int, int], gpus: int, old=None, options=None):
    """eplb exactly as vLLM's ``rearrange`` calls the policy (plugin entry point)."""
    from eplb.integrations.vllm import EplbPolicy

    groups, nodes = topo
    cls = type("P", (EplbPolicy,), {"options": dict(options or {})})
    return cls.rebalance_experts(weight, replicas, groups, nodes, gpus, old)


def _real_cases() -> dict[str, Callable]:
    cases: dict[str, Callable] = {}
    files = ("decode_in1000out1000", "prefill_in4096", "prefill_in512")
    for topo_name, topo in (("hier", HIER), ("global", GLOBAL)):
        for f in files:
            short = f.split("_")[0] + f.split("_in")[1][:4]

            def fresh(f=f, topo=topo):
                return _call(_real(f), 288, topo, 32)

            def initial(f=f, topo=topo):
                w = _real(f)
                return _call(w, 288, topo, 32, _initial_map(w.shape[0], 288, 256))

            def drifted(f=f, topo=topo):
                w = _real(f)
                old = _call(w, 288, topo, 32)
                return _call(_drift(w, 1), 288, topo, 32, old)

            def budget(f=f, topo=topo):
                w = _real(f)
                old = _call(w, 288, topo, 32)
                return _call(_drift(w, 2), 288, topo, 32, old, {"max_moves": 2500})

            cases[f"real-{topo_name}-{short}-fresh"] = fresh
            cases[f"real-{topo_name}-{short}-initial"] = initial
            cases[f"real-{topo_name}-{short}-drift"] = drifted
            cases[f"real-{topo_name}-{short}-budget"] = budget
    return cases


def _synthetic_cases() -> dict[str, Callable]:
    cases: dict[str, Callable] = {}
    shapes = {
        # name: (layers, experts, replicas, gpus, hierarchical (groups, nodes))
        "v3": (58, 256, 288, 32, HIER),
        "small": (6, 64, 80, 8, (4, 2)),
        "odd": (5, 60, 72, 12, (6, 3)),
        "two": (8, 64, 128, 64, (4, 2)),  # two slots per GPU: the count search
        # every expert once (the tighter second search), and GPUs of many slots (the third)
        "nospare": (6, 128, 128, 8, (4, 2)),
        "wide": (3, 96, 96, 2, (2, 2)),
        # one spare slot a GPU on GPUs of many slots (the tight gap of the second search)
        "fewspare": (2, 128, 136, 8, (4, 2)),
        # every expert once at 4 slots a GPU (the greedy's second opinion)
        "nospare4": (6, 64, 64, 16, (4, 2)),
        # eight experts (every count vector one replica from Jefferson's; hierarchical:
        # 4 experts a node)
        "tiny": (6, 8, 24, 4, (2, 2)),
    }
    for shape_name, (layers, experts, replicas, gpus, hier) in shapes.items():
        for kind in ("int", "float", "zeros", "ties", "few"):
            for topo_name, topo in (("hier", hier), ("global", (hier[0], 1))):
                def fresh(kind=kind, layers=layers, experts=experts, replicas=replicas,
                          gpus=gpus, topo=topo):
                    return _call(_synthetic(kind, layers, experts, 7), replicas, topo, gpus)

                def drifted(kind=kind, layers=layers, experts=experts, replicas=replicas,
                            gpus=gpus, topo=topo):
                    w = _synthetic(kind, layers, experts, 7)
                    old = _call(w, replicas, topo, gpus, _initial_map(layers, replicas, experts))
                    return _call(_drift(w, 3), replicas, topo, gpus, old)

                name = f"syn-{shape_name}-{kind}-{topo_name}"
                cases[f"{name}-fresh"] = fresh
                cases[f"{name}-drift"] = drifted
    return cases


def supported_capabilities() -> list[str]:
    """``ATEN_CPU_CAPABILITY`` values this CPU can run (from /proc/cpuinfo flags)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        return ["default"]
    caps = ["default"]
    if "avx2" in flags:
        caps.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        caps.append("avx512")
    return caps


#: NumPy's own SIMD dispatch levels (NumPy 2.4 feature groups; X86_V3 ~ AVX2, X86_V4 ~
#: AVX512): value of NPY_DISABLE_CPU_FEATURES
NUMPY_LEVELS = {
    "numpy-native": "",
    "numpy-x86v3": "X86_V4 AVX512_ICL AVX512_SPR",
    "numpy-baseline": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
}


def _option_cases() -> dict[str, Callable]:
    """Non-default incremental options, where the drift's spread factor is computed from
    ``drift`` at call time (found by the attack pass: NumPy's ``expm1`` differed)."""
    import torch

    def drift_0434():
        return _call(torch.tensor([[3, 4, 5, 3, 2, 0, 3, 3]], dtype=torch.int32), 8, (4, 1), 4,
                     torch.tensor([[2, 0, 5, 7, 1, 3, 6, 4]]),
                     {"drift": 0.434, "move_price": 0.001})

    def drift_0587():
        return _call(torch.tensor([[885, 522, 864, 18, 48, 796, 907, 504]], dtype=torch.int32),
                     12, (1, 1), 4, torch.tensor([[2, 1, 7, 2, 6, 1, 0, 5, 0, 3, 3, 4]]),
                     {"drift": 0.587, "move_price": 0.0})

    return {"opt-drift-0.434": drift_0434, "opt-drift-0.587": drift_0587}


def _sglang_cases() -> dict[str, Callable]:
    """SGLang's runtime call under its static dispatch (DeepEP): eplb plans for the nearest
    replica, fresh and from the placement in force; every rank computes it on its own."""
    from eplb.integrations.sglang import eplb_rebalance

    def call(weight, old=None):
        return eplb_rebalance(weight[None], 80, 10, 4, 2, hierarchical=True,
                              old_phy2log=old, sglang_dispatch="static")[0]

    def fresh():
        return call(_synthetic("int", 6, 64, 7))

    def drifted():
        w = _synthetic("int", 6, 64, 7)
        return call(_drift(w, 4), call(w))

    def few():
        return call(_synthetic("few", 6, 64, 11))

    def one_node():  # one node: SGLang's runtime table, from the placement in force
        w = _synthetic("int", 6, 64, 13)

        def on_one(weight, old=None):
            return eplb_rebalance(weight[None], 80, 10, 4, 1, hierarchical=True,
                                  old_phy2log=old, sglang_dispatch="static")[0]

        return on_one(_drift(w, 5), on_one(w))

    return {"sglang-nearest-fresh": fresh, "sglang-nearest-drift": drifted,
            "sglang-nearest-few": few, "sglang-one-node-drift": one_node}


def _locality_cases() -> dict[str, Callable]:
    """The locality policy on problem 1680 of ``bench_locality_determinism.py`` (4 layers of
    16 experts, 24 slots on 8 GPUs in 2 nodes): it planned otherwise under AVX2 than under
    ATen's default kernels while its swap search summed in float32."""
    import numpy as np
    import torch

    import eplb

    def tiny_1680():
        rng = np.random.default_rng(1680)
        weight = torch.from_numpy(np.round(np.exp(rng.standard_normal((4, 16))) * 100))
        return eplb.plan(weight, 24, 8, 2, policy="locality", dispatch="nearest",
                         slack=0.03).phy2log

    return {"locality-tiny-1680": tiny_1680}


def all_cases() -> dict[str, Callable]:
    """Every case by name (real-* need the real loads)."""
    return {**_real_cases(), **_synthetic_cases(), **_option_cases(), **_sglang_cases(),
            **_locality_cases()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default="", help="comma-separated case names, in order")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    cases = all_cases()
    if args.list:
        print("\n".join(cases))
        return 0
    import torch  # after the environment is set: ATEN_CPU_CAPABILITY is read at import

    torch.set_num_threads(args.threads)
    hashes: dict[str, str] = {}
    for name in [c for c in args.cases.split(",") if c]:
        try:
            phy2log = cases[name]()
        except Missing as exc:
            hashes[name] = f"missing: {exc}"
            continue
        data = phy2log.to(torch.int64).contiguous().numpy().tobytes()
        hashes[name] = hashlib.sha256(data).hexdigest()[:16]
    print(json.dumps({
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "hashes": hashes,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
