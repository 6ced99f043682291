#!/usr/bin/env bash
# Serve DeepSeek-V3 with SGLang 0.5.23 whose runtime EPLB rebalancing (--enable-eplb)
# plans with eplb. Run the same command on every node (--node-rank 0..3).
set -euo pipefail

# eplb is not on a package index: install this repository into SGLang's environment
# (EPLB_SRC defaults to the clone this script lives in). Its entry point
# sglang.srt.plugins:eplb is what SGLang's scheduler processes load.
EPLB_SRC="${EPLB_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}"
pip install "$EPLB_SRC"

# The launcher sets SGLANG_EPLB_POLICY=eplb, checks that SGLang can load the plugin and
# runs python -m sglang.launch_server with the remaining arguments.
python -m eplb.integrations.sglang --eplb-options '{"max_moves": 2000}' \
  --model-path deepseek-ai/DeepSeek-V3 --trust-remote-code \
  --tp-size 32 --ep-size 32 --nnodes 4 --node-rank "${NODE_RANK:-0}" \
  --dist-init-addr "${MASTER_ADDR:-127.0.0.1}:5000" \
  --moe-a2a-backend deepep --ep-num-redundant-experts 32 \
  --enable-eplb --eplb-rebalance-num-iterations 1000

# Each scheduler process logs "eplb 0.1.0 plans SGLang's expert rebalancing" at its
# first call, and at the first runtime rebalance "rank R of W plans with eplb ...; plans
# are agreed". Every node must run this same command (same eplb, same options): at each
# runtime rebalance the ranks agree on one plan, and a node started with plain
# sglang.launch_server (or an older eplb, or agree_timeout_s 0) never joins, so the
# others raise AgreementError after agree_timeout_s (120 s) and SGLang's server stops
# rather than moving experts by mismatched maps.
