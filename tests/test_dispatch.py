"""Dispatch models (even, SGLang's nearest), dispatch-aware planning, locality, token sampling.

The nearest model is checked against SGLang 0.5.23's real
``compute_logical_to_rank_dispatch_physical_map`` (``tests/sglang_dispatch.py``) where
the wheel is fetched; those tests skip visibly otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb import Placement, PlanOptions, Topology
from eplb.core.dispatch import (
    balancedness,
    coactivation,
    dispatch_fractions,
    node_hit_probs,
    realised_gpu_loads,
    realised_slot_loads,
    remote_nodes_from_coactivation,
    remote_nodes_per_token,
    source_distribution,
    table_gpu_loads,
)
from eplb.core.dispatch_plan import (
    capped_counts,
    coverage_counts,
    plan_nearest_global,
    polish_realised,
    repair_node_pairs,
)
from eplb.core.locality import group_pair_surrogate, plan_locality
from eplb.core.node_labels import node_conflicts, spread_over_nodes
from eplb.online.nearest import expected_balance
from eplb.tools.routing import fit_router

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def placements(draw, allow_dead: bool = True):
    """A random valid eplb placement, its loads, node count and live mask."""
    nodes = draw(st.sampled_from([1, 2, 4]))
    gpus = nodes * draw(st.integers(1, 3))
    slots = draw(st.integers(1, 4))
    experts = draw(st.integers(1, gpus * slots))
    layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = torch.from_numpy(np.exp(rng.normal(0, 1.2, (layers, experts))) * 100)
    live = None
    if allow_dead and gpus > 1 and draw(st.booleans()):
        live = torch.ones(gpus, dtype=torch.bool)
        dead = rng.choice(gpus, size=draw(st.integers(1, gpus - 1)), replace=False)
        live[torch.from_numpy(dead)] = False
        if int(live.sum()) * slots < experts:
            live = None
    p = eplb.plan(w, gpus * slots, gpus, nodes, policy="global", active_gpus=live)
    return p, w, nodes, live


@SETTINGS
@given(placements(), st.sampled_from(["even", "nearest"]), st.booleans())
def test_realised_loads_sum_to_the_layer_total(case, dispatch, given_source):
    p, w, nodes, live = case
    gpus = p.topology.num_gpus
    source = torch.rand(gpus, generator=torch.Generator().manual_seed(1)) + 0.1 \
        if given_source else None
    loads = realised_gpu_loads(w, p.phy2log, gpus, nodes, dispatch, source, live)
    assert torch.allclose(loads.sum(1), w.sum(1), rtol=1e-9)
    if live is not None:
        assert bool((loads[:, ~live] == 0).all())
    frac = dispatch_fractions(p.phy2log, gpus, nodes, dispatch)
    per_expert = torch.zeros(p.num_layers, gpus, p.num_experts + 1, dtype=torch.float64)
    idx = torch.where(p.phy2log >= 0, p.phy2log, p.num_experts)[:, None].expand(-1, gpus, -1)
    per_expert.scatter_add_(2, idx, frac)
    assert torch.allclose(per_expert[..., :-1], torch.ones(()).double())  # one target per token


@SETTINGS
@given(placements(), st.booleans(), st.booleans())
def test_nearest_loads_are_the_dispatch_fractions_summed_over_sources(case, given_source,
                                                                      shuffled):
    # realised_slot_loads sums the rule per slot without the [L, P, R] fractions table;
    # it must agree with that table weighted by where tokens arise
    p, w, nodes, live = case
    gpus = p.topology.num_gpus
    phy2log = p.phy2log
    if shuffled:  # not eplb's own layout: replicas of an expert anywhere, in any order
        g = torch.Generator().manual_seed(int(w.sum()) % 1000)
        order = torch.stack([torch.randperm(phy2log.shape[1], generator=g)
                             for _ in range(phy2log.shape[0])])
        phy2log = phy2log.gather(1, order)
        live = None if live is None else torch.ones(gpus, dtype=torch.bool)
        if bool((phy2log < 0).any()):
            return
    source = torch.rand(gpus, generator=torch.Generator().manual_seed(3)) + 0.05 \
        if given_source else None
    src = source_distribution(gpus, live, source)
    frac = dispatch_fractions(phy2log, gpus, nodes, "nearest")
    expected = torch.einsum("lpr,p->lr", frac, src) * w.gather(1, phy2log.clamp(min=0))
    expected = torch.where(phy2log >= 0, expected, torch.zeros_like(expected))
    got = realised_slot_loads(w, phy2log, gpus, nodes, "nearest", source, live)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-9)


@SETTINGS
@given(placements())
def test_even_rule_equals_placement_gpu_loads(case):
    p, w, nodes, live = case
    got = realised_gpu_loads(w, p.phy2log, p.topology.num_gpus, nodes, "even", active_gpus=live)
    assert torch.allclose(got, p.gpu_loads(w))


def test_nearest_rule_on_a_hand_case():
    # 8 GPUs, 2 nodes, 1 slot each; expert 0 on GPUs 0, 1 (node 0) and 4 (node 1)
    phy = torch.tensor([[0, 0, 1, 2, 0, 3, 4, 5]])
    w = torch.tensor([[80.0, 1, 1, 1, 1, 1]])
    share = realised_gpu_loads(w, phy, 8, 2, "nearest")[0, [0, 1, 4]] / 80
    # GPU 0 serves itself and node 0's GPUs 2, 3 (first replica there); GPU 1 only itself;
    # GPU 4 serves all of node 1 (no fair choice: both nodes hold a replica)
    assert share.tolist() == pytest.approx([3 / 8, 1 / 8, 4 / 8])
    # N = 1 (or replicas all on one node): the fair choice makes the split even
    assert torch.allclose(realised_gpu_loads(w, phy, 8, 1, "nearest"),
                          realised_gpu_loads(w, phy, 8, 1, "even"))


def test_bad_input_names_the_problem():
    phy = torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown dispatch"):
        dispatch_fractions(phy, 2, 1, "hash")
    with pytest.raises(ValueError, match="split over 3 GPUs"):
        dispatch_fractions(phy, 3, 1)
    with pytest.raises(ValueError, match="source"):
        realised_gpu_loads(torch.ones(1, 1), phy, 2, 1, source=torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="ids must"):
        remote_nodes_per_token(phy, torch.zeros(3, 2, 1, dtype=torch.int64), 1, 2, 2)


# ---------------------------------------------------------------- traffic
def test_remote_nodes_from_a_trace_on_a_hand_case():
    # 4 GPUs in 2 nodes, 1 slot each: experts 0, 1 on node 0, experts 2, 3 on node 1
    phy = torch.tensor([[0, 1, 2, 3]])
    ids = torch.tensor([[[0, 1]], [[0, 2]], [[2, 3]]])  # [T=3, L=1, k=2]
    got = remote_nodes_per_token(phy, ids, 4, 4, 2, sources=torch.tensor([0, 0, 0]))
    assert got.tolist() == pytest.approx([(0 + 1 + 1) / 3])
    # averaged over sources: half the sources sit on each node
    got = remote_nodes_per_token(phy, ids, 4, 4, 2)
    assert got.tolist() == pytest.approx([(0.5 + 1 + 0.5) / 3])


@SETTINGS
@given(placements(allow_dead=False), st.integers(0, 2**31 - 1))
def test_coactivation_estimate_is_exact_for_top1(case, seed):
    p, _, nodes, _ = case
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, p.num_experts, (64, p.num_layers, 1), generator=gen)
    exact = remote_nodes_per_token(p.phy2log, ids, p.num_experts, p.topology.num_gpus, nodes)
    pairs = coactivation(ids, p.num_experts)
    est = remote_nodes_from_coactivation(p.phy2log, pairs, 64, p.topology.num_gpus, nodes)
    assert torch.allclose(est, exact, atol=1e-9)
    assert bool((exact >= 0).all() & (exact <= nodes - 1 + 1e-12).all())


def test_coactivation_counts_pairs():
    ids = torch.tensor([[[0, 1]], [[1, 2]]])
    c = coactivation(ids, 3)[0]
    assert c.tolist() == [[1, 1, 0], [1, 2, 1], [0, 1, 1]]


# ------------------------------------------------------- SGLang's real code
def _sglang(sglang_root):
    from sglang_dispatch import sglang_dispatch_tables
    return lambda *a, **k: sglang_dispatch_tables(*a, root=sglang_root, **k)


@pytest.mark.parametrize("path", ["eplb", "mapping"])
def test_nearest_model_matches_sglangs_static_table(sglang_root, path):
    tables = _sglang(sglang_root)
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(3, 16, generator=gen, dtype=torch.float64) ** 3 * 100
    gpus, nodes = 8, 4
    p = eplb.plan(w, 32, gpus, nodes, policy="global")
    table = tables(p.phy2log, 16, gpus, nodes, path=path)  # [P, L, E]
    assert torch.equal(p.phy2log.gather(1, table.permute(1, 0, 2).reshape(3, -1)).view(
        3, gpus, 16), torch.arange(16).expand(3, gpus, 16))  # a replica of the right expert
    frac = dispatch_fractions(p.phy2log, gpus, nodes, "nearest")  # [L, P, R]
    # tiers 1-3 are deterministic: wherever the model sends a rank to one slot, so does SGLang
    chosen = frac.gather(2, table.permute(1, 0, 2))  # model's probability of SGLang's pick
    per_expert_det = torch.zeros(3, gpus, 16, dtype=torch.bool)
    idx = p.phy2log[:, None].expand(-1, gpus, -1)
    per_expert_det.scatter_reduce_(2, idx, frac.eq(1), reduce="amax")
    assert bool((chosen[per_expert_det] == 1).all())
    assert bool((chosen > 0).all())  # the fair tier picks one of the model's candidates
    if path == "eplb":
        # one stream for all ranks: every replica gets floor or ceil of the remaining ranks
        fair = ~per_expert_det & (p.logcnt[:, None, :] > 1)
        for layer, expert in fair.any(1).nonzero().tolist():
            ranks = fair[layer, :, expert].nonzero()[:, 0]
            picks = table[ranks, layer, expert]
            slots = p.log2phy[layer, expert, : p.logcnt[layer, expert]]
            got = torch.stack([(picks == s).sum() for s in slots])
            q, r = divmod(len(ranks), len(slots))
            assert int(got.min()) >= q and int(got.max()) <= q + (r > 0)


def test_expected_loads_are_sglangs_average_over_seeds(sglang_root):
    from engines import sglang_sources
    from sglang_dispatch import _settings

    gen = torch.Generator().manual_seed(5)
    w = torch.rand(2, 8, generator=gen, dtype=torch.float64) * 100
    p = eplb.plan(w, 16, 8, 4, policy="global")
    with sglang_sources(sglang_root, _settings(16, 8, 8, 4)) as ns:
        loc = ns.expert_location
        cand = loc._compute_logical_to_all_physical_map(
            physical_to_logical_map=p.phy2log, num_logical_experts=8, ep_size=8,
            moe_ep_rank=None)
        runs = [table_gpu_loads(w, loc.compute_logical_to_rank_dispatch_physical_map(
            cand, 8, 16, slice(None), seed=seed).long(), 8, 16) for seed in range(300)]
    mean = torch.stack(runs).mean(0)
    model = realised_gpu_loads(w, p.phy2log, 8, 4, "nearest")
    assert torch.allclose(mean, model, rtol=0.03, atol=0.01 * float(w.sum(1).max()) / 8)


@pytest.mark.parametrize("path", ["eplb", "mapping"])
def test_coverage_plans_are_realised_exactly_by_sglang(sglang_root, path):
    tables = _sglang(sglang_root)
    gen = torch.Generator().manual_seed(7)
    w = torch.rand(2, 16, generator=gen, dtype=torch.float64) ** 3 * 100
    topo = Topology(24, 8, 2, 1)  # R − E = 8 = 8·(N − 1): no cold pair left over
    phy = plan_nearest_global(w, topo, PlanOptions(), fair="avoid")
    got = table_gpu_loads(w, tables(phy, 16, 8, 2, path=path), 8, 24)
    assert torch.allclose(got, realised_gpu_loads(w, phy, 8, 2, "nearest"))


@pytest.mark.parametrize("path", ["eplb", "mapping"])
def test_on_one_node_fair_avoid_puts_hot_experts_on_every_gpu_and_sglang_realises_it(
        sglang_root, path):
    """On one node every rank without the expert on its GPU takes SGLang's random fair
    choice, and an --init-expert-location file draws it per rank: eplb's even split,
    1.0 in its model, realised 0.905-0.947 on real DeepSeek-V3 loads (a new-user pass;
    BENCHMARKS.md §14). fair="avoid" gives the hot experts a replica on every GPU: then
    only cold experts' pairs draw, and SGLang realises the model exactly where none are
    left over."""
    tables = _sglang(sglang_root)
    gen = torch.Generator().manual_seed(9)
    w = torch.rand(2, 16, generator=gen, dtype=torch.float64) ** 3 * 100
    # R − E = 12 = 4·(P − 1): four hot experts on all 4 GPUs, no cold pair left over
    placement = eplb.plan(w, 28, 4, dispatch="nearest", fair="avoid")
    placement.validate()
    assert sorted(set(placement.logcnt.flatten().tolist())) == [1, 4]
    hot = placement.logcnt == 4
    assert torch.equal(hot, w >= w.topk(4, 1).values[:, -1:])  # the four hottest
    got = table_gpu_loads(w, tables(placement.phy2log, 16, 4, 1, path=path), 4, 28)
    assert torch.allclose(got, realised_gpu_loads(w, placement.phy2log, 4, 1, "nearest"))
    with pytest.raises(ValueError, match="fair='avoid' on one node is planned fresh"):
        eplb.plan(w, 28, 4, dispatch="nearest", fair="avoid", previous=placement)
    from eplb.online import Rebalancer  # so is a rebalancer's, refused when it is made

    with pytest.raises(ValueError, match="fair='avoid' on one node is planned fresh"):
        Rebalancer(28, 4, window=4, interval=4, incremental=True, dispatch="nearest",
                   fair="avoid")
    # where the replicas left over would reach the hot experts (P + 1 of them on P GPUs),
    # the capped counts are planned instead (a review pass found two on one GPU)
    few = eplb.plan(torch.rand(4, 5, generator=gen), 24, 8, dispatch="nearest", fair="avoid")
    assert int(few.logcnt.max()) <= 8


# -------------------------------------------------------------- planning
@st.composite
def problems(draw):
    nodes = draw(st.sampled_from([2, 4]))
    gpus = nodes * draw(st.integers(1, 3))
    slots = draw(st.integers(2, 5))
    experts = draw(st.integers(max(1, gpus * slots // 2), gpus * slots))
    layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = torch.from_numpy(np.exp(rng.normal(0, 1.5, (layers, experts))) * 100)
    return w, Topology(gpus * slots, gpus, nodes, 1)


@SETTINGS
@given(problems(), st.sampled_from(["auto", "avoid", "expect"]))
def test_nearest_global_plans_are_valid_and_realise_their_even_loads(problem, fair):
    w, topo = problem
    phy = plan_nearest_global(w, topo, PlanOptions(), fair=fair)
    p = Placement.from_phy2log(phy, w.shape[1], topo).validate()
    left = (node_conflicts(phy, topo.num_gpus, w.shape[1]) * _same_node(topo)).sum() / 2
    if int(left) == 0:  # every c >= 3 expert on distinct nodes: the rule splits evenly
        assert torch.allclose(realised_gpu_loads(w, phy, topo.num_gpus, topo.num_nodes),
                              p.gpu_loads(w))


def _same_node(topo: Topology) -> torch.Tensor:
    node = torch.arange(topo.num_gpus) // topo.gpus_per_node
    return (node[:, None] == node[None, :]).double()


def test_an_expert_hotter_than_the_nodes_share_gets_more_than_a_replica_per_node(
        sglang_root):
    # found by a review pass: the nearest plans capped the hot expert at a replica per
    # node (0.25 served under SGLang's table, where the even-split plan served 0.89)
    from eplb.core.dispatch import table_gpu_loads

    tables = _sglang(sglang_root)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(0, 100, (8, 64), generator=gen)
    weight[:, 0] += 3000

    def served(phy2log):
        loads = table_gpu_loads(weight, tables(phy2log, 64, 16, 2, path="eplb"), 16, 128)
        return float(loads.mean(1).sum() / loads.amax(1).sum())

    nearest = eplb.plan(weight, 128, 16, 2, 1, policy="global", dispatch="nearest")
    nearest.validate()
    even = eplb.plan(weight, 128, 16, 2, 1, policy="global").phy2log
    # (before replica counts were capped at a replica per GPU, the even-split plan served
    # 0.89 here and the nearest plan 0.934; capped, the even-split plan serves 0.941 and
    # the nearest plan 0.931: it keeps its own layers within keep_better_served's 5 %)
    assert served(nearest.phy2log) > 0.92 and served(even) > 0.92
    assert int((nearest.phy2log == 0).sum(1).min()) > 2  # more than a replica per node


def test_counts_respect_their_rules():
    w = torch.tensor([[100.0, 50, 10, 1, 1, 1]])
    assert capped_counts(w, 12, 2)[0].tolist() == [[2, 2, 2, 2, 2, 2]]
    c = capped_counts(w, 10, 3)[0]
    assert int(c.max()) <= 3 and int(c.sum()) == 10
    cover = coverage_counts(w, 11, 3)  # R − E = 5 = 2·2 + 1
    assert cover.tolist() == [[3, 3, 1, 1, 1, 2]]


def test_spread_and_repair_remove_same_node_pairs():
    w = torch.tensor(json_free_loads(), dtype=torch.float64)
    topo = Topology(48, 8, 4, 1)
    from eplb.core.dispatch_plan import plan_rows_capped
    phy = plan_rows_capped(w, 48, 8, 4, PlanOptions())
    spread, _ = spread_over_nodes(phy, 8, 4, w.shape[1])
    # bins only move: the multiset of GPU contents is unchanged
    key = lambda x: sorted(tuple(sorted(g)) for g in x.view(8, -1).tolist())  # noqa: E731
    assert all(key(a) == key(b) for a, b in zip(phy, spread, strict=True))
    repaired, _ = repair_node_pairs(w, spread, 8, 4)
    same = _same_node(topo)
    assert float((node_conflicts(repaired, 8, w.shape[1]) * same).sum()) == 0
    Placement.from_phy2log(repaired, w.shape[1], topo).validate()
    budget = torch.zeros(w.shape[0], dtype=torch.int64)
    kept, none = repair_node_pairs(w, phy, 8, 4, budget=budget)
    assert torch.equal(kept, phy) and int(none.sum()) == 0
    # one node has no pair of nodes to spread over: the map comes back as it was, for
    # every caller (which the one-node nearest plans now rely on instead of skipping it)
    alone, none = repair_node_pairs(w, phy, 8, 1, min_count=1)
    assert torch.equal(alone, phy) and alone is not phy and int(none.sum()) == 0


def json_free_loads() -> list[list[float]]:
    rng = np.random.default_rng(11)
    return (np.exp(rng.normal(0, 1.4, (3, 32))) * 50).tolist()


def test_dead_gpus_and_polish():
    w = torch.tensor(json_free_loads(), dtype=torch.float64)
    topo = Topology(64, 16, 4, 1)
    live = torch.ones(16, dtype=torch.bool)
    live[[1, 6, 7]] = False
    phy = plan_nearest_global(w, topo, PlanOptions(), active_gpus=live)
    Placement.from_phy2log(phy, 32, topo, active_gpus=live).validate()
    plain = eplb.plan(w, 64, 16, 4, policy="global", active_gpus=live).phy2log
    ours = balancedness(realised_gpu_loads(w, phy, 16, 4, active_gpus=live), live)
    theirs = balancedness(realised_gpu_loads(w, plain, 16, 4, active_gpus=live), live)
    assert ours >= theirs - 1e-9
    polished = polish_realised(w, plain, 16, 4, live)
    before = realised_gpu_loads(w, plain, 16, 4, active_gpus=live).amax(1)
    after = realised_gpu_loads(w, polished, 16, 4, active_gpus=live).amax(1)
    assert bool((after <= before + 1e-9).all())
    Placement.from_phy2log(polished, 32, topo, active_gpus=live).validate()


# -------------------------------------------------------------- locality
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.05, 10.0]), st.booleans())
def test_locality_plans_are_valid_and_copy_hot_experts_everywhere(seed, slack, groups):
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(np.exp(rng.normal(0, 1.3, (2, 32))) * 100)
    topo = Topology(48, 8, 4, 4 if groups else 1)
    phy = plan_locality(w, topo, slack=slack, top_k=4, topk_groups=2 if groups else None)
    p = Placement.from_phy2log(phy, 32, topo).validate()
    per_node = phy.view(2, 4, -1)
    hot = p.logcnt >= 4
    for layer in range(2):
        for e in hot[layer].nonzero()[:, 0].tolist():
            assert all(bool((per_node[layer, n] == e).any()) for n in range(4))
    # the rule realises the even split of this plan, with no fair choice for hot experts
    assert torch.allclose(realised_gpu_loads(w, phy, 8, 4), p.gpu_loads(w))


def test_locality_balances_nodes_at_zero_slack_and_keeps_groups_when_free():
    rng = np.random.default_rng(2)
    w = torch.from_numpy(np.exp(rng.normal(0, 1.0, (2, 64))) * 100)
    topo = Topology(80, 16, 4, 8)
    tight = plan_locality(w, topo, slack=0.0)
    loose = plan_locality(w, topo, slack=100.0)
    node = lambda phy: realised_gpu_loads(w, phy, 16, 4).view(2, 4, 4).sum(2)  # noqa: E731
    spread = lambda x: float((x.amax(1) / x.mean(1)).max())  # noqa: E731
    assert spread(node(tight)) <= spread(node(loose)) + 1e-9
    assert spread(node(tight)) < 1.02
    # the traffic estimate the search minimises is lower when the slack allows it
    freq, pair = group_pair_surrogate(w, 8, 8, 4)
    est = lambda phy: float(remote_nodes_from_coactivation(  # noqa: E731
        phy, pair + torch.diag_embed(freq), 1, 16, 4).mean())
    assert est(loose) <= est(tight) + 1e-9


def test_locality_uses_a_routing_trace():
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(1, 32, generator=gen, dtype=torch.float64) + 0.5
    router = fit_router(w, top_k=4, num_groups=1, topk_groups=1, iterations=4, generator=gen)
    ids = router.sample(600, gen)
    topo = Topology(40, 8, 4, 1)
    phy = plan_locality(w, topo, slack=0.1, routing=ids[:300], top_k=4, topk_groups=None)
    Placement.from_phy2log(phy, 32, topo).validate()
    plain = plan_nearest_global(w, topo, PlanOptions())
    ours = remote_nodes_per_token(phy, ids[300:], 32, 8, 4).mean()
    theirs = remote_nodes_per_token(plain, ids[300:], 32, 8, 4).mean()
    assert ours < theirs
    hits = node_hit_probs(phy, 32, 8, 4)
    assert torch.allclose(hits.sum(3), torch.ones(()).double())


# ---------------------------------------------------------------- routing
def test_group_limited_sampler():
    gen = torch.Generator().manual_seed(1)
    w = torch.rand(2, 64, generator=gen, dtype=torch.float64) ** 2 * 100 + 1
    router = fit_router(w, top_k=4, num_groups=8, topk_groups=2, iterations=6,
                        fit_tokens=512, generator=gen)
    ids = router.sample(2000, gen)
    assert ids.shape == (2000, 2, 4) and ids.dtype == torch.int64
    assert bool((ids.sort(2).values.diff(dim=2) > 0).all())  # distinct experts per token
    groups = ids // 8
    sorted_groups = groups.view(-1, 4).sort(1).values
    distinct = 1 + (sorted_groups.diff(dim=1) > 0).sum(1)
    assert int(distinct.max()) <= 2  # at most topk_groups groups per token
    counts = torch.stack([torch.bincount(ids[:, layer].flatten(), minlength=64)
                          for layer in range(2)]).double()
    target = 4 * w / w.sum(1, keepdim=True) * 2000
    assert float((counts - target).abs().sum() / target.sum()) < 0.2
    with pytest.raises(ValueError, match="groups"):
        fit_router(w, num_groups=7)


def test_nearest_incremental_respects_the_budget():
    """Through the public API: ``dispatch="nearest"`` with the placement in force."""
    rng = np.random.default_rng(4)
    w = torch.from_numpy(np.exp(rng.normal(0, 1.2, (3, 32))) * 100)
    old = eplb.plan(w, 48, 8, 4, policy="global", dispatch="nearest").phy2log
    drifted = w * torch.from_numpy(np.exp(rng.normal(0, 0.3, w.shape)))
    before = realised_gpu_loads(drifted, old, 8, 4).amax(1)
    for budget in (None, [6, 6, 6], [0, 0, 0]):
        placed = eplb.plan(drifted, 48, 8, 4, policy="global", dispatch="nearest",
                           previous=old, max_moves=budget)
        placed.validate()
        new = placed.phy2log
        moved = (new != old).sum(1)
        # a layer is only re-planned where its realised peak drops
        assert bool((realised_gpu_loads(drifted, new, 8, 4).amax(1) <= before + 1e-9).all())
        if budget is not None:
            assert bool((moved <= torch.tensor(budget)).all())
            if max(budget) == 0:
                assert torch.equal(new, old)


def test_nearest_per_layer_budgets_of_one_slot_buy_what_pays():
    # attacker pass: the warm start took 85 % of each layer's budget, int(0.85) = 0
    # slots, so per-layer budgets of 1 moved nothing where a total of 1 bought a slot
    g = torch.Generator().manual_seed(2)
    w0 = torch.exp(torch.randn(5, 32, generator=g, dtype=torch.float64))
    w1 = w0 * torch.exp(torch.randn(5, 32, generator=g, dtype=torch.float64) * 0.8)
    kwargs = {"policy": "global", "dispatch": "nearest"}
    old = eplb.plan(w0, 48, 8, 2, **kwargs)
    total = eplb.plan(w1, 48, 8, 2, previous=old, max_moves=1, **kwargs).moved_slots(old)
    each = eplb.plan(w1, 48, 8, 2, previous=old, max_moves=[1] * 5, **kwargs).moved_slots(old)
    assert int(total.sum()) == 1 and (each <= 1).all()
    assert int(each.sum()) >= 1


def drifted_nearest_case(seed: int, layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A nearest-rule plan ``[L, 96]`` of random loads ``[L, 64]`` on 16 GPUs (4 nodes),
    and those loads drifted by ×exp(0.3·Z)."""
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(np.exp(rng.normal(0, 1.0, (layers, 64))) * 100)
    old = eplb.plan(w, 96, 16, 4, policy="global", dispatch="nearest").phy2log
    return old, w * torch.from_numpy(np.exp(rng.normal(0, 0.3, w.shape)))


