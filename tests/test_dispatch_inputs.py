"""The dispatch model's public helpers (``realised_gpu_loads``, ``remote_nodes_per_token``)
refuse inputs that would give silently wrong figures or an internal error: a placement
that does not hold every expert the loads or the trace use, an expert count below the
map's ids, token sources that overflow, and non-integer sizes or ids (found by the
fourteenth attack pass)."""

from __future__ import annotations

import pytest
import torch

import eplb
from eplb.core import realised_gpu_loads, remote_nodes_per_token
from eplb.core.dispatch import balancedness, layer_balancedness


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(2, 8, generator=g, dtype=torch.float64) * 10
    p = eplb.plan(w, 16, 4, 2, 2, policy="global", dispatch="nearest")
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)]).view(20, 2, 2)
    return w, p.phy2log, ids


@pytest.mark.parametrize("num_experts", [7, 6])
def test_an_expert_count_below_the_maps_ids_is_refused(case, num_experts):
    # 7 dropped expert 7's replicas silently, 6 raised an IndexError from a scatter
    _, phy2log, _ = case
    ids = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [1, 0]]])  # below num_experts
    with pytest.raises(ValueError, match=f"expert id 7, beyond the {num_experts} experts"):
        remote_nodes_per_token(phy2log, ids, num_experts, 4, 2)


def test_a_trace_choosing_an_expert_the_map_lacks_is_refused(case):
    # its tokens were counted as reaching no node at all
    _, phy2log, ids = case
    lacking = torch.where(phy2log == 0, 1, phy2log)
    with pytest.raises(ValueError, match="expert 0 of layer 0 is chosen by the trace but"):
        remote_nodes_per_token(lacking, ids, 8, 4, 2)


def test_loads_of_experts_the_map_lacks_are_refused(case):
    # their load vanished from every GPU (balancedness of the rest)
    w, phy2log, _ = case
    lacking = torch.where(phy2log == 0, 1, phy2log)
    with pytest.raises(ValueError, match="expert 0 of layer 0 has load but phy2log gives"):
        realised_gpu_loads(w, lacking, 4, 2)
    with pytest.raises(ValueError, match="expert 8 of layer 0 has load"):
        realised_gpu_loads(torch.cat([w, w], 1), phy2log, 4, 2)  # loads of another model
    idle = w.clone()
    idle[:, 0] = 0  # an expert without load needs no replica
    loads = realised_gpu_loads(idle, lacking, 4, 2)
    assert torch.allclose(loads.sum(1), idle.sum(1))


def test_token_sources_that_overflow_are_refused(case):
    # 4 × 1e308 sums to inf: every share came out 0, and so every load
    w, phy2log, ids = case
    huge = torch.full((4,), 1e308, dtype=torch.float64)
    with pytest.raises(ValueError, match="source sums beyond float64's range"):
        realised_gpu_loads(w, phy2log, 4, 2, source=huge)
    with pytest.raises(ValueError, match="source sums beyond float64's range"):
        remote_nodes_per_token(phy2log, ids, 8, 4, 2, source=huge)
    scaled = realised_gpu_loads(w, phy2log, 4, 2, source=torch.full((4,), 1e300,
                                                                     dtype=torch.float64))
    assert torch.allclose(scaled, realised_gpu_loads(w, phy2log, 4, 2))


def test_token_sources_are_checked_as_the_planner_checks_them(case):
    # a str met torch's internal "new(): invalid data type 'str'", and a bool mask was
    # taken as counts (attacker pass); eplb.plan refused both by name
    w, phy2log, ids = case
    for bad, error, words in (("junk", TypeError, "source must be a sequence of 4 numbers"),
                              (torch.ones(4, dtype=torch.bool), TypeError, "torch.bool"),
                              ([1.0, -1.0, 1.0, 1.0], ValueError, r"source\[1\] is -1.0"),
                              ([0.0] * 4, ValueError, "source is all zero")):
        with pytest.raises(error, match=words):
            realised_gpu_loads(w, phy2log, 4, 2, source=bad)
        with pytest.raises(error, match=words):
            remote_nodes_per_token(phy2log, ids, 8, 4, 2, source=bad)


def test_sizes_and_ids_of_the_wrong_kind_are_refused(case):
    w, phy2log, ids = case
    with pytest.raises(ValueError, match=r"num_gpus must be an integer, got 4\.0"):
        remote_nodes_per_token(phy2log, ids, 8, 4.0, 2)  # was a TypeError from torch.zeros
    with pytest.raises(ValueError, match="num_nodes must be an integer, got True"):
        realised_gpu_loads(w, phy2log, 4, True)
    with pytest.raises(TypeError, match=r"ids must hold integer expert ids, got torch\.bool"):
        remote_nodes_per_token(phy2log, ids > 3, 8, 4, 2)  # read as experts 0 and 1
    with pytest.raises(TypeError, match="sources must hold integer GPU ids"):
        remote_nodes_per_token(phy2log, ids, 8, 4, 2, sources=torch.full((20,), 1.7))


