"""CPU vs GPU: the same planner on CPU and CUDA tensors, with validity checks.

Runs only where ``torch.cuda.is_available()``; otherwise it says so and exits 0.
For each shape it plans on CPU (one thread) and on the GPU, checks that the GPU result
is on the GPU and passes ``validate()``, and prints balancedness and median times.
The GPU is timed three ways (issue 14): automatic (since 2026-12-04 device input is planned
on the CPU and the plan moved back, :func:`eplb.core.device_path.plans_on_host`), the same
forced (``FORCE="host"``), and planned on the device with construction and expansion there
from ``DEVICE_PATH_MIN_ITEMS`` items (``FORCE="device"``).

Usage: ``python benchmarks/bench_gpu.py [--repeats N]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import eplb
import eplb.core.device_path as device_path
from eplb.tools.generator import generate_loads

SHAPES = [  # layers, experts, replicas, gpus, nodes, groups
    (58, 256, 288, 32, 1, 1),
    (58, 256, 288, 32, 4, 8),
    (58, 256, 288, 96, 1, 1),
    (58, 256, 288, 144, 1, 1),
    (61, 384, 512, 64, 1, 1),
    (61, 384, 768, 256, 1, 1),
    (100, 1024, 2048, 256, 1, 1),
    (100, 1024, 2048, 1024, 1, 1),
]


def timed(fn, repeats: int, sync: bool) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device (torch.cuda.is_available() is False)")
        return
    torch.set_num_threads(1)
    print(
        f"# bench_gpu — {time.strftime('%Y-%m-%d')}, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}\n"
    )
    print(
        "| L×E | R | P | policy | CPU ms | GPU ms (auto) | GPU ms, host steps | "
        "GPU ms, device steps | CPU bal | GPU bal host / device | GPU valid |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for layers, experts, replicas, gpus, nodes, groups in SHAPES:
        w = generate_loads(num_layers=layers, num_experts=experts, seed=0)
        wg = w.cuda()
        shape = (replicas, gpus, nodes, groups)
        cpu = eplb.plan(w, *shape)
        cpu_ms = timed(lambda w=w, s=shape: eplb.plan(w, *s), args.repeats, False)
        gpu_ms, bal, valid = {}, {}, True
        for force in (None, "host", "device"):
            device_path.FORCE = force
            try:
                gpu = eplb.plan(wg, *shape)
                gpu.validate()
                valid &= gpu.phy2log.is_cuda and gpu.log2phy.is_cuda and gpu.logcnt.is_cuda
                bal[force] = gpu.balancedness(wg)
                gpu_ms[force] = timed(lambda w=wg, s=shape: eplb.plan(w, *s), args.repeats, True)
            except Exception as exc:  # reported in the table, the other shapes still run
                print(f"<!-- {layers}x{experts} P={gpus} FORCE={force}: "
                      f"{type(exc).__name__}: {exc} -->")
                valid, bal[force], gpu_ms[force] = False, float("nan"), float("nan")
            finally:
                device_path.FORCE = None
        print(
            f"| {layers}×{experts} | {replicas} | {gpus} | {cpu.policy} | {cpu_ms:.1f} | "
            f"{gpu_ms[None]:.1f} | {gpu_ms['host']:.1f} | {gpu_ms['device']:.1f} | "
            f"{cpu.balancedness(w):.5f} | {bal['host']:.5f} / {bal['device']:.5f} | "
            f"{'yes' if valid else 'NO'} |"
        )


if __name__ == "__main__":
    main()