def test_nearest_incremental_spends_a_total_budget_where_it_pays():
    # a total budget is not split evenly over the layers (a share of 1–2 slots per layer
    # buys no swap): it goes where a moved slot gains most, and a small one still helps
    old, drifted = drifted_nearest_case(11, 8)

    def balance(phy):
        loads = realised_gpu_loads(drifted, phy, 16, 4)
        return float(loads.mean(1).sum() / loads.amax(1).sum())

    before, last = balance(old), balance(old)
    for total in (0, 8, 40, 200):
        placed = eplb.plan(drifted, 96, 16, 4, policy="global", dispatch="nearest",
                           previous=old, max_moves=total)
        placed.validate()
        moved = int((placed.phy2log != old).sum())
        assert moved <= total
        got = balance(placed.phy2log)
        assert got >= last - 1e-12  # a larger budget never buys less here
        last = got
        if total == 0:
            assert torch.equal(placed.phy2log, old)
        if total == 8:  # one slot per layer if split evenly: no swap would fit
            assert moved > 0 and got > before


@SETTINGS
@given(
    gpus=st.sampled_from([4, 8]),
    slots=st.integers(2, 4),
    layers=st.integers(1, 4),
    origin=st.sampled_from(["eplb", "vllm-initial", "random"]),
    budget=st.one_of(st.none(), st.integers(0, 40), st.just("per-layer")),
    seed=st.integers(0, 2**31 - 1),
)
def test_nearest_incremental_from_old_maps_of_every_origin(gpus, slots, layers, origin,
                                                             budget, seed):
    # valid, deterministic, and within a budget (beyond the forced moves, which an
    # eplb map needs none of)
    rng = np.random.default_rng(seed)
    replicas, experts = gpus * slots, gpus * slots * 2 // 3
    w = torch.from_numpy(np.exp(rng.normal(0, 1.0, (layers, experts))) * 100)
    if origin == "eplb":
        old = eplb.plan(w, replicas, gpus, 2, policy="global", dispatch="nearest").phy2log
    elif origin == "vllm-initial":
        old = torch.arange(replicas).remainder(experts).repeat(layers, 1)
    else:
        old = torch.from_numpy(rng.integers(0, experts, (layers, replicas)))
    drifted = w * torch.from_numpy(np.exp(rng.normal(0, 0.3, w.shape)))
    limit = [int(rng.integers(0, 12)) for _ in range(layers)] if budget == "per-layer" else budget
    kwargs = {"policy": "global", "dispatch": "nearest", "previous": old, "max_moves": limit}
    new = eplb.plan(drifted, replicas, gpus, 2, **kwargs)
    new.validate()
    assert torch.equal(eplb.plan(drifted, replicas, gpus, 2, **kwargs).phy2log, new.phy2log)
    if origin == "eplb" and limit is not None:
        moved = (new.phy2log != old).sum(1)
        if isinstance(limit, list):
            assert bool((moved <= torch.tensor(limit)).all())
        else:
            assert int(moved.sum()) <= limit


