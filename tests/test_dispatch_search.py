"""The nearest-dispatch plan's node relabelling search (``_kl_swaps``) makes the same
swaps as its plain formulation: a fresh conflict-by-node product in float64 every step.
It keeps that product up to date swap by swap and runs in float32 where every sum is an
integer below 2**24 (about twice as fast at 256–512 GPUs), and scores the full search
with one batched product where that is exact; none may change a swap."""

from __future__ import annotations

import pytest
import torch

from eplb.core.node_labels import _kl_swaps, node_conflicts


def plain_kl_swaps(conflict, where, node_of_pos, num_nodes, steps):
    """The search written plainly, row by row: every step recomputes each bin's conflict
    with every node from scratch (float64), takes the first best swap in row-major
    order, and a row stops for good once no swap lowers its same-node conflict."""
    where = where.clone()
    num_bins = where.shape[1]
    done = [False] * len(where)
    for _ in range(steps):
        for r in range(len(where)):
            if done[r]:
                continue
            nodes = node_of_pos[where[r]]
            with_node = conflict[r] @ torch.nn.functional.one_hot(nodes, num_nodes).double()
            stay = with_node[torch.arange(num_bins), nodes]  # each bin's own node
            move = with_node[:, nodes] - stay[:, None]  # bin a placed on bin b's node
            gain = move + move.T - 2 * conflict[r]
            gain[nodes[:, None] == nodes[None, :]] = 0.0
            if float(gain.min()) >= -1e-9:
                done[r] = True
                continue
            first = int((gain == gain.min()).flatten().nonzero()[0])
            a, b = divmod(first, num_bins)
            where[r, a], where[r, b] = where[r, b].clone(), where[r, a].clone()
        if all(done):
            break
    nodes = node_of_pos[where]
    same = (nodes[:, :, None] == nodes[:, None, :]).double()
    return where, (conflict * same).sum((1, 2)) / 2


@pytest.mark.parametrize(("gpus", "nodes", "slots", "sigma"),
                         [(32, 4, 9, 1.0), (64, 8, 2, 1.5), (96, 12, 5, 2.5), (128, 16, 3, 2.0)])
@pytest.mark.parametrize("seed", range(4))
def test_the_search_makes_the_plain_formulations_swaps(gpus, nodes, slots, sigma, seed):
    gen = torch.Generator().manual_seed(seed)
    layers, experts = 3, 4 * gpus
    weight = torch.exp(sigma * torch.randn(layers, experts, generator=gen, dtype=torch.float64))
    phy2log = torch.stack([torch.multinomial(row / row.sum(), gpus * slots, replacement=True,
                                             generator=gen) for row in weight])
    conflict = node_conflicts(phy2log, gpus, experts).repeat(2, 1, 1)
    where = torch.stack([torch.randperm(gpus, generator=gen) for _ in range(2 * layers)])
    node_of_pos = torch.arange(gpus) // (gpus // nodes)
    want = plain_kl_swaps(conflict, where, node_of_pos, nodes, 2 * gpus)
    got = _kl_swaps(conflict, where, node_of_pos, nodes, 2 * gpus)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1]) and got[1].dtype == want[1].dtype
    assert float(want[1].sum()) < float(plain_kl_swaps(conflict, where, node_of_pos, nodes,
                                                       0)[1].sum())  # it searched


def test_the_search_from_few_conflicts_searches_their_rows_only_and_makes_the_same_swaps(
        monkeypatch):
    # from a greedy labelling few bins conflict, so the search scores only their rows of
    # the gain; it must still take the full search's first best swap (the smallest
    # (lower bin, higher bin) among the best pairs)
    import eplb.core.node_labels as node_labels

    used = []
    real = node_labels._best_conflicted_swap
    monkeypatch.setattr(node_labels, "_best_conflicted_swap",
                        lambda *args: used.append(args[-1]) or real(*args))
    gen = torch.Generator().manual_seed(7)
    gpus, nodes, slots, layers = 64, 8, 3, 4
    experts = 2 * gpus
    weight = torch.exp(0.5 * torch.randn(layers, experts, generator=gen, dtype=torch.float64))
    phy2log = torch.stack([torch.multinomial(row / row.sum(), gpus * slots, replacement=True,
                                             generator=gen) for row in weight])
    conflict = node_conflicts(phy2log, gpus, experts)
    node_of_pos = torch.arange(gpus) // (gpus // nodes)
    start = node_labels._greedy_labelling(conflict, node_of_pos, nodes)
    # a few random swaps away from the greedy labelling: some conflicts to remove
    for row in range(layers):
        for a, b in torch.randint(gpus, (3, 2), generator=gen).tolist():
            start[row, a], start[row, b] = start[row, b].clone(), start[row, a].clone()
    want = plain_kl_swaps(conflict, start, node_of_pos, nodes, 2 * gpus)
    got = _kl_swaps(conflict, start, node_of_pos, nodes, 2 * gpus)
    assert used and max(used) * 2 <= gpus  # the restricted search ran
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(("gpus", "nodes", "slots", "dead"),
                         [(32, 4, 9, ()), (64, 8, 2, (3, 17, 18)), (128, 16, 3, (0, 127))])
