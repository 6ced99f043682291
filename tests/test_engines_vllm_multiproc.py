"""Four EP ranks on gloo run vLLM's released EPLB code (0.33.0 and 0.34.0) with eplb as the policy.

Each rank is a process running ``tests/_vllm_ep_worker.py`` (its docstring lists what is
stubbed: module shells and CUDA/NIXL-only names, nothing of vLLM's EPLB code). They
load eplb through vLLM's own plugin loader, build vLLM's ``EplbState``, call the policy
with vLLM's arguments and move small dummy expert weights with vLLM's
``rearrange_expert_weights_inplace`` (sync) and ``transfer_layer`` + ``_move_to_workspace``
(async, with and without migration batching), then check:

- every rank computed the same plan at every step (digests), for both policies, from
  vLLM's initial map (slot i → expert i % E), from a previous plan, and without a map;
- every rank's weights are those of the experts the new map puts on it, and vLLM
  committed that map;
- a rank that fails alone (``MemoryError``) still ends with its peers' plan;
- a rank without the switch (vLLM's own policy) makes the others raise
  ``AgreementError`` naming it, instead of shuffling weights on mismatched plans.

Skips visibly without the fetched vLLM wheel (``scripts/fetch_engines.py``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import run_ranks

WORKER = Path(__file__).resolve().parent / "_vllm_ep_worker.py"
WORLD = 4
STEPS = ["profile", "sync-initial-map", "async", "async-batched", "sync-no-old-map"]


@pytest.fixture(scope="module")
def ranks(vllm_root, tmp_path_factory) -> list[dict]:
    """Run the four ranks once for the module; returns their reports, rank order."""
    workdir = tmp_path_factory.mktemp("ep")
    env = dict(os.environ, EPLB_VLLM_ROOT=str(vllm_root), VLLM_EPLB_POLICY="eplb",
               OMP_NUM_THREADS="1")
    for name in ("VLLM_EPLB_OPTIONS", "EPLB_VLLM_POLICY", "EPLB_VLLM_OPTIONS", "VLLM_PLUGINS"):
        env.pop(name, None)
    start = time.perf_counter()
    commands = [[sys.executable, str(WORKER), str(r), str(WORLD), str(workdir)]
                for r in range(WORLD)]
    reports = run_ranks(commands, env, [workdir / f"rank{r}.json" for r in range(WORLD)],
                        timeout_s=240)
    print(f"{WORLD} ranks in {time.perf_counter() - start:.1f} s")
    return reports


def test_vllm_plugin_loader_made_eplb_the_policy_on_every_rank(ranks):
    assert all(r["policy_is_eplb"] for r in ranks)
    for r, report in enumerate(ranks):
        # through vLLM's configured logging: the switch line, then the rank line
        assert "eplb 0.1.0 active" in report["log"] or "active: vLLM EPLB policy" in report["log"]
        assert f"EP rank {r} of {WORLD} plans with eplb" in report["log"]


@pytest.mark.parametrize("policy", ["global", "hier"])
def test_every_rank_plans_alike_and_moves_weights_to_the_new_map(ranks, policy):
    for report in ranks:
        steps = report[policy]["steps"]
        assert [s["name"] for s in steps] == STEPS
        for s in steps:
            assert s["weights_ok"], f"rank {report['rank']} {policy} {s['name']}: wrong weights"
            assert s["map_committed"], f"rank {report['rank']} {policy} {s['name']}"
    for i, name in enumerate(STEPS):
        digests = {r[policy]["steps"][i]["digest"] for r in ranks}
        assert len(digests) == 1, f"{policy} {name}: ranks planned differently: {digests}"
    # the rebalances really changed the placement (weights moved); eplb may keep a layer
    # where no move pays, so not every step has to change the whole map
    assert len({s["digest"] for s in ranks[0][policy]["steps"]}) >= 3


def test_the_two_policies_differ(ranks):
    glob = [s["digest"] for s in ranks[0]["global"]["steps"]]
    hier = [s["digest"] for s in ranks[0]["hier"]["steps"]]
    assert glob[1:] != hier[1:]


def test_a_rank_failing_alone_gets_its_peers_plan(ranks):
    steps = [r["rank-fails"]["steps"][0] for r in ranks]
    assert len({s["digest"] for s in steps}) == 1
    assert all(s["weights_ok"] and s["map_committed"] for s in steps)
    assert "MemoryError: rank 2 out of memory" in ranks[0]["log"]
    assert "every rank uses rank 0's plan" in ranks[0]["log"]


def test_a_rank_without_the_switch_is_detected(ranks):
    for report in ranks[:3]:
        error = report["half-switched"].get("agreement_error", "")
        assert "got none from rank(s) 3" in error, report["half-switched"]
    # rank 3 ran vLLM's own policy and never joined: it cannot know; its peers stop
    assert ranks[3]["half-switched"]["steps"][0]["name"] == "half-switched"


def test_every_plan_was_agreed_through_the_store(ranks):
    # 5 steps x 2 policies + the failure round, on every switched rank
    assert [r["agreement_rounds"] for r in ranks[:3]] == [12, 12, 12]
    assert ranks[3]["agreement_rounds"] == 11


def test_weight_check_catches_a_wrong_layout():
    """The worker's check is not vacuous: weights laid out for one map fail another."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        import _vllm_ep_worker as worker
    finally:
        sys.path.pop(0)
    model = worker.Model(WORLD, rank=1)
    initial = (torch.arange(WORLD * worker.SLOTS_PER_RANK) % worker.EXPERTS).expand(
        worker.LAYERS, -1)
    assert worker.weights_match(model, initial, rank=1)
    swapped = initial.clone()
    swapped[:, [6, 7]] = swapped[:, [7, 6]]  # two slots of rank 1 exchange experts
    assert not worker.weights_match(model, swapped, rank=1)
