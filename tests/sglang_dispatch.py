"""SGLang 0.5.23's real static dispatch tables for an eplb placement (tests and benchmarks).

Runs the released ``sglang/srt/eplb/expert_location.py`` (fetched by
``scripts/fetch_engines.py``; loaded with the stubs of
:func:`tests.engines.sglang_sources`) with ``ep_dispatch_algorithm="static"``
and an all-to-all backend (``"deepep"``). SGLang 0.5.23 builds a static table only then:
``arg_groups/parallel_hook.py::handle_eplb_and_dispatch`` picks ``"static"`` when an a2a
backend is set and ``"dynamic"`` (a token-row round robin over *all* replicas, i.e. an
even split) without one, and rejects ``static`` without one.

Two start-up paths build the table differently:

- ``path="mapping"``: ``--init-expert-location`` holding a ``physical_to_logical_map``
  (what eplb writes): ``ExpertLocationMetadata.init_by_mapping(model_config, phy2log,
  moe_ep_rank=r)``. Every rank first collapses each expert's candidate list to its own
  nearest replica, then computes its table row with ``random.Random(42)`` consumed over
  the experts it could not collapse, so ranks draw their fair choices from different
  points of the stream. The model-config hook (``get_model_config_for_expert_location``)
  is replaced by a class reporting the placement's layers and experts; everything after
  it is SGLang's code.
- ``path="eplb"``: SGLang's own planning (``init_by_eplb``, the runtime rebalancer)
  passes the planner's full candidate lists, uncollapsed, so every rank computes the
  same table from one stream and keeps its row. It is computed once here: SGLang's
  ``_compute_logical_to_all_physical_map`` (no ``moe_ep_rank``: no collapse) and
  ``compute_logical_to_rank_dispatch_physical_map`` with ``ep_rank`` a slice of all rows.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
from engines import engine_root, sglang_sources

__all__ = ["sglang_dispatch_tables"]


def _settings(num_slots: int, num_experts: int, num_gpus: int, num_nodes: int,
              a2a: str = "deepep") -> types.SimpleNamespace:
    moe = types.SimpleNamespace(
        init_expert_location="trivial",
        ep_num_redundant_experts=num_slots - num_experts,
        ep_dispatch_algorithm="static",
        moe_a2a_backend=a2a,
        eplb_algorithm="auto",
        ep_join_mode=None,  # not an elastic "scale" join: same-node preference on
    )
    parallel = types.SimpleNamespace(
        ep_size=num_gpus, nnodes=num_nodes, tp_size=num_gpus, elastic_ep_initial_size=None,
        ep_join_rank_offset=0,
    )
    return types.SimpleNamespace(device=types.SimpleNamespace(device="cpu"),
                                 exec=types.SimpleNamespace(moe=moe), parallel=parallel)


def sglang_dispatch_tables(
    phy2log: torch.Tensor,
    num_experts: int,
    num_gpus: int,
    num_nodes: int,
    path: str = "mapping",
    ranks: list[int] | None = None,
    root: Path | None = None,
) -> torch.Tensor:
    """``[len(ranks), L, E]`` int64: the physical slot each rank's static dispatch sends
    every expert to, as SGLang 0.5.23 computes it from ``phy2log [L, R]`` on the start-up
    ``path`` (``"mapping"`` or ``"eplb"``, module docstring).

    ``ranks`` defaults to every rank. Raises ``LookupError`` when the wheel is not fetched.
    """
    if path not in ("mapping", "eplb"):
        raise ValueError(f"path must be 'mapping' or 'eplb', got {path!r}")
    root = root or engine_root("sglang")
    if root is None:
        raise LookupError("SGLang 0.5.23 not fetched: run python scripts/fetch_engines.py")
    num_layers, num_slots = phy2log.shape
    settings = _settings(num_slots, num_experts, num_gpus, num_nodes)
    rows = []
    with sglang_sources(root, settings) as ns:
        location = ns.expert_location
        shape = location.ModelConfigForExpertLocation(
            num_layers=num_layers, num_logical_experts=num_experts, num_groups=None)
        model = type("PlacementShape", (), {
            "get_model_config_for_expert_location": classmethod(lambda cls, cfg: shape)})
        model_config = types.SimpleNamespace(hf_config=None, model_class=model)
        if path == "eplb":
            phy = phy2log.cpu().long()
            candidates = location._compute_logical_to_all_physical_map(
                physical_to_logical_map=phy, num_logical_experts=num_experts,
                ep_size=num_gpus, moe_ep_rank=None)
            table = location.compute_logical_to_rank_dispatch_physical_map(
                logical_to_all_physical_map=candidates, ep_size=num_gpus,
                num_physical_experts=num_slots, ep_rank=slice(None)).long()
            return table if ranks is None else table[ranks]
        for rank in range(num_gpus) if ranks is None else ranks:
            meta = location.ExpertLocationMetadata.init_by_mapping(
                model_config, physical_to_logical_map=phy2log.cpu().long(), moe_ep_rank=rank)
            rows.append(meta.logical_to_rank_dispatch_physical_map.long())
    return torch.stack(rows)