def test_nearest_incremental_without_a_budget_moves_only_what_pays():
    # an unchanged workload keeps (almost) its whole map; a drifted one is re-planned,
    # and what moves buys more realised balance than move_price × the share moved
    rng = np.random.default_rng(7)
    w = torch.from_numpy(np.exp(rng.normal(0, 1.0, (6, 64))) * 100)
    old = eplb.plan(w, 96, 16, 4, policy="global", dispatch="nearest").phy2log
    same = eplb.plan(w, 96, 16, 4, policy="global", dispatch="nearest", previous=old)
    assert float((same.phy2log != old).float().mean()) < 0.02
    drifted = w * torch.from_numpy(np.exp(rng.normal(0, 0.3, w.shape)))
    new = eplb.plan(drifted, 96, 16, 4, policy="global", dispatch="nearest",
                    previous=old).phy2log
    share = (new != old).float().mean(1)
    assert float(share.max()) > 0.1  # the drift is worth re-planning somewhere

    def balance(phy):
        loads = realised_gpu_loads(drifted, phy, 16, 4)
        return loads.mean(1) / loads.amax(1)

    gain = balance(new) - balance(old)
    # the default move price, 0.01 at 9 slots per GPU, follows the slots per GPU: 6 here
    price = 0.01 * 6 / 9
    assert bool((gain >= price * share - 1e-12).all())
    # and on the next window expected under the default drift (0.2): a move that only
    # pays in sample is not made
    expected, _ = expected_balance(drifted, torch.stack([old, new]), 16, 4, 0.2)
    assert bool((expected[1] - expected[0] >= price * share - 1e-12).all())
    # a dear move price: only moves that gain that much per share moved are made
    dear = eplb.plan(drifted, 96, 16, 4, policy="global", dispatch="nearest",
                     previous=old, move_price=0.5).phy2log
    dear_share = (dear != old).float().mean(1)
    assert float(dear_share.mean()) < float(share.mean())
    assert bool((balance(dear) - balance(old) >= 0.5 * 6 / 9 * dear_share - 1e-12).all())


