"""One expert-parallel rank of vLLM's EPLB (0.33.0 or 0.34.0), on CPU, for
``test_engines_vllm_multiproc``.

Run as ``python tests/_vllm_ep_worker.py RANK WORLD WORKDIR [SCENARIOS]``; the test starts
WORLD of them. They join a gloo process group (``file://WORKDIR/store``), load vLLM's
released EPLB package from the engine cache (``scripts/fetch_engines.py``) and:

1. run vLLM's own plugin loader (``vllm.plugins.load_general_plugins``) with
   ``VLLM_EPLB_POLICY=eplb``, then build vLLM's ``EplbState`` with its own ``add_model``
   (initial map slot i → expert i % E, the policy taken from ``EPLB_POLICIES``, the
   ``torch_nccl`` communicator, which vLLM runs over the gloo CPU group for CPU weights);
2. rebalance as ``EplbState.rearrange`` does: each rank's int32 physical load window is
   mapped to logical experts and all-reduced, then the policy is called with
   ``(window.cpu(), R, G, N, P, physical_to_logical_map.cpu())``, then weights move:
   - sync: ``rearrange_expert_weights_inplace`` then ``_commit_eplb_maps``;
   - async: ``async_worker.run_rebalance_experts``, then per layer the worker's
     coordinated flag, ``transfer_layer`` and the main thread's ``_move_to_workspace``
     (``move_from_buffer`` + ``_commit_eplb_maps_for_layer``), also with migration
     batching (``schedule_migration_batches_for_layers``);
   - the profile run (zero loads, ``is_profile=True``), and a first call without a map;
3. checks that every local slot holds the weights of the expert the new map puts there,
   and writes ``WORKDIR/rank{RANK}.json`` with the plan digests and checks.

``EplbState.rearrange`` itself cannot run on a CPU: it records ``torch.Event``s (rank 0,
sync) or a ``CpuGpuEvent`` (async), which need an accelerator. Its policy call and the
load mapping are therefore restated here (lines marked ``# as rearrange``); everything
else is vLLM's code.

**Stubs** (modules whose real file imports the engine, CUDA or NIXL; nothing of the
EPLB algorithm): package shells ``vllm``, ``vllm.distributed``, ``vllm.config`` (with
``ModelConfig``/``ParallelConfig`` placeholders used as annotations),
``vllm.config.parallel`` (``EPLBPolicyOption`` executed from the real file),
``vllm.config.utils`` (its hash helper under both releases' names);
``vllm.distributed.parallel_state`` (``get_ep_group`` / ``get_eplb_group`` give a
coordinator over the gloo world: ``ranks``, ``rank_in_group``, ``world_size``,
``unique_name``, ``cpu_group`` = ``device_group`` = WORLD;
``get_node_count`` gives the scenario's node count); ``vllm.distributed.
stateless_coordinator``, ``vllm.distributed.utils``, ``vllm.distributed.nixl_utils``
(no NIXL), ``vllm.distributed.device_communicators.pynccl{,_wrapper}`` (CUDA only),
``vllm.model_executor.models.interfaces``, ``vllm.platforms`` (not ROCm, not CUDA),
``vllm.utils.gpu_sync_debug`` (``gpu_sync_allowed`` is a no-op context) and
``vllm.utils.torch_utils`` (``PIN_MEMORY = False``). Real: ``vllm.envs``,
``vllm.logger``, ``vllm.logging_utils``, ``vllm.plugins`` and every module of
``vllm.distributed.eplb``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
import traceback
import types
from pathlib import Path

import torch
import torch.distributed as dist

# the scenario: 3 MoE layers, 16 experts in 4 groups, 24 slots on 4 ranks (6 each)
LAYERS, EXPERTS, GROUPS, SLOTS_PER_RANK, WINDOW = 3, 16, 4, 6, 8
WIDTHS = (5, 3)  # two weight tensors per layer (e.g. gate-up and down), [local, width]


def _package(name: str, path: Path | None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []
    module.__package__ = name
    return module


def _module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


class Coordinator:
    """What vLLM's ``GroupCoordinator`` offers EPLB, over the gloo world group."""

    def __init__(self, name: str) -> None:
        self.unique_name = f"{name}:0"
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.rank_in_group = self.rank
        self.ranks = list(range(self.world_size))
        self.cpu_group = dist.group.WORLD
        self.device_group = dist.group.WORLD
        self.device_communicator = None


