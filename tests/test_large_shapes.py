"""Shapes far from DeepSeek-V3's: many expert groups, many experts. Each plan must finish in
seconds or be refused with a message, never run for hours."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

import pytest


def _finishes(code: str, timeout_s: float = 120.0, memory_gib: float | None = None) -> str:
    """Run ``code`` in a fresh interpreter; its stdout, or a failure when it runs too long.
    ``memory_gib`` caps its address space, so a plan that asks too much fails here (a
    MemoryError) instead of taking the test machine's memory."""

    def limit() -> None:
        if memory_gib is not None:
            cap = int(memory_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout_s, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout_s:.0f} s:\n{code}")
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(("groups", "nodes"), [(32, 4), (64, 8), (256, 4)])
def test_locality_with_many_groups_per_node_plans_in_seconds(groups, nodes):
    # the group→node splits are enumerated only when there are at most 20 000 of them;
    # the count was found by running the enumeration, whose loops went on for hours past
    # the cut-off (64 groups on 8 nodes: C(63, 7) = 5.5e8 combinations at the first level)
    out = _finishes(f"""
        import torch, eplb
        torch.set_num_threads(1)
        weight = torch.randint(0, 1000, (1, 256), generator=torch.Generator().manual_seed(0))
        p = eplb.plan(weight, 512, 32, {nodes}, {groups}, policy="locality",
                      dispatch="nearest").validate()
        print(p.policy, tuple(p.phy2log.shape))
    """)
    assert out.split() == ["locality", "(1,", "512)"]


def test_conflict_repair_with_many_slots_per_gpu_plans_in_seconds():
    # 1024 slots per GPU: the anti-affinity repair moves one replica per pass (43 passes
    # here) and scored all S × S swaps of the GPU each time, though one slot could
    # leave: 19-24 s for this one layer (41 s for 65,536 slots on 64 GPUs); 0.5 s when
    # only the movable slots are scored
    out = _finishes("""
        import torch, eplb
        torch.set_num_threads(1)
        rank = torch.arange(1, 6001, dtype=torch.float64)
        order = torch.randperm(6000, generator=torch.Generator().manual_seed(0))
        weight = (1e6 / rank**2)[order][None]
        p = eplb.plan(weight, 8192, 8).validate()
        print(tuple(p.phy2log.shape))
    """, timeout_s=15)
    assert out.split() == ["(1,", "8192)"]


def test_capping_a_hot_expert_keeps_memory_flat_in_layers():
    # an expert with more replicas than GPUs is cut to one per GPU and the freed replicas
    # regranted from a [rows, E, P] table of steps, built for every layer and rule at
    # once: 4 layers of 2,048 experts on 2,048 GPUs asked 512 MiB arrays (2.3 GB peak)
    # and failed in NumPy's allocator under 2 GiB; now 0.8 GB
    out = _finishes("""
        import torch, eplb
        torch.set_num_threads(1)
        weight = torch.zeros(4, 2048)
        weight[:, 0] = 1e6
        p = eplb.plan(weight, 16384, 2048).validate()
        print(int(p.logcnt[:, 0].max()))
    """, timeout_s=60, memory_gib=2)
    assert out.split() == ["2048"]


def test_a_log2phy_table_beyond_the_limit_is_refused_naming_it():
    # log2phy [L, E, maxcnt] is dense: one expert on all 65,536 GPUs widens the row of
    # each of 100,000 experts to 65,536 (48.8 GiB of int64, a MemoryError in NumPy)
    out = _finishes("""
        import torch, eplb
        torch.set_num_threads(1)
        weight = torch.zeros(1, 100000)
        weight[:, 0] = 1e6
        try:
            eplb.plan(weight, 262144, 65536)
        except ValueError as error:
            print(error)
    """, timeout_s=60, memory_gib=3)
    assert "log2phy [1, 100000, 65536]" in out and "at most 2.68e+08" in out


