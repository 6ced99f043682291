"""Incremental rebalancing: what ``previous=``, ``max_moves=`` and ``skip_threshold=``
refuse, with errors that name what is wrong (the planning itself: test_incremental.py and
the test_incremental_*.py files it names)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_contract
from test_incremental import W1, E, L, P, R, old_plan

import eplb
import eplb.online
from eplb.core.planner import make_request


def test_bad_previous():
    old = old_plan("global", 1, 1)
    with pytest.raises(ValueError, match=r"previous placement has shape \(6, 32\)"):
        eplb.plan(W1, R, P, previous=old.phy2log[:, :32])
    with pytest.raises(ValueError, match=r"previous placement has shape \(5, 40\)"):
        eplb.plan(W1, R, P, previous=old.phy2log[:5])
    bad = old.phy2log.clone()
    bad[0, 0] = E
    with pytest.raises(ValueError, match=r"outside \[-1, 32\)"):
        eplb.plan(W1, R, P, previous=bad)
    with pytest.raises(TypeError, match="previous phy2log must hold integer expert ids"):
        eplb.plan(W1, R, P, previous=old.phy2log.double())


@pytest.mark.parametrize(("field", "message"), [
    ("topology", "previous placement's topology is a NoneType, expected an eplb.Topology"),
    ("phy2log", "previous placement's phy2log is a NoneType, expected a torch.Tensor"),
])
def test_a_previous_placement_edited_by_hand_is_named(field, message):
    # (attacker pass: dataclasses.replace(plan, topology=None) met an AttributeError)
    import dataclasses

    bad = dataclasses.replace(old_plan("global", 1, 1), **{field: None})
    with pytest.raises(TypeError, match=message):
        eplb.plan(W1, R, P, previous=bad)


def test_bad_budget_arguments():
    old = old_plan("global", 1, 1)
    with pytest.raises(ValueError, match=r"max_moves must be a non-negative int.*got -1"):
        eplb.plan(W1, R, P, previous=old, max_moves=-1)
    with pytest.raises(ValueError, match=r"one int per layer, 6; got 3: \[1, 2, 3\]"):
        eplb.plan(W1, R, P, previous=old, max_moves=[1, 2, 3])
    # a long wrong list is counted and quoted short (it printed every value)
    with pytest.raises(ValueError, match=r"got 5000: \[0, 1, 2, 3, 4, 5, \.\.\.\]$"):
        eplb.plan(W1, R, P, previous=old, max_moves=list(range(5000)))
    with pytest.raises(ValueError, match=r"got 5000: tensor\(\[.{1,40}\]\)$"):
        eplb.plan(W1, R, P, previous=old, max_moves=torch.arange(5000))
    # as given, not as capped, and an empty list as an empty tensor (attacker pass)
    with pytest.raises(ValueError, match=r"got 1: \[1000000.*0000\]$"):
        eplb.plan(W1, R, P, previous=old, max_moves=[10**40])
    with pytest.raises(ValueError, match=r"one int per layer, 6; got 0: \[\]$"):
        eplb.plan(W1, R, P, previous=old, max_moves=[])
    with pytest.raises(ValueError, match="need the previous placement"):
        eplb.plan(W1, R, P, max_moves=5)
    with pytest.raises(ValueError, match="need the previous placement"):
        eplb.plan(W1, R, P, skip_threshold=0.1)
    with pytest.raises(ValueError, match=r"skip_threshold must be a fraction in \[0, 1\)"):
        eplb.plan(W1, R, P, previous=old, skip_threshold=-0.5)
    # a rise in balancedness is below 1: 2 (meant as "2 %") switched rebalancing off
    # without a word (new-user pass)
    for value in (1, 2.0, np.float64(100)):
        with pytest.raises(ValueError, match=r"fraction in \[0, 1\) .*0\.01 is 1 %.*"
                                             r"max_moves=0 keeps the map in force"):
            eplb.plan(W1, R, P, previous=old, skip_threshold=value)
    with pytest.raises(ValueError, match="gpu_speed cannot be combined with previous"):
        eplb.plan(W1, R, P, previous=old, gpu_speed=torch.arange(1.0, P + 1))
    # equal speeds are equal GPUs (attacker pass): they plan from the placement in force
    eplb.plan(W1, R, P, previous=old, gpu_speed=torch.ones(P)).validate()
    # the message shows the value as given (it read np.float32(5.0) for a float tensor)
    with pytest.raises(ValueError, match=r"got tensor\(5\.\)$"):
        eplb.plan(W1, R, P, previous=old, max_moves=torch.tensor(5.0))
    # also where a caller builds the request itself (the attacker's pass: only eplb.plan
    # and the Rebalancer refused it; plan_incremental planned for equal GPUs in silence)
    request = make_request(W1, R, P, gpu_speed=torch.tensor([1.0] * (P - 1) + [3.0]))
    with pytest.raises(ValueError, match="gpu_speed cannot be combined with previous"):
        eplb.online.plan_incremental(request, old)


def test_unsigned_previous_ids_out_of_range_are_refused():
    """An unsigned id beyond int64 would wrap to -1 (an empty slot) if converted first."""
    old = (np.arange(R, dtype=np.uint64) % E).reshape(1, R).repeat(L, 0)
    assert_contract(eplb.plan(W1, R, P, previous=old.astype(np.uint8)))
    old[0, 0] = np.iinfo(np.uint64).max
    with pytest.raises(ValueError, match="expert ids outside"):
        eplb.plan(W1, R, P, previous=old)


def test_meta_tensor_budget_is_refused_by_name():
    # it raised NotImplementedError ("Cannot copy out of meta tensor"; attacker pass)
    w = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    old = eplb.plan(w, 24, 8, 2)
    with pytest.raises(ValueError, match="max_moves is a meta tensor"):
        eplb.plan(w, 24, 8, 2, previous=old, max_moves=torch.tensor(4, device="meta"))


def test_skip_threshold_takes_0d_numpy_numbers_as_0d_tensors():
    # torch.tensor(0.1) was taken and np.array(0.1) refused (attacker pass)
    old = eplb.plan(W1, R, P)
    for value in (np.array(0.1), np.array(0), torch.tensor(0.1)):
        eplb.plan(W1, R, P, previous=old, skip_threshold=value).validate()
    for value in (np.array([0.1]), np.array(True), np.array(-1.0), np.array(np.nan), np.array(1)):
        with pytest.raises(ValueError, match=r"skip_threshold must be a fraction in \[0, 1\)"):
            eplb.plan(W1, R, P, previous=old, skip_threshold=value)