def install_vllm(root: Path, topology: dict[str, int]) -> types.SimpleNamespace:
    """Put the stubs listed in the module docstring into sys.modules, import vLLM's real
    EPLB modules, and return them."""
    from typing import Literal

    from engines import _extract_assignment

    pkg = root / "vllm"
    sys.modules["vllm"] = _package("vllm", pkg)
    sys.modules["vllm.distributed"] = _package("vllm.distributed", pkg / "distributed")
    config = _package("vllm.config", None)
    config.ModelConfig = type("ModelConfig", (), {})
    config.ParallelConfig = type("ParallelConfig", (), {})
    sys.modules["vllm.config"] = config
    _module("vllm.config.parallel", EPLBPolicyOption=_extract_assignment(
        pkg / "config" / "parallel.py", "EPLBPolicyOption", {"Literal": Literal}))
    # the config hash helper: compute_hash_cached in 0.33, renamed hash_config_cached in 0.34
    _module("vllm.config.utils", compute_hash_cached=lambda config: config.compute_hash(),
            hash_config_cached=lambda config: config.compute_hash())

    ep, eplb_group = Coordinator("ep"), Coordinator("eplb")
    _module(
        "vllm.distributed.parallel_state",
        GroupCoordinator=Coordinator,
        get_ep_group=lambda: ep,
        get_eplb_group=lambda: eplb_group,
        get_pp_group=lambda: None,
        get_node_count=lambda: topology["nodes"],
        in_the_same_node_as=lambda *a, **k: None,
        is_local_first_rank=lambda: dist.get_rank() == 0,
    )
    _module("vllm.distributed.stateless_coordinator",
            StatelessGroupCoordinator=type("StatelessGroupCoordinator", (), {}))
    _module("vllm.distributed.utils",
            StatelessProcessGroup=type("StatelessProcessGroup", (), {}),
            is_weak_contiguous=lambda t: t.is_contiguous())
    _module("vllm.distributed.nixl_utils", NixlWrapper=None)
    sys.modules["vllm.distributed.device_communicators"] = _package(
        "vllm.distributed.device_communicators", None)
    _module("vllm.distributed.device_communicators.pynccl",
            PyNcclCommunicator=type("PyNcclCommunicator", (), {}))
    _module("vllm.distributed.device_communicators.pynccl_wrapper",
            ncclDataTypeEnum=type("ncclDataTypeEnum", (), {}))
    sys.modules["vllm.model_executor"] = _package("vllm.model_executor", None)
    sys.modules["vllm.model_executor.models"] = _package("vllm.model_executor.models", None)
    _module("vllm.model_executor.models.interfaces",
            MixtureOfExperts=type("MixtureOfExperts", (), {}))
    platform = types.SimpleNamespace(is_rocm=lambda: False, is_cuda_alike=lambda: False)
    _module("vllm.platforms", current_platform=platform)
    sys.modules["vllm.utils"] = _package("vllm.utils", pkg / "utils")
    _module("vllm.utils.gpu_sync_debug", gpu_sync_allowed=contextlib.nullcontext)
    _module("vllm.utils.torch_utils", PIN_MEMORY=False)

    ns = types.SimpleNamespace(ep=ep)
    for name in ("envs", "logger", "plugins"):
        setattr(ns, name, importlib.import_module(f"vllm.{name}"))
    ns.logger._configure_vllm_root_logger()  # as every vLLM process does at start
    for name in ("policy", "rebalance_execute", "eplb_communicator", "migration_scheduler",
                 "async_worker", "eplb_state"):
        setattr(ns, name, importlib.import_module(f"vllm.distributed.eplb.{name}"))
    return ns


class Model:
    """The ``MixtureOfExperts`` surface ``EplbState.add_model`` reads, with CPU weights.

    Every expert's weights are distinct integers (exact in float32): expert ``e`` of
    layer ``l`` in tensor ``t`` is ``l·10⁴ + e·10² + t·10 + [0, 1, ...]``.
    """

    def __init__(self, world: int, rank: int) -> None:
        self.num_routed_experts = self.num_logical_experts = EXPERTS
        self.num_physical_experts = SLOTS_PER_RANK * world
        self.num_redundant_experts = self.num_physical_experts - EXPERTS
        self.num_local_physical_experts = SLOTS_PER_RANK
        self.num_expert_groups = GROUPS
        self.num_moe_layers = LAYERS
        self.moe_layers: list = []
        initial = [s % EXPERTS for s in range(self.num_physical_experts)]  # vLLM's start
        local = initial[rank * SLOTS_PER_RANK:(rank + 1) * SLOTS_PER_RANK]
        self.expert_weights = [
            [expected(layer, t, torch.tensor(local)) for t in range(len(WIDTHS))]
            for layer in range(LAYERS)
        ]

    def set_eplb_state(self, *args: object) -> None:
        self.eplb_tensors = args


def expected(layer: int, tensor: int, experts: torch.Tensor) -> torch.Tensor:
    """``[len(experts), width]`` the weights of ``experts`` in one layer's tensor."""
    base = layer * 10_000 + experts.to(torch.float32)[:, None] * 100 + tensor * 10
    return base + torch.arange(WIDTHS[tensor], dtype=torch.float32)