def test_nearest_dispatch_beyond_its_gpu_limit_is_refused_and_sglang_plans_even():
    """The global nearest-dispatch plan's node relabelling grows up to L·P³: one layer on
    2048 GPUs ran past two minutes (fifteenth-session scale pass). It is refused before
    any search, and SGLang's hook plans for an even split instead of failing its call."""
    import torch

    import eplb
    from eplb.integrations.sglang import eplb_rebalance

    weight = torch.rand(1, 4096, generator=torch.Generator().manual_seed(0)) * 1000
    with pytest.raises(ValueError, match="2048 GPUs with 4 slots each"):
        eplb.plan(weight, 8192, 2048, 16, dispatch="nearest")
    # at most 2**24 GPUs × all slots × replicas per expert (one DeepSeek-V3 layer on 1024
    # GPUs × 4 slots took 36 s, on 512 × 8 4-7 s: attacker passes, bench_nearest_scale.py)
    small = torch.rand(1, 256, generator=torch.Generator().manual_seed(1)) * 1000
    for gpus, slots in ((1024, 4), (512, 8), (2048, 1)):
        with pytest.raises(ValueError, match=f"{gpus} GPUs with {slots} slots? each"):
            eplb.plan(small, gpus * slots, gpus, gpus // 8, dispatch="nearest")
    # the hierarchical policy under nearest dispatch searches no relabelling: allowed
    eplb.plan(torch.rand(1, 4096) * 1000, 4096 + 2048, 2048, 16, 64, dispatch="nearest",
              policy="hierarchical")
    phy2log, _, _ = eplb_rebalance(weight.round().long()[None], 4096 + 2048, 3, None, 16,
                                   hierarchical=False, sglang_dispatch="static")
    assert phy2log.shape == (1, 6144)


@pytest.mark.parametrize(("experts", "replicas"), [(600, 1024), (1500, 2048)])
def test_the_repair_scoring_only_movable_slots_makes_the_same_plans(monkeypatch, experts,
                                                                    replicas):
    """From 32 slots per GPU the torch anti-affinity repair scores only the slots that may
    leave (an immovable slot's swaps all score inf): the same swaps as scoring them all,
    and as the host repair (which small CPU states like these take by default)."""
    import importlib

    import torch

    import eplb

    state = importlib.import_module("eplb.core.packing.state")
    repair = importlib.import_module("eplb.core.packing.repair")
    rank = torch.arange(1, experts + 1, dtype=torch.float64)
    order = torch.randperm(experts, generator=torch.Generator().manual_seed(0))
    weight = (1e6 / rank**2)[order][None]
    host = eplb.plan(weight, replicas, 8).phy2log
    monkeypatch.setattr(repair, "host_repair_applies", lambda sub: False)
    picked = []
    held_by = state._held_by
    monkeypatch.setattr(state, "_held_by", lambda *a: picked.append(1) or held_by(*a))
    fast = eplb.plan(weight, replicas, 8).phy2log
    assert picked  # the torch repair ran, on the picked slots
    assert torch.equal(fast, host)
    monkeypatch.setattr(state, "_PICK_FROM_SLOTS", 1 << 30)  # every slot scored
    assert torch.equal(eplb.plan(weight, replicas, 8).phy2log, fast)


def test_one_gpu_needs_no_swap_search_and_is_not_refused():
    """One GPU has no partner to swap with: ``P/2 · S²`` is 0 swaps, but the size check
    counted one pair and refused 40,000 experts on one GPU as 1.6e9 swaps (attacker
    pass); the polish now skips such rows instead of allocating its ``[S, S]`` search."""
    import torch

    import eplb

    weight = torch.rand(2, 40_000, generator=torch.Generator().manual_seed(0))
    weight[1] = 0.0  # an idle row takes the packing path, not the every-GPU shortcut
    placement = eplb.plan(weight, 40_000, 1)
    placement.validate()
    assert torch.equal(placement.logcnt, torch.ones(2, 40_000, dtype=placement.logcnt.dtype))
    # an idle row of many slots on one GPU: even counts, without the packing's S² work
    # (327,680 slots took a minute: second attacker pass)
    idle = eplb.plan(torch.zeros(1, 256), 327_680, 1)
    assert int(idle.logcnt.min()) == int(idle.logcnt.max()) == 1280


def test_the_locality_policy_beyond_its_size_is_refused():
    """Its searches grow about as P³ like the nearest plan's relabelling: 512 GPUs × 2
    slots took about 6 s a real layer (5 minutes for 58; second attacker pass, 640 × 4
    about 18 s a layer). Refused by size, with the numbers, before any search."""
    import torch

    import eplb

    weight = torch.rand(1, 256, generator=torch.Generator().manual_seed(0)) * 1000
    with pytest.raises(ValueError, match=r"512 GPUs with 2 slots each \(GPUs × all slots"):
        eplb.plan(weight, 1024, 512, 8, 8, dispatch="nearest", policy="locality")


def test_relabelling_onto_many_gpus_plans_alike_with_one_or_two_threads():
    # the relabelling counts the experts two GPUs share by joining the GPUs that hold each
    # expert; beyond 4M (layer, GPU, GPU) cells it counts only the cells met (17 layers on
    # 512 GPUs here, vLLM's initial map as the placement in force). The plan must keep the
    # contract, come out alike on 1 and 2 threads, and keep some of the old slots
    code = """
        import torch, eplb
        g = torch.Generator().manual_seed(0)
        weight = torch.rand(17, 512, generator=g, dtype=torch.float64) * 100
        old = torch.arange(1024).remainder(512).repeat(17, 1)
        plans = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            plans.append(eplb.plan(weight, 1024, 512, previous=old).validate().phy2log)
        assert torch.equal(plans[0], plans[1])
        print(int((plans[0] == old).sum()))
    """
    kept = int(_finishes(code, timeout_s=120.0, memory_gib=8.0))
    assert kept > 0


def test_planning_from_a_placement_on_thousands_of_gpus_is_refused_by_size():
    """A fresh plan is relabelled onto the old GPUs by an assignment problem per layer
    (about P³): 58 layers on 8,192 GPUs asked for 14.5 GiB, and 16,384 GPUs killed the
    process (attacker pass). Refused before any work, naming the sizes and what to do;
    the same loads still plan fresh."""
    import torch

    import eplb

    weight = torch.rand(58, 256, generator=torch.Generator().manual_seed(0)) * 1000
    old = torch.arange(8192).remainder(256).repeat(58, 1)
    with pytest.raises(ValueError, match=r"58 layer\(s\) on 8192 GPUs.*plan without previous"):
        eplb.plan(weight, 8192, 8192, previous=old)
    assert eplb.plan(weight, 8192, 8192).validate().topology.num_gpus == 8192


def test_relabelling_in_parts_of_layers_plans_alike(monkeypatch):
    """Large relabellings are split into parts of layers so that the overlap tables stay
    bounded; layers are matched independently, so the plans must not change."""
    import torch

    import eplb
    from eplb.online import align

    g = torch.Generator().manual_seed(1)
    weight = torch.rand(6, 64, generator=g, dtype=torch.float64) * 100
    cases = [(torch.arange(96).remainder(64).repeat(6, 1), {}),
             (torch.arange(96).remainder(64).repeat(6, 1), {"num_nodes": 2, "num_groups": 4})]
    whole = [eplb.plan(weight, 96, 16, previous=old, **kw).phy2log for old, kw in cases]
    monkeypatch.setattr(align, "_MAX_TABLE_CELLS", 40)  # parts of one layer each
    for (old, kw), expected in zip(cases, whole, strict=True):
        assert torch.equal(eplb.plan(weight, 96, 16, previous=old, **kw).phy2log, expected)
