"""The rank agreement: every rank ends with one plan, or every rank learns who is missing."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.integrations.agreement import (
    AgreementError,
    PlanAgreement,
    _decode_plan,
    _encode_plan,
    plan_digest,
)

WORLD = 4


def plan(seed: int) -> torch.Tensor:
    return torch.randperm(24, generator=torch.Generator().manual_seed(seed)).view(2, 12) % 10


def run_round(agreements, plans, errors=None, tags=None):
    """One round on every rank at once (threads); returns the outcomes in rank order."""
    errors = errors or [None] * len(agreements)
    tags = tags or [""] * len(agreements)
    with ThreadPoolExecutor(len(agreements)) as pool:
        futures = [pool.submit(a.agree, p, e, t)
                   for a, p, e, t in zip(agreements, plans, errors, tags, strict=True)]
        return [f.result() for f in futures]


@pytest.fixture
def group():
    store = dist.HashStore()
    return store, [PlanAgreement(store, r, WORLD, "eplb/test", timeout_s=5) for r in range(WORLD)]


def test_unanimous_ranks_keep_their_own_plan_and_publish_no_copy(group):
    store, agreements = group
    plans = [plan(1) for _ in range(WORLD)]
    outcomes = run_round(agreements, plans)
    for p, o in zip(plans, outcomes, strict=True):
        assert o.unanimous and o.source is None and o.plan is p
    assert not store.check(["eplb/test/0/plan"])


def test_a_failed_rank_adopts_the_lowest_successful_ranks_plan(group):
    _, agreements = group
    plans = [None, plan(1), plan(1), plan(1)]
    errors = [MemoryError("rank 0 out of memory"), None, None, None]
    outcomes = run_round(agreements, plans, errors)
    for o in outcomes:
        assert not o.unanimous and o.source == 1
        assert torch.equal(o.plan, plan(1))
        assert o.failed == {0: "MemoryError: rank 0 out of memory"}
    assert "rank 0 failed (MemoryError" in outcomes[2].describe()


def test_divergent_plans_resolve_to_rank_zero(group):
    _, agreements = group
    plans = [plan(1), plan(2), plan(1), plan(3)]
    outcomes = run_round(agreements, plans)
    for o in outcomes:
        assert o.source == 0 and torch.equal(o.plan, plan(1))
        assert sorted(map(sorted, o.digests.values())) == [[0, 2], [1], [3]]
    assert "on ranks 0,2" in outcomes[0].describe()


def test_no_rank_succeeds_means_no_plan_on_every_rank(group):
    _, agreements = group
    outcomes = run_round(agreements, [None] * WORLD, [ValueError("bad input")] * WORLD)
    assert all(o.plan is None and len(o.failed) == WORLD for o in outcomes)


def test_different_tags_with_equal_plans_are_reported_not_repaired(group):
    _, agreements = group
    outcomes = run_round(agreements, [plan(1)] * WORLD, tags=["eplb 0.1", "eplb 0.1",
                                                             "eplb 0.2", "eplb 0.1"])
    for o in outcomes:
        assert not o.unanimous and o.source is None and torch.equal(o.plan, plan(1))
    assert "ranks 2 run eplb 0.2" in outcomes[0].describe()


def test_a_rank_that_never_publishes_is_named_after_the_timeout():
    store = dist.HashStore()
    agreements = [PlanAgreement(store, r, WORLD, "eplb/t", timeout_s=0.3) for r in range(3)]
    with pytest.raises(AgreementError, match=r"got none from rank\(s\) 3"):
        run_round(agreements, [plan(1)] * 3)



class _DiesBeforeItsPlan:
    """The store as seen by a rank that stops between publishing its status and its plan."""

    def __init__(self, store) -> None:
        self._store = store

    def set(self, key: str, value) -> None:
        if key.endswith("/plan"):
            raise RuntimeError("the rank was killed here")
        self._store.set(key, value)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def test_a_source_rank_that_dies_before_its_plan_is_named_as_such():
    store = dist.HashStore()
    agreements = [PlanAgreement(_DiesBeforeItsPlan(store) if r == 0 else store, r, 2, "eplb/t",
                                timeout_s=0.3) for r in range(2)]
    with ThreadPoolExecutor(2) as pool:
        source = pool.submit(agreements[0].agree, plan(1))
        waiting = pool.submit(agreements[1].agree, None, MemoryError("rank 1 only"))
        with pytest.raises(RuntimeError, match="killed"):
            source.result()
        with pytest.raises(AgreementError) as info:
            waiting.result()
    message = str(info.value)
    # rank 0 ran eplb and planned: not "rank(s) plan ... do not run eplb's policy"
    assert "rank 0 reported a plan and never published it" in message
    assert "do not run eplb" not in message and "rank(s) plan" not in message


@pytest.mark.parametrize("timeout", [1e-300, 0.0004])
@pytest.mark.parametrize("kind", ["hash", "file"])
def test_a_timeout_under_a_millisecond_still_ends_the_wait(tmp_path, kind, timeout):
    # these stores count whole milliseconds and read 0 ms as "wait forever"
    store = dist.HashStore() if kind == "hash" else dist.FileStore(str(tmp_path / "store"), 2)
    agreement = PlanAgreement(store, 0, 2, "eplb/t", timeout_s=timeout)
    raised: list[BaseException] = []

    def lone_rank() -> None:
        try:
            agreement.agree(plan(1))
        except AgreementError as exc:
            raised.append(exc)

    waiter = threading.Thread(target=lone_rank, daemon=True)
    waiter.start()
    waiter.join(20)
    assert not waiter.is_alive(), f"a {timeout} s timeout waited forever"
    assert raised and "got none from rank(s) 1" in str(raised[0])

def test_rounds_stay_in_step_and_old_keys_are_deleted(group):
    store, agreements = group
    for i in range(6):
        plans = [plan(i)] * WORLD
        if i % 2:
            plans = [None, plan(i), plan(i), plan(i)]  # forces a published plan
        outcomes = run_round(agreements, plans, [ValueError("x")] + [None] * 3)
        assert all(torch.equal(o.plan, plan(i)) for o in outcomes)
    assert all(a.round == 6 for a in agreements)
    # rounds 0..3 were forgotten; rounds 4 and 5 remain (statuses and one plan)
    assert store.num_keys() <= 2 * WORLD + 1


def test_bad_arguments():
    store = dist.HashStore()
    with pytest.raises(ValueError, match="rank 4 outside"):
        PlanAgreement(store, 4, 4, "x")
    with pytest.raises(ValueError, match="timeout_s"):
        PlanAgreement(store, 0, 4, "x", timeout_s=0)


@settings(max_examples=30, deadline=None)
@given(layers=st.integers(1, 5), slots=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_plan_encoding_round_trips_and_digests_tell_plans_apart(layers, slots, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randint(-1, 300, (layers, slots), generator=gen)
    back = _decode_plan(_encode_plan(p))
    assert back.dtype == torch.int64 and torch.equal(back, p)
    assert plan_digest(back) == plan_digest(p.to(torch.int32))  # dtype-independent
    other = p.clone()
    other[0, 0] += 1
    assert plan_digest(other) != plan_digest(p)
    assert plan_digest(p.reshape(1, -1)) != plan_digest(p) or layers == 1


# -- the vLLM plugin's use of it ---------------------------------------------------------------


def _plugin_ranks(monkeypatch, world: int):
    """Route the plugin's agreement to per-thread ranks over one HashStore."""
    from eplb.integrations import vllm as plugin

    store, local = dist.HashStore(), threading.local()
    agreements = [PlanAgreement(store, r, world, "eplb/plugin", timeout_s=5) for r in range(world)]
    monkeypatch.setattr(plugin, "_agreement_for", lambda options: agreements[local.rank])

    def call_as(rank, fn, *args):
        local.rank = rank
        return fn(*args)

    return call_as