def test_nearest_expected_balance_is_over_the_live_gpus():
    # without drift the expected next window is the window at hand: both over the live
    # GPUs' mean (the expected one was over all P, 7/8 of it with one of 8 GPUs dead)
    generator = torch.Generator().manual_seed(5)
    weight = torch.rand(3, 16, generator=generator, dtype=torch.float64)
    active = torch.ones(8, dtype=torch.bool)
    active[7] = False
    plan = eplb.plan(weight, 32, 8, 2, policy="global", dispatch="nearest", active_gpus=active)
    expected, peak = expected_balance(weight, plan.phy2log[None], 8, 2, drift=0.0,
                                      active_gpus=active)
    in_sample = weight.sum(1) / 7 / peak[0]
    assert torch.allclose(expected[0], in_sample, rtol=1e-12)


def test_nearest_small_total_budget_buys_what_one_layer_alone_would():
    # the even split spends a total where the even split gains most: a total of 3 on two
    # layers moved nothing, where 3 slots given to layer 0 alone bought 0.468 -> 0.513
    # under the rule (second attacker pass); each layer's own warm start is offered too
    rng = np.random.default_rng(0)
    w0 = torch.tensor(rng.gamma(0.5, 100, size=(2, 16)))
    w1 = w0 * torch.tensor(np.exp(rng.normal(0, 1, size=(2, 16))))
    kwargs = {"dispatch": "nearest"}
    old = eplb.plan(w0, 24, 8, 2, **kwargs)

    def balance(placement):
        loads = realised_gpu_loads(w1, placement.phy2log, 8, 2, dispatch="nearest")
        return float((w1.sum(1) / 8 / loads.amax(1)).sum())

    total = eplb.plan(w1, 24, 8, 2, previous=old, max_moves=3, **kwargs)
    alone = eplb.plan(w1, 24, 8, 2, previous=old, max_moves=[3, 0], **kwargs)
    assert 0 < int(total.moved_slots(old).sum()) <= 3
    assert int(alone.moved_slots(old).sum()) <= 3
    assert balance(total) >= balance(alone) - 1e-12 > balance(old)


