"""The nearest-dispatch plan's node relabelling search (``_kl_swaps``) makes the same
swaps as its plain formulation: a fresh conflict-by-node product in float64 every step.
It keeps that product up to date swap by swap and runs in float32 where every sum is an
integer below 2**24 (about twice as fast at 256–512 GPUs); both must change no swap."""

from __future__ import annotations

import pytest
import torch

from eplb.core.dispatch_plan import _kl_swaps, node_conflicts


def plain_kl_swaps(conflict, where, node_of_pos, num_nodes, steps):
    """The search as first written: every step recomputes each bin's conflict with every
    node from scratch (float64 products of integer counts)."""
    rows, num_bins = where.shape
    eye = torch.eye(num_nodes, dtype=conflict.dtype)
    where = where.clone()
    active = torch.arange(rows)
    searched, twice = conflict, 2 * conflict
    for _ in range(steps):
        y = node_of_pos[where[active]]
        m = torch.bmm(searched, eye[y])
        own = m.gather(2, y[:, :, None])[..., 0]
        cross = m.gather(2, y[:, None, :].expand(-1, num_bins, -1))
        half = cross.sub_(own[:, :, None])
        gain = half.transpose(1, 2).add(half).sub_(twice)
        gain.masked_fill_(y[:, :, None] == y[:, None, :], 0.0)
        best, flat = gain.flatten(1).min(1)
        todo = best < -1e-9
        if not bool(todo.any()):
            break
        moving = todo.nonzero()[:, 0]
        a, b = flat[moving] // num_bins, flat[moving] % num_bins
        row = active[moving]
        wa, wb = where[row, a], where[row, b]
        where[row, a], where[row, b] = wb, wa
        if len(moving) < len(active):
            active, searched, twice = row, searched[moving], twice[moving]
    y = node_of_pos[where]
    same = (y[:, :, None] == y[:, None, :]).to(conflict.dtype)
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
