#!/usr/bin/env bash
# One-shot GPU check for a lent CUDA machine (see BENCHMARKS.md, "GPU"): the CUDA tests,
# CPU-vs-CUDA plan identity, then the CPU-vs-GPU timing benchmark. Uses the machine's own
# torch; eplb from src/. Arguments go to bench_gpu.py (e.g. --repeats 5).
set -uo pipefail
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/eplb-device}"; mkdir -p "$OUT"
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_planner.py \
    tests/test_baselines.py tests/test_device_path.py -k cuda 2>&1 | tee "$OUT/cuda_tests.txt" | tail -15
python3 benchmarks/bench_cuda_identical.py 2>&1 | tee "$OUT/bench_cuda_identical.md"
python3 benchmarks/bench_gpu.py "$@" 2>&1 | tee "$OUT/bench_gpu.md"
