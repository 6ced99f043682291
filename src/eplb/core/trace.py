"""``LoadTrace``: expert loads over time, the common result of every load reader."""

from __future__ import annotations

import reprlib  # a wrong value from a file may be a huge list: quote it short
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from eplb.core.inputs import as_counts, refuse_overflowed_sum, refuse_without_values
from eplb.core.messages import integer_runs

#: model layer ids lie below this: models have about a hundred layers, and an SGLang file
#: gets a row for every layer up to the largest id, so a stray huge id must not size it
MAX_MODEL_LAYERS = 1 << 12


def model_layer_ids(values: Sequence[Any] | None, num_rows: int, what: str) -> list[int]:
    """``values`` (``None``: ``0..num_rows-1``) as ``num_rows`` distinct model layer ids in
    ``[0, MAX_MODEL_LAYERS)``. Integers only: a float must be whole (``3.0``, not ``3.7``),
    a bool is refused. Raises ``ValueError`` starting with ``what``."""
    if values is None:
        return list(range(num_rows))
    if hasattr(values, "tolist"):  # a tensor or array: its elements as Python numbers
        values = values.tolist()
        values = values if isinstance(values, list) else [values]
    ids = []
    for item in values:
        # NumPy and 0-d torch scalars as Python numbers (a float tensor's __index__ truncates)
        value = item.tolist() if hasattr(item, "tolist") else item
        whole = isinstance(value, float) and value.is_integer()
        if isinstance(value, bool) or not (isinstance(value, int) or whole):
            raise ValueError(f"{what}: layer ids must be integers, got {reprlib.repr(item)}")
        ids.append(int(value))
    if len(ids) != num_rows:
        raise ValueError(f"{what} has {len(ids)} layer ids for {num_rows} rows")
    bad = [i for i in ids if not 0 <= i < MAX_MODEL_LAYERS]
    if bad:
        raise ValueError(f"{what}: layer id {reprlib.repr(bad[0])} is outside "
                         f"0..{MAX_MODEL_LAYERS - 1} (a model layer index)")
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))  # the first repeat
        raise ValueError(f"{what}: layer id {twice} appears twice")
    return ids


@dataclass(frozen=True)
class LoadTrace:
    """Routed-token counts per step, layer and expert.

    Attributes:
        counts: ``[T, L, E]`` float64 loads; ``T`` steps (recording windows, iterations,
            or token windows), ``L`` MoE layers, ``E`` logical experts.
        layer_ids: ``[L]`` the model's own layer index of each row (e.g. DeepSeek-V3's
            MoE layers are 3..60). Defaults to ``range(L)``.
        source: where the trace came from (a path, or a generator description).
        format: the format name it was read from (one of :data:`eplb.formats.FORMATS`,
            or e.g. ``"synthetic"``).
        meta: format-specific extras (top-k, rank count, iteration ids, ...).
    """

    counts: torch.Tensor
    layer_ids: list[int] | None = None
    source: str = ""
    format: str = "tensor"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if getattr(self.counts, "ndim", 3) != 3:
            # (a nested tensor has no shape to quote: torch's "NestedTensorImpl doesn't
            # support sizes" from the message below; review pass)
            refuse_without_values(self.counts, "LoadTrace.counts")
            raise ValueError(
                f"LoadTrace.counts must have shape [steps, layers, experts]; got "
                f"{tuple(self.counts.shape)}"
            )
        counts = as_counts(self.counts, "LoadTrace.counts")
        num_layers = counts.shape[1]
        ids = model_layer_ids(self.layer_ids, num_layers, "layer_ids")
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "layer_ids", ids)
        object.__setattr__(self, "meta", dict(self.meta))

    def __repr__(self) -> str:
        # the counts and meta (a generated trace's per-step regimes, its preset) run to
        # tens of kB: the shape and where it came from are what a reader needs
        ids = self.layer_ids
        # runs shortened, the rest listed: [0, 7, 15] is no range 0..15
        span = f"[{reprlib.repr(integer_runs(ids))[1:-1]}]" if ids else "none"
        return (f"LoadTrace(steps={self.num_steps}, layers={self.num_layers}, "
                f"experts={self.num_experts}, layer_ids={span}, format={self.format!r}, "
                f"source={self.source!r}, meta keys={sorted(map(str, self.meta))})")

    # ------------------------------------------------------------------ shape
    @property
    def num_steps(self) -> int:
        return self.counts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts.shape[1]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[2]

    # ------------------------------------------------------------- reductions
    def total(self) -> torch.Tensor:
        """``[L, E]`` loads summed over all steps (what a one-shot planner wants)."""
        return refuse_overflowed_sum(self.counts.sum(0), self.counts, "the loads",
                                     self.num_steps)

    def windows(self, steps_per_window: int) -> LoadTrace:
        """Sum consecutive steps into windows of ``steps_per_window`` (the last may be shorter).

        This is the ADRS protocol's "sum 100 steps per window".
        """
        if (
            isinstance(steps_per_window, bool)
            or not isinstance(steps_per_window, int)
            or (steps_per_window < 1)
        ):
            raise ValueError(
                f"steps_per_window must be a positive integer, got {steps_per_window!r}"
            )
        num_windows = -(-self.num_steps // steps_per_window)
        window = torch.arange(self.num_steps, device=self.counts.device) // steps_per_window
        out = self.counts.new_zeros(num_windows, self.num_layers, self.num_experts)
        out.index_add_(0, window, self.counts)
        refuse_overflowed_sum(out, self.counts, "the loads", self.num_steps)
        meta = {**self.meta, "steps_per_window": steps_per_window}
        return replace(self, counts=out, meta=meta)

    def select_layers(self, layer_ids: Sequence[int]) -> LoadTrace:
        """Keep the rows of the given model layer ids, in the given order."""
        where = {lid: row for row, lid in enumerate(self.layer_ids)}
        missing = [lid for lid in layer_ids if lid not in where]
        if missing:
            raise ValueError(f"layer ids {missing} are not in this trace (it has {self.layer_ids})")
        rows = torch.tensor([where[lid] for lid in layer_ids], dtype=torch.int64)
        return replace(self, counts=self.counts[:, rows], layer_ids=list(layer_ids))

    def drop_empty_layers(self) -> LoadTrace:
        """Drop layers with no load in any step (e.g. DeepSeek's dense layers 0-2 in SGLang);
        the trace itself where none is empty (a copy doubled a long trace's memory:
        ``eplb simulate`` of 1,200 DeepSeek-V3 steps peaked there, 142 MB above the
        trace)."""
        keep = self.counts.sum((0, 2)) > 0
        if bool(keep.all()):
            return self
        ids = [lid for lid, k in zip(self.layer_ids, keep.tolist(), strict=True) if k]
        return replace(self, counts=self.counts[:, keep], layer_ids=ids)
