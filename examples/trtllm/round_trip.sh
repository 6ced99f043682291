#!/usr/bin/env bash
# TensorRT-LLM (PyTorch backend): record expert statistics, plan with eplb, serve with
# eplb's static placement. Example: DeepSeek-V3 on EP32 with 288 slots (9 per GPU).
set -euo pipefail
MODEL=deepseek-ai/DeepSeek-V3

# 1. Record: TensorRT-LLM dumps routed-expert counts for an iteration range.
export EXPERT_STATISTIC_PATH=./expert_statistic     # meta_info.json + rank{r}.safetensors
export EXPERT_STATISTIC_ITER_RANGE=100-200
mkdir -p "$EXPERT_STATISTIC_PATH"
cat > extra_record.yaml <<YAML
enable_attention_dp: true
YAML
trtllm-serve "$MODEL" --backend pytorch --tp_size 32 --ep_size 32 \
  --extra_llm_api_options extra_record.yaml
# ...send representative traffic past iteration 200, then stop the server.
unset EXPERT_STATISTIC_ITER_RANGE

# 2. Plan: eplb reads the statistics folder (its rank*.safetensors files need the optional
#    safetensors package: pip install "/path/to/eplb[safetensors]"); a .yaml output means
#    --emit trtllm.
#    Keys of initial_global_assignments are the model's own MoE layer ids (3..60). A global
#    plan balances best; add --nodes 4 --groups 8 to keep each expert group on one node
#    (fewer nodes per token, far worse balance: README, TensorRT-LLM section).
eplb plan "$EXPERT_STATISTIC_PATH" -r 288 -g 32 -o moe_load_balancer.yaml

# 3. Serve with the placement (num_slots 288 must be a multiple of ep_size 32).
cat > extra_eplb.yaml <<YAML
enable_attention_dp: true
moe_config:
  load_balancer: ./moe_load_balancer.yaml
YAML
trtllm-serve "$MODEL" --backend pytorch --tp_size 32 --ep_size 32 \
  --extra_llm_api_options extra_eplb.yaml
