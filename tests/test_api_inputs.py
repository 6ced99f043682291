"""Arguments of the public API as users pass them (issue 11, items 6 and 9): integer
scalars of any type, boolean masks only, sparse and meta tensors, and loads of any scale."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import assert_contract

import eplb
from eplb import Placement, PlacementError
from eplb.core import balancedness_ceiling, realised_gpu_loads
from eplb.online import MultiWindow, Rebalancer
from eplb.tools import generate_trace

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

def test_rebalance_experts_takes_previous_as_plan_calls_it():
    weight = torch.rand(4, 16, generator=G) * 10
    old = eplb.plan(weight, 32, 8)
    got = eplb.rebalance_experts(weight * 2 + 1, 32, 1, 1, 8, previous=old)[0]
    assert torch.equal(got, eplb.rebalance_experts(weight * 2 + 1, 32, 1, 1, 8,
                                                   old_phy2log=old.phy2log)[0])
    with pytest.raises(TypeError, match="once"):
        eplb.rebalance_experts(weight, 32, 1, 1, 8, previous=old, old_phy2log=old.phy2log)


def test_absurd_slots_per_gpu_are_refused_before_planning():
    with pytest.raises(ValueError, match="8192 slots per GPU on 8 GPUs"):
        eplb.plan(torch.rand(1, 64), 8 * 8192, 8)


@pytest.mark.parametrize(("shape", "replicas", "gpus", "named"), [
    ((1, 64), 196_611, 65_537, "at most 65536 GPUs"),  # the packing's 16-bit GPU index
    ((1000, 64), 65_536, 32_768, "at most 3.36e+07 slots over all layers"),
])
def test_problems_beyond_what_eplb_plans_are_refused_before_allocating(shape, replicas,
                                                                       gpus, named):
    with pytest.raises(ValueError, match="beyond what eplb plans") as caught:
        eplb.plan(torch.rand(*shape), replicas, gpus)
    assert named in str(caught.value)


def test_a_nearest_plan_past_its_call_size_is_refused_at_once(tmp_path):
    """One layer of 2048 experts on 2048 GPUs passed the per-layer bound and ran for 266 s
    with no word (attacker pass): the whole call's layers × GPUs³ × experts is bounded.
    In child processes with a timeout, so that a regression fails instead of hanging."""
    np.save(tmp_path / "loads.npy", np.random.default_rng(0).random((2, 2048)) * 1000)
    script = """if True:
        import torch, eplb
        for shape, gpus, nodes in (((1, 2048), 2048, 16), ((58, 1024), 1024, 4)):
            try:
                eplb.plan(torch.rand(*shape), 2 * gpus, gpus, nodes, policy="global",
                          dispatch="nearest")
            except ValueError as error:
                print(error)
    """
    api = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "1 layer of 2048 experts on 2048 GPUs" in api
    # a quarter of the per-layer bound, but 58 layers: about 17 minutes
    assert "58 layers of 1024 experts on 1024 GPUs (layers × GPUs³ × experts" in api
    cli = subprocess.run(
        [sys.executable, "-m", "eplb.cli", "plan", str(tmp_path / "loads.npy"), "-r", "4096",
         "-g", "2048", "--nodes", "16", "--policy", "global", "--dispatch", "nearest", "-o",
         str(tmp_path / "plan.json")], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "2 layers of 2048 experts on 2048 GPUs" in cli.stderr
    assert not (tmp_path / "plan.json").exists()


def test_few_experts_with_thousands_of_replicas_each_plan_in_little_memory():
    # the dealing's anti-affinity check compared an expert's replicas pairwise: 12 GiB here
    weight = torch.rand(1, 16, generator=G) ** 3 * 1000
    eplb.plan(weight, 262_144, 65_536).validate()


def test_the_cli_refuses_them_before_reading_a_plan(tmp_path, capsys):
    from eplb.cli import main
    torch.save(torch.rand(40, 26, 64), tmp_path / "trace.pt")
    for argv in (["simulate", str(tmp_path / "trace.pt"), "--window", "10"],
                 ["bench", "--no-builtin", str(tmp_path / "trace.pt")]):
        assert main([*argv, "-r", "2000000000", "-g", "1"]) == 2
        assert "beyond what eplb plans" in capsys.readouterr().err


def test_layers_packed_in_chunks_keep_the_contract(monkeypatch):
    """Many layers of many slots are packed a few rows at a time (flat memory)."""
    import eplb.core.packing as packing

    weight = torch.rand(12, 64, generator=G) ** 4 * 100
    whole = eplb.plan(weight, 256, 8)
    monkeypatch.setattr(packing, "SWAPS_PER_CHUNK", 4 * 32 * 32 * 3)  # 3 rows per chunk
    chunked = eplb.plan(weight, 256, 8).validate()
    assert abs(chunked.balancedness(weight) - whole.balancedness(weight)) < 0.01


def test_routing_and_previous_of_the_wrong_kind_are_named():
    w = torch.rand(2, 8)
    with pytest.raises(TypeError, match="routing must be integer top-k ids"):
        eplb.plan(w, 16, 4, 2, 2, policy="locality", dispatch="nearest", routing={"a": 1})
    meta = torch.empty(3, 2, 2, dtype=torch.long, device="meta")
    with pytest.raises(TypeError, match="meta"):
        eplb.plan(w, 16, 4, 2, 2, policy="locality", dispatch="nearest", routing=meta)
    with pytest.raises(TypeError, match="meta"):
        eplb.plan(w, 16, 4, previous=torch.empty(2, 16, dtype=torch.long, device="meta"))
    p = eplb.plan(w, 16, 4, 2, 2, policy="locality", dispatch="nearest", slack=np.float32(0.1))
    p.validate()
    # an int past float's range raised OverflowError (review pass)
    for bad in (10**400, -1, float("inf"), True, torch.tensor([0.1])):
        with pytest.raises(ValueError, match="slack must be a finite number >= 0"):
            eplb.plan(w, 16, 4, 2, 2, policy="locality", dispatch="nearest", slack=bad)


def test_options_that_would_be_ignored_are_refused():
    w = torch.rand(2, 16) + 0.1
    with pytest.raises(ValueError, match="move_price: only for incremental plans"):
        eplb.plan(w, 24, 4, move_price=0.01)
    with pytest.raises(ValueError, match="routing gives the locality policy"):
        eplb.plan(w, 24, 4, 2, 2, policy="global", dispatch="nearest",
                  routing=torch.zeros(5, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="fair and source"):
        eplb.plan(w, 24, 4, 2, 2, dispatch="nearest", fair="expect")  # auto: hierarchical
    eplb.plan(w, 24, 4, 2, 2, policy="global", dispatch="nearest", fair="expect").validate()


def test_a_slack_the_policy_does_not_use_is_refused():
    # found by the twelfth-session newcomer pass: slack=0.5 without the locality policy
    # was dropped without a word (the CLI's --slack was already refused there)
    w = torch.rand(2, 16) + 0.1
    for kwargs in ({}, {"dispatch": "nearest", "policy": "global"}):
        with pytest.raises(ValueError, match="slack is the locality policy's knob"):
            eplb.plan(w, 24, 4, 2, 2, slack=0.5, **kwargs)
    from eplb.online import Rebalancer
    with pytest.raises(ValueError, match="slack is the locality policy's knob"):
        Rebalancer(24, 4, window=2, slack=0.5)
    eplb.plan(w, 24, 4, 2, 2, policy="locality", dispatch="nearest", slack=0.5).validate()


# --------------------------------------------------- found by the fifth session's attack
@pytest.mark.parametrize(("gpus", "nodes"), [(6, 4), (8, 16)])
def test_nearest_dispatch_needs_whole_nodes(gpus, nodes):
    with pytest.raises(ValueError, match=f"num_gpus \\({gpus}\\) is not a multiple of num_nodes"):
        eplb.plan(W, 4 * gpus * 4, gpus, nodes, 1, dispatch="nearest")


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**70])
def test_seed_out_of_range_is_named(seed):
    with pytest.raises(ValueError, match="seed must be in"):
        eplb.plan(W, 96, 16, seed=seed)


def test_gpu_speed_lists_are_read_in_float64():
    """A list of speeds is not squeezed through float32 (1e300 became inf, 1e-50 zero)."""
    for scale in (1e300, 1e-50):
        speeds = [scale] + [2 * scale] * 15
        p = eplb.plan(W, 96, 16, gpu_speed=speeds)
        assert p.balancedness(W, gpu_speed=speeds) > 0


def test_gpu_speeds_whose_sum_overflows_are_refused():
    """Every speed finite but their sum inf: the mean speed, and every score in time, came
    out 0 (balancedness 0.0) instead of an error."""
    with pytest.raises(ValueError, match="gpu_speed sums beyond float64's range"):
        eplb.plan(W, 96, 16, gpu_speed=[1e308] * 16)


def test_previous_placement_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="slots would be read as other GPUs'"):
        eplb.plan(W, 96, 16, previous=eplb.plan(W, 96, 8))
    with pytest.raises(ValueError, match="previous placement has 32 experts"):
        eplb.plan(W, 96, 16, previous=eplb.plan(W[:, :32], 96, 16))


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


def test_placement_records_refuse_bad_expert_counts_and_mask_types():
    placed = eplb.plan(W.double(), 96, 16)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_experts must be a positive int"):
            Placement.from_phy2log(placed.phy2log, bad, placed.topology)
    listed = dataclasses.replace(placed, active_gpus=[True] * 16)
    with pytest.raises(PlacementError, match="active_gpus is a list"):
        listed.validate()
    # loads as a list of rows (tensors or huge ints) are scored like the tensor
    rows = [row for row in W.double()]
    assert placed.balancedness(rows) == placed.balancedness(W.double())


_NOT_NAMES = [np.arange(3), np.array([]), np.array(["global", "x"])]


@pytest.mark.parametrize("value", _NOT_NAMES, ids=["ints", "empty", "names"])
@pytest.mark.parametrize("call", [
    lambda v: eplb.plan(W, 96, 16, 2, policy=v),
    lambda v: eplb.plan(W, 96, 16, 2, policy=v, dispatch="nearest"),
    lambda v: eplb.plan(W, 96, 16, 2, dispatch=v),
    lambda v: eplb.plan(W, 96, 16, 2, dispatch="nearest", fair=v),
    lambda v: eplb.PackingOptions(construction=v),
    lambda v: eplb.Placement.from_phy2log(eplb.plan(W, 96, 16).phy2log, 64,
                                          eplb.Topology(96, 16), policy=v).validate(),
    lambda v: balancedness_ceiling(W, 96, 16, policy=v),
    lambda v: Rebalancer(96, 16, planner=v),
    lambda v: MultiWindow(reduce=v),
], ids=["policy", "policy-nearest", "dispatch", "fair", "construction", "validate", "bounds",
        "planner", "reduce"])
def test_option_names_given_as_arrays_are_refused_by_name(call, value):
    """``array in names`` compares element-wise: an array where an option name belongs
    raised NumPy's "truth value of an array is ambiguous", naming nothing (found by the
    twelfth-session fuzz pass)."""
    with pytest.raises(ValueError, match=r"policy|dispatch|fair|construction|planner|reduce"):
        call(value)


def test_a_regime_schedule_may_be_an_array_of_pairs():
    """``regime == "config"`` on an array of (start, regime) pairs raised NumPy's
    truth-value error; a list of the same pairs worked."""
    pairs = [(0, 0), (10, 0)]
    want = generate_trace("mixtral-8x7b", steps=20, regime=pairs).counts
    assert torch.equal(generate_trace("mixtral-8x7b", steps=20, regime=np.array(pairs)).counts,
                       want)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"packing": None}, TypeError, "packing must be an eplb.PackingOptions"),
    ({"packing": {"num_candidates": 2}}, TypeError, "packing must be an eplb.PackingOptions"),
    ({"incremental": 3}, TypeError, "incremental must be an eplb.IncrementalOptions"),
    ({"hamilton": "no"}, ValueError, "hamilton must be True or False"),
    ({"portfolio_threshold": float("nan")}, ValueError, "portfolio_threshold must be a number"),
    ({"portfolio_threshold": "high"}, ValueError, "portfolio_threshold must be a number"),
    ({"shifts": "0"}, ValueError, "shifts must be a tuple of numbers"),
    ({"shifts": torch.zeros(2, 2)}, ValueError, "shifts must be a tuple of numbers"),
    # each shift is an allocation counted and compared: 10**4 took 24 s and 5.3 GB on a
    # 3×16 plan, 10**5 ran out of memory (attacker pass)
    ({"shifts": [-i / 100 for i in range(65)]}, ValueError, "holds 65 divisor shifts; at most 64"),
    ({"incremental": eplb.IncrementalOptions}, TypeError, "incremental must be"),
])
def test_plan_options_of_the_wrong_kind_are_named(kwargs, error, match):
    """A wrong record failed deep in planning with an AttributeError ('NoneType' object has
    no attribute 'candidates_for'); hamilton='no' and a NaN threshold were taken (found by
    the twelfth-session fuzz pass)."""
    with pytest.raises(error, match=match):
        eplb.plan(W, 96, 16, options=eplb.PlanOptions(**kwargs))


def test_incremental_steps_are_bounded():
    """Every warm-start step is a candidate placement of every layer, built and scored:
    10**9 steps was killed for memory (attacker pass); refused by name instead."""
    assert eplb.IncrementalOptions(steps=256).steps == 256
    with pytest.raises(ValueError, match="steps must be at most 256, got 257"):
        eplb.IncrementalOptions(steps=257)


def test_an_array_of_shifts_plans_like_the_tuple():
    """Two or more shifts as a tensor raised torch's "Boolean value of Tensor with more
    than one value is ambiguous"."""
    want = eplb.plan(W, 96, 16, options=eplb.PlanOptions(shifts=(0.0, -0.5))).phy2log
    for shifts in (torch.tensor([0.0, -0.5]), np.array([0.0, -0.5]), [0, -0.5]):
        options = eplb.PlanOptions(shifts=shifts)
        assert options.shifts == (0.0, -0.5)
        assert torch.equal(eplb.plan(W, 96, 16, options=options).phy2log, want)