def test_nearest_budget_buys_no_move_that_does_not_pay():
    # a budget caps the moves that pay; at a dear move price it buys no others (before,
    # a budget was spent on realised balance alone, whatever the price)
    old, drifted = drifted_nearest_case(7, 6)

    def balance(phy):
        loads = realised_gpu_loads(drifted, phy, 16, 4)
        return loads.mean(1) / loads.amax(1)

    for budget in (10**6, [10**6] * 6):
        new = eplb.plan(drifted, 96, 16, 4, policy="global", dispatch="nearest",
                        previous=old, move_price=0.5, max_moves=budget).phy2log
        share = (new != old).float().mean(1)
        assert bool((balance(new) - balance(old) >= 0.5 * share - 1e-12).all()), budget
        expected, _ = expected_balance(drifted, torch.stack([old, new]), 16, 4, 0.2)
        assert bool((expected[1] - expected[0] >= 0.5 * share - 1e-12).all()), budget


def test_tradeoff_picture(tmp_path):
    pytest.importorskip("matplotlib")
    from eplb.tools.dispatch_plot import plot_tradeoff

    path = plot_tradeoff({"locality": [(2.3, 0.99, "0"), (2.2, 0.95, "0.1")]},
                         [("hierarchical", 2.4, 0.8, "corner"), ("a", 2.6, 0.9, "engine"),
                          ("b", 2.6, 0.9, "engine")], tmp_path / "t.png")
    assert path.stat().st_size > 1000