def test_the_labelling_never_leaves_more_conflicts_than_a_search_from_the_packings_order(
        gpus, nodes, slots, dead):
    from eplb.core.node_labels import spread_over_nodes

    gen = torch.Generator().manual_seed(gpus)
    layers, experts = 6, 2 * gpus
    weight = torch.exp(1.5 * torch.randn(layers, experts, generator=gen, dtype=torch.float64))
    phy2log = torch.stack([torch.multinomial(row / row.sum(), gpus * slots, replacement=True,
                                             generator=gen) for row in weight])
    live = torch.ones(gpus, dtype=torch.bool)
    live[list(dead)] = False
    phy2log.view(layers, gpus, slots)[:, ~live] = -1
    out, left = spread_over_nodes(phy2log, gpus, nodes, experts, live,
                                  generator=torch.Generator().manual_seed(0))
    # the GPUs' contents only moved, live GPUs among live GPUs
    grid, before = out.view(layers, gpus, slots), phy2log.view(layers, gpus, slots)
    assert (grid[:, ~live] == -1).all()
    for row in range(layers):
        assert sorted(map(tuple, grid[row, live].tolist())) == sorted(
            map(tuple, before[row, live].tolist()))
    pos = live.nonzero()[:, 0]
    node_of_pos = pos // (gpus // nodes)
    conflict = node_conflicts(before[:, pos].reshape(layers, -1), len(pos), experts)
    from_order = _kl_swaps(conflict, torch.arange(len(pos)).expand(layers, -1), node_of_pos,
                           nodes, 2 * gpus)[1]
    assert (left <= from_order).all()
    y = (torch.arange(gpus) // (gpus // nodes))
    assert (left == node_conflicts(out, gpus, experts).mul(
        (y[:, None] == y[None, :]).double()).sum((1, 2)) / 2).all()


@pytest.mark.parametrize("seed", range(3))
def test_with_attraction_the_search_makes_the_plain_formulations_swaps(seed):
    # experts with more replicas than nodes pull their replicas together (negative
    # weights): the search then scores every pair, and must take the plain search's swaps
    gen = torch.Generator().manual_seed(seed)
    gpus, nodes, slots, layers, experts = 32, 4, 3, 3, 24
    weight = torch.exp(torch.randn(layers, experts, generator=gen, dtype=torch.float64))
    phy2log = torch.stack([torch.multinomial(row / row.sum(), gpus * slots, replacement=True,
                                             generator=gen) for row in weight])
    counts = torch.stack([torch.bincount(row, minlength=experts) for row in phy2log])
    attract = counts > nodes
    assert attract.any()
    conflict = node_conflicts(phy2log, gpus, experts, attract=attract)
    assert (conflict < 0).any()
    where = torch.stack([torch.randperm(gpus, generator=gen) for _ in range(layers)])
    node_of_pos = torch.arange(gpus) // (gpus // nodes)
    want = plain_kl_swaps(conflict, where, node_of_pos, nodes, 2 * gpus)
    got = _kl_swaps(conflict, where, node_of_pos, nodes, 2 * gpus)
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize(("nodes", "scale"), [(4, 1.0), (4, 2.0**21), (8, 2.0**21), (1, 1.0)])
def test_the_full_search_never_takes_a_same_node_pair(nodes, scale):
    # the full search scores a same-node pair +inf (no change) where the plain search
    # scores 0; only rows whose best swap lowers the conflict move, so both take the same
    # swaps: in float64 too (sums of 2**22 and more), and on one node, where nothing moves
    gen = torch.Generator().manual_seed(nodes)
    gpus, slots, layers, experts = 32, 6, 4, 40
    weight = torch.exp(torch.randn(layers, experts, generator=gen, dtype=torch.float64))
    phy2log = torch.stack([torch.multinomial(row / row.sum(), gpus * slots, replacement=True,
                                             generator=gen) for row in weight])
    conflict = node_conflicts(phy2log, gpus, experts) * scale
    where = torch.stack([torch.randperm(gpus, generator=gen) for _ in range(layers)])
    node_of_pos = torch.arange(gpus) // (gpus // nodes)
    want = plain_kl_swaps(conflict, where, node_of_pos, nodes, 2 * gpus)
    got = _kl_swaps(conflict, where, node_of_pos, nodes, 2 * gpus)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[0] == where).all() if nodes == 1 else (got[0] != where).any()


