"""CPU vs CUDA input: does eplb return the same plan, bit for bit? (issue 10, part 2)

Runs only where ``torch.cuda.is_available()``; otherwise it says so and exits 0.
For each case it plans from the same loads on the CPU and on the GPU, and again on the
GPU, and reports whether the maps (``phy2log``) are identical, the balancedness of each,
and the median time of each (one CPU thread). Cases: the engines' calls at the
DeepSeek-V3 shape (global, hierarchical, vLLM's call with its initial map and int32
loads, SGLang's nearest rule), the issue-14 low-slot planners (S = 2, S = 3), dead GPUs
with speeds, and large shapes that take the device path
(:data:`eplb.core.device_path.DEVICE_PATH_MIN_ITEMS`).

Usage: ``python benchmarks/bench_cuda_identical.py [--repeats N]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from bench_gpu import timed

import eplb
from eplb.core.dispatch import realised_gpu_loads
from eplb.tools.generator import generate_loads


def _vllm_initial(layers: int, experts: int, replicas: int) -> torch.Tensor:
    """vLLM's first map: slot ``i`` holds expert ``i mod E``."""
    return (torch.arange(replicas) % experts).expand(layers, -1).contiguous()


def _cases() -> list[tuple[str, int, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    """``(name, GPUs, loads, call)``: ``call(loads on a device)`` → ``phy2log`` there."""
    ds = generate_loads(num_layers=58, num_experts=256, seed=0)
    ds_int = (ds * 1000).round().to(torch.int32)
    initial = _vllm_initial(58, 256, 288)
    speed = torch.ones(32)
    speed[:8] = 1.5
    live = torch.ones(32, dtype=torch.bool)
    live[[3, 17]] = False
    large = generate_loads(num_layers=100, num_experts=1024, seed=0)
    large_int = (large * 1000).round().to(torch.int32)
    big_initial = _vllm_initial(100, 1024, 2048)

    def on(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device)

    return [
        ("58x256 R=288 P=32 global", 32, ds, lambda w: eplb.plan(w, 288, 32).phy2log),
        ("58x256 R=288 P=32 hierarchical N=4 G=8", 32, ds,
         lambda w: eplb.plan(w, 288, 32, 4, 8).phy2log),
        ("58x256 int32, vLLM initial map, global", 32, ds_int,
         lambda w: eplb.rebalance_experts(w, 288, 1, 1, 32, old_phy2log=on(initial, w))[0]),
        ("58x256 int32, vLLM initial map, hierarchical", 32, ds_int,
         lambda w: eplb.rebalance_experts(w, 288, 8, 4, 32, old_phy2log=on(initial, w))[0]),
        ("58x256 nearest dispatch N=4", 32, ds,
         lambda w: eplb.plan(w, 288, 32, 4, policy="global", dispatch="nearest").phy2log),
        ("58x256 speeds + 2 dead GPUs (balance ignores speed)", 32, ds,
         lambda w: eplb.plan(w, 288, 32, gpu_speed=on(speed, w),
                             active_gpus=on(live, w)).phy2log),
        ("58x256 R=288 P=144 (S=2)", 144, ds, lambda w: eplb.plan(w, 288, 144).phy2log),
        ("58x256 R=288 P=96 (S=3)", 96, ds, lambda w: eplb.plan(w, 288, 96).phy2log),
        ("61x384 R=768 P=256 (device-path size)", 256,
         generate_loads(num_layers=61, num_experts=384, seed=0),
         lambda w: eplb.plan(w, 768, 256).phy2log),
        ("100x1024 R=2048 P=256 (device-path size)", 256, large,
         lambda w: eplb.plan(w, 2048, 256).phy2log),
        ("100x1024 R=2048 P=256 hierarchical N=8 G=16 (device-path size)", 256, large,
         lambda w: eplb.plan(w, 2048, 256, 8, 16).phy2log),
        ("100x1024 int32 from vLLM's initial map (device-path size)", 256, large_int,
         lambda w: eplb.rebalance_experts(w, 2048, 1, 1, 256, old_phy2log=on(big_initial, w))[0]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("SKIPPED: no CUDA device (torch.cuda.is_available() is False)")
        return
    torch.set_num_threads(1)
    print(f"# bench_cuda_identical — {time.strftime('%Y-%m-%d')}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| case | CPU = CUDA | CUDA = CUDA again | slots differing | CPU bal | CUDA bal | "
          "CPU ms | CUDA ms |")
    print("|---|---|---|---|---|---|---|---|")
    same_all = True
    for name, gpus, loads, call in _cases():
        gpu_loads = loads.cuda()
        cpu_map = call(loads)
        try:
            gpu_map = call(gpu_loads)
            again = call(gpu_loads)
        except Exception as exc:  # reported, so that one failure does not hide the rest
            print(f"| {name} | ERROR on CUDA: {type(exc).__name__}: {exc} | | | | | | |")
            same_all = False
            continue
        same = torch.equal(cpu_map, gpu_map.cpu())
        repeat = torch.equal(gpu_map, again)
        same_all &= same and repeat
        differing = int((cpu_map != gpu_map.cpu()).sum())
        weight = loads.to(torch.float64)
        cpu_ms = timed(lambda c=call, w=loads: c(w), args.repeats, False)
        gpu_ms = timed(lambda c=call, w=gpu_loads: c(w), args.repeats, True)
        print(f"| {name} | {'yes' if same else 'NO'} | {'yes' if repeat else 'NO'} | "
              f"{differing} of {cpu_map.numel()} | {_balance(weight, cpu_map, gpus):.5f} | "
              f"{_balance(weight, gpu_map.cpu(), gpus):.5f} | {cpu_ms:.1f} | {gpu_ms:.1f} |")
    print(f"\nall identical: {'yes' if same_all else 'NO'}")


def _balance(weight: torch.Tensor, phy2log: torch.Tensor, gpus: int) -> float:
    """Σ mean / Σ max of the live GPUs' loads under an even split (global balancedness)."""
    load = realised_gpu_loads(weight, phy2log, gpus, 1, "even", check=False)
    live = (phy2log.view(phy2log.shape[0], gpus, -1) >= 0).any(2)
    mean = (load * live).sum(1) / live.sum(1)
    return float(mean.sum() / load.amax(1).sum())


if __name__ == "__main__":
    main()
