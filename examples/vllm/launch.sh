#!/usr/bin/env bash
# Serve an MoE model with vLLM (0.33 or 0.34) whose EPLB rebalancing is planned by eplb.
# eplb's vLLM plugin is an entry point (vllm.general_plugins) that vLLM loads in every
# process; it only acts when VLLM_EPLB_POLICY is set. No vLLM change, no config change.
set -euo pipefail

# eplb is not on a package index: install this repository into vLLM's environment, on
# every node (EPLB_SRC defaults to the clone this script lives in).
EPLB_SRC="${EPLB_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}"
pip install "$EPLB_SRC"

export VLLM_EPLB_POLICY=eplb          # make vLLM's "default" EPLB policy run eplb
# VLLM_-prefixed, so Ray data-parallel engine cores on other nodes receive it too.
# Optional options (JSON). Without them eplb moves only what pays on the next window. To
# cap the slots moved per rebalance (in total over all MoE layers: about 15 % of
# DeepSeek-V3's 58 x 288 slots here; a small budget leaves most of the imbalance):
# export VLLM_EPLB_OPTIONS='{"max_moves": 2500}'
# If you set VLLM_PLUGINS (an allow-list), it must include "eplb".

# 8 GPUs, expert parallel over DP x TP, 32 redundant expert slots (256 + 32 = 288 = 8 x 36).
vllm serve deepseek-ai/DeepSeek-V3 \
  --data-parallel-size 8 \
  --enable-expert-parallel \
  --enable-eplb \
  --eplb-config '{"window_size": 1000, "step_interval": 3000, "num_redundant_experts": 32}'

# Every vLLM process logs "eplb 0.1.0 active: vLLM EPLB policy 'default' and 'eplb' run
# eplb (...)" once, and each worker its EP rank at the first rebalance. Unset
# VLLM_EPLB_POLICY to go back to vLLM's own policy (on every node: a rank running another
# policy makes the eplb ranks stop with an AgreementError naming it).
