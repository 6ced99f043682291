"""The nearest plans' slot repairs (eplb.core.node_repair) keep their count tables up to
date swap by swap: after every swap each table is the one a rebuild gives, in the
repair of node pairs, the gathering of experts kept together and the realised-load
polish (dead GPU, token sources)."""

from __future__ import annotations

import pytest
import torch

import eplb
from eplb.core import node_repair
from eplb.core.map_tables import expert_counts

GPUS, SLOTS, LAYERS, EXPERTS = 16, 6, 4, 40


def random_map(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [L, E], phy2log [L, R])``: eplb's plan for the even split of skewed loads
    (hot experts with several replicas, none twice on a GPU), its GPUs shuffled per
    layer, so replicas of one expert often share a node."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.exp(torch.randn(LAYERS, EXPERTS, generator=gen, dtype=torch.float64))
    phy2log = eplb.plan(weight, GPUS * SLOTS, GPUS, policy="global").phy2log
    order = torch.stack([torch.randperm(GPUS, generator=gen) for _ in range(LAYERS)])
    shuffled = phy2log.view(LAYERS, GPUS, SLOTS).gather(1, order[:, :, None].expand(-1, -1, SLOTS))
    return weight, shuffled.reshape(LAYERS, -1)


@pytest.fixture
def checked_tables(monkeypatch):
    """Swaps seen (layer-swaps), each checked: the kept table equals a rebuilt one."""
    seen = []
    real = node_repair._move_counts

    def checking(table, unit_of_slot, out, rows, a, b, num_experts):
        real(table, unit_of_slot, out, rows, a, b, num_experts)
        rebuilt = node_repair._tally(out, unit_of_slot, table.shape[1], num_experts)
        assert torch.equal(table, rebuilt)
        seen.append(len(rows))

    monkeypatch.setattr(node_repair, "_move_counts", checking)
    return seen


@pytest.mark.parametrize("seed", range(3))
def test_the_node_pair_repair_keeps_its_tables(checked_tables, seed):
    weight, phy2log = random_map(seed)
    # eight nodes of 2 GPUs: experts of 3 to 8 replicas can be spread over distinct nodes
    out, swaps = node_repair.repair_node_pairs(weight, phy2log, GPUS, 8)
    assert int(swaps.sum()) > 0 and sum(checked_tables) == 2 * int(swaps.sum())
    assert torch.equal(expert_counts(out, EXPERTS), expert_counts(phy2log, EXPERTS))


@pytest.mark.parametrize("seed", range(3))
def test_gathering_together_keeps_its_tables(checked_tables, seed):
    weight, phy2log = random_map(seed)
    # two nodes of 8 GPUs: experts of 3 to 8 replicas can be kept on one
    attract = expert_counts(phy2log, EXPERTS) > 2
    _, swaps = node_repair.gather_together(weight, phy2log, GPUS, 2, attract)
    assert int(swaps.sum()) > 0 and sum(checked_tables) == 2 * int(swaps.sum())


@pytest.mark.parametrize("seed", range(3))
def test_the_realised_polish_keeps_its_table(checked_tables, seed):
    weight, phy2log = random_map(seed)
    live = torch.ones(GPUS, dtype=torch.bool)
    live[5] = False
    phy2log.view(LAYERS, GPUS, SLOTS)[:, 5] = -1
    source = torch.arange(1, GPUS + 1, dtype=torch.float64)
    node_repair.polish_realised(weight, phy2log, GPUS, 4, live, source)
    assert sum(checked_tables) > 0