def test_locality_refuses_pair_statistics_beyond_its_limit():
    with pytest.raises(ValueError, match="co-selection statistics"):
        eplb.plan(torch.rand(32, 2048), 2304, 64, 8, 8, policy="locality", dispatch="nearest")


def test_dispatch_helpers_refuse_ids_below_minus_one():
    phy2log = torch.arange(16).remainder(8).view(1, 16)
    phy2log[0, 0] = -5
    with pytest.raises(ValueError, match="-1 marks an empty slot"):
        realised_gpu_loads(torch.ones(1, 8), phy2log, 4, 2)


def test_nearest_total_budget_is_not_spent_on_layers_without_load():
    # an all-zero layer is scored on uniform loads and its moves are undone afterwards:
    # the slots the budget gave it were lost to the layers that gain (here all of them)
    g = torch.Generator().manual_seed(17)
    w = torch.rand(2, 12, generator=g, dtype=torch.float64) ** 3
    w[1] = 0
    old = torch.arange(16).remainder(12).repeat(2, 1)
    old[0] = old[0, torch.randperm(16, generator=g)]
    kwargs = {"policy": "global", "dispatch": "nearest", "max_moves": 10}
    both = eplb.plan(w, 16, 4, 2, previous=old, **kwargs).phy2log
    alone = eplb.plan(w[:1], 16, 4, 2, previous=old[:1], **kwargs).phy2log
    assert torch.equal(both[1], old[1])
    assert torch.equal(both[:1], alone) and not torch.equal(alone, old[:1])