def test_nodes_that_do_not_divide_the_gpus_are_planned_as_one_node_with_a_warning(
        tmp_path, capsys):
    """Found by an attacker pass: ``num_nodes=3`` on 8 GPUs (one group) was planned
    silently and recorded as 3 nodes, a cluster the CLI refuses (a file written from it
    could not be scored). Engines pass such shapes (vLLM resets ``num_nodes`` to 1, SGLang
    passes its node count), so the API warns and plans one node; what needs whole nodes
    still raises."""
    from eplb.cli import main
    from eplb.formats import write_placement

    message = r"num_gpus \(16\) is not a multiple of num_nodes \(3\).*one node"
    with pytest.warns(RuntimeWarning, match=message) as caught:
        placement = eplb.plan(W, 96, 16, num_nodes=3)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert placement.topology.num_nodes == 1 and placement.policy == "global"
    assert torch.equal(placement.phy2log, eplb.plan(W, 96, 16).phy2log)
    with pytest.warns(RuntimeWarning, match=message):
        phy2log = eplb.rebalance_experts(W, 96, 1, 3, 16)[0]
    assert torch.equal(phy2log, placement.phy2log)
    for kwargs in ({"policy": "locality", "dispatch": "nearest"}, {"dispatch": "nearest"},
                   {"policy": "hierarchical"}):
        with pytest.raises(ValueError, match=r"num_gpus \(16\) is not a multiple"):
            eplb.plan(W, 96, 16, 3, 1, **kwargs)
    # the placement is one the CLI reads and scores; the CLI refuses the cluster itself
    write_placement(placement, tmp_path / "p.json")
    np.save(tmp_path / "loads.npy", W.numpy())
    assert main(["eval", "--placement", str(tmp_path / "p.json"),
                 str(tmp_path / "loads.npy"), "--summary"]) == 0
    assert main(["plan", str(tmp_path / "loads.npy"), "-r", "96", "-g", "16", "--nodes", "3",
                 "-o", str(tmp_path / "q.json")]) == 2
    assert "must be a multiple of --nodes" in capsys.readouterr().err


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


