"""The planner's input errors through its public API (``eplb.plan``): bad load values,
shapes and types, impossible topologies, bad masks, speeds, seeds and old maps, and
search knobs that have no value, each refused with an error that names it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_planner import W

import eplb


# --------------------------------------------------------------------------- input errors
@pytest.mark.parametrize(
    ("value", "where"),
    [(float("nan"), r"weight\[2, 7\] \(layer 2, expert 7\) is nan"),
     (float("inf"), r"weight\[2, 7\] \(layer 2, expert 7\) is inf"),
     (-1.0, r"weight\[2, 7\] \(layer 2, expert 7\) is -1.0")],
)
def test_bad_load_values_name_layer_and_expert(value, where):
    w = W.clone()
    w[2, 7] = value
    with pytest.raises(ValueError, match=where):
        eplb.plan(w, 40, 8)
    with pytest.raises(ValueError, match=where):
        eplb.rebalance_experts(w, 40, 1, 1, 8)


def test_negative_integer_load():
    w = torch.ones(2, 8, dtype=torch.int64)
    w[1, 3] = -5
    with pytest.raises(ValueError, match=r"weight\[1, 3\].*>= 0"):
        eplb.plan(w, 8, 2)


@pytest.mark.parametrize("w", [torch.tensor(3.0), torch.ones(2, 3, 8)])
def test_wrong_number_of_dims(w):
    with pytest.raises(ValueError, match=f"got {w.dim()} dimensions"):
        eplb.plan(w, 8, 2)


@pytest.mark.parametrize(
    ("w", "missing"), [(torch.zeros(0, 8), "no layers"), (torch.zeros(3, 0), "no experts")]
)
def test_empty_loads(w, missing):
    with pytest.raises(ValueError, match=missing):
        eplb.plan(w, 8, 2)


@pytest.mark.parametrize("w", [float("nan"), float("inf"), -float("inf"), -1.0])
def test_bad_value_in_float32_and_float64(w):
    for dtype in (torch.float32, torch.float64):
        loads = torch.ones(3, 8, dtype=dtype)
        loads[2, 5] = w
        with pytest.raises(ValueError, match=r"weight\[2, 5\]"):
            eplb.plan(loads, 8, 2)


def test_loads_whose_sum_overflows_are_accepted():
    loads = torch.full((2, 8), 3e38, dtype=torch.float32)  # float32 sum is inf, values finite
    eplb.plan(loads, 8, 2).validate()


@pytest.mark.parametrize("w", ["loads", {"logical_count": [1, 2]}, None, 3.5])
def test_non_tensor_input(w):
    with pytest.raises(TypeError, match=r"torch\.Tensor, numpy\.ndarray or a nested list"):
        eplb.plan(w, 8, 2)
    with pytest.raises(TypeError, match=type(w).__name__):
        eplb.rebalance_experts(w, 8, 1, 1, 2)


def test_ragged_list():
    # where it goes wrong, as the load files say it (NumPy's "inhomogeneous shape")
    with pytest.raises(TypeError, match=r"rectangular.*\[1\] has 1 entries where \[0\] has 2"):
        eplb.plan([[1, 2], [3]], 4, 2)
    with pytest.raises(TypeError, match=r"\[0\]\[1\] is an object, not a number"):
        eplb.plan([[1, {"a": 1}], [2, 3]], 4, 2)


def test_too_few_replicas():
    msg = r"num_replicas \(24\) must be at least the number of experts \(32\)"
    with pytest.raises(ValueError, match=msg):
        eplb.plan(W, 24, 8)


def test_replicas_not_multiple_of_gpus():
    msg = r"num_replicas \(42\) must be a multiple of num_gpus \(8\)"
    with pytest.raises(ValueError, match=msg):
        eplb.plan(W, 42, 8)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True])
def test_bad_topology_numbers(bad):
    with pytest.raises(ValueError, match="positive integer"):
        eplb.plan(W, 40, bad)


@pytest.mark.parametrize("active", [torch.ones(7, dtype=torch.bool),
                                    torch.ones(2, 8, dtype=torch.bool), [True] * 9])
def test_bad_active_gpus_shape(active):
    with pytest.raises(ValueError, match=r"active_gpus must have shape \[8\]"):
        eplb.plan(W, 40, 8, active_gpus=active)


@pytest.mark.parametrize(("speed", "named"), [
    ([1.0] * 7 + [0.0], r"gpu_speed\[7\] is 0.0"),
    ([1.0, -2.0] + [1.0] * 6, r"gpu_speed\[1\] is -2.0"),
    ([1.0] * 7 + [float("nan")], r"gpu_speed\[7\] is nan"),
    ([1.0] * 4, r"gpu_speed must have shape \[8\]"),
])
def test_bad_gpu_speed(speed, named):
    with pytest.raises(ValueError, match=named):
        eplb.plan(W, 40, 8, gpu_speed=torch.tensor(speed))


def test_bad_seed_type():
    with pytest.raises(TypeError, match="seed must be an int"):
        eplb.plan(W, 40, 8, seed="1")


def test_previous_with_wrong_shape():
    msg = r"previous placement has shape \(4, 32\), expected \[4, 40\]"
    with pytest.raises(ValueError, match=msg):
        eplb.plan(W, 40, 8, previous=torch.zeros(4, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(3, 40\)"):
        eplb.rebalance_experts(W, 40, 1, 1, 8, old_phy2log=torch.zeros(3, 40, dtype=torch.int64))


def test_absurd_candidate_counts_are_refused():
    with pytest.raises(ValueError, match="num_candidates must be at most"):
        eplb.plan(W, 48, 8, num_candidates=10**6)


def test_number_knobs_take_zero_d_arrays_and_refuse_what_has_no_value() -> None:
    # a 0-d NumPy array was refused where a 0-d tensor was taken; a meta tensor raised
    # torch's NotImplementedError instead of the knob's ValueError
    from eplb.online.estimate import ExponentialAverage

    assert eplb.PlanOptions(portfolio_threshold=np.array(0.5)).portfolio_threshold == 0.5
    assert ExponentialAverage(np.array(3.0)).half_life == 3.0
    for bad in (torch.empty((), device="meta"), np.array([0.5]), np.array(True)):
        with pytest.raises(ValueError, match="portfolio_threshold must be a number"):
            eplb.PlanOptions(portfolio_threshold=bad)