def test_plugin_ranks_that_all_fail_fall_back_to_vllms_default_alike(vllm_root, monkeypatch,
                                                                      caplog):
    from engines import vllm_sources

    from eplb.integrations import vllm as plugin

    def broken(*args, **kwargs):
        raise ValueError("input eplb cannot plan")

    monkeypatch.setattr(plugin, "rebalance_experts", broken)
    call_as = _plugin_ranks(monkeypatch, WORLD)
    weight = torch.randint(0, 1000, (3, 16), dtype=torch.int32)
    with vllm_sources(vllm_root) as vllm, ThreadPoolExecutor(WORLD) as pool:
        futures = [pool.submit(call_as, r, plugin.EplbPolicy.rebalance_experts,
                               weight, 24, 4, 1, 4) for r in range(WORLD)]
        got = [f.result() for f in futures]
        want = vllm.DefaultEplbPolicy.rebalance_experts(weight, 24, 4, 1, 4)
    assert all(torch.equal(g, want) for g in got)
    assert "no EP rank could plan" in caplog.text


def _failing_where_flagged(monkeypatch, module, name: str,
                           error: BaseException) -> threading.local:
    """``module.name`` replaced by a version that raises ``error`` in the threads that set
    the returned flag's ``yes`` (one rank of the threaded ranks), and is itself elsewhere."""
    real = getattr(module, name)
    flag = threading.local()

    def flaky(*args, **kwargs):
        if getattr(flag, "yes", False):
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)
    return flag


