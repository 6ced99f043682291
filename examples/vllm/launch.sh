#!/usr/bin/env bash
# Serve an MoE model with vLLM 0.33 whose EPLB rebalancing is planned by eplb.
# eplb's vLLM plugin is an entry point (vllm.general_plugins) that vLLM loads in every
# process; it only acts when EPLB_VLLM_POLICY is set. No vLLM change, no config change.
set -euo pipefail

pip install eplb                      # into the same environment as vLLM

export EPLB_VLLM_POLICY=eplb          # make vLLM's "default" EPLB policy run eplb
# Optional planner options (JSON), e.g. cap expert moves per layer per rebalance:
# export EPLB_VLLM_OPTIONS='{"max_moves": 64}'
# If you set VLLM_PLUGINS (an allow-list), it must include "eplb".

# 8 GPUs, expert parallel over DP x TP, 32 redundant expert slots (256 + 32 = 288 = 8 x 36).
vllm serve deepseek-ai/DeepSeek-V3 \
  --data-parallel-size 8 \
  --enable-expert-parallel \
  --enable-eplb \
  --eplb-config '{"window_size": 1000, "step_interval": 3000, "num_redundant_experts": 32}'

# The server log says "eplb: registered vLLM EPLB policy 'eplb' and made it the 'default'
# policy" once per process. Unset EPLB_VLLM_POLICY to go back to vLLM's own policy.
