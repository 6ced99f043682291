"""Secondary public helpers refuse arguments of the wrong kind with errors that name them
(found by the twelfth session's fuzz pass: these raised AttributeError, torch's 'ambiguous'
RuntimeError, ZeroDivisionError or OverflowError)."""

from __future__ import annotations

import pytest
import torch

import eplb
from eplb import Placement, Topology
from eplb.core.baselines import plan_greedy, rebalance_experts_greedy
from eplb.core.bounds import layer_lower_bound
from eplb.core.dispatch import remote_nodes_per_token
from eplb.online.estimate import expected_max
from eplb.online.planners import trivial_placement
from eplb.online.rebalancer import Rebalancer
from eplb.tools.simulate import simulate

W = torch.rand(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1


@pytest.fixture()
def placement() -> Placement:
    return eplb.plan(W, 16, 4, 2)


def test_trivial_placement_checks_its_counts():
    topo = Topology(16, 4)
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        trivial_placement(0, 2, topo)
    with pytest.raises(ValueError, match="num_layers must be an integer >= 0"):
        trivial_placement(8, -1, topo)
    with pytest.raises(ValueError, match="num_experts"):
        trivial_placement(8.0, 2, topo)
    with pytest.raises(TypeError, match=r"topology must be an eplb\.Topology"):
        trivial_placement(8, 2, (16, 4))
    assert trivial_placement(8, 2, topo).phy2log.shape == (2, 16)


@pytest.mark.parametrize("active", [[0, 1, 2, 3], [0.5] * 4, [1, 1, 0, 1]])
def test_trivial_placement_takes_a_boolean_mask_only(active):
    # as every planner: GPU ids (or 0.5) cast to bool were read as a mask, GPU 0 dead
    with pytest.raises(TypeError, match="boolean mask"):
        trivial_placement(8, 2, Topology(16, 4), active_gpus=active)
    with pytest.raises(ValueError, match="every GPU dead"):
        trivial_placement(8, 2, Topology(16, 4), active_gpus=[False] * 4)
    live = trivial_placement(8, 2, Topology(16, 4), active_gpus=torch.tensor([True, False] * 2))
    assert live.active_gpus.tolist() == [True, False, True, False]


def test_an_initial_placement_must_be_a_placement(placement):
    with pytest.raises(TypeError, match=r"initial must be an eplb\.Placement"):
        Rebalancer(16, 4, initial=1.5)
    with pytest.raises(TypeError, match=r"initial must be an eplb\.Placement"):
        simulate(torch.rand(4, 2, 8), num_replicas=16, num_gpus=4, initial=placement.phy2log)


def test_expected_max_needs_a_scenario(placement):
    with pytest.raises(ValueError, match="at least one scenario"):
        expected_max(placement, torch.empty(0, 2, 8))
    with pytest.raises(ValueError, match="at least one scenario"):
        expected_max(placement, [])


def test_placement_maps_of_none_and_huge_expert_counts_are_named(placement):
    with pytest.raises(TypeError, match="phy2log must be"):
        Placement.from_phy2log(None, 8, placement.topology)
    with pytest.raises(TypeError, match="previous must be"):
        placement.moved_slots(None)
    with pytest.raises(ValueError, match=r"num_experts=.* beyond"):
        Placement.from_phy2log(placement.phy2log, 10**20, placement.topology)


def test_moved_slots_checks_a_raw_previous_map(placement):
    # attacker pass: ids out of range, fractional ids and booleans were counted silently
    # (eplb.plan(previous=) refuses them), a string raised torch's own TypeError, and a
    # one-layer [R] map was refused beside rebalance_experts' own [R] output; the checks
    # are eplb.plan(previous=)'s own
    old = placement.phy2log
    with pytest.raises(ValueError, match=r"previous placement holds expert ids outside "
                                         r"\[-1, 8\)"):
        placement.moved_slots(old + 100)
    for bad in (old.double() + 0.5, old > 3):
        with pytest.raises(TypeError, match="previous phy2log must hold integer expert ids"):
            placement.moved_slots(bad)
    with pytest.raises(TypeError, match=r"previous must be a Placement or a phy2log tensor"):
        placement.moved_slots("abc")
    with pytest.raises(ValueError, match=r"previous placement has shape \(2, 15\), "
                                         r"expected \[2, 16\]"):
        placement.moved_slots(old[:, :-1])
    assert placement.moved_slots(old, per_gpu=True).tolist() == [0] * placement.topology.num_gpus
    emptied = old.clone()
    emptied[0, 0] = -1  # an empty slot in the old map: its new expert moves in
    assert int(placement.moved_slots(emptied).sum()) == 1
    one = Placement.from_phy2log(old[:1], 8, placement.topology)
    assert one.moved_slots(old[0]).tolist() == [0]


def test_remote_nodes_per_token_names_bad_arguments(placement):
    ids = torch.tensor([[[0, 1], [2, 3]]])  # one token, 2 layers, top-2
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        remote_nodes_per_token(placement.phy2log, ids, torch.tensor([1, 2]), 4, 2)
    with pytest.raises(TypeError, match="ids must be integer top-k ids"):
        remote_nodes_per_token(placement.phy2log, None, 8, 4, 2)
    with pytest.raises(TypeError, match="sources must be the"):
        remote_nodes_per_token(placement.phy2log, ids, 8, 4, 2, sources=placement)
    assert remote_nodes_per_token(placement.phy2log, ids, 8, 4, 2).shape == (2,)


def test_bounds_refuse_slot_counts_beyond_exact_arithmetic():
    with pytest.raises(ValueError, match="beyond what the bounds compute"):
        layer_lower_bound(W, 10**20, 4)


@pytest.mark.parametrize(("call", "named"), [
    (lambda: trivial_placement(16, 2**40, Topology(32, 8)), "1099511627776 layers × 32"),
    (lambda: trivial_placement(16, 2, Topology(2**40, 8)), f"2 layers × {2**40} slots"),
    (lambda: plan_greedy(torch.rand(2, 16), 2**40, 8), f"2 layers × {2**40} slots"),
    (lambda: rebalance_experts_greedy(torch.rand(2, 16), 2**40, 1, 1, 8), "2 layers"),
], ids=["trivial-layers", "trivial-slots", "plan_greedy", "rebalance_experts_greedy"])
def test_helpers_that_build_a_placement_of_a_shape_refuse_absurd_ones(call, named):
    # found by an attacker pass: these failed in torch's allocator ("can't allocate
    # memory: you tried to allocate 281474976710656 bytes"); the planners' size limit
    # (L·R slots over all layers) now refuses them first, naming the limit
    with pytest.raises(ValueError, match="beyond what eplb plans") as caught:
        call()
    assert named in str(caught.value) and "slots over all layers" in str(caught.value)


@pytest.mark.parametrize("call", [lambda w: eplb.plan(w, 16, 4),
                                  lambda w: eplb.rebalance_experts(w, 16, 1, 1, 4)])
def test_a_per_step_trace_is_told_to_sum_its_steps(call):
    """A new-user pass: a [T, L, E] tensor (what README tells vLLM users to save, and a
    LoadTrace's .counts) was refused as '3 dimensions' without saying what to pass."""
    with pytest.raises(ValueError, match=r"3 dimensions.*steps summed.*\.sum\(0\)"):
        call(W[None].repeat(3, 1, 1))


def test_a_file_name_for_loads_or_the_map_in_force_names_the_reader(placement, tmp_path):
    # new-user pass: eplb.plan("stats.json", ...) said only "got str", and
    # previous="placement.json" ended in NumPy's list of the dtypes torch converts;
    # the CLI takes files, the API takes what eplb.formats reads from them
    path = tmp_path / "placement.json"
    for name in (str(path), path):
        with pytest.raises(TypeError, match=r"got (str|PosixPath|WindowsPath); a file is read "
                                            r"with eplb\.formats\.read_loads\(path\)"):
            eplb.plan(name, 16, 4)
        with pytest.raises(TypeError, match=r"eplb\.formats\.read_loads\(path\)"):
            simulate(name, "eplb", num_replicas=16, num_gpus=4, cadence="adrs")
        with pytest.raises(TypeError, match=r"previous must be a Placement or a phy2log tensor "
                                            r"\[L, R\], got a \w+ \('.*placement\.json'\); .*"
                                            r"eplb\.formats\.read_placement\(path\)"):
            eplb.plan(W, 16, 4, 2, previous=name)
        with pytest.raises(TypeError, match=r"eplb\.formats\.read_placement\(path\)"):
            placement.moved_slots(name)
