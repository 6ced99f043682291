"""The packing lower bound for fixed counts (eplb.core.count_bounds) never exceeds the
best packing, found by brute force over every way to fill P GPUs with S items each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import best_packing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eplb.core.count_bounds import bound_is_mean, packing_bound, rank_allocations
from eplb.core.options import PlanOptions
from eplb.core.replication import expand_replicas, replica_counts


@given(
    gpus=st.integers(1, 3),
    slots=st.integers(1, 3),
    data=st.data(),
)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_packing_bound_is_a_lower_bound(gpus, slots, data):
    n = gpus * slots
    x = sorted(data.draw(st.lists(st.floats(0, 100), min_size=n, max_size=n)), reverse=True)
    bound = packing_bound(np.array([x]), gpus)[0]
    assert bound <= best_packing(x, gpus) + 1e-9
    assert bound >= sum(x) / gpus - 1e-9  # never below the mean


def test_packing_bound_sees_coarse_items():
    # three GPUs of three slots: the 9-load item needs two partners, at least 1 + 1; the
    # ceiling's bound max(mean, largest item) is only 9
    x = np.array([[9.0, 2, 2, 2, 2, 2, 1, 1, 1]])
    assert packing_bound(x, 3)[0] == pytest.approx(11.0)
    assert best_packing(list(x[0]), 3) == pytest.approx(11.0)


def test_rank_allocations_keeps_the_smallest_bounds_in_portfolio_order_on_ties():
    items = torch.tensor([[4.0, 1, 1, 0], [3.0, 2, 1, 0], [4.0, 1, 1, 0]])
    groups = torch.tensor([[0], [1], [2]])  # three candidate allocations of one row
    kept = rank_allocations(items, 2, groups, 2)
    assert kept.tolist() == [[1], [0]]  # bound 3 first, then the first of the two ties


@given(
    rows=st.integers(1, 6),
    experts=st.integers(4, 24),
    gpus=st.integers(2, 8),
    slots=st.integers(3, 4),
    skew=st.floats(0.2, 3.0),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_a_row_whose_first_bound_is_the_mean_is_ranked_first(
    rows, experts, gpus, slots, skew, seed
):
    # the planner skips the rest of the portfolio in such rows (eplb.core.policies.base):
    # exact only if rank_allocations would have kept the first allocation there anyway
    replicas = gpus * slots
    if replicas < experts:
        return
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(skew * torch.randn(rows, experts, generator=g, dtype=torch.float64))
    rules = PlanOptions().rules
    counts = replica_counts(w, replicas, rules)  # [A, rows, E]
    items = torch.cat([expand_replicas(w, counts[a])[0] for a in range(len(rules))])
    groups = torch.arange(len(rules) * rows).view(len(rules), rows)
    first = rank_allocations(items, gpus, groups, 1)[0]
    at_mean = bound_is_mean(items[:rows], gpus)
    assert (first[at_mean] == groups[0][at_mean]).all()
