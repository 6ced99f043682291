"""The engine plugins plan on ``threads`` torch threads (default 1) and give the calling
thread its setting back: the vLLM policy and the SGLang hook, as the engines call them."""

from __future__ import annotations

import logging
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.distributed as dist

import eplb
from eplb.integrations import sglang as sglang_plugin
from eplb.integrations import vllm as vllm_plugin
from eplb.integrations.agreement import PlanAgreement


@pytest.fixture
def two_threads():
    """The calling thread on two torch threads (the engines' processes may run more)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _policy(options: dict) -> type:
    """eplb's vLLM policy class with ``options`` (as ``VLLM_EPLB_OPTIONS`` sets them)."""
    return type("Policy", (vllm_plugin.EplbPolicy,), {"options": options})


def _spy(monkeypatch, module, name: str) -> list[int]:
    """Record the calling thread's torch threads whenever ``module.name`` plans."""
    seen: list[int] = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.mark.parametrize(("options", "inside"), [
    ({}, 1), ({"threads": 3}, 3), ({"threads": np.int64(1)}, 1), ({"threads": None}, 2)])
def test_the_vllm_policy_plans_on_its_threads_and_restores_the_callers(
        monkeypatch, two_threads, options, inside):
    seen = _spy(monkeypatch, vllm_plugin, "rebalance_experts")
    weight = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    plan = _policy({"agree_timeout_s": 0, **options}).rebalance_experts(
        weight, 16, 1, 1, 4)
    assert seen == [inside] and torch.get_num_threads() == 2
    assert torch.equal(plan, eplb.plan(weight, 16, 4).phy2log)  # the same plan on any count


def test_the_callers_threads_come_back_when_the_plan_fails(monkeypatch, two_threads):
    seen = []

    def failing(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise RuntimeError("planner failed")

    monkeypatch.setattr(vllm_plugin, "rebalance_experts", failing)
    policy = _policy({"agree_timeout_s": 0})
    weight = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    # the plugin falls back to vLLM's policy (absent here: the error itself is raised)
    with pytest.raises(Exception):  # noqa: B017 (which one depends on vLLM's presence)
        policy.rebalance_experts(weight, 16, 1, 1, 4)
    assert seen == [1] and torch.get_num_threads() == 2


def test_another_thread_keeps_its_own_count_while_a_plan_runs(monkeypatch, two_threads):
    """torch takes the count per calling thread: the engine's other threads keep theirs."""
    started, release = threading.Event(), threading.Event()
    real = vllm_plugin.rebalance_experts

    def slow(*args, **kwargs):
        started.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(vllm_plugin, "rebalance_experts", slow)
    weight = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    planner = threading.Thread(target=_policy({"agree_timeout_s": 0}).rebalance_experts,
                               args=(weight, 16, 1, 1, 4))
    planner.start()
    try:
        assert started.wait(10)
        assert torch.get_num_threads() == 2
    finally:
        release.set()
        planner.join(10)


@pytest.mark.parametrize("bad", [np.array([3]), np.array(3), torch.tensor(2), torch.tensor(True),
                                 np.True_, np.float64(2.0)])
def test_threads_set_on_the_class_as_an_array_or_tensor_is_refused_naming_it(bad):
    """As the planner's int options are: a 1-element array raised a bare TypeError, and a
    0-d array or tensor (a bool one too) passed."""
    with pytest.raises(ValueError, match=r"Policy\.options: threads must be a whole number"):
        _policy({"threads": bad}).rebalance_experts(torch.ones(2, 8), 16, 1, 1, 4)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, [1], 10**6, 2**70])
def test_a_bad_threads_option_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="threads must be a whole number"):
        _policy({"threads": bad}).rebalance_experts(
            torch.ones(2, 8), 16, 1, 1, 4)
    with pytest.raises(ValueError, match="SGLANG_EPLB_OPTIONS: threads must be"):
        sglang_plugin.checked_options(f'{{"threads": {__import__("json").dumps(bad)}}}',
                                      "SGLANG_EPLB_OPTIONS")


@pytest.mark.parametrize(("options", "inside"), [("", 1), ('{"threads": null}', 2)])
def test_the_sglang_hook_plans_on_its_threads_and_restores_the_callers(
        monkeypatch, two_threads, options, inside):
    monkeypatch.setenv(sglang_plugin.OPTIONS_ENV_VAR, options)
    seen = _spy(monkeypatch, sglang_plugin, "eplb_rebalance")
    counts = torch.randint(0, 100, (3, 2, 8), generator=torch.Generator().manual_seed(0))
    phy2log, _, _ = sglang_plugin._hook(
        lambda **kwargs: pytest.fail("SGLang's own algorithm answered"),
        tokens_per_expert=counts, num_physical_experts=12, num_local_physical_experts=3,
        num_groups=None, num_nodes=1, algorithm=types.SimpleNamespace(name="deepseek"))
    assert seen == [inside] and torch.get_num_threads() == 2
    assert torch.equal(phy2log, eplb.plan(counts.sum(0), 12, 4).phy2log)


@pytest.mark.parametrize("threads", [
    [{}, {"threads": 1}], [{"threads": 1}, {"threads": None}], [{"threads": 1}, {"threads": 2}],
    # the plugin's own wait, and a number spelt as NumPy's, are the same settings too
    [{"agree_timeout_s": 5}, {"agree_timeout_s": 10}], [{"seed": np.int64(3)}, {"seed": 3}]])
def test_vllm_ranks_on_other_threads_agree_without_a_settings_warning(
        monkeypatch, caplog, threads):
    """Plans do not depend on the thread count, so ranks differing only there (or one
    spelling the default, or in the plugin's own options) hold the same settings: no
    warning at every rebalance."""
    store, local = dist.HashStore(), threading.local()
    agreements = [PlanAgreement(store, r, 2, "eplb/threads", timeout_s=5) for r in range(2)]
    monkeypatch.setattr(vllm_plugin, "_agreement_for", lambda options: agreements[local.rank])
    classes = [_policy({"seed": 3, **options}) for options in threads]

    def rank_call(rank: int, weight: torch.Tensor) -> torch.Tensor:
        local.rank = rank
        return classes[rank].rebalance_experts(weight, 24, 4, 1, 4)

    weight = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(2) as pool:
        got = [f.result() for f in [pool.submit(rank_call, r, weight) for r in range(2)]]
    assert torch.equal(got[0], got[1])
    assert "different eplb settings" not in caplog.text, caplog.text
