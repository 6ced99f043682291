"""Are eplb's plans bit-identical across the settings that differ between ranks?

Runs ``tests/_determinism_worker.py`` in fresh interpreters under every combination of
torch threads, ``ATEN_CPU_CAPABILITY`` (set before torch is imported), NumPy CPU
features, and the order of the cases (forward, reversed, and each case alone in its
own process), then reports every case whose phy2log hash is not the same everywhere.

    python benchmarks/bench_determinism.py                      # the full matrix
    python benchmarks/bench_determinism.py --threads 1,4 --capabilities default,avx512

Real DeepSeek-V3 loads: ``$EPLB_REAL_DATA`` (default ``../shared/data/real``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_determinism_worker.py"
sys.path.insert(0, str(WORKER.parent))
from _determinism_worker import NUMPY_LEVELS, supported_capabilities  # noqa: E402

sys.path.pop(0)


def run_worker(cases: list[str], threads: int, capability: str, numpy_off: str) -> dict:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    env.pop("NPY_DISABLE_CPU_FEATURES", None)
    if numpy_off:
        env["NPY_DISABLE_CPU_FEATURES"] = numpy_off
    out = subprocess.run(
        [sys.executable, str(WORKER), "--threads", str(threads), "--cases", ",".join(cases)],
        env=env, capture_output=True, text=True, check=False,
    )
    if out.returncode:
        raise RuntimeError(f"worker failed ({capability}, {threads} threads):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,4")
    parser.add_argument("--capabilities", default=",".join(supported_capabilities()))
    parser.add_argument("--cases", default="", help="comma-separated (default: all)")
    parser.add_argument("--alone", action="store_true",
                        help="also run every case alone in its own process (slow)")
    parser.add_argument("--numpy", action="store_true",
                        help="also vary NumPy's CPU features (NPY_DISABLE_CPU_FEATURES)")
    args = parser.parse_args()
    listed = subprocess.run([sys.executable, str(WORKER), "--list"], capture_output=True,
                            text=True, check=True).stdout.split()
    cases = [c for c in args.cases.split(",") if c] or listed
    threads = [int(t) for t in args.threads.split(",")]
    caps = args.capabilities.split(",")
    numpy_settings = NUMPY_LEVELS if args.numpy else {"numpy-native": ""}

    seen: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    start = time.perf_counter()
    # ATen capability x threads x call order; NumPy's dispatch (independent of ATen)
    # varied once, at the best capability and one thread
    settings = [(cap, t, "numpy-native", order)
                for cap in caps for t in threads for order in ("forward", "reversed")]
    settings += [(caps[-1], 1, level, "forward") for level in numpy_settings
                 if level != "numpy-native"]
    runs = 0
    for cap, t, level, order in settings:
        seq = cases if order == "forward" else cases[::-1]
        got = run_worker(seq, t, cap, numpy_settings[level])
        runs += 1
        label = f"{got['capability']}/{t}t/{level}/{order}"
        for name, digest in got["hashes"].items():
            seen[name][digest].append(label)
    if args.alone:
        for name in cases:
            got = run_worker([name], 1, caps[-1], "")
            runs += 1
            seen[name][got["hashes"][name]].append(f"{got['capability']}/1t/alone")
    elapsed = time.perf_counter() - start
    missing = [n for n, d in seen.items() if any(k.startswith("missing") for k in d)]
    differ = {n: d for n, d in seen.items() if len(d) > 1}
    print(f"{len(cases)} cases x {runs} processes in {elapsed:.0f} s "
          f"(capabilities {caps}, threads {threads}, numpy {list(numpy_settings)})")
    if missing:
        print(f"{len(missing)} cases lack real data ({real_hint()})")
    if not differ:
        print("every case: one hash across all settings")
        return 0
    print(f"{len(differ)} cases differ:")
    for name, digests in differ.items():
        print(f"  {name}")
        for digest, labels in digests.items():
            print(f"    {digest}: {len(labels)} runs, e.g. {', '.join(sorted(labels)[:4])}")
    return 1


def real_hint() -> str:
    return os.environ.get("EPLB_REAL_DATA", str(REPO.parent / "shared/data/real"))


if __name__ == "__main__":
    sys.exit(main())