@pytest.mark.parametrize("dispatch", ["nearest", "even"])
def test_a_total_budget_goes_to_the_layers_that_carry_the_load(dispatch):
    # attacker pass: under the nearest rule a total went by balancedness gains alone, and
    # layers with a millionth of the others' load got most of it; a layer's MoE time is
    # its load times its peak, so the heavy layers come first
    g = torch.Generator().manual_seed(3)
    w0 = torch.exp(torch.randn(4, 32, generator=g, dtype=torch.float64))
    w1 = w0 * torch.exp(torch.randn(4, 32, generator=g, dtype=torch.float64) * 0.8)
    kwargs = {"policy": "global", "dispatch": dispatch}
    old = eplb.plan(w0, 48, 8, 2, **kwargs)
    light = w1 * torch.tensor([1.0, 1.0, 1e-6, 1e-6], dtype=torch.float64)[:, None]
    for budget in (4, 8):
        moved = eplb.plan(light, 48, 8, 2, previous=old, max_moves=budget,
                          **kwargs).moved_slots(old)
        assert int(moved[:2].sum()) > 0 and int(moved[2:].sum()) == 0, moved.tolist()


@pytest.mark.parametrize("replicas, gpus, nodes, experts",
                         [(8, 8, 8, 3), (16, 8, 8, 3), (8, 8, 8, 2), (16, 16, 8, 3)])