def test_sparse_maps_and_ids_are_refused_by_name(case):
    # torch's "Could not run 'aten::min' with arguments from the 'SparseCPU' backend"
    # (review pass); the planner refuses a sparse map in force alike
    w, phy2log, ids = case
    with pytest.raises(TypeError, match=r"phy2log is a torch\.sparse_coo tensor"):
        realised_gpu_loads(w, phy2log.to_sparse(), 4, 2)
    with pytest.raises(TypeError, match=r"phy2log is a torch\.sparse_coo tensor"):
        remote_nodes_per_token(phy2log.to_sparse(), ids, 8, 4, 2)
    with pytest.raises(TypeError, match=r"ids is a torch\.sparse_coo tensor"):
        remote_nodes_per_token(phy2log, ids.to_sparse(), 8, 4, 2)


def test_an_incremental_nearest_plan_refuses_a_source_it_would_ignore(case):
    # its candidates are built and scored with tokens arising evenly: the plan came out
    # the same whatever source was given, with or without a budget
    w, phy2log, _ = case
    skewed = torch.tensor([8.0, 0.0, 0.0, 1.0])
    for budget in (None, 5, [2, 2]):
        with pytest.raises(ValueError, match="source is not used by incremental plans"):
            eplb.plan(w, 16, 4, 2, 2, policy="global", dispatch="nearest", source=skewed,
                      previous=phy2log, max_moves=budget)
    fresh = eplb.plan(w, 16, 4, 2, 2, policy="global", dispatch="nearest", source=skewed)
    fresh.validate()  # a fresh plan uses it
    live = torch.tensor([True, True, True, False])  # re-planned and relabelled: used too
    eplb.plan(w, 16, 4, 2, 2, policy="global", dispatch="nearest", source=skewed,
              previous=fresh, active_gpus=live).validate()
    from eplb.online import Rebalancer

    with pytest.raises(ValueError, match="source is not used by incremental plans"):
        Rebalancer(16, 4, 2, 2, window=1, interval=1, incremental=True, policy="global",
                   dispatch="nearest", source=skewed)
    Rebalancer(16, 4, 2, 2, window=1, interval=1, policy="global", dispatch="nearest",
               source=skewed)  # fresh plans use it


def test_a_rebalancer_refuses_fair_and_source_its_policy_ignores_when_it_is_made():
    # it was made, and raised at its first rebalance; with groups on several nodes "auto"
    # is hierarchical, which does not use them (eplb.plan refuses them alike)
    from eplb.online import Rebalancer

    counts = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    for options in ({"fair": "avoid"}, {"source": torch.ones(16)},
                    {"fair": "expect", "policy": "hierarchical"}):
        with pytest.raises(ValueError, match="the hierarchical policy does not use them"):
            Rebalancer(64, 16, 2, 8, window=1, interval=1, dispatch="nearest", **options)
        with pytest.raises(ValueError, match="the hierarchical policy does not use them"):
            eplb.plan(counts, 64, 16, 2, 8, dispatch="nearest",
                      **{k: v for k, v in options.items()})
    made = Rebalancer(64, 16, 2, 8, window=1, interval=1, dispatch="nearest", fair="avoid",
                      policy="global")  # the global policy uses them
    made.record(counts).validate()
    # "auto" with a dead GPU plans globally (eplb.plan does): accepted (attacker pass: the
    # first version of this check refused it)
    live = torch.ones(16, dtype=torch.bool)
    live[1] = False
    with pytest.warns(RuntimeWarning, match="planning globally"):
        dead = Rebalancer(64, 16, 2, 8, window=1, interval=1, dispatch="nearest",
                          fair="avoid", active_gpus=live)
        assert dead.record(counts).policy == "global"


def test_the_group_limited_sampler_refuses_knobs_that_break_it():
    # latent_scale=nan scored every expert nan (the samples came from two groups only);
    # latent_dim=0 and fit_tokens=0 divided by zero; float sizes failed inside torch
    from eplb.tools import sample_group_limited
    from eplb.tools.routing import fit_router

    w = torch.rand(2, 32, generator=torch.Generator().manual_seed(0)) * 100
    for scale in (float("nan"), float("inf"), -1.0, True):
        with pytest.raises(ValueError, match="latent_scale must be a finite number >= 0"):
            sample_group_limited(w, 8, latent_scale=scale)
    for knob in ("latent_dim", "fit_tokens", "top_k"):
        for value in (0, 2.5, True):
            with pytest.raises(ValueError, match=knob):
                fit_router(w, **{knob: value})
    with pytest.raises(ValueError, match="iterations must be an integer >= 0"):
        fit_router(w, iterations=-1)
    for count in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_tokens must be an integer >= 0"):
            sample_group_limited(w, count)
    assert sample_group_limited(w, 0).shape == (0, 2, 8)
    assert torch.equal(sample_group_limited(w, torch.tensor(6).numpy()[()]),
                       sample_group_limited(w, 6))


