"""Dispatch-aware planning: plans for SGLang's nearest rule (their counts, node spreading
and repair, dead GPUs), the locality policy, the group-limited token sampler, and the
trade-off picture. The models they are scored by: ``test_dispatch.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dispatch import SETTINGS, _sglang

import eplb
from eplb import Placement, PlanOptions, Topology
from eplb.core.dispatch import (
    balancedness,
    node_hit_probs,
    realised_gpu_loads,
    remote_nodes_from_coactivation,
    remote_nodes_per_token,
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
from eplb.tools.routing import fit_router


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


@pytest.mark.parametrize("replicas, gpus, nodes, experts",
                         [(8, 8, 8, 3), (16, 8, 8, 3), (8, 8, 8, 2), (16, 16, 8, 3)])
def test_nearest_plans_with_more_nodes_than_experts(replicas, gpus, nodes, experts):
    # the coverage counts cannot place (R − E) mod (N − 1) > E leftover replicas (one
    # more each for the coldest experts): capped counts instead, not a ZeroDivisionError
    for w in (torch.zeros(2, experts, dtype=torch.float64),
              torch.rand(2, experts, dtype=torch.float64)):
        eplb.plan(w, replicas, gpus, nodes, policy="global", dispatch="nearest").validate()


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