def test_nearest_plans_with_more_nodes_than_experts(replicas, gpus, nodes, experts):
    # the coverage counts cannot place (R − E) mod (N − 1) > E leftover replicas (one
    # more each for the coldest experts): capped counts instead, not a ZeroDivisionError
    for w in (torch.zeros(2, experts, dtype=torch.float64),
              torch.rand(2, experts, dtype=torch.float64)):
        eplb.plan(w, replicas, gpus, nodes, policy="global", dispatch="nearest").validate()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_nearest_per_layer_budget_of_unsigned_ints(dtype):
    w = torch.rand(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    old = torch.arange(16).remainder(12).repeat(3, 1)
    limit = np.array([1, 2, 3], dtype)
    new = eplb.plan(w, 16, 4, 2, policy="global", dispatch="nearest", previous=old,
                    max_moves=limit)
    assert bool(((new.phy2log != old).sum(1) <= torch.tensor([1, 2, 3])).all())


def test_tradeoff_picture_keeps_an_existing_file(tmp_path):
    pytest.importorskip("matplotlib")
    from eplb.tools.dispatch_plot import plot_tradeoff

    kept = tmp_path / "t.svg"
    kept.write_text("mine")
    curves = {"locality": [(2.3, 0.99, "0"), (2.2, 0.95, "0.1")]}
    with pytest.raises(FileExistsError, match="force=True"):
        plot_tradeoff(curves, [], kept)
    assert kept.read_text() == "mine"
    plot_tradeoff(curves, [], kept, force=True)
    assert kept.read_text().lstrip().startswith("<?xml")  # the suffix's format


def test_tradeoff_picture_format_is_checked_before_drawing(tmp_path):
    pytest.importorskip("matplotlib")
    from eplb.tools.dispatch_plot import picture_format, plot_tradeoff

    assert picture_format(tmp_path / "t.PNG") == "png"
    assert picture_format(tmp_path / "t") == "png"
    with pytest.raises(ValueError, match=r"cannot be written as \.xyz"):
        plot_tradeoff({"locality": [(2.3, 0.99, "0")]}, [], tmp_path / "t.xyz")
    assert not list(tmp_path.iterdir())


def test_tradeoff_picture_under_a_file_names_the_folder(tmp_path):
    pytest.importorskip("matplotlib")
    from eplb.tools.dispatch_plot import plot_tradeoff

    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        plot_tradeoff({"locality": [(2.3, 0.99, "0")]}, [], tmp_path / "file" / "x.png",
                      force=True)


@pytest.mark.parametrize(("slots", "nodes", "hot"), [(2, 8, 1), (3, 8, 1), (4, 8, 1), (2, 2, 10)])
def test_locality_never_gives_up_much_more_balance_than_its_slack(slots, nodes, hot):
    # found by attacker passes: with few slots per GPU the hot experts' copies took the
    # spare slots and single experts outweighed a GPU's share, 0.52 where the global plan
    # for the rule serves 0.95 (uniform loads); with one expert 10x the others 0.26, where
    # the even-split plan serves 0.95 under the rule. Such layers take the global plan
    torch.manual_seed(0)
    experts = 64 if hot == 1 else 109
    w = torch.rand(4, experts, dtype=torch.float64) * 1000
    w[:, 0] *= hot
    groups = 8 if experts % 8 == 0 else 1
    args = (64 * slots, 64, nodes, groups)
    slack = 0.03
    local = eplb.plan(w, *args, policy="locality", dispatch="nearest", slack=slack)
    other = eplb.plan(w, *args, policy="global", dispatch="nearest")
    peak = realised_gpu_loads(w, local.phy2log, 64, nodes).amax(1)
    peak_other = realised_gpu_loads(w, other.phy2log, 64, nodes).amax(1)
    assert bool((peak <= peak_other * (1 + slack) * 1.05 + 1e-9).all())


@pytest.mark.parametrize("policy", ["hierarchical", "locality"])
def test_nearest_replans_that_score_no_moves_refuse_the_move_knobs(policy):
    """Under ``dispatch="nearest"`` on several nodes the hierarchical and locality policies
    re-plan and relabel onto the old GPUs, scoring no move: ``move_price``, ``drift`` and
    ``group_share`` were taken there and changed nothing (as ``max_moves`` and
    ``skip_threshold``, which are refused); the global policy still prices its moves."""
    rng = np.random.default_rng(5)
    w = torch.from_numpy(np.exp(rng.normal(0, 1.0, (2, 16))) * 100)
    old = eplb.plan(w, 32, 4, 2, 4, policy="hierarchical")
    drifted = w * torch.from_numpy(np.exp(rng.normal(0, 0.5, w.shape)))
    for knob in ({"move_price": 0.5}, {"drift": 0.01}, {"group_share": 0.5}):
        with pytest.raises(ValueError, match=f"^{next(iter(knob))}: with dispatch='nearest' "
                           f"the {policy} policy re-plans and relabels"):
            eplb.plan(drifted, 32, 4, 2, 4, policy=policy, dispatch="nearest", previous=old,
                      **knob)
    eplb.plan(drifted, 32, 4, 2, 4, policy=policy, dispatch="nearest", previous=old).validate()
    priced = eplb.plan(drifted, 32, 4, 2, 4, policy="global", dispatch="nearest",
                       previous=old, move_price=0.99)
    assert torch.equal(priced.phy2log, old.phy2log)  # nothing pays at that price


def _one_node_drift(seed: int) -> tuple[int, int, torch.Tensor, Placement, Placement]:
    """A random small one-node case under nearest dispatch: ``(replicas, gpus, loads of
    the next window [4, E], the map in force, its plan from that map without a budget)``
    (2-8 GPUs, 2-5 slots each, the loads drifted by ``exp(0.3·Z)``)."""
    rng = np.random.default_rng(seed)
    gpus, slots = int(rng.integers(2, 9)), int(rng.integers(2, 6))
    replicas = gpus * slots
    experts = int(rng.integers(max(2, replicas // 3), replicas + 1))
    w0 = torch.from_numpy(np.rint(rng.lognormal(0, 1.2, (4, experts)) * 100) + 1)
    w1 = torch.from_numpy(np.rint(w0.numpy() * np.exp(0.3 * rng.standard_normal(
        (4, experts)))) + 1)
    old = eplb.plan(w0, replicas, gpus, dispatch="nearest")
    return replicas, gpus, w1, old, eplb.plan(w1, replicas, gpus, dispatch="nearest",
                                              previous=old)


@pytest.mark.parametrize("budget", ["total", "per layer"])
def test_a_budget_above_what_pays_moves_no_layer_more_than_no_budget_on_one_node(budget):
    # README: a budget "never [moves] more slots in a layer than the plan without a
    # budget", under either rule. On one node (SGLang's runtime table) a budget also
    # offers the even split's own plan within it, and an ample budget moved layers that
    # the plan without one kept (stateful sequence tests: 20 of 60 random cases, e.g. 4
    # layers on 7 GPUs of 2 slots moved [4, 0, 5, 3] slots where no budget moved
    # [0, 0, 5, 4]); the layers' moves are now capped at the plan without a budget's
    failures = []
    for seed in range(12):
        replicas, gpus, w1, old, free = _one_node_drift(seed)
        ample = 10**6 if budget == "total" else [10**6] * 4
        capped = eplb.plan(w1, replicas, gpus, dispatch="nearest", previous=old,
                           max_moves=ample)
        moved, unlimited = capped.moved_slots(old), free.moved_slots(old)
        if bool((moved > unlimited).any()):
            failures.append((seed, moved.tolist(), unlimited.tolist()))
    assert not failures, f"(seed, slots moved with a budget, without) per layer: {failures}"


def test_a_budget_that_does_not_bind_gives_the_plan_without_a_budget_on_one_node():
    # a cap that does not bind changes nothing: an ample total (or per-layer cap) plans
    # as no budget does. A total was spent by MoE time among the budget's own candidates
    # (0.8911 against 0.8920 on the next window at 32 GPUs), and a scoring of the draws
    # that differed by an ulp with the number of candidates scored at once chose otherwise
    # in near-ties (seed 74: 4 slots of one layer, the same number moved)
    for seed in [*range(10), 74]:
        replicas, gpus, w1, old, free = _one_node_drift(seed)
        for ample in (10**6, [10**6] * 4):
            capped = eplb.plan(w1, replicas, gpus, dispatch="nearest", previous=old,
                               max_moves=ample)
            assert torch.equal(capped.phy2log, free.phy2log), (seed, ample)
