"""Arguments of the public API as users pass them (issue 11, items 6 and 9): integer
scalars of any type, boolean masks only, sparse, meta, fake, nested and quantized tensors.

Loads of any scale and layout: ``test_api_inputs_values.py``; the other options:
``test_api_inputs_options.py`` (which draws from ``G`` here, after these tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eplb
from eplb import Placement
from eplb.online import Rebalancer

G = torch.Generator().manual_seed(0)
W = (torch.rand(8, 64, generator=G) ** 3 * 1000).float()


def test_integer_scalars_of_any_type():
    want = eplb.plan(W, 96, 16).phy2log
    for r, p in ((np.int64(96), np.int64(16)), (np.int32(96), torch.tensor(16))):
        assert torch.equal(eplb.plan(W, r, p).phy2log, want)
    assert eplb.Topology(np.int64(96), np.int16(16)).num_gpus == 16


def test_integer_knobs_take_integer_scalars_of_any_type():
    # the float knobs took NumPy and 0-d tensor numbers, the integer ones refused them:
    # refine_steps=np.int64(3) raised "refine_steps must be an integer >= 0, got
    # np.int64(3)", and so did num_candidates, pair_steps, max_steps, the ladder's steps
    # and the Rebalancer's window and interval
    want = eplb.plan(W, 96, 16, num_candidates=2, refine_steps=3).phy2log
    got = eplb.plan(W, 96, 16, num_candidates=np.int64(2), refine_steps=torch.tensor(3))
    assert torch.equal(got.phy2log, want)
    packing = eplb.PackingOptions(num_candidates=np.int32(2), pair_steps=np.uint8(1),
                                  max_steps=torch.tensor(3))
    assert packing == eplb.PackingOptions(num_candidates=2, pair_steps=1, max_steps=3)
    assert eplb.IncrementalOptions(steps=np.int64(2)) == eplb.IncrementalOptions(steps=2)
    rb = Rebalancer(96, 16, window=np.int64(4), interval=torch.tensor(2))
    assert (rb.window, rb.interval) == (4, 2) and type(rb.window) is int
    for bad in (True, np.bool_(True), 2.0, np.float64(2), "2", -1):
        with pytest.raises(ValueError, match="max_steps must be an integer >= 0"):
            eplb.PackingOptions(max_steps=bad)
        with pytest.raises(ValueError, match="window must be a positive integer"):
            Rebalancer(96, 16, window=bad)


@pytest.mark.parametrize("bad", [1.0, np.float64(16), True, "16", 0, -3])
def test_non_integers_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="num_gpus must be a positive integer"):
        eplb.plan(W, 96, bad)


@pytest.mark.parametrize("ids", [[0, 1, 2, 3], torch.tensor([1, 1, 0, 1] * 4), np.arange(16)])
def test_active_gpus_must_be_a_boolean_mask(ids):
    """A list of ids ([0, 1, 2, 3]) used to be read as a mask that kills GPU 0."""
    with pytest.raises(TypeError, match=r"boolean mask.*live\[dead_ids\] = False"):
        eplb.plan(W, 96, 16, active_gpus=ids)


def test_boolean_masks_of_every_kind_work():
    mask = [True] * 16
    mask[3] = False
    for given in (mask, np.array(mask), torch.tensor(mask)):
        p = eplb.plan(W, 96, 16, active_gpus=given)
        assert (p.phy2log[:, 18:24] == -1).all()
    with pytest.raises(ValueError, match="every GPU dead"):
        eplb.plan(W, 96, 16, active_gpus=[False] * 16)


def test_sparse_loads_plan_like_dense_ones():
    assert torch.equal(eplb.plan(W.to_sparse(), 96, 16).phy2log, eplb.plan(W, 96, 16).phy2log)


def test_meta_tensors_are_refused_clearly():
    with pytest.raises(TypeError, match="meta tensor"):
        eplb.plan(torch.empty(8, 64, device="meta"), 96, 16)


def test_fake_tensors_are_refused_clearly():
    # tensors made under torch's FakeTensorMode (tracing) have a shape and no values: a
    # weight raised "RuntimeError: .numpy() is not supported for tensor subclasses" from
    # inside the planner (attacker pass), a previous map and a budget alike
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = eplb.plan(W, 96, 16)
    with FakeTensorMode():
        fake_weight = torch.rand(8, 64)
        fake_map = torch.zeros(8, 96, dtype=torch.int64)
        fake_budget = torch.tensor(4)
    with pytest.raises(TypeError, match="weight is a fake tensor"):
        eplb.plan(fake_weight, 96, 16)
    with pytest.raises(TypeError, match="previous must be a dense tensor with data, got a fake"):
        eplb.plan(W, 96, 16, previous=fake_map)
    with pytest.raises(ValueError, match="max_moves is a fake tensor"):
        eplb.plan(W, 96, 16, previous=real, max_moves=fake_budget)



def test_fake_and_meta_masks_speeds_sources_and_maps_are_refused_by_name():
    # they raised DataDependentOutputException or "Cannot copy out of meta tensor" from
    # inside the input parsing, the placement record and the vLLM plugin (attacker pass)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from eplb.integrations.vllm import EplbPolicy

    with FakeTensorMode():
        fake_mask, fake_speed = torch.ones(16, dtype=torch.bool), torch.ones(16)
        fake_map = torch.zeros(8, 96, dtype=torch.int64)
    meta_mask = torch.ones(16, dtype=torch.bool, device="meta")
    for mask, kind in ((fake_mask, "fake"), (meta_mask, "meta")):
        with pytest.raises(TypeError, match=f"active_gpus is a {kind} tensor"):
            eplb.plan(W, 96, 16, active_gpus=mask)
    with pytest.raises(TypeError, match="gpu_speed is a fake tensor"):
        eplb.plan(W, 96, 16, gpu_speed=fake_speed)
    with pytest.raises(TypeError, match="source is a fake tensor"):
        eplb.plan(W, 96, 16, 2, policy="global", dispatch="nearest", source=fake_speed)
    with pytest.raises(TypeError, match="phy2log is a fake tensor"):
        Placement.from_phy2log(fake_map, 64, eplb.Topology(96, 16))
    with pytest.raises(TypeError, match="weight is a meta tensor"):
        EplbPolicy.rebalance_experts(W.to("meta"), 96, 1, 1, 16, None)
    with pytest.raises(TypeError, match="old_global_expert_indices is a fake tensor"):
        EplbPolicy.rebalance_experts(W, 96, 1, 1, 16, fake_map)
    # sizes and knobs as meta tensors: "Tensor.item() cannot be called on meta tensors"
    with pytest.raises(ValueError, match="num_replicas must be a positive integer"):
        eplb.plan(W, torch.tensor(96, device="meta"), 16)
    with pytest.raises(ValueError, match=r"skip_threshold must be a fraction in \[0, 1\)"):
        eplb.plan(W, 96, 16, previous=eplb.plan(W, 96, 16),
                  skip_threshold=torch.tensor(0.01, device="meta"))


def test_sparse_masks_speeds_and_sources_are_refused_by_name():
    # sparse loads are densified, but a sparse live mask, speed or token-source vector
    # raised torch's own "Could not run 'aten::all' ... 'SparseCPU' backend" (review pass)
    live = torch.ones(16, dtype=torch.bool)
    live[3] = False
    speed = torch.tensor([1.0] * 8 + [2.0] * 8)
    for layout, to_layout in (("sparse_coo", torch.Tensor.to_sparse),
                              ("sparse_csr", lambda t: t[None].to_sparse_csr())):
        with pytest.raises(TypeError, match=rf"active_gpus is a torch\.{layout} tensor; "
                                            "expected a dense one"):
            eplb.plan(W, 96, 16, active_gpus=to_layout(live))
        with pytest.raises(TypeError, match=rf"gpu_speed is a torch\.{layout} tensor"):
            eplb.plan(W, 96, 16, gpu_speed=to_layout(speed))
    placement = eplb.plan(W, 96, 16)
    with pytest.raises(TypeError, match=r"gpu_speed is a torch\.sparse_coo tensor"):
        placement.balancedness(W, gpu_speed=speed.to_sparse())
    with pytest.raises(TypeError, match=r"active_gpus is a torch\.sparse_coo tensor"):
        Placement.from_phy2log(placement.phy2log, 64, placement.topology,
                               active_gpus=live.to_sparse())
    with pytest.raises(TypeError, match=r"phy2log is a torch\.sparse_coo tensor"):
        Placement.from_phy2log(placement.phy2log.to_sparse(), 64, placement.topology)
    with pytest.raises(TypeError, match=r"source is a torch\.sparse_coo tensor"):
        eplb.plan(W, 96, 16, 2, policy="global", dispatch="nearest",
                  source=torch.ones(16).to_sparse())


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor", "ignore:The PyTorch API of nested")
def test_sparse_nested_and_quantized_move_budgets_are_refused_by_name():
    # torch's own errors: "can't convert Sparse layout tensor to numpy", "NestedTensorImpl
    # doesn't support sizes", "Got unsupported ScalarType QInt32" (review pass)
    previous = eplb.plan(W, 96, 16)
    budgets = {r"torch\.sparse_coo": torch.tensor([3, 0] * 4).to_sparse(),
               "nested": torch.nested.nested_tensor([torch.tensor([3] * 8)]),
               "quantized": torch.quantize_per_tensor(torch.full((8,), 3.0), 1.0, 0,
                                                      torch.qint32)}
    for kind, budget in budgets.items():
        with pytest.raises(ValueError, match=f"max_moves is a {kind} tensor; give an int"):
            eplb.plan(W, 96, 16, previous=previous, max_moves=budget)
        with pytest.raises(ValueError, match=f"max_moves is a {kind} tensor"):
            Rebalancer(96, 16, incremental=True, max_moves=budget)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor", "ignore:The PyTorch API of nested")
def test_nested_and_quantized_maps_masks_and_speeds_are_refused_by_name():
    # a map in force of either kind raised torch's internal errors ("NestedTensorImpl
    # doesn't support sizes", "isSignedType not supported for quantized types") from
    # eplb.plan, Placement and both engine plugins, whose loads were refused by name
    # (review pass)
    from eplb.integrations.sglang import eplb_rebalance
    from eplb.integrations.vllm import EplbPolicy

    real = eplb.plan(W, 96, 16).phy2log
    maps = {"nested": torch.nested.nested_tensor(list(real)),
            "quantized": torch.quantize_per_tensor(real.float(), 1.0, 0, torch.qint32)}
    for kind, old in maps.items():
        with pytest.raises(TypeError, match=f"previous must be a dense tensor with data, "
                                            f"got a {kind}"):
            eplb.plan(W, 96, 16, previous=old)
        with pytest.raises(TypeError, match=f"got a {kind}"):
            eplb.rebalance_experts(W, 96, 1, 1, 16, old_phy2log=old)
        with pytest.raises(TypeError, match=f"phy2log is a {kind} tensor"):
            Placement.from_phy2log(old, 64, eplb.Topology(96, 16))
        with pytest.raises(TypeError, match=f"old_global_expert_indices is a {kind} tensor"):
            EplbPolicy.rebalance_experts(W, 96, 1, 1, 16, old)
        with pytest.raises(TypeError, match=f"old_phy2log is a {kind} tensor"):
            eplb_rebalance(W, 96, 6, None, 1, False, old_phy2log=old)
    ones = torch.ones(16)
    for kind, value in (("nested", torch.nested.nested_tensor([ones])),
                        ("quantized", torch.quantize_per_tensor(ones, 1.0, 0, torch.qint32))):
        for name in ("active_gpus", "gpu_speed"):
            with pytest.raises(TypeError, match=f"{name} is a {kind} tensor"):
                eplb.plan(W, 96, 16, **{name: value})


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor", "ignore:The PyTorch API of nested")
def test_nested_and_quantized_routing_traces_are_refused_by_name():
    # a nested trace raised torch's "Internal error: NestedTensorImpl doesn't support
    # sizes" from the shape check, a quantized one a shape error for the right shape
    w = torch.rand(2, 8)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(10)]).reshape(5, 2, 2)
    traces = {"nested": torch.nested.nested_tensor(list(ids)),
              "quantized": torch.quantize_per_tensor(ids.float(), 1.0, 0, torch.qint32)}
    for kind, routing in traces.items():
        with pytest.raises(TypeError, match=f"routing must be a dense tensor with data, "
                                            f"got a {kind} tensor"):
            eplb.plan(w, 16, 4, 2, 2, policy="locality", dispatch="nearest", routing=routing)
    eplb.plan(w, 16, 4, 2, 2, policy="locality", dispatch="nearest", routing=ids).validate()


def _same(a, b) -> bool:
    return torch.equal(a.phy2log, b.phy2log)


def test_numpy_and_tensor_scalars_work_as_knobs():
    weight = torch.rand(4, 16, generator=G) * 10
    before = eplb.plan(weight, 32, 8)
    after = weight * 1.5 + 1

    def again(**knobs):
        return eplb.plan(after, 32, 8, previous=before, **knobs)

    assert _same(eplb.plan(weight, 32, 8, seed=np.int64(3)), eplb.plan(weight, 32, 8, seed=3))
    for knob, value in (("drift", 0.3), ("move_price", 0.01)):
        want = again(**{knob: value})
        for same in (np.float32(value), np.float64(value), torch.tensor(value)):
            assert _same(again(**{knob: same}), want)
        with pytest.raises(ValueError, match=knob):
            again(**{knob: True})
        # an int past float's range raised OverflowError (review pass)
        with pytest.raises(ValueError, match=knob):
            again(**{knob: 10**400})
    budget = again(max_moves=5)
    for same in (np.int64(5), torch.tensor(5), np.array(5)):
        assert _same(again(max_moves=same), budget)
    with pytest.raises(ValueError, match="max_moves"):
        again(max_moves=5.0)
    # integer 0-d tensors too, and skip_threshold like the others (an attack pass)
    assert _same(again(drift=torch.tensor(1)), again(drift=1.0))
    want = again(skip_threshold=0.001)
    for same in (np.float64(0.001), torch.tensor(0.001, dtype=torch.float64)):
        assert _same(again(skip_threshold=same), want)
    with pytest.raises(ValueError, match="skip_threshold"):
        again(skip_threshold=torch.tensor(True))



@pytest.mark.parametrize("dispatch", ["even", "nearest"])
def test_a_per_layer_budget_beyond_int64_means_no_limit_and_bools_are_refused(dispatch):
    # a total of 10**30 worked, but a list of them was refused as "not non-negative ints"
    # (NumPy read it as objects or floats); [True, 2] was read as [1, 2] (attack pass 14)
    weight = torch.rand(2, 8, generator=torch.Generator().manual_seed(0)) * 100
    vllm = (torch.arange(16) % 8).expand(2, 16).clone()

    def again(max_moves):
        return eplb.plan(weight, 16, 4, 2, 2, policy="global", dispatch=dispatch,
                         previous=vllm, max_moves=max_moves)

    unlimited = again([1 << 62, 1 << 62])
    for huge in ([10**30, 10**30], [2**63, 2**64], [np.uint64(2**64 - 1), 10**19]):
        assert _same(again(huge), unlimited)
    assert _same(again([2**63, 0]), again([1 << 62, 0]))
    with pytest.raises(ValueError, match="max_moves per layer must be ints"):
        again([True, 2])
    with pytest.raises(ValueError, match="max_moves"):
        again([1.0, 2.0])
