"""The move price follows the slots per GPU (``IncrementalOptions.layer_price``): moving
all of a layer's slots sends ``S`` experts' weights into each GPU at ``S`` slots per GPU,
so ``move_price`` (stated at 9 slots per GPU) costs ``move_price × S / 9`` there."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import replan_drifted

from eplb.core.options import IncrementalOptions
from eplb.online import score


def test_layer_price_follows_the_slots_per_gpu() -> None:
    options = IncrementalOptions(move_price=0.018)
    assert options.layer_price(9) == 0.018  # the shape the price is stated at, exactly
    assert options.layer_price(2) == pytest.approx(0.004)
    assert options.layer_price(18) == pytest.approx(0.036)
    assert IncrementalOptions(move_price=0.0).layer_price(2) == 0.0
    for bad in (0, -3, 2.5, True, "9"):
        with pytest.raises(ValueError, match="slots_per_gpu"):
            options.layer_price(bad)


def test_two_slot_moves_pay_the_price_of_their_bytes() -> None:
    """At 2 slots per GPU every layer's move gains at least the two-slot price × the share
    of its slots moved on the expected next window, and some gain less than the price of
    9 slots per GPU would ask (moves a price blind to the slots per GPU refused; at a
    weak drift, 0.05, where the gains are small). Global and hierarchical."""
    replicas, gpus = 96, 48
    options = IncrementalOptions()
    price = options.layer_price(replicas // gpus)
    cheap = 0
    for num_nodes, num_groups in ((1, 1), (2, 4)):
        for seed in range(3):
            drifted, old, new = replan_drifted(seed, 0.05, replicas, gpus, num_nodes,
                                               num_groups)
            both = np.stack([old.phy2log.numpy(), new.phy2log.numpy()])
            peak = score.expected_peak(drifted.numpy(), both, gpus, options.drift,
                                       groups=num_groups,
                                       group_share=options.group_share)[0]
            gain = 1.0 / peak[1] - 1.0 / peak[0]
            share = (both[1] != both[0]).mean(1)
            assert bool((gain >= price * share - 1e-9).all()), (gain, share)
            cheap += int(((share > 0) & (gain < options.move_price * share)).sum())
    assert cheap > 0


@pytest.mark.parametrize(("num_nodes", "num_groups"), [(1, 1), (4, 8)],
                         ids=["global", "hierarchical"])
@pytest.mark.parametrize("replicas", [64, 128], ids=["no spare slot", "spare slots"])
def test_one_slot_per_gpu_moves_only_replica_counts(num_nodes: int, num_groups: int,
                                                    replicas: int) -> None:
    """With one slot per GPU a plan with the placement in force's replica counts has its
    GPU loads on other GPUs: no move can pay, whatever the score's draws say (review
    pass: 910 slots moved at 256 experts on 256 GPUs, hierarchical, for nothing)."""
    for seed in range(3):
        drifted, old, new = replan_drifted(seed, 0.3, replicas, replicas, num_nodes,
                                           num_groups, experts=64)
        moved = (new.phy2log != old.phy2log).any(1)
        same_counts = (new.logcnt == old.logcnt).all(1)
        assert not bool((moved & same_counts).any()), (moved, same_counts)
        assert (new.layer_balancedness(drifted)
                >= old.layer_balancedness(drifted) - 1e-12).all()
    if replicas == 64:  # every expert once: nothing can move at all
        assert not bool(moved.any())