def test_plugin_rank_failing_alone_takes_the_others_plan(monkeypatch, caplog):
    from eplb.integrations import vllm as plugin

    call_as = _plugin_ranks(monkeypatch, WORLD)
    failing = _failing_where_flagged(monkeypatch, plugin, "rebalance_experts",
                                     MemoryError("this rank only"))

    def rank_call(rank, weight):
        failing.yes = rank == 1
        return plugin.EplbPolicy.rebalance_experts(weight, 24, 4, 1, 4)

    weight = torch.randint(0, 1000, (3, 16), dtype=torch.int32)
    with ThreadPoolExecutor(WORLD) as pool:
        got = [f.result() for f in [pool.submit(call_as, r, rank_call, r, weight)
                                    for r in range(WORLD)]]
    assert all(torch.equal(g, got[0]) for g in got)
    assert "rank 1 failed (MemoryError: this rank only)" in caplog.text


def test_a_rank_failing_before_it_plans_keeps_the_rounds_in_step(monkeypatch, caplog):
    """Found by a new-user pass: an error raised before the plan (here checking the loads;
    moving them to the host can fail alike) skipped the agreement, so the failing rank's
    next call completed its peers' previous round, and the round after that timed out
    ("those ranks do not run eplb's policy"). Every rank now agrees in every round."""
    from eplb.integrations import vllm as plugin

    call_as = _plugin_ranks(monkeypatch, WORLD)
    failing = _failing_where_flagged(monkeypatch, plugin, "check_loads",
                                     MemoryError("before planning"))

    def rank_call(rank, weight, fail):
        failing.yes = fail and rank == 3
        return plugin.EplbPolicy.rebalance_experts(weight, 24, 4, 1, 4)

    weight = torch.randint(0, 1000, (3, 16), dtype=torch.int32)
    with ThreadPoolExecutor(WORLD) as pool:
        for fail in (True, False, False):
            got = [f.result() for f in [pool.submit(call_as, r, rank_call, r, weight, fail)
                                        for r in range(WORLD)]]
            assert all(torch.equal(g, got[0]) for g in got)
    assert "rank 3 failed (MemoryError: before planning)" in caplog.text


def test_plugin_ranks_asked_for_other_shapes_all_raise_instead_of_adopting(monkeypatch):
    from eplb.integrations import vllm as plugin

    call_as = _plugin_ranks(monkeypatch, WORLD)
    weight = torch.randint(0, 1000, (3, 16), dtype=torch.int32)
    replicas = [24, 24, 28, 24]  # rank 2 has other slots: rank 0's plan cannot be its answer
    with ThreadPoolExecutor(WORLD) as pool:
        futures = [pool.submit(call_as, r, plugin.EplbPolicy.rebalance_experts,
                               weight, replicas[r], 4, 1, 4) for r in range(WORLD)]
        for future in futures:
            with pytest.raises(AgreementError, match="asked to plan different things") as info:
                future.result()
            assert "ranks 0-1,3: loads [3, 16], 24 slots" in str(info.value)
            assert "ranks 2: loads [3, 16], 28 slots" in str(info.value)


def test_ranks_with_other_questions_raise_alike_even_when_one_failed(group):
    _, agreements = group
    questions = ["a", "a", "b", "a"]
    with ThreadPoolExecutor(WORLD) as pool:
        futures = [pool.submit(a.agree, None if r == 0 else plan(1), ValueError("x"), "",
                               questions[r]) for r, a in enumerate(agreements)]
        for future in futures:
            with pytest.raises(AgreementError, match="ranks 0-1,3: a; ranks 2: b"):
                future.result()


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0, 1e14, True])
def test_agreement_timeout_is_a_sane_number_of_seconds(timeout):
    with pytest.raises(ValueError, match="timeout_s"):
        PlanAgreement(torch.distributed.HashStore(), 0, 1, "t", timeout_s=timeout)