def test_the_group_limited_sampler_reads_loads_as_the_planner_does():
    # a sparse weight raised torch's "Could not run 'aten::ne.Scalar' ... 'SparseCPU'
    # backend"; a NaN was refused without saying where (review pass)
    from eplb.tools import sample_group_limited

    w = torch.rand(2, 32, generator=torch.Generator().manual_seed(0)) * 100 + 1
    dense = sample_group_limited(w, 16, seed=3)
    assert torch.equal(sample_group_limited(w.to_sparse(), 16, seed=3), dense)
    assert torch.equal(sample_group_limited(w.numpy(), 16, seed=3), dense)
    bad = w.clone()
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match="layer 1, expert 5"):
        sample_group_limited(bad, 16)
    with pytest.raises(ValueError, match=r"loads \[L, E\]; got one layer \[32\]"):
        sample_group_limited(w[0], 16)


def test_the_group_limited_sampler_names_the_layers_without_load():
    """A real SGLang dump has all-zero rows for DeepSeek-V3's dense layers 0..2: the
    refusal named no layer and said nothing of what to pass instead."""
    from eplb.tools import sample_group_limited

    w = torch.rand(6, 32, generator=torch.Generator().manual_seed(0)) * 100
    w[:3] = 0
    w[5] = 0
    message = r"layers 0\.\.2, 5 of the weight carry no load.*weight\[3:\]"
    with pytest.raises(ValueError, match=message):
        sample_group_limited(w, 8)
    assert sample_group_limited(w[3:5], 8).shape == (8, 2, 8)


def test_the_group_limited_sampler_refuses_a_sample_beyond_memory_before_work():
    """10**20 tokens took the host's memory chunk by chunk (24 GB before the fuzz pass of
    the twelfth session killed it) instead of failing with a message."""
    from eplb.tools import sample_group_limited

    w = torch.rand(2, 32, generator=torch.Generator().manual_seed(0)) * 100
    with pytest.raises(ValueError, match="GiB of ids"):
        sample_group_limited(w, 10**20)


def test_a_dead_gpu_that_holds_experts_is_refused(case):
    # it served tokens whose load the live-GPU figures left out (0.82 "balanced" where
    # the loads had all GPUs working)
    w, phy2log, ids = case
    live = torch.tensor([False, True, True, True])
    with pytest.raises(ValueError, match=r"GPU 0 is dead .* but phy2log places experts"):
        realised_gpu_loads(w, phy2log, 4, 2, active_gpus=live)
    with pytest.raises(ValueError, match="GPU 0 is dead"):
        remote_nodes_per_token(phy2log, ids, 8, 4, 2, active_gpus=live)
    planned = eplb.plan(w, 16, 4, 2, 2, policy="global", dispatch="nearest", active_gpus=live)
    loads = realised_gpu_loads(w, planned.phy2log, 4, 2, active_gpus=live)
    assert torch.allclose(loads.sum(1), w.sum(1)) and bool((loads[:, 0] == 0).all())


def test_a_top_k_row_that_names_an_expert_twice_is_refused(case):
    # a router's top-k never does; the trace counted the expert twice: [3, 3] reached
    # more remote nodes than [3] although the token goes to expert 3 once
    w, phy2log, _ = case
    twice = torch.tensor([[[3, 3], [0, 1]]])
    with pytest.raises(ValueError, match=r"ids: token 0 names an expert twice in layer 0 "
                                         r"\(top-k \[3, 3\]\)"):
        remote_nodes_per_token(phy2log, twice, 8, 4, 2)
    with pytest.raises(ValueError, match="routing: token 0 names an expert twice"):
        eplb.plan(w, 16, 4, 2, 2, policy="locality", dispatch="nearest", routing=twice)
    once = torch.tensor([[[3, 4], [0, 1]]])
    remote_nodes_per_token(phy2log, once, 8, 4, 2)
    eplb.plan(w, 16, 4, 2, 2, policy="locality", dispatch="nearest", routing=once).validate()


def test_active_gpus_as_gpu_ids_are_refused_as_the_planner_refuses_them(case):
    """``[0, 1, 2, 3]`` was read as a 0/1 mask (GPU 0 dead) where ``eplb.plan`` refuses
    integer masks with the way to build one."""
    w, phy2log, _ = case
    with pytest.raises(TypeError, match="active_gpus must be a boolean mask"):
        realised_gpu_loads(w, phy2log, 4, 2, active_gpus=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="active_gpus must be a boolean mask"):
        realised_gpu_loads(w, phy2log, 4, 2, active_gpus=[1, 1, 1, 1])
    assert realised_gpu_loads(w, phy2log, 4, 2, active_gpus=[True] * 4).shape == (2, 4)


def test_balancedness_helpers_take_a_boolean_mask_only(case):
    w, phy2log, _ = case
    loads = realised_gpu_loads(w, phy2log, 4, 2)
    with pytest.raises(TypeError, match="active_gpus must be a boolean mask"):
        balancedness(loads, torch.tensor([0, 1, 2, 3]))
    live = torch.tensor([True, True, True, True])
    assert balancedness(loads, live) == balancedness(loads)
    assert torch.equal(layer_balancedness(loads, live), layer_balancedness(loads))
