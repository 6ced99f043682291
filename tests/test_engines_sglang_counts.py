"""What SGLang hands the function its rebalance calls
(``eplb.integrations.sglang.eplb_rebalance``, called directly): old maps (integer ids,
dense copies of sparse ones) and step counts of every dtype (checked before they are
summed, summed without overflow or wrapping, quantized or non-load counts refused).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eplb import Placement, Topology
from eplb.integrations import sglang as plugin


def test_an_old_map_that_is_not_integer_ids_is_refused():
    tokens = torch.randint(0, 100, (3, 4, 16), generator=torch.Generator().manual_seed(0))
    old = plugin.eplb_rebalance(tokens, 24, 3, None, 1, False)[0]
    with pytest.raises(TypeError, match="integer expert ids"):
        plugin.eplb_rebalance(tokens, 24, 3, None, 1, False, old_phy2log=old.float() + 0.9)


@pytest.mark.parametrize(("make", "message"), [
    (lambda old: old.numpy(), "old_phy2log must be a torch.Tensor"),  # an AttributeError
    (lambda old: old.to("meta"), "old_phy2log is a meta tensor"),  # torch's own errors
    (lambda old: old[:, :8].to("meta"), "old_phy2log is a meta tensor"),  # (not read at all)
])
def test_an_old_map_that_is_no_tensor_with_values_is_refused_by_name(make, message):
    tokens = torch.randint(0, 100, (3, 4, 16), generator=torch.Generator().manual_seed(0))
    old = plugin.eplb_rebalance(tokens, 24, 3, None, 1, False)[0]
    with pytest.raises(TypeError, match=message):
        plugin.eplb_rebalance(tokens, 24, 3, None, 1, False, old_phy2log=make(old))


def test_a_sparse_old_map_is_read_as_its_dense_copy():
    # as the vLLM policy reads it (torch's NotImplementedError from 'aten::ge' before)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (3, 4, 16), generator=generator)
    old = plugin.eplb_rebalance(torch.randint(0, 100, (3, 4, 16), generator=generator),
                                24, 3, None, 1, False)[0]
    expected = plugin.eplb_rebalance(tokens, 24, 3, None, 1, False, old_phy2log=old)[0]
    got = plugin.eplb_rebalance(tokens, 24, 3, None, 1, False, old_phy2log=old.to_sparse())[0]
    assert torch.equal(got, expected)


def test_step_counts_are_checked_before_they_are_summed():
    # SGLang's [T, L, E] counts are summed over T: a negative count of one step vanished
    # into a positive sum, and counts whose sum passes int64's range wrapped to negative
    # loads that the check then blamed on SGLang's call
    tokens = torch.randint(0, 100, (3, 4, 16), generator=torch.Generator().manual_seed(0))
    tokens[0, 1, 2], tokens[1, 1, 2] = -50, 90
    with pytest.raises(ValueError, match=r"tokens_per_expert\[0, 1, 2\] \(step 0, layer 1, "):
        plugin.eplb_rebalance(tokens, 24, 3, None, 1, False)
    huge = torch.full((3, 4, 16), 2**62)
    huge[:, :, 0] = 3 * 2**61  # expert 0 carries 1.5× the others' load
    phy2log, _, logcnt = plugin.eplb_rebalance(huge, 24, 3, None, 1, False)
    Placement.from_phy2log(phy2log, 16, Topology(24, 8)).validate()
    assert bool((logcnt[:, 0] == logcnt.max(1).values).all())


def test_half_precision_step_counts_are_summed_without_overflow():
    # 2 steps of 40,000 tokens pass float16's 65,504: the sum was inf and the loads check
    # blamed "weight[0, 0] ... is inf" on the call (attacker pass); summed in float64 now
    tokens = torch.full((2, 2, 8), 40000.0, dtype=torch.float16)
    tokens[:, :, 0] = 60000.0
    phy2log = plugin.eplb_rebalance(tokens, 16, 4, None, 1, False)[0]
    Placement.from_phy2log(phy2log, 8, Topology(16, 4)).validate()
    # the plan of the same counts given exactly (float64)
    expected = plugin.eplb_rebalance(tokens.to(torch.float64), 16, 4, None, 1, False)[0]
    assert torch.equal(phy2log, expected)
    # a float64 sum that overflows is named as the sum, not an entry
    overflow = r"tokens_per_expert summed over 2 steps: the sum overflows float64"
    with pytest.raises(ValueError, match=overflow):
        plugin.eplb_rebalance(torch.full((2, 2, 8), 1e308, dtype=torch.float64), 16, 4, None,
                              1, False)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_step_counts_are_summed_as_their_values(dtype):
    # torch cannot sum float8 ("sum_cpu" not implemented): a raw NotImplementedError
    tokens = torch.randint(0, 100, (3, 4, 16), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(dtype)
    expected = plugin.eplb_rebalance(tokens.to(torch.float64), 24, 3, None, 1, False)[0]
    assert torch.equal(plugin.eplb_rebalance(tokens, 24, 3, None, 1, False)[0], expected)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_step_counts_are_summed(dtype):
    # torch has no min/max for uint16/32/64: the step check raised NotImplementedError
    # ("aminmax_cpu" not implemented for 'UInt64') where eplb.plan takes these dtypes
    tokens = torch.randint(0, 100, (3, 4, 16), generator=torch.Generator().manual_seed(0))
    expected = plugin.eplb_rebalance(tokens, 24, 3, None, 1, False)[0]
    assert torch.equal(plugin.eplb_rebalance(tokens.to(dtype), 24, 3, None, 1, False)[0],
                       expected)


def test_summed_uint64_counts_beyond_int64_are_planned_not_wrapped():
    # an [L, E] call skips sum_steps: its uint64 counts were cast to int64, and counts of
    # 2**63 or more wrapped to negative loads the check then blamed on the call
    counts = np.full((4, 16), 2**63, dtype=np.uint64)
    counts[:, 0] = 2**64 - 1  # expert 0 carries about twice the others' load
    tokens = torch.from_numpy(counts)
    phy2log, _, logcnt = plugin.eplb_rebalance(tokens, 24, 3, None, 1, False)
    Placement.from_phy2log(phy2log, 16, Topology(24, 8)).validate()
    assert bool((logcnt[:, 0] == logcnt.max(1).values).all())


@pytest.mark.parametrize(("tokens", "error", "message"), [
    # a complex tensor was cast to int64 (its imaginary part dropped, a torch warning),
    # a 0-d one raised an IndexError (attacker pass); eplb.plan refuses both alike
    (torch.ones(2, 8, dtype=torch.complex64), TypeError, "real counts; got torch.complex64"),
    (torch.ones(1, 2, 8, dtype=torch.complex64), TypeError, "real counts"),
    (torch.tensor(3.0), ValueError, r"got shape \(\)"),
    ([[1, 2, 3, 4]], TypeError, "got list"),
    # torch's own errors from the step sum before ("Tensor.item() cannot be called on
    # meta tensors", "Could not run 'aten::aminmax'"); eplb.plan names them
    (torch.ones(1, 2, 8, device="meta"), TypeError, "tokens_per_expert is a meta tensor"),
    (torch.ones(2, 8, device="meta"), TypeError, "tokens_per_expert is a meta tensor"),
])
def test_counts_that_are_no_loads_are_refused(tokens, error, message):
    with pytest.raises(error, match=message):
        plugin.eplb_rebalance(tokens, 16, 4, None, 1, False)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_quantized_counts_are_refused():
    tokens = torch.quantize_per_tensor(torch.ones(1, 2, 8), 1.0, 0, torch.quint8)
    with pytest.raises(TypeError, match="got a quantized tensor"):
        plugin.eplb_rebalance(tokens, 16, 4, None, 1, False)


def test_sparse_step_counts_are_planned_as_their_dense_copy():
    # sparse [L, E] counts were planned (as eplb.plan reads them), sparse [T, L, E] ones
    # raised torch's NotImplementedError from the step sum
    tokens = torch.randint(0, 100, (3, 4, 16), generator=torch.Generator().manual_seed(0))
    tokens[:, :, :5] = 0
    expected = plugin.eplb_rebalance(tokens, 24, 3, None, 1, False)[0]
    assert torch.equal(plugin.eplb_rebalance(tokens.to_sparse(), 24, 3, None, 1, False)[0],
                       expected)