def test_a_rank_that_does_not_say_its_question_is_named_as_another_eplb(group):
    # an older eplb publishes no question: the versions differ, not the model
    _, agreements = group
    questions = ["a", "", "a", "a"]
    with ThreadPoolExecutor(WORLD) as pool:
        futures = [pool.submit(a.agree, plan(1), None, "", questions[r])
                   for r, a in enumerate(agreements)]
        for future in futures:
            with pytest.raises(AgreementError, match="older version"):
                future.result()


def _fake_vllm_groups(monkeypatch, groups):
    """The plugin's view of vLLM: torch.distributed initialised and ``get_ep_group()``
    returning ``groups[rank]`` for the calling thread's rank."""
    import sys
    import types

    local = threading.local()
    module = types.ModuleType("vllm.distributed.parallel_state")
    module.get_ep_group = lambda: groups[local.rank]
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", module)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "is_available", lambda: True)
    return local


def test_an_elastic_ep_group_agrees_across_processes_that_number_it_differently(monkeypatch):
    # after an elastic scale-up the running processes build their second "ep" group
    # (unique_name ep:1) and the new ones their first (ep:0), on the group's own store
    from types import SimpleNamespace

    from eplb.integrations import vllm as plugin

    store = dist.HashStore()
    groups = [SimpleNamespace(unique_name="ep:1" if r < 2 else "ep:0", ranks=list(range(WORLD)),
                              rank_in_group=r, world_size=WORLD,
                              tcp_store_group=SimpleNamespace(store=store))
              for r in range(WORLD)]
    local = _fake_vllm_groups(monkeypatch, groups)

    def agree_as(rank):
        local.rank = rank
        return plugin._agreement_for({"agree_timeout_s": 5}).agree(plan(1), None, "t")

    with ThreadPoolExecutor(WORLD) as pool:
        outcomes = list(pool.map(agree_as, range(WORLD)))
    assert all(o.unanimous for o in outcomes)
    # groups on the default store stay apart by their name
    named = SimpleNamespace(unique_name="ep:0", ranks=[0, 1], tcp_store_group=None)
    assert plugin._namespace(named) != plugin._namespace(
        SimpleNamespace(unique_name="eplb:0", ranks=[0, 1], tcp_store_group=None))


def test_the_rank_log_line_shows_a_sub_second_timeout_as_it_is(monkeypatch, caplog):
    # "%.0f" printed 0.4 s as "timeout 0 s", and 0 is the value that turns the agreement off
    from types import SimpleNamespace

    from eplb.integrations import vllm as plugin

    group = SimpleNamespace(unique_name="ep:0", ranks=[0, 1], rank_in_group=0, world_size=2,
                            tcp_store_group=SimpleNamespace(store=dist.HashStore()))
    _fake_vllm_groups(monkeypatch, [group]).rank = 0
    with caplog.at_level(logging.INFO, logger=plugin.LOGGER_NAME):
        assert plugin._agreement_for({"agree_timeout_s": 0.4}).timeout_s == 0.4
    assert "(timeout 0.4 s)" in caplog.text


def test_the_plugin_plans_and_reports_with_one_snapshot_of_its_options(monkeypatch):
    # the options a rank planned with are the ones its agreement tag reports, even if the
    # class's dict changes while the call runs
    import eplb
    from eplb.integrations import vllm as plugin

    real, tags = eplb.rebalance_experts, []

    def planning(*args, **kwargs):
        plugin.EplbPolicy.options["seed"] = 7  # changed mid-call
        return real(*args, **kwargs)

    from eplb.integrations.agreement import Outcome

    class Recorder:
        def agree(self, plan, error, tag, question):
            tags.append(tag)
            return Outcome(plan=plan, unanimous=True)

    monkeypatch.setattr(plugin.EplbPolicy, "options", {"seed": 3})
    monkeypatch.setattr(plugin, "rebalance_experts", planning)
    monkeypatch.setattr(plugin, "_agreement_for", lambda options: Recorder())
    weight = torch.randint(0, 1000, (3, 16), dtype=torch.int32)
    plugin.EplbPolicy.rebalance_experts(weight, 24, 4, 1, 4)
    assert tags and '"seed": 3' in tags[0]


def test_a_silent_ranks_causes_include_its_agreement_turned_off():
    # a rank with agree_timeout_s 0 plans without publishing, like one without the switch
    agreement = PlanAgreement(dist.HashStore(), 0, 2, "eplb/t", timeout_s=0.2)
    with pytest.raises(AgreementError, match="agree_timeout_s 0 there"):
        agreement.agree(plan(1))