def weights_match(model: Model, phy2log: torch.Tensor, rank: int) -> bool:
    """Every local slot holds the weights of the expert ``phy2log`` puts there."""
    local = phy2log[:, rank * SLOTS_PER_RANK:(rank + 1) * SLOTS_PER_RANK]
    return all(
        torch.equal(model.expert_weights[layer][t], expected(layer, t, local[layer]))
        for layer in range(LAYERS) for t in range(len(WIDTHS))
    )


def logical_window(state: object, model_state: object, seed: int, zero: bool) -> torch.Tensor:
    """``[L, E]`` int32 global logical load, as rearrange builds it (# as rearrange)."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(seed * 101 + rank)
    shape = (WINDOW, LAYERS, model_state.physical_to_logical_map.shape[1])
    # rank-local physical counts: heavy-tailed, different on every rank
    window = (torch.rand(shape, generator=gen) ** 4 * 500).to(torch.int32)
    if zero:
        window.zero_()
    model_state.expert_load_window.copy_(window)
    physical_to_logical = model_state.physical_to_logical_map
    invalid = EXPERTS
    logical = torch.zeros(WINDOW, LAYERS, invalid + 1, dtype=window.dtype)
    logical.scatter_add_(
        dim=-1,
        index=physical_to_logical.masked_fill(physical_to_logical < 0, invalid)
        .unsqueeze(0).expand_as(window).long(),
        src=model_state.expert_load_window,
    )
    total = logical[..., :-1].sum(dim=0)
    dist.all_reduce(total)  # _allreduce_list over the EP group
    return total


SCENARIOS = ("global", "hier", "rank-fails", "half-switched")


def main() -> int:
    rank, world, workdir = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    scenarios = sys.argv[4].split(",") if len(sys.argv) > 4 else list(SCENARIOS)
    torch.set_num_threads(1)
    report: dict[str, object] = {"rank": rank}
    try:
        dist.init_process_group("gloo", init_method=f"file://{workdir / 'store'}",
                                rank=rank, world_size=world)
        topology = {"nodes": 1}
        vllm = install_vllm(Path(os.environ["EPLB_VLLM_ROOT"]), topology)
        vllm.plugins.load_general_plugins()  # VLLM_EPLB_POLICY=eplb is in the environment
        from eplb.integrations import vllm as plugin

        report["policy_is_eplb"] = issubclass(vllm.policy.EPLB_POLICIES["default"],
                                              plugin.EplbPolicy)
        for scenario in scenarios:
            topology["nodes"] = 2 if scenario == "hier" else 1
            report[scenario] = run(rank, world, vllm, scenario, topology["nodes"])
    except Exception:
        report["error"] = traceback.format_exc()
    from eplb.integrations import vllm as plugin

    report["agreement_rounds"] = sum(a.round for _, a in plugin._AGREEMENTS.values())
    (workdir / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


def run(rank: int, world: int, vllm: types.SimpleNamespace, scenario: str, nodes: int) -> dict:
    """One scenario on a fresh ``EplbState``; returns its part of the report."""
    from eplb.integrations import vllm as plugin
    from eplb.integrations.agreement import plan_digest

    report: dict[str, object] = {"steps": []}
    parallel = types.SimpleNamespace(
        eplb_config=types.SimpleNamespace(
            use_async=False, window_size=WINDOW, step_interval=100, policy="default",
            communicator="torch_nccl", migration_batching_enabled=False,
            log_balancedness_interval=1),
        enable_elastic_ep=False, num_ubatches=0, data_parallel_size=1)
    model_config = types.SimpleNamespace(model="dummy-moe", compute_hash=lambda: "dummy")
    model = Model(world, rank)
    state = vllm.eplb_state.EplbState(parallel, torch.device("cpu"))
    state.add_model(model, model_config)
    model_state = state.model_states["dummy"]
    num_replicas, num_groups = model.num_physical_experts, model.num_expert_groups
    group = vllm.ep.device_group
    ex, es = vllm.rebalance_execute, vllm.eplb_state

    def step(name: str, new: torch.Tensor, start: float) -> None:
        ok = weights_match(model, model_state.physical_to_logical_map, rank)
        report["steps"].append({
            "name": name, "digest": plan_digest(new), "weights_ok": ok,
            "map_committed": torch.equal(model_state.physical_to_logical_map, new),
            "seconds": round(time.perf_counter() - start, 3)})

    def policy_call(window: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        # as rearrange: with gpu_sync_allowed(): policy(window.cpu(), R, G, N, P, map.cpu())
        return state.policy.rebalance_experts(
            window.cpu(), num_replicas, num_groups, nodes, world,
            None if old is None else old.cpu())

    def sync_move(new: torch.Tensor) -> None:
        ex.rearrange_expert_weights_inplace(
            model_state.physical_to_logical_map, new, model.expert_weights,
            model_state.expert_buffer, group, model_state.communicator, False, None)
        es._commit_eplb_maps(model_state, new_physical_to_logical_map=new)

    def async_move(window: torch.Tensor, batching: bool) -> torch.Tensor:
        model_state.eplb_stats = es.EplbStats(  # as rearrange (async mode)
            global_expert_load_window=window.clone(), num_replicas=num_replicas,
            num_groups=num_groups, num_nodes=nodes, num_gpus=world)
        model_state.rebalanced = True
        old_cpu = model_state.physical_to_logical_map.cpu()
        new = vllm.async_worker.run_rebalance_experts(model_state, state, old_cpu, None)
        batches = None
        if batching:
            batches = vllm.migration_scheduler.schedule_migration_batches_for_layers(
                SLOTS_PER_RANK, old_cpu.numpy(), new.numpy())
        for layer in range(LAYERS):
            flag = torch.tensor([int(model_state.rebalanced)], dtype=torch.int32)
            dist.all_reduce(flag)  # the worker's coordinated continue/stop
            assert int(flag.item()) == world
            metadata = ex.transfer_layer(
                old_layer_indices=old_cpu[layer], new_layer_indices=new[layer],
                expert_weights=model.expert_weights[layer],
                expert_weights_buffer=model_state.expert_buffer,
                communicator=model_state.communicator, ep_group=group,
                layer_idx=layer, enable_migration_batching=batching,
                migration_batches=None if batches is None else batches[layer])
            model_state.pending_result = ex.AsyncEplbLayerResult(
                layer_idx=layer, new_physical_to_logical_map=new[layer],
                transfer_metadata=metadata,
                consumed_event=types.SimpleNamespace(record=lambda: None))
            es._move_to_workspace(model_state, ep_rank=rank)  # the main thread's half
        assert not model_state.rebalanced
        return new

    if scenario in ("global", "hier"):
        start = time.perf_counter()
        window = logical_window(state, model_state, 0, zero=True)
        new = policy_call(window, model_state.physical_to_logical_map)
        ex.rearrange_expert_weights_inplace(  # profile run: a dummy exchange, no commit
            model_state.physical_to_logical_map, new, model.expert_weights,
            model_state.expert_buffer, group, model_state.communicator, True, None)
        report["steps"].append({"name": "profile", "digest": plan_digest(new),
                                "weights_ok": weights_match(
                                    model, model_state.physical_to_logical_map, rank),
                                "map_committed": True, "seconds": 0})
        for seed, name in ((1, "sync-initial-map"), (2, "async"), (3, "async-batched"),
                           (4, "sync-no-old-map")):
            start = time.perf_counter()
            window = logical_window(state, model_state, seed, zero=False)
            if name.startswith("async"):
                new = async_move(window, batching=name.endswith("batched"))
            else:
                old = None if name.endswith("no-old-map") else model_state.physical_to_logical_map
                new = policy_call(window, old)
                sync_move(new)
            step(name, new, start)
        return report

    # failure scenarios (global topology)
    if scenario == "rank-fails":
        from eplb.integrations import vllm as plugin

        real = plugin.rebalance_experts
        if rank == 2:  # a rank-local failure: this rank alone runs out of memory
            def broken(*args, **kwargs):
                raise MemoryError("rank 2 out of memory")

            plugin.rebalance_experts = broken
        try:
            start = time.perf_counter()
            window = logical_window(state, model_state, 5, zero=False)
            new = policy_call(window, model_state.physical_to_logical_map)
            sync_move(new)
            step("rank-2-fails", new, start)
        finally:
            plugin.rebalance_experts = real
        return report
    if scenario == "half-switched":
        # rank 3 was started without the switch: vLLM's own policy answers there
        cls = (vllm.policy.DefaultEplbPolicy if rank == 3
               else plugin.vllm_policy_class({"agree_timeout_s": 3}))
        window = logical_window(state, model_state, 6, zero=False)
        start = time.perf_counter()
        try:
            new = cls.rebalance_experts(window.cpu(), num_replicas, num_groups, nodes, world,
                                        model_state.physical_to_logical_map.cpu())
            report["steps"].append({"name": "half-switched", "digest": plan_digest(new),
                                    "seconds": round(time.perf_counter() - start, 3)})
        except plugin.AgreementError as exc:
            report["agreement_error"] = str(exc)
            report["seconds"] = round(time.perf_counter() - start, 3)
        return report
    raise ValueError(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    sys.exit(main())
