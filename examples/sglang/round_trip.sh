#!/usr/bin/env bash
# SGLang 0.5.23: record expert loads, plan with eplb, start SGLang on eplb's placement.
# Example: DeepSeek-V3 on 4 nodes x 8 GPUs (EP32) with 32 redundant slots (288 = 32 x 9).
set -euo pipefail
MODEL=deepseek-ai/DeepSeek-V3
COMMON="--model-path $MODEL --tp-size 32 --ep-size 32 --nnodes 4 --moe-a2a-backend deepep"
# (plus --node-rank and --dist-init-addr on each node, as for any multi-node SGLang run)

# 1. Record: run with the expert-distribution recorder, send representative traffic.
export SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR=/tmp/eplb_dump   # default /tmp
python -m sglang.launch_server $COMMON --expert-distribution-recorder-mode stat &
# ...when the server is up:
curl -X POST http://127.0.0.1:30000/start_expert_distribution_record
#    ...send traffic...
curl -X POST http://127.0.0.1:30000/stop_expert_distribution_record
curl -X POST http://127.0.0.1:30000/dump_expert_distribution_record
#    -> /tmp/eplb_dump/expert_distribution_recorder_<time>.pt (rank 0 writes it)

# 2. Plan: eplb reads the dump directly; --emit sglang writes --init-expert-location JSON.
#    SGLang's static dispatch sends a token to the nearest replica: plan for that rule
#    (with --ep-dispatch-algorithm dynamic, an even split, drop --policy/--dispatch).
eplb plan /tmp/eplb_dump/expert_distribution_recorder_*.pt \
  -r 288 -g 32 --nodes 4 --groups 8 --policy global --dispatch nearest \
  --emit sglang -o placement.sglang.json

# 3. Launch on eplb's placement (slots per GPU = 288 / 32 = 9).
python -m sglang.launch_server $COMMON --ep-dispatch-algorithm static \
  --ep-num-redundant-experts 32 \
  --init-expert-location placement.sglang.json
