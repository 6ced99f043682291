"""Device-side construction and expansion for CUDA tensors (issue 14, part 3).

Today replication, expansion and the BLDM construction run in NumPy on the host for every
device: on CPU that is the fastest choice (NumPy's per-call cost is a fraction of torch's),
but a CUDA problem then pays two host round trips and runs its largest dependent chains
on one CPU core (BENCHMARKS §10: large shapes only 2.1–2.4× faster on a GPU than on one
CPU thread). This module holds torch implementations of the two steps whose host copies
dominate large CUDA problems:

- :func:`expand_replicas_torch`: counts → replica items sorted heaviest first
  (one stable sort, one ``repeat_interleave`` with a known output size, so no host sync);
- :func:`bldm_gpus_torch`: the balanced largest-differencing construction, step for step
  the algorithm of :func:`eplb.core.packing.construct._bldm_gpus` (same packed
  ``value << 16 | position`` sort keys, same tie rules), so on one device both give the
  same GPU for every item.

Design: **one implementation per step, chosen by device and size**. The NumPy versions stay
the CPU path (faster there, measured); the torch versions are the device path for problems
of at least :data:`DEVICE_PATH_MIN_ITEMS` items (below that a few host copies cost less than
the extra kernel launches). They are plain torch, so the CPU test-suite checks them
against the NumPy versions bit for bit; no CPU test needs a GPU. The anti-affinity
pre-pass of the host construction (``_whole_runs`` / ``_settle_clashes``, NumPy) is not
ported: on the device path every row goes through :func:`eplb.core.packing.repair.repair_conflicts`
(torch), which the host path uses for the rare rows its pre-pass leaves.

**Measured on an H200 (2026-12-04), device input is planned on the CPU by default**
(:func:`plans_on_host`): the plan is then the CPU input's, bit for bit, and the device path
was faster at one shape of the four large ones timed. ``FORCE = "device"`` opts in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

__all__ = [
    "DEVICE_PATH_MIN_ITEMS",
    "FORCE",
    "bldm_gpus_torch",
    "caller_settings_off",
    "expand_replicas_torch",
    "plans_on_host",
    "to_host",
    "use_device_path",
]

#: smallest ``rows × R`` that takes the device path for a non-CPU tensor (the DeepSeek-V3
#: global problem, 58 × 288 = 16.7k items, stays on the host; 100 × 2048 takes it).
#: To be tuned on a lent GPU (``benchmarks/bench_gpu.py --device-path``).
DEVICE_PATH_MIN_ITEMS = 1 << 15


#: ``None`` (automatic: device input is planned on the CPU, :func:`plans_on_host`),
#: ``"host"``, or ``"device"``: device input is planned on its device, with construction
#: and expansion there from :data:`DEVICE_PATH_MIN_ITEMS` items (27 against 88 ms at
#: 100×1024 → 2048/256 on an H200, but not the CPU's plan bit for bit); CPU tensors then
#: take the device path's steps too (the tests check them against the host's). Process-wide.
FORCE: str | None = None


def use_device_path(tensor: torch.Tensor, num_items: int) -> bool:
    """True when ``tensor`` (any shape: only its device counts) lives off the CPU and the
    problem has ``num_items >=`` :data:`DEVICE_PATH_MIN_ITEMS` items (rows × replicas), or
    when :data:`FORCE` says so."""
    if _forced() is not None:
        return FORCE == "device"
    return tensor.device.type != "cpu" and num_items >= DEVICE_PATH_MIN_ITEMS


def _forced() -> str | None:
    """:data:`FORCE`, checked: a typo (``"cuda"``, ``True``) would otherwise act as ``None``
    without a word."""
    if FORCE not in (None, "host", "device"):
        raise ValueError(f"eplb.core.device_path.FORCE must be None, 'host' or 'device', "
                         f"got {FORCE!r}")
    return FORCE


#: a subnormal float64: reads as 0 after arithmetic where the thread's CPU flags flush them
_SUBNORMAL = np.array([1e-310])


@contextlib.contextmanager
def caller_settings_off() -> Iterator[None]:
    """Plan in the dtypes and on the devices the planner chose, whatever the caller's torch
    settings (attacker pass, thirty-eighth session):

    - autocast off: a caller's ``torch.autocast`` region (an engine's forward pass) ran the
      locality and dispatch planners' ``bmm``/``einsum`` in bfloat16 and changed their plans;
    - the CPU as the default device where the caller set another
      (``torch.set_default_device``): the planner's own tensors are made on the host, as
      its NumPy steps expect (a "meta" default failed inside torch). Entered only then:
      the device context intercepts every torch call.

    - subnormal numbers kept where the caller flushes them (``torch.set_flush_denormal``,
      the thread's CPU flags, which NumPy's arithmetic follows too): flushed, loads of
      1e-310 read as 0 and their layer was planned as all-zero (attacker pass).

    All three are per thread. The default dtype is process-wide and cannot be scoped here: the
    planner makes its floating-point tensors with explicit dtypes instead (a bfloat16
    default changed plans through the packing's rescue factors; ``test_determinism``
    plans every kind under it). Autocast on other backends (XPU, HPU) is left as is: only
    ``FORCE = "device"`` plans there.
    """
    with contextlib.ExitStack() as stack:
        # (each entered only where needed: a few µs per call otherwise, 1 % of a small plan)
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        if torch.get_default_device().type != "cpu":
            stack.enter_context(torch.device("cpu"))
        if (_SUBNORMAL * 1.0)[0] == 0:  # the flags flush: off here, back on after
            torch.set_flush_denormal(False)
            stack.callback(torch.set_flush_denormal, True)
        yield


def plans_on_host(tensor: torch.Tensor) -> bool:
    """True when a problem given on a device (``tensor`` off the CPU) is planned on the
    CPU and its plan moved back: always, unless :data:`FORCE` is ``"device"``.

    Why (measured on an H200, ``benchmarks/bench_cuda_identical.py`` and
    ``bench_gpu.py``, BENCHMARKS §10): planned on the device, float sums add in another
    order than on the CPU, so the plan differs (220 of 16,704 slots at 58×256 → 288/32;
    10–92 % of the slots on the device path's shapes), at the same quality (±1e-4).
    Planned on the host, CPU and CUDA input give one plan bit for bit, whatever the GPU
    model. The cost: on the device path's shapes the GPU was faster only at 100×1024 →
    2048/256 (27 against 88 ms); at 61×384 → 768/256 and 100×1024 → 2048/1024 the CPU
    was as fast or faster, and below :data:`DEVICE_PATH_MIN_ITEMS` items (the
    DeepSeek-V3 shape) a plan is hundreds of small operations, no faster as kernels.
    """
    # (a meta tensor holds no data: the input checks refuse it by name)
    return tensor.device.type not in ("cpu", "meta") and _forced() != "device"


def to_host(value: object) -> object:
    """``value`` on the CPU: a tensor, or anything with a ``.to(device)`` (a placement);
    other values (numbers, lists, arrays, ``None``) as they are."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    move = getattr(value, "to", None)
    return move("cpu") if callable(move) else value


def expand_replicas_torch(
    weight: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts → items, on the tensors' device; same contract and order as
    :func:`eplb.core.replication.expand_replicas`.

    Args:
        weight: ``[rows, E]`` expert loads.
        counts: ``[rows, E]`` replicas per expert, every row summing to ``R``.

    Returns:
        ``(item_load [rows, R], item_expert [rows, R])``: heaviest expert first (per-replica
        loads compared in float32, ties in expert order), an expert's replicas adjacent.
    """
    rows, num_experts = weight.shape
    per_replica = weight / counts
    order = torch.sort(per_replica.to(torch.float32), dim=1, descending=True, stable=True).indices
    flat = (order + torch.arange(rows, device=weight.device)[:, None] * num_experts).view(-1)
    times = counts.reshape(-1)[flat]
    total = int(counts.shape[0]) * int(counts[0].sum()) if rows else 0
    item_load = per_replica.reshape(-1)[flat].repeat_interleave(times, output_size=total)
    item_expert = order.reshape(-1).repeat_interleave(times, output_size=total)
    return item_load.view(rows, -1), item_expert.view(rows, -1)


def bldm_gpus_torch(load: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[rows, R]`` GPU of every item under balanced largest differencing, in torch.

    ``load [rows, R]`` is non-negative float32, every row heaviest first, ``S = R / P``
    rounds of ``P``. The same algorithm as :func:`eplb.core.packing.construct._bldm_gpus`: partial
    solutions are kept sorted ascending; the two with the largest spread merge (heaviest
    subset of one with the lightest of the other) and re-sort by exact packed keys; the
    sort orders are replayed backwards to find every item's GPU. ``S − 1`` merges and
    ``S − 1`` replays, each a handful of kernels over ``[rows, P]``.
    """
    rows, num_items = load.shape
    slots = num_items // num_gpus
    device = load.device
    # rounds heaviest first; flip so that position p of a part is ascending
    parts = load.to(torch.float32).reshape(rows, slots, num_gpus).flip(2).contiguous()
    flat_parts = parts.view(rows * slots, num_gpus)
    dead = torch.zeros(rows, slots, dtype=torch.float32, device=device)  # not the default dtype
    first_round = torch.arange(rows, device=device) * slots
    position = torch.arange(num_gpus, device=device)
    row = torch.arange(rows, device=device)
    merges = []
    for _ in range(slots - 1):
        spread = parts[:, :, -1] - parts[:, :, 0] - dead  # dead parts: -inf
        widest = spread.argmax(1)
        spread[row, widest] = -float("inf")
        heavy, light = first_round + widest, first_round + spread.argmax(1)
        merged = flat_parts[heavy].flip(1) + flat_parts[light]
        # non-negative float32 bit patterns order like the values: exact, stable keys
        packed = (merged.view(torch.int32).to(torch.int64) << 16) | position
        packed = packed.sort(dim=1).values
        flat_parts[heavy] = (packed >> 16).to(torch.int32).view(torch.float32)
        dead.view(-1)[light] = float("inf")
        merges.append((heavy, light, packed & 0xFFFF))
    label = torch.empty(rows * slots, num_gpus, dtype=torch.int64, device=device)
    label[first_round + dead.argmin(1)] = position
    offset = (row * num_gpus)[:, None]
    for heavy, light, order in reversed(merges):
        gpu = label[heavy].reshape(-1)
        from_light = torch.empty_like(gpu)
        from_light[(offset + order).reshape(-1)] = gpu
        from_heavy = torch.empty_like(gpu)
        from_heavy[(offset + (num_gpus - 1) - order).reshape(-1)] = gpu
        label[heavy] = from_heavy.view(rows, num_gpus)
        label[light] = from_light.view(rows, num_gpus)
    return label.view(rows, slots, num_gpus).flip(2).reshape(rows, num_items)
