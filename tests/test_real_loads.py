"""Quality on the real DeepSeek-V3/R1 routed-token counts (SGLang's EP statistics).

The data is read from ``../shared/data/real`` next to the repository (never copied into it);
the tests skip, saying why, when it is absent. R = 288 slots on P = 32 GPUs, as DeepSeek
deploys; hierarchical with G = 8 groups on N = 4 nodes.
"""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
from helpers import DEEPSEEK_DIR, DEEPSEEK_FILES, MISSING_REAL, assert_contract

import eplb
from eplb.core.baselines import plan_greedy
from eplb.core.bounds import balancedness_ceiling
from eplb.formats import read_loads

DATA, FILES, MISSING = DEEPSEEK_DIR, DEEPSEEK_FILES, MISSING_REAL
WORKLOADS = [pytest.param(f.stem, id=f.stem) for f in FILES] or [
    pytest.param(None, marks=pytest.mark.skip(reason=MISSING), id="no-data")]

REPLICAS, GPUS = 288, 32
TOPOLOGY = {"global": (1, 1), "hierarchical": (4, 8)}  # (nodes, groups)
FIRST_MOE, LAYERS, EXPERTS = 3, 61, 256


@cache
def counts(name: str) -> torch.Tensor:
    """``[61, 256]`` float64 routed-token counts; rows 0-2 are dense layers (all zero)."""
    with open(DATA / f"{name}.json") as f:
        data = json.load(f)
    if "logical_count" not in data:
        raise KeyError(f"{name}.json has no 'logical_count' key")
    w = torch.tensor(data["logical_count"], dtype=torch.float64)
    assert w.shape == (LAYERS, EXPERTS), w.shape
    return w


@cache
def planned(name: str, policy: str) -> eplb.Placement:
    nodes, groups = TOPOLOGY[policy]
    return eplb.plan(counts(name)[FIRST_MOE:], REPLICAS, GPUS, nodes, groups, policy=policy)


def greedy(name: str, policy: str) -> float:
    nodes, groups = TOPOLOGY[policy]
    w = counts(name)[FIRST_MOE:]
    return plan_greedy(w, REPLICAS, GPUS, nodes, groups, policy=policy).balancedness(w)


@pytest.mark.parametrize("name", WORKLOADS)
def test_global_reaches_0_9995(name):
    w = counts(name)[FIRST_MOE:]
    assert (w.sum(1) > 0).all()  # the MoE rows carry traffic
    p = planned(name, "global")
    assert p.policy == "global"
    p.validate()
    assert_contract(p)
    bal = p.balancedness(w)
    assert bal >= 0.9995, f"{name}: global balancedness {bal:.5f}"
    assert bal >= greedy(name, "global")
    assert bal <= balancedness_ceiling(w, REPLICAS, GPUS) + 1e-9


@pytest.mark.parametrize("name", WORKLOADS)
def test_hierarchical_at_the_ceiling(name):
    w = counts(name)[FIRST_MOE:]
    p = planned(name, "hierarchical")
    assert p.policy == "hierarchical"
    p.validate()
    assert_contract(p)
    bal = p.balancedness(w)
    ceiling = balancedness_ceiling(w, REPLICAS, GPUS, 4, 8, policy="hierarchical")
    assert bal <= ceiling + 1e-9
    assert ceiling - bal <= 1e-3, f"{name}: hierarchical {bal:.5f}, ceiling {ceiling:.5f}"
    assert bal >= greedy(name, "hierarchical")


@pytest.mark.parametrize("name", WORKLOADS[:2])
def test_full_dump_with_dense_rows(name):
    """The whole 61-row dump, dense all-zero rows 0-2 included, plans validly (auto policy:
    hierarchical for G=8, N=4)."""
    w = counts(name)
    assert (w[:FIRST_MOE] == 0).all()
    p = eplb.plan(w, REPLICAS, GPUS, 4, 8)
    assert p.policy == "hierarchical"
    p.validate()
    assert_contract(p)
    zero_rows = p.logcnt[:FIRST_MOE]
    assert int((zero_rows.amax(1) - zero_rows.amin(1)).max()) <= 1  # spread evenly
    # the MoE rows are planned as well as on their own
    moe = w[FIRST_MOE:]
    sub = eplb.Placement.from_phy2log(p.phy2log[FIRST_MOE:], EXPERTS, p.topology, p.policy)
    assert sub.balancedness(moe) >= planned(name, "hierarchical").balancedness(moe) - 1e-3


QWEN = (DATA.parent / "qwen3_30b_a3b_sharegpt_prefill_vllm"
        / "qwen3_30b_sharegpt_prefill_topk_ids.npz")


@pytest.mark.parametrize("gpus", [4, 8, 16])
def test_without_spare_slots_eplb_is_not_below_the_greedy_on_qwen3(gpus):
    """vLLM runs without redundant experts by default (slots = experts): the packing is the
    whole plan. On Qwen3-30B-A3B's real prefill batches on 8 GPUs of 16 slots the
    automatic steps ended at 0.9965-0.9983 where DeepSeek's greedy (vLLM's default
    policy) reached 0.9993-0.9997 (new-user pass); rows holding every expert once now get
    the longer search wherever they end 0.1 % above their bound."""
    if not QWEN.is_file():
        pytest.skip(f"real Qwen3-30B-A3B routing not found at {QWEN} (read-only, not in the "
                    "repository; set EPLB_REAL_DATA to its folder)")
    for key in ("ep_states_topk_ids", "token_distri_8_topk_ids", "token_distri_16_topk_ids"):
        w = read_loads(QWEN, key=key).total()
        got = eplb.plan(w, 128, gpus).balancedness(w)
        # (on 4 GPUs both end at the bound, the greedy 5e-5 nearer in one batch: below
        # either search's stopping rule)
        assert got >= plan_greedy(w, 128, gpus, 1, 1).balancedness(w) - 1e-4, key
