"""Call eplb's vLLM policy the way vLLM (0.33, 0.34) does, with or without vLLM installed.

    python examples/vllm/policy_demo.py

vLLM calls ``policy.rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_ranks, old_global_expert_indices)`` on CPU tensors and expects ``phy2log
[layers, num_replicas]`` (int64). With vLLM installed and ``VLLM_EPLB_POLICY=eplb`` the
same class is what ``EPLB_POLICIES["default"]`` holds.
"""

import importlib.util
import os

import torch

import eplb
from eplb.integrations import vllm as plugin

torch.manual_seed(0)
# 58 MoE layers x 256 experts of skewed (log-normal) routed-token counts, as vLLM's window
weight = torch.exp(torch.randn(58, 256)).mul(1000).round().to(torch.int64)

os.environ.setdefault(plugin.ENV_VAR, "eplb")
has_vllm = importlib.util.find_spec("vllm") is not None
if has_vllm and plugin.register():  # what vLLM's plugin loader runs in every process
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    policy = EPLB_POLICIES["default"]
    print("vLLM found: EPLB_POLICIES['default'] =", policy.__name__)
else:
    policy = plugin.EplbPolicy
    why = ("vLLM found, but eplb did not register (its warning above says why)" if has_vllm
           else "vLLM not installed")
    print(f"{why}: calling eplb.integrations.vllm.EplbPolicy directly")

# 288 slots on 32 GPUs in 4 nodes, 8 expert groups (DeepSeek-V3 at EP32)
phy2log = policy.rebalance_experts(weight, 288, 8, 4, 32)
placement = eplb.Placement.from_phy2log(phy2log, 256, eplb.Topology(288, 32, 4, 8))
print("phy2log", tuple(phy2log.shape), phy2log.dtype, "balancedness",
      round(placement.balancedness(weight), 4))

# next rebalance: vLLM passes the map in service; eplb plans incrementally from it
drifted = (weight.double() * torch.exp(0.2 * torch.randn(58, 256))).round().to(torch.int64)
new = policy.rebalance_experts(drifted, 288, 8, 4, 32, phy2log)
moved = (new != phy2log).sum(1).float().mean().item()
print(f"after drift: {moved:.1f} of 288 slots changed per layer on average")