@pytest.mark.parametrize("slowest", [1e-7, 1e-300, 1e-310, 1e-320])
def test_a_gpu_far_slower_than_the_rest_is_refused(slowest):
    # it sets every layer's time whatever it holds (0.0000 at 1e-9), and at 1e-310 the
    # speed-aware packing's times overflowed with a NumPy warning (attacker pass); at
    # 1e-320 the message said "inf times slower" (files attacker pass)
    speeds = [1.0] * 3 + [slowest] + [1.0] * 12
    with pytest.raises(ValueError, match=r"GPU 3 is .* times slower than the fastest.*--dead"
                       ) as refused:
        eplb.plan(W, 96, 16, gpu_speed=speeds)
    assert "inf" not in str(refused.value)
    # a dead GPU's speed is not read, and scoring takes any speeds (second attacker pass)
    live = [True] * 3 + [False] + [True] * 12
    assert eplb.plan(W, 96, 16, gpu_speed=speeds, active_gpus=live).gpu_loads(W)[:, 3].eq(0).all()
    assert eplb.plan(W, 96, 16).balancedness(W, gpu_speed=speeds) >= 0


def test_the_speed_ratio_limit_holds_at_its_boundary():
    # a decimal 1e6 may round above it (second attacker pass): still planned
    for scale in (1.0, 3.7, 1e-3, 123.456):
        eplb.plan(W, 96, 16, gpu_speed=[scale] * 15 + [scale * 1e-6]).validate()
