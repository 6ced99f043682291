"""Four SGLang ranks on gloo run SGLang 0.5.23's released rebalancing with eplb's plugin.

Each rank is a process running ``tests/_sglang_ep_worker.py`` (its docstring says what
it runs: SGLang's plugin loader and ``EPLBManager.rebalance`` → ``init_by_eplb`` →
``eplb_algorithms.rebalance_experts``, three rebalances on drifting counts). Checks:

- every rank installs the same map at every rebalance;
- a rank whose planner fails alone (``MemoryError``) installs its peers' plan, and the
  failure is logged on every rank;
- where no rank could plan, SGLang's own algorithm answers on every rank;
- a rank without the switch (SGLang's own algorithm: a half-switched cluster) makes the
  others raise ``AgreementError`` naming it, instead of exchanging weights by mismatched
  maps;
- the start-up call (no placement in force) is not agreed: SGLang's processes compute it
  at different moments.

Skips visibly without the fetched SGLang wheel (``scripts/fetch_engines.py``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_ranks

from eplb import Placement, Topology

WORKER = Path(__file__).resolve().parent / "_sglang_ep_worker.py"
WORLD = 4


@pytest.fixture(scope="module")
def scenarios(sglang_root, tmp_path_factory) -> dict[str, list[dict]]:
    """Run both scenarios once for the module; returns the ranks' reports per scenario."""
    workdir = tmp_path_factory.mktemp("sglang-ep")
    env = dict(os.environ, EPLB_SGLANG_ROOT=str(sglang_root), SGLANG_EPLB_POLICY="eplb",
               OMP_NUM_THREADS="1",
               # a rank that never publishes is named after this wait
               SGLANG_EPLB_OPTIONS=json.dumps({"agree_timeout_s": 5}))
    env.pop("SGLANG_PLUGINS", None)
    out = {}
    for scenario in ("agree", "half"):
        commands = [[sys.executable, str(WORKER), str(r), str(WORLD), str(workdir), scenario]
                    for r in range(WORLD)]
        out[scenario] = run_ranks(commands, env, [workdir / f"{scenario}-{r}.json"
                                                  for r in range(WORLD)], timeout_s=180)
    return out


def test_every_rank_installs_the_same_valid_map_at_every_rebalance(scenarios):
    ranks = scenarios["agree"]
    assert all(r["hooked"] for r in ranks)
    for step in range(4):
        assert all("digest" in r["steps"][step] for r in ranks), [r["steps"] for r in ranks]
        assert len({r["steps"][step]["digest"] for r in ranks}) == 1, f"rebalance {step}"
    for step in range(3):  # eplb's maps (the fourth is SGLang's greedy, which may stack)
        phy2log = torch.tensor(ranks[0]["steps"][step]["map"])
        Placement.from_phy2log(phy2log, 48, Topology(64, WORLD), "global").validate()
    # the runtime rebalances were agreed, the start-up one was not
    assert [r["rounds"] for r in ranks] == [3] * WORLD


def test_a_rank_failing_alone_installs_its_peers_plan(scenarios):
    ranks = scenarios["agree"]
    # rank 1's planner raised at the second rebalance; every rank logged the repair
    for report in ranks:
        assert "rank 1 failed (MemoryError: rank 1 out of memory at rebalance 1)" in report["log"]
        assert "every rank uses rank 0's plan" in report["log"]


def test_where_no_rank_could_plan_sglangs_algorithm_answers_on_every_rank(scenarios):
    ranks = scenarios["agree"]
    for report in ranks:
        assert "no rank could plan this rebalance" in report["log"]
        assert "SGLang's algorithm deepseek answers it on every rank" in report["log"]
    # SGLang's own plan differs from eplb's of the same counts (the previous rebalance's
    # map is eplb's; this one is SGLang's greedy)
    assert ranks[0]["steps"][3]["digest"] != ranks[0]["steps"][2]["digest"]


def test_a_rank_without_the_switch_is_named_by_the_others(scenarios):
    ranks = scenarios["half"]
    assert [r["hooked"] for r in ranks] == [True, True, True, False]
    for report in ranks[:3]:
        # the start-up call (no map in force) ran everywhere; the first runtime one stops
        assert "digest" in report["steps"][0]
        error = report["steps"][1]["error"]
        assert error.startswith("AgreementError") and "rank(s) 3" in error, error
    # rank 3 ran SGLang's own algorithm and cannot know; its peers did not move weights
    assert all("digest" in s for s in ranks[3]["steps"])


@pytest.mark.parametrize("value", [-1, "5", True, float("nan"), 1e9])
def test_agree_timeout_is_checked_at_start_up(value):
    from eplb.integrations import sglang as plugin

    assert plugin.options_from_env({plugin.OPTIONS_ENV_VAR: '{"agree_timeout_s": 0}'}) == {
        "agree_timeout_s": 0}
    text = json.dumps({"agree_timeout_s": value})
    with pytest.raises(ValueError, match="agree_timeout_s must be a number of seconds"):
        plugin.options_from_env({plugin.OPTIONS_ENV_VAR: text})


def test_no_agreement_under_elastic_ep_nor_without_a_world(monkeypatch):
    """Under SGLang's elastic EP not every rank of the world plans (rank 0 alone after a
    scale-up, no dead rank after a fault): waiting for them would fail the rebalance."""
    import types

    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    from eplb.integrations import sglang as plugin

    assert plugin._world_agreement(120.0) is None  # no torch.distributed world here
    monkeypatch.setattr(plugin, "_WORLD", [])
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    group = object()
    monkeypatch.setattr(distributed_c10d, "_get_default_group", lambda: group)
    monkeypatch.setattr(distributed_c10d, "_get_default_store", lambda: dist.HashStore())
    state = types.SimpleNamespace(value=None)
    elastic = types.ModuleType("sglang.srt.elastic_ep.elastic_ep")
    elastic.ElasticEPStateManager = types.SimpleNamespace(instance=lambda: state.value)
    for name in ("sglang", "sglang.srt", "sglang.srt.elastic_ep"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, elastic.__name__, elastic)
    agreement = plugin._world_agreement(30.0)
    assert (agreement.rank, agreement.world_size, agreement.timeout_s) == (2, 4, 30.0)
    assert plugin._world_agreement(60.0) is agreement and agreement.timeout_s == 60.0
    assert plugin._world_agreement(0.0) is None  # turned off
    state.value = types.SimpleNamespace(has_scaled=False)  # elastic EP on
    assert plugin._world_agreement(30.0) is None


def test_a_silent_rank_is_explained_in_sglangs_terms(monkeypatch):
    """The timeout's message names what keeps an SGLang rank out of the agreement (the
    SGLang switch unset, an eplb without this agreement, agree_timeout_s 0 on that node),
    not vLLM's causes: it is the line that stops the server."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    from eplb.integrations import sglang as plugin
    from eplb.integrations.agreement import AgreementError

    monkeypatch.setattr(plugin, "_WORLD", [])
    monkeypatch.setattr(plugin, "_elastic_ep", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed_c10d, "_get_default_group", lambda: object())
    monkeypatch.setattr(distributed_c10d, "_get_default_store", lambda: dist.HashStore())
    agreement = plugin._world_agreement(0.2)
    with pytest.raises(AgreementError, match=r"got none from rank\(s\) 1") as info:
        agreement.agree(torch.zeros(2, 4, dtype=torch.int64))
    message = str(info.value)
    assert "vLLM" not in message, message
    for cause in (plugin.ENV_VAR, "agree_timeout_s", "eplb not installed"):
        assert cause in message, message
