"""Tables read off a placement map: replica counts, per-GPU loads, the ``log2phy``
inverse, and the balancedness of GPU loads (see :mod:`eplb.core.topology` for the words
used). They sit below :mod:`eplb.core.placement`, whose record builds and checks with
them, so that the packing and the policies can use them without the record.
"""

from __future__ import annotations

import numpy as np
import torch

from eplb.core.inputs import scale_rows_to_unit


def expert_counts(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[L, E]`` replicas of every expert in ``phy2log [L, R]`` (``-1`` slots ignored)."""
    idx = torch.where(phy2log >= 0, phy2log, num_experts)
    counts = torch.zeros(
        phy2log.shape[0], num_experts + 1, dtype=torch.int64, device=phy2log.device
    )
    return counts.scatter_add_(1, idx, torch.ones_like(idx))[:, :num_experts]


def slot_gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[L, P]`` GPU loads of ``phy2log [L, R]`` under ``weight [L, E]``: each expert's load
    split evenly over its replicas; ``-1`` slots carry nothing."""
    per_replica = weight / expert_counts(phy2log, weight.shape[1]).clamp(min=1)
    loads = per_replica.gather(1, phy2log.clamp(min=0))
    loads = torch.where(phy2log >= 0, loads, torch.zeros_like(loads))
    return loads.view(phy2log.shape[0], num_gpus, -1).sum(2)


#: the most entries of a ``log2phy [L, E, maxcnt]`` table eplb builds (int64: 2 GiB)
MAX_LOG2PHY_CELLS = 1 << 28


def build_log2phy(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``phy2log [L, R]`` (-1 = empty) into ``log2phy [L, E, maxcnt]``, ``logcnt [L, E]``.

    A stable sort of every layer's slots by expert puts each expert's slots in ascending
    order; a slot's rank inside its expert is its sorted position minus the position where
    its expert's run starts. It runs in NumPy on the host for every device (a dozen small
    array calls, each a fraction of a torch call's cost) and returns tensors on
    ``phy2log``'s device.
    """
    num_layers, num_slots = phy2log.shape
    expert = phy2log.cpu().numpy()
    # empty slots (dead GPUs) go to a spare expert E, sorted last and dropped at the end;
    # so do ids out of range, which validate() reports (two reductions rule both out in
    # the common case, cheaper than building the mask)
    has_empty = expert.size > 0 and (int(expert.min()) < 0 or int(expert.max()) >= num_experts)
    width = num_experts + 1 if has_empty else num_experts
    if has_empty:
        expert = expert.astype(np.int64)  # a copy: the caller's map stays as it is
        expert[(expert < 0) | (expert >= num_experts)] = num_experts
    else:
        expert = expert.astype(np.int64, copy=False)
    row = np.arange(num_layers, dtype=np.int64)[:, None]
    counts = np.bincount((row * width + expert).ravel(), minlength=num_layers * width)
    if width <= 256 and num_slots >= 128:
        # NumPy's stable sort of 8-bit keys is a radix sort: about half the time of the
        # packed sort below at 58 × 288 slots (42 vs 82 µs), a little slower on rows
        # shorter than its 256 buckets
        sorted_slot = np.argsort(expert.astype(np.uint8), axis=1, kind="stable")
    elif num_slots <= 1 << 16:
        # sort (expert, slot) pairs packed in one int64: exact and stable
        packed = (expert << 16) | np.arange(num_slots, dtype=np.int64)
        packed.sort(axis=1)
        sorted_slot = packed & 0xFFFF
    else:
        sorted_slot = np.argsort(expert, axis=1, kind="stable")
    # the sorted slots, flattened, are the (layer, expert) runs in ascending order with
    # the lengths ``counts``: a slot's rank = its position − its run's start, and its run
    # is its (layer, expert) cell, so its place in the table is
    # cell · maxcnt + position − run start: one repeat, no search for the run starts
    run_start = np.cumsum(counts) - counts
    flat_counts = counts
    counts = counts.reshape(num_layers, width)
    maxcnt = max(int(counts[:, :num_experts].max()), 1) if counts.size else 1
    cells = num_layers * width * maxcnt
    if cells > MAX_LOG2PHY_CELLS:
        # the table is dense: one expert with many replicas widens every expert's row
        # (one hot expert among 100,000 on 65,536 GPUs asked 48.8 GiB of NumPy)
        raise ValueError(
            f"log2phy [{num_layers}, {num_experts}, {maxcnt}] (layers, experts, the most "
            f"replicas of one expert) would hold {cells:.2e} entries ({cells * 8 / 2**30:.0f}"
            f" GiB); eplb builds at most {MAX_LOG2PHY_CELLS:.2e}: plan fewer layers, or fewer "
            f"slots per GPU, at once"
        )
    position = np.arange(num_layers * num_slots, dtype=np.int64)
    cell_start = np.arange(num_layers * width, dtype=np.int64) * maxcnt
    if has_empty:
        rank = np.minimum(position - np.repeat(run_start, flat_counts), maxcnt - 1)
        target = np.repeat(cell_start, flat_counts) + rank  # the spare expert may hold more
    else:
        target = np.repeat(cell_start - run_start, flat_counts) + position
    device = phy2log.device
    logcnt = torch.from_numpy(np.ascontiguousarray(counts[:, :num_experts])).to(device)
    if device.type == "cpu":
        table = np.full((num_layers, width, maxcnt), -1, dtype=np.int64)
        table.reshape(-1)[target] = sorted_slot.ravel()
        return torch.from_numpy(table)[:, :num_experts], logcnt
    # on an accelerator the table (L·E·maxcnt, large when one expert has many replicas)
    # is filled on the device; only the [L, R] indices cross from the host
    table = torch.full((num_layers, width, maxcnt), -1, dtype=torch.int64, device=device)
    table.view(-1)[torch.from_numpy(target).to(device)] = (
        torch.from_numpy(sorted_slot.ravel()).to(device))
    return table[:, :num_experts], logcnt


def ratio_or_one(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, 1.0 where the denominator is not positive (no load);
    not a clamp: one to 1e-300 read loads scaled to 1e-305 as 0 (attacker pass)."""
    positive = denominator > 0
    return torch.where(positive, numerator / denominator.where(positive, 1.0),
                       torch.ones((), dtype=numerator.dtype, device=numerator.device))


def ideal_and_peak(
    gpu_loads: torch.Tensor, live: torch.Tensor | None = None, speed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ideal [..., L], peak [..., L])`` float64 time of per-GPU loads ``[..., L, P]`` on
    the ``live [P]`` GPUs: the mean and max load, or with ``speed [P]`` (times a power of two:
    exact; 1e-300 overflowed) the load over the total speed and the max of load / speed."""
    loads = gpu_loads.to(torch.float64)
    if live is not None:
        loads = loads[..., live]
        speed = None if speed is None else speed[live]
    if speed is None:
        return loads.mean(-1), loads.max(-1).values
    speed = scale_rows_to_unit(speed.to(device=loads.device, dtype=torch.float64)[None])[0][0]
    return loads.sum(-1) / speed.sum(), (loads / speed).max(-1).values


def load_balance(
    gpu_loads: torch.Tensor, live: torch.Tensor | None = None, speed: torch.Tensor | None = None
) -> tuple[torch.Tensor, float, float]:
    """Balancedness of per-GPU loads ``[L, P]`` over the ``live [P]`` GPUs.

    Returns ``(per-layer [L], overall, worst max/mean)``. With ``speed [P]`` a GPU's time is
    load / speed and the ideal is the total load over the live GPUs' total speed, so the
    figure is still "ideal time / actual time" (1.0 = perfect).
    """
    ideal, peak = ideal_and_peak(gpu_loads, live, speed)
    per_layer = ratio_or_one(ideal, peak)
    total = float(ideal.sum() / peak.sum()) if float(peak.sum()) > 0 else 1.0
    loaded = ideal > 0
    worst = float(ratio_or_one(peak, ideal)[loaded].max()) if bool(loaded.any()) else 1.0
    return per_layer, total, worst
