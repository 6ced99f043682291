"""Benchmark: streaming a ~200 MB vLLM load-history file (ADRS format) with eplb.formats.

Measures, in fresh subprocesses, the wall time of ``read_loads`` and its peak resident
memory above the baseline of an interpreter that just imported eplb (peak RSS read
with ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``). Targets: <= 30 s and peak
memory <= 3x the file size. The naive ``json.load`` + ``torch.tensor`` route (what the
ADRS evaluator does) is measured once for comparison.

With ``--trtllm`` it instead times writing and reading a TensorRT-LLM YAML placement
(``write_placement`` / ``read_placement``) at a few shapes, through libyaml (eplb's
default where PyYAML has it) and through PyYAML's pure-Python emitter and parser (the
``CSafeDumper`` / ``CSafeLoader`` names hidden), medians of ``--repeats``, one thread.

Usage:
    .venv/bin/python benchmarks/bench_formats.py [--mb 200] [--repeats 3] [--keep FILE]
    .venv/bin/python benchmarks/bench_formats.py --trtllm [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

NUM_LAYERS, NUM_EXPERTS = 58, 256  # DeepSeek-V3's MoE layers

WORKER_READ = """
import time, torch
torch.set_num_threads(1)
from eplb.formats import read_loads
t = time.perf_counter()
trace = read_loads({path!r})
print(time.perf_counter() - t, trace.num_steps, flush=True)
"""

WORKER_NAIVE = """
import time, json, torch
torch.set_num_threads(1)
import eplb.formats
t = time.perf_counter()
with open({path!r}) as f:
    data = json.load(f)
counts = torch.tensor([x["logical_expert_load"] for x in data["load_history"]], dtype=torch.float64)
print(time.perf_counter() - t, counts.shape[0], flush=True)
"""

WORKER_BASELINE = """
import torch
torch.set_num_threads(1)
import eplb.formats
print(0.0, 0, flush=True)
"""

# The wrapper runs the worker as its own child so RUSAGE_CHILDREN sees that worker alone.
WRAPPER = """
import resource, subprocess, sys
out = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
if out.returncode:
    sys.stderr.write(out.stderr)
    raise SystemExit(out.returncode)
kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(out.stdout.strip(), kib)
"""


def make_history(path: Path, target_mb: float, seed: int = 0) -> int:
    """Write a vLLM load-history JSON of about ``target_mb`` MB; return the step count.

    Loads follow eplb.tools.generator when it is available, else a log-normal skew with
    per-step Poisson noise (integer token counts, like vLLM's recorder).
    """
    rng = np.random.default_rng(seed)
    target = int(target_mb * 1e6)
    try:
        from eplb.tools.generator import generate_trace

        base = generate_trace("deepseek-v3", steps=64, seed=seed).counts.numpy()
        base = base / base.sum(-1, keepdims=True)
    except Exception:  # the generator is optional here
        base = rng.lognormal(0.0, 0.8, size=(64, NUM_LAYERS, NUM_EXPERTS))
        base /= base.sum(-1, keepdims=True)
    tokens_per_step = 8192 * 8
    steps = 0
    with open(path, "w") as f:
        f.write('{"load_history": [')
        written = 0
        while written < target:
            lam = base[steps % base.shape[0]] * tokens_per_step
            step = rng.poisson(lam).astype(np.int64)
            text = json.dumps({"logical_expert_load": step.tolist()})
            if steps:
                f.write(", ")
            f.write(text)
            written += len(text) + 2
            steps += 1
        f.write(f'], "num_steps": {steps}}}\n')
    return steps


def run_child(code: str) -> tuple[float, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, code], capture_output=True, text=True, check=True
    )
    seconds, steps, kib = out.stdout.split()
    return float(seconds), int(steps), int(kib)


def trtllm_yaml(repeats: int) -> None:
    """The ``--trtllm`` table (module docstring)."""
    import time

    import torch
    import yaml

    from eplb.core import Placement, Topology
    from eplb.formats import read_placement, write_placement

    torch.set_num_threads(1)
    hidden = {name: getattr(yaml, name) for name in ("CSafeDumper", "CSafeLoader")
              if hasattr(yaml, name)}
    print("| layers × slots (GPUs) | libyaml: write, read (s) | pure Python: write, read (s) "
          "| same text |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for layers, slots, gpus in ((58, 288, 32), (200, 2048, 256)):
            # every expert once, then the hot ones again: a valid global placement
            experts = slots // 2
            gen = torch.Generator().manual_seed(0)
            phy2log = torch.stack([torch.cat([torch.randperm(experts, generator=gen),
                                              torch.randperm(experts, generator=gen)])
                                   for _ in range(layers)])
            placement = Placement.from_phy2log(phy2log, experts, Topology(slots, gpus))
            cells, texts = [], []
            for fast in (True, False):
                for name in hidden:
                    if fast:
                        setattr(yaml, name, hidden[name])
                    else:
                        delattr(yaml, name)
                path = Path(tmp) / f"lb_{fast}.yaml"
                writes, reads = [], []
                for _ in range(repeats):
                    began = time.perf_counter()
                    write_placement(placement, path, force=True)
                    writes.append(time.perf_counter() - began)
                    began = time.perf_counter()
                    read_placement(path)
                    reads.append(time.perf_counter() - began)
                texts.append(path.read_text())
                cells.append(f"{statistics.median(writes):.2f}, {statistics.median(reads):.2f}")
            for name, value in hidden.items():
                setattr(yaml, name, value)
            print(f"| {layers} × {slots} ({gpus}) | {cells[0]} | {cells[1]} | "
                  f"{texts[0] == texts[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="file size to generate (MB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="write the file here and keep it")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--trtllm", action="store_true",
                        help="only the TensorRT-LLM YAML write/read times (see the docstring)")
    args = parser.parse_args()
    if args.trtllm:
        trtllm_yaml(args.repeats)
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "load_history.json"
        steps = make_history(path, args.mb) if not path.exists() else -1
        size = path.stat().st_size
        print(f"file: {size / 1e6:.1f} MB, {steps} steps x {NUM_LAYERS} x {NUM_EXPERTS}")

        base_kib = statistics.median(run_child(WORKER_BASELINE)[2] for _ in range(3))
        times, peaks = [], []
        for _ in range(args.repeats):
            seconds, got_steps, kib = run_child(WORKER_READ.format(path=str(path)))
            times.append(seconds)
            peaks.append((kib - base_kib) * 1024)
        result_mb = got_steps * NUM_LAYERS * NUM_EXPERTS * 8 / 1e6
        print(f"baseline RSS (import eplb): {base_kib / 1024:.0f} MiB")
        print(
            f"read_loads: median {statistics.median(times):.2f} s "
            f"(runs {', '.join(f'{t:.2f}' for t in times)}), "
            f"peak RSS above baseline {statistics.median(peaks) / 1e6:.0f} MB = "
            f"{statistics.median(peaks) / size:.2f}x file size "
            f"(result tensor itself {result_mb:.0f} MB = {result_mb * 1e6 / size:.2f}x)"
        )
        if not args.skip_naive:
            seconds, _, kib = run_child(WORKER_NAIVE.format(path=str(path)))
            print(
                f"naive json.load + torch.tensor: {seconds:.2f} s, peak RSS above baseline "
                f"{(kib - base_kib) * 1024 / 1e6:.0f} MB = {(kib - base_kib) * 1024 / size:.2f}x"
            )


if __name__ == "__main__":
    main()
