"""Loads of the public API as users pass them: any scale (huge, tiny, a node far colder than
its layer), scores in the loads' units, bad loads refused when scoring, and arrays of every
layout and dtype (nested, quantized, extended precision, big-endian, reversed, lazy views,
text, masked, raw bytes, read-only).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import assert_contract
from test_api_inputs import W

import eplb
from eplb.core import realised_gpu_loads
from eplb.online import Rebalancer


def test_a_node_far_colder_than_its_layer_plans_validly():
    # a hierarchical node of a layer whose other nodes are 1e300 times hotter held
    # subnormal loads after the layer's scaling: Hamilton's counts came out 5 replicas
    # short and planning raised "cannot reshape array of size 67" (attacker pass)
    exponents = [0, 0, 0, 0, 0, 0, 0, 300, 0, 0, 0, 100, -300, -300, -200, -20]
    w = torch.tensor([[10.0**x for x in exponents]], dtype=torch.float64)
    for policy in ("hierarchical", "auto"):
        planned = eplb.plan(w, 36, 12, 4, 4, policy=policy)
        assert_contract(planned)
        assert planned.policy == "hierarchical"
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = torch.pow(10.0, torch.randint(-300, 301, (3, 16), generator=g).double())
        for shape in ((36, 12, 4, 4), (24, 8, 4, 4), (48, 16, 4, 8)):
            assert_contract(eplb.plan(w, *shape, policy="hierarchical"))


@pytest.mark.parametrize("scale", [3e35, 1e-30])
def test_loads_of_any_scale_plan_alike(scale):
    """Rows are scaled by a power of two (exact): 1e35 in float32 no longer plans worse."""
    assert torch.equal(eplb.plan(W * scale, 96, 16).phy2log, eplb.plan(W, 96, 16).phy2log)


def test_balancedness_of_huge_loads_is_finite():
    w = W.double() * 1e305
    p = eplb.plan(w, 96, 16)
    assert p.balancedness(w) == pytest.approx(eplb.plan(W.double(), 96, 16).balancedness(W))
    assert torch.isfinite(p.layer_balancedness(w)).all()


@pytest.mark.parametrize("scale", [1e-301, 1e290])
def test_gpu_loads_are_in_the_units_of_the_loads(scale):
    """Loads beyond 2**±900 came back multiplied by a power of two (1e-301 loads as about
    0.1), unlike realised_gpu_loads(dispatch="even"), which the docs say equals them
    (found by the twelfth-session fuzz pass); balancedness keeps its exact rescale."""
    w = W.double() * scale
    p = eplb.plan(w, 96, 16)
    want = p.replica_loads(W.double()).view(8, 16, 6).sum(2) * scale
    assert torch.allclose(p.gpu_loads(w), want, rtol=1e-12, atol=0)
    assert torch.allclose(p.replica_loads(w), p.replica_loads(W.double()) * scale, rtol=1e-12,
                          atol=0)
    assert torch.allclose(realised_gpu_loads(w, p.phy2log, 16, dispatch="even"), p.gpu_loads(w),
                          rtol=1e-12, atol=0)
    assert p.balancedness(w) == pytest.approx(p.balancedness(W))
    assert torch.allclose(p.layer_balancedness(w), p.layer_balancedness(W))


def test_validate_finds_stacking_in_one_pass():
    p = eplb.plan(W, 96, 16)
    broken = p.phy2log.clone()
    broken[2, [0, 1]] = broken[2, [1, 0]]  # still valid: the same GPU
    eplb.Placement.from_phy2log(broken, 64, p.topology).validate()
    e = int(broken[5, 0])
    broken[5, 1] = e  # two replicas of e on GPU 0 (and one of another expert gone)
    with pytest.raises(eplb.PlacementError):
        eplb.Placement.from_phy2log(broken, 64, p.topology).validate()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("method", ["balancedness", "layer_balancedness", "gpu_loads"])
def test_scoring_a_placement_refuses_bad_loads(bad, method):
    placement = eplb.plan(torch.rand(3, 16) + 1, 32, 8)
    weight = torch.rand(3, 16)
    weight[1, 5] = bad
    with pytest.raises(ValueError, match=r"weight\[1, 5\]"):
        getattr(placement, method)(weight)
    # every accepted load type scores alike
    ones = [[1] * 16] * 3
    want = placement.balancedness(torch.ones(3, 16))
    assert placement.balancedness(ones) == want
    assert placement.balancedness(np.ones((3, 16), dtype=np.int32)) == want


@pytest.mark.filterwarnings("ignore:.*(nested tensors|quantize).*:UserWarning")
def test_nested_quantized_and_extended_precision_loads_are_refused_by_name():
    nested = torch.nested.nested_tensor([W[0], W[1]])
    with pytest.raises(TypeError, match="weight is a nested tensor"):
        eplb.plan(nested, 96, 16)
    quantized = torch.quantize_per_tensor(W, 1.0, 0, torch.quint8)
    with pytest.raises(TypeError, match="weight is a quantized tensor"):
        eplb.plan(quantized, 96, 16)
    if np.dtype(np.longdouble).itemsize > 8:
        with pytest.raises(TypeError, match="extended precision"):
            eplb.plan(W.numpy().astype(np.longdouble), 96, 16)


def test_big_endian_arrays_plan_like_native_ones():
    native = W.double().numpy()
    want = eplb.plan(native, 96, 16).phy2log
    assert torch.equal(eplb.plan(native.astype(">f8"), 96, 16).phy2log, want)


def test_reversed_and_big_endian_arrays_are_read_as_every_input_reads_them():
    # the loads took them, but active_gpus, previous, routing and Placement.from_phy2log
    # passed them to torch.as_tensor, which refuses negative strides and foreign byte
    # order with its own text ("At least one stride in the given numpy array is negative")
    w = W.double().numpy()[:, :16]
    base = eplb.plan(w, 32, 4)
    ids = base.phy2log.numpy()
    flipped = np.ascontiguousarray(ids[:, ::-1])
    for odd in (flipped[:, ::-1], ids.astype(">i8")):
        again = eplb.plan(w, 32, 4, previous=odd)
        assert torch.equal(again.phy2log, eplb.plan(w, 32, 4, previous=ids).phy2log)
        assert torch.equal(eplb.Placement.from_phy2log(odd, 16, base.topology).phy2log,
                           base.phy2log)
        assert base.moved_slots(odd).tolist() == [0] * base.num_layers
    live = np.array([True, False, True, True])
    assert torch.equal(eplb.plan(w, 32, 4, active_gpus=live[::-1].copy()[::-1]).phy2log,
                       eplb.plan(w, 32, 4, active_gpus=live).phy2log)
    rng = np.random.default_rng(0)
    routing = np.stack([[rng.permutation(16)[:2] for _ in range(w.shape[0])]
                        for _ in range(32)])
    kw = dict(policy="locality", dispatch="nearest")
    want = eplb.plan(w, 32, 4, 2, 4, routing=routing, **kw).phy2log
    reversed_k = np.ascontiguousarray(routing[:, :, ::-1])[:, :, ::-1]
    assert torch.equal(eplb.plan(w, 32, 4, 2, 4, routing=reversed_k, **kw).phy2log, want)


def test_lazy_views_numpy_cannot_read_plan_like_their_values():
    # negated views and autograd's zero tensors (no storage) take the torch path:
    # the same plan as the materialised loads, not a RuntimeError from .numpy()
    w = W.double()
    lazy = torch._neg_view(torch._neg_view(w))
    assert torch.equal(eplb.plan(lazy, 96, 16).phy2log, eplb.plan(w, 96, 16).phy2log)
    for dtype in (torch.float32, torch.float64):
        zero = torch._efficientzerotensor((8, 64), dtype=dtype)
        want = eplb.plan(torch.zeros(8, 64, dtype=dtype), 96, 16)
        assert torch.equal(eplb.plan(zero, 96, 16).phy2log, want.phy2log)
        assert want.balancedness(zero) == 1.0


def test_text_and_masked_loads_are_refused_by_name():
    # NumPy would parse "1" as a number, and plan a masked array on its masked entries
    with pytest.raises(TypeError, match="holds text"):
        eplb.plan([["1", "2", "3", "4"]], 8, 4)
    with pytest.raises(TypeError, match="masked array"):
        eplb.plan(np.ma.masked_array([[1.0, 2, 3, 4]], mask=[[0, 1, 0, 0]]), 8, 4)
    # ints beyond int64 are numbers: planned as float64
    assert eplb.plan([[10**30, 1, 2, 3]], 8, 4).phy2log.shape == (1, 8)


@pytest.mark.parametrize("raw", [bytes, bytearray])
def test_raw_bytes_are_no_numbers_whichever_their_type(raw):
    """Found by an attacker pass: ``bytes`` was refused as loads, ``bytearray`` planned
    on as its byte values (a list of ``bytearray`` rows too). Both are refused, as loads,
    counts, per-GPU values, routing and the placement in force; a ``memoryview`` carries
    its element type and stays accepted."""
    data = raw(range(1, 17))
    for value in (data, [data, data], [[1.0] * 16, data]):
        with pytest.raises(TypeError, match=f"weight (is|holds) {raw.__name__}: raw bytes"):
            eplb.plan(value, 16, 4)
    with pytest.raises(TypeError, match=f"counts holds {raw.__name__}"):
        Rebalancer(16, 4, window=2).record([data, data])
    with pytest.raises(TypeError, match=f"gpu_speed is {raw.__name__}"):
        eplb.plan(W[:, :16], 16, 4, gpu_speed=raw([1] * 4))
    with pytest.raises(TypeError, match=f"source is {raw.__name__}"):
        eplb.plan(W[:, :16], 16, 4, 2, dispatch="nearest", source=raw([1] * 4))
    with pytest.raises(TypeError, match=f"previous holds {raw.__name__}"):
        eplb.plan(W[:2, :16], 16, 4, previous=[raw(range(16))] * 2)
    with pytest.raises(TypeError, match=f"routing holds {raw.__name__}"):
        eplb.plan(W[:1, :16], 16, 4, 2, policy="locality", dispatch="nearest",
                  routing=[[raw([0, 1])]] * 4)
    with pytest.raises(TypeError, match=f"active_gpus is {raw.__name__}: raw bytes"):
        eplb.plan(W[:, :16], 16, 4, active_gpus=raw([1] * 4))
    typed = memoryview(np.arange(1.0, 17.0))
    assert torch.equal(eplb.plan(typed, 16, 4).phy2log,
                       eplb.plan(np.arange(1.0, 17.0), 16, 4).phy2log)


def test_read_only_arrays_plan_without_a_torch_warning():
    # torch warns that a read-only array makes a non-writable tensor: a caller running
    # with -W error failed (attacker pass); eplb copies such arrays
    loads = np.random.default_rng(0).random((2, 16))
    speed, live = np.ones(8), np.ones(8, dtype=bool)
    for array in (loads, speed, live):
        array.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eplb.plan(loads, 24, 8).validate()
        eplb.plan(loads, 24, 8, gpu_speed=speed, active_gpus=live).validate()
