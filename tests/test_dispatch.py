"""Dispatch models (even, SGLang's nearest): realised and expected loads, traffic and
co-activation, and the nearest model against SGLang's own code.

The nearest model is checked against SGLang 0.5.23's real
``compute_logical_to_rank_dispatch_physical_map`` (``tests/sglang_dispatch.py``) where
the wheel is fetched; those tests skip visibly otherwise. Dispatch-aware planning,
locality and token sampling: ``test_dispatch_planning.py``; its incremental plans and
budgets: ``test_dispatch_incremental.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb import PlanOptions, Topology
from eplb.core.dispatch import (
    coactivation,
    dispatch_fractions,
    realised_gpu_loads,
    realised_slot_loads,
    remote_nodes_from_coactivation,
    remote_nodes_per_token,
    source_distribution,
    table_gpu_loads,
)
from eplb.core.dispatch_plan import (
    plan_nearest_global,
)

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


def test_dispatch_helpers_refuse_ids_below_minus_one():
    phy2log = torch.arange(16).remainder(8).view(1, 16)
    phy2log[0, 0] = -5
    with pytest.raises(ValueError, match="-1 marks an empty slot"):
        realised_gpu_loads(torch.ones(1, 8), phy2log, 4, 2)