@pytest.mark.parametrize(("scale", "by_product", "precision"),
                         [(1.0, True, "highest"), (1.0, True, "medium"), (64.0, False, "highest")])
def test_the_product_search_makes_the_plain_formulations_swaps(
        monkeypatch, scale, by_product, precision):
    # the full search scores every pair with one batched product where each bin's row of
    # |conflict| sums to at most 256 (exact even in bfloat16, which "medium" precision
    # may use), the gather search elsewhere: the same swaps either way
    import eplb.core.node_labels as node_labels

    used = []
    real = node_labels._best_swap_by_product
    monkeypatch.setattr(node_labels, "_best_swap_by_product",
                        lambda *args: used.append(1) or real(*args))
    gen = torch.Generator().manual_seed(11)
    gpus, nodes, slots, layers, experts = 32, 4, 6, 4, 40
    weight = torch.exp(torch.randn(layers, experts, generator=gen, dtype=torch.float64))
    phy2log = torch.stack([torch.multinomial(row / row.sum(), gpus * slots, replacement=True,
                                             generator=gen) for row in weight])
    conflict = node_conflicts(phy2log, gpus, experts) * scale
    assert (float(conflict.abs().sum(2).max()) <= 256) == by_product
    where = torch.stack([torch.randperm(gpus, generator=gen) for _ in range(layers)])
    node_of_pos = torch.arange(gpus) // (gpus // nodes)
    want = plain_kl_swaps(conflict, where, node_of_pos, nodes, 2 * gpus)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        got = _kl_swaps(conflict, where, node_of_pos, nodes, 2 * gpus)
    finally:
        torch.set_float32_matmul_precision(before)
    assert bool(used) == by_product
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[0] != where).any()


def test_the_search_is_exact_where_float32_products_round(monkeypatch):
    # a caller's torch.set_float32_matmul_precision("medium") lets float32 products run in
    # bfloat16 on CPUs that have it (TF32 on CUDA): 8 bits of mantissa. The search's table
    # of each bin's conflict with every node was such a product, of counts far above 256
    # here; emulated by a batched product that rounds its operands so, it must still make
    # the plain search's swaps
    real_bmm = torch.bmm

    def bfloat16_bmm(a, b, *args, **kwargs):
        if a.dtype == torch.float32:
            a, b = a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()
        return real_bmm(a, b, *args, **kwargs)

    gen = torch.Generator().manual_seed(5)
    gpus, nodes, slots, layers, experts = 32, 4, 6, 4, 40
    weight = torch.exp(torch.randn(layers, experts, generator=gen, dtype=torch.float64))
    phy2log = torch.stack([torch.multinomial(row / row.sum(), gpus * slots, replacement=True,
                                             generator=gen) for row in weight])
    conflict = node_conflicts(phy2log, gpus, experts) * 257.0  # odd: bfloat16 rounds it
    where = torch.stack([torch.randperm(gpus, generator=gen) for _ in range(layers)])
    node_of_pos = torch.arange(gpus) // (gpus // nodes)
    want = plain_kl_swaps(conflict, where, node_of_pos, nodes, 2 * gpus)
    monkeypatch.setattr(torch, "bmm", bfloat16_bmm)
    got = _kl_swaps(conflict, where, node_of_pos, nodes, 2 * gpus)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_searchs_minimum_is_the_flat_minimums_first_place(dtype):
    # the search takes each row's minimum in steps (row minima, the first row holding the
    # least, its first such column); with many ties, and +inf, it must be the place a
    # min over the flattened rows gives (the first in row-major order)
    from eplb.core.node_labels import _first_min

    gen = torch.Generator().manual_seed(3)
    gain = torch.randint(-2, 3, (50, 12, 12), generator=gen).to(dtype)
    gain[gain > 1] = float("inf")
    gain[0] = float("inf")  # a row with nothing to gain
    want_best, flat = gain.reshape(50, -1).min(1)
    best, a, b = _first_min(gain)
    assert torch.equal(best, want_best)
    assert torch.equal(a, flat // 12) and torch.equal(b, flat % 12)
