"""SGLang's token counts ``[T, L, E]`` (or ``[L, E]``) as eplb plans them: checked, and
summed over the steps exactly (:func:`eplb.integrations.sglang.eplb_rebalance`)."""

from __future__ import annotations

import torch

from eplb.core.inputs import check_loads, refuse_overflowed_sum, refuse_without_values

__all__ = ["check_step_counts", "sum_steps"]


def check_step_counts(counts: object) -> torch.Tensor:
    """``counts`` as a dense tensor, after eplb.plan's checks that the cast and step sum
    below would skip (attacker pass: a complex tensor lost its imaginary part to the int64
    cast, a 0-d one an IndexError; a meta, quantized or nested tensor raised torch's own
    error from the sum, and sparse ``[T, L, E]`` counts one that eplb.plan's sparse
    ``[L, E]`` loads do not)."""
    shape = "a torch.Tensor [T, L, E] or [L, E]"
    if not isinstance(counts, torch.Tensor) or counts.is_complex():
        got = counts.dtype if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise TypeError(f"tokens_per_expert must be {shape} of real counts; got {got}")
    if counts.is_quantized or counts.is_nested:
        kind = "quantized" if counts.is_quantized else "nested"
        raise TypeError(f"tokens_per_expert must be {shape} of real counts; got a {kind} "
                        "tensor")
    refuse_without_values(counts, "tokens_per_expert")
    if counts.dim() not in (2, 3):
        raise ValueError(f"tokens_per_expert must be {shape}; got shape {tuple(counts.shape)}")
    return counts.to_dense() if counts.layout != torch.strided else counts


def sum_steps(counts: torch.Tensor) -> torch.Tensor:
    """``counts [T, L, E]`` summed over ``T``: for integer counts an exact sum on any device.

    The steps are checked first: a negative count in one step would vanish into a
    positive sum, and integer counts whose sum passes int64's range would wrap to negative
    loads that the loads check then blamed on SGLang's call. Such counts are summed in
    float64 instead (the same rounding on every rank).
    """
    if counts.dtype == torch.bool:  # as 0/1 counts, like every other loads input
        return counts.sum(0)
    if counts.dtype in (torch.uint16, torch.uint32, torch.uint64):
        # torch has no min/max for these: int64 holds uint16/32 exactly; uint64 may pass
        # int64's range, so as float64, as eplb.plan reads it
        counts = counts.to(torch.float64 if counts.dtype == torch.uint64 else torch.int64)
    elif counts.is_floating_point() and counts.element_size() == 1:
        counts = counts.to(torch.float64)  # float8: torch cannot sum it; float64 is exact
    check_loads(counts, "tokens_per_expert")
    if (not counts.is_floating_point() and counts.numel()
            and int(counts.max()) * counts.shape[0] > torch.iinfo(torch.int64).max):
        return counts.to(torch.float64).sum(0)
    if counts.dtype in (torch.float16, torch.bfloat16):
        # half-precision counts overflow when summed (2 steps of 40,000 tokens pass
        # float16's 65,504): summed in float64, which holds their values exactly
        counts = counts.to(torch.float64)
    return refuse_overflowed_sum(counts.sum(0), counts, "tokens_per_expert", counts.shape[0])
