"""SGLang's runtime rebalancing (``--enable-eplb``) plans with eplb, through SGLang's code.

Runs SGLang 0.5.23's released files from the engine cache (``scripts/fetch_engines.py``):
its plugin loader ``sglang.srt.plugins.load_plugins`` (which finds eplb's installed entry
point) and ``HookRegistry``, ``sglang.srt.environ``, and the rebalancing chain
``EPLBManager.rebalance`` → ``ExpertLocationMetadata.init_by_eplb`` →
``eplb_algorithms.compute_algorithm`` / ``rebalance_experts`` →
``update_expert_location_with_recovery``, all real.

Stubs (modules whose real file starts the server stack or needs a GPU): package shells
``sglang``, ``sglang.srt``; ``sglang.srt.runtime_context`` (the server settings below);
``sglang.srt.elastic_ep.elastic_ep`` (elastic EP off); ``sglang.srt.model_loader``
(the model class); ``sglang.srt.eplb.expert_distribution`` (a recorder returning given
counts); ``sglang.srt.eplb.expert_location_updater`` (only the class name: the updater
instance is a recorder of what SGLang asks it to install); and
``sglang.srt.model_executor.model_runner_components.moe_ep_setup`` (LP dispatch only).

eplb's launcher: ``test_engines_sglang_launcher.py``; the function SGLang's rebalance
calls, called directly: ``test_engines_sglang_options.py`` (options, dispatch) and
``test_engines_sglang_counts.py`` (old maps, step counts).
"""

from __future__ import annotations

import ast
import importlib
import json
import logging
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from engines import _isolated_modules, _package
from helpers import DEEPSEEK_DIR as REAL

import eplb
from eplb import Placement, Topology
from eplb.integrations import sglang as plugin
from eplb.integrations import sglang_call


class Recorder:
    """The expert-distribution recorder EPLBManager dumps: returns ``counts``."""

    recording = True

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None

    def start_record(self) -> None:
        self.recording = True

    def dump_record(self, output_mode: str) -> dict:
        assert output_mode == "object"
        return {"logical_count": self.counts, "average_utilization_rate_over_window": None}


class Updater:
    """Stands for SGLang's ExpertLocationUpdater: records the metadata to install."""

    def __init__(self) -> None:
        self.installed: list = []

    def update(self, weights, metadata, *, update_layer_ids, nnodes, rank, use_flat_topology):
        self.installed.append((metadata, list(update_layer_ids), nnodes, use_flat_topology))
        return []  # no expert is missing: nothing to load from disk


def _model_class(num_layers: int, num_experts: int, num_groups: int | None, el) -> type:
    def get_model_config_for_expert_location(cls, hf_config):
        return el.ModelConfigForExpertLocation(num_layers, num_experts, num_groups)

    return type("MoEModel", (), {"get_model_config_for_expert_location":
                                 classmethod(get_model_config_for_expert_location)})


@contextmanager
def sglang_runtime(root: Path, settings: types.SimpleNamespace) -> Iterator[types.SimpleNamespace]:
    with _isolated_modules("sglang"):
        pkg = root / "sglang"
        sys.modules["sglang"] = _package("sglang", pkg)
        sys.modules["sglang.srt"] = _package("sglang.srt", pkg / "srt")
        runtime = types.ModuleType("sglang.srt.runtime_context")
        runtime.get_device = lambda: settings.device
        runtime.get_exec = lambda: settings.exec
        runtime.get_parallel = lambda: settings.parallel
        runtime.get_resources = lambda: settings.resources
        runtime.get_model = lambda: settings.model
        sys.modules["sglang.srt.runtime_context"] = runtime
        sys.modules["sglang.srt.elastic_ep"] = _package("sglang.srt.elastic_ep", None)
        elastic = types.ModuleType("sglang.srt.elastic_ep.elastic_ep")
        elastic.ElasticEPStateManager = types.SimpleNamespace(
            instance=lambda: None, healthy_rank_state=lambda: None)
        elastic.elastic_expanded_world_enabled = lambda: False
        sys.modules["sglang.srt.elastic_ep.elastic_ep"] = elastic
        loader = types.ModuleType("sglang.srt.model_loader")
        loader.get_model_architecture = lambda model_config: (model_config.model_class, None)
        sys.modules["sglang.srt.model_loader"] = loader
        distribution = types.ModuleType("sglang.srt.eplb.expert_distribution")
        distribution.get_global_expert_distribution_recorder = (
            lambda: settings.resources.expert_distribution_recorder)
        sys.modules["sglang.srt.eplb.expert_distribution"] = distribution
        updater = types.ModuleType("sglang.srt.eplb.expert_location_updater")
        updater.ExpertLocationUpdater = Updater
        sys.modules["sglang.srt.eplb.expert_location_updater"] = updater
        for name in ("sglang.srt.model_executor",
                     "sglang.srt.model_executor.model_runner_components"):
            sys.modules[name] = _package(name, None)
        setup = types.ModuleType(
            "sglang.srt.model_executor.model_runner_components.moe_ep_setup")
        setup.init_lplb_solvers = lambda model_config: None
        sys.modules[setup.__name__] = setup

        ns = types.SimpleNamespace(settings=settings)
        ns.plugins = importlib.import_module("sglang.srt.plugins")
        ns.algorithms = importlib.import_module("sglang.srt.eplb.eplb_algorithms")
        ns.expert_location = importlib.import_module("sglang.srt.eplb.expert_location")
        ns.manager = importlib.import_module("sglang.srt.eplb.eplb_manager")
        yield ns


def make_settings(*, nnodes: int, ep_size: int, redundant: int, algorithm: str = "auto"):
    moe = types.SimpleNamespace(
        init_expert_location="trivial", ep_num_redundant_experts=redundant,
        ep_dispatch_algorithm="dynamic", moe_a2a_backend="none", eplb_algorithm=algorithm,
        ep_join_mode="none", eplb_rebalance_layers_per_chunk=None,
        eplb_rebalance_num_iterations=1000, expert_distribution_recorder_buffer_size=1000,
        eplb_min_rebalancing_utilization_threshold=1.0)
    return types.SimpleNamespace(
        device=types.SimpleNamespace(device="cpu"),
        exec=types.SimpleNamespace(moe=moe),
        parallel=types.SimpleNamespace(ep_size=ep_size, nnodes=nnodes, tp_size=ep_size,
                                       tp_rank=0, elastic_ep_initial_size=None,
                                       ep_join_rank_offset=0),
        resources=types.SimpleNamespace(expert_distribution_recorder=Recorder(),
                                        expert_location_metadata=None),
        model=types.SimpleNamespace(model_path="unused", load_format="auto"),
    )


def rebalance(sg, model_config, counts: torch.Tensor, num_layers: int) -> Updater:
    """One ``EPLBManager.rebalance()`` of SGLang on ``counts [T, L, E]``."""
    sg.settings.resources.expert_distribution_recorder.counts = counts
    updater = Updater()
    model = types.SimpleNamespace(routed_experts_weights_of_layer={i: None
                                                                   for i in range(num_layers)})
    manager = sg.manager.EPLBManager(
        model_config=model_config, get_model=lambda: model,
        get_expert_location_updater=lambda: updater, get_expert_backup_client=lambda: None,
        get_weight_updater=lambda: types.SimpleNamespace(update_weights_from_disk=None))
    for _ in manager.rebalance():  # a generator: yields between layer chunks
        pass
    assert len(updater.installed) == 1
    return updater


def deepseek_counts() -> torch.Tensor:
    path = REAL / "prefill_in4096.json"
    if not path.is_file():
        pytest.skip(f"real DeepSeek-V3 loads not found at {path}"
                    " (set EPLB_REAL_DATA to the real-data folder)")
    counts = torch.tensor(json.loads(path.read_text())["logical_count"], dtype=torch.int32)
    return torch.stack([counts // 2, counts - counts // 2])  # [T=2, 61, 256] as dumped


def maps_in_force(monkeypatch) -> list:
    """The list the hook's planner calls append the map in force they were given to."""
    calls = []
    real = eplb.rebalance_experts

    def spy(*args, **kwargs):
        calls.append(kwargs.get("old_phy2log"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sglang_call, "rebalance_experts", spy)
    return calls


@pytest.fixture
def switch(monkeypatch):
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    monkeypatch.delenv(plugin.OPTIONS_ENV_VAR, raising=False)
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    monkeypatch.setattr(plugin, "_ANNOUNCED", False)


def test_sglang_loads_eplb_and_its_deepseek_rebalance_runs_eplb(sglang_root, switch, caplog):
    caplog.set_level(logging.INFO)
    settings = make_settings(nnodes=4, ep_size=32, redundant=32)
    with sglang_runtime(sglang_root, settings) as sg:
        sg.plugins.load_plugins()  # SGLang's own loader: finds eplb's entry point
        assert getattr(sg.algorithms.rebalance_experts, "__wrapped__", None) is not None
        model_config = types.SimpleNamespace(
            hf_config=None, model_class=_model_class(61, 256, 8, sg.expert_location))
        counts = deepseek_counts()
        updater = rebalance(sg, model_config, counts, 61)
        metadata, layers, nnodes, flat = updater.installed[0]
        assert layers == list(range(61)) and nnodes == 4 and not flat
        got = metadata.physical_to_logical_map
        # SGLang chose deepseek_hierarchical (auto, 8 groups on 4 nodes): eplb's plan
        want = eplb.rebalance_experts(counts.sum(0).long(), 288, 8, 4, 32,
                                      policy="hierarchical")[0]
        assert torch.equal(got, want)
        placement = Placement.from_phy2log(got, 256, Topology(288, 32, 4, 8), "hierarchical")
        placement.validate()  # includes: every group's replicas on one node
        # and it is not what SGLang's own algorithm gives
        theirs = sg.algorithms.rebalance_experts.__wrapped__(
            tokens_per_expert=counts, num_physical_experts=288, num_local_physical_experts=9,
            num_groups=8, num_nodes=4, algorithm=sg.algorithms.EplbAlgorithm.deepseek_hierarchical)
        assert not torch.equal(theirs[0], got)
        ours_bal = placement.balancedness(counts.sum(0).double())
        theirs_bal = Placement.from_phy2log(theirs[0], 256, Topology(288, 32, 4, 8),
                                            "hierarchical").balancedness(counts.sum(0).double())
        assert ours_bal >= theirs_bal, (ours_bal, theirs_bal)
    assert "eplb" in caplog.text and "plans SGLang's expert rebalancing" in caplog.text


def test_a_sglang_without_the_hooked_function_is_not_told_eplb_plans(sglang_root, switch,
                                                                    monkeypatch, caplog):
    """SGLang's own loader runs eplb's plugin, but the function the hook wraps is gone (a
    later SGLang renaming it): the plugin says it is not registered and SGLang keeps its
    algorithm. It used to register and log that eplb plans, and SGLang then logged that it
    failed to apply the hook (attacker pass)."""
    caplog.set_level(logging.INFO)
    with sglang_runtime(sglang_root, make_settings(nnodes=1, ep_size=8, redundant=0)) as sg:
        monkeypatch.delattr(sg.algorithms, "rebalance_experts")
        sg.plugins.load_plugins()
    assert (f"SGLang plugin not registered: this SGLang has no {plugin.HOOK_TARGET}, the "
            "function eplb replaces") in caplog.text
    assert "will be eplb" not in caplog.text


def test_under_static_dispatch_eplb_plans_for_the_nearest_replica(sglang_root, switch,
                                                                  monkeypatch, caplog):
    # SGLang with an all-to-all backend (DeepEP) dispatches statically: a token goes to the
    # expert's replica nearest its GPU. eplb's runtime plan is made for that rule
    from sglang_dispatch import sglang_dispatch_tables

    from eplb.core.dispatch import table_gpu_loads

    caplog.set_level(logging.INFO)
    settings = make_settings(nnodes=4, ep_size=32, redundant=32)
    settings.exec.moe.ep_dispatch_algorithm = "static"
    settings.exec.moe.moe_a2a_backend = "deepep"
    # SGLang builds rank 0's static table (it asks torch.distributed which rank it is)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: 0)
    counts = deepseek_counts()
    weight = counts.sum(0).long()[3:]  # the MoE layers (the dense rows carry nothing)
    with sglang_runtime(sglang_root, settings) as sg:
        sg.plugins.load_plugins()
        model_config = types.SimpleNamespace(
            hf_config=None, model_class=_model_class(61, 256, 8, sg.expert_location))
        got = rebalance(sg, model_config, counts, 61).installed[0][0].physical_to_logical_map
    total = counts.sum(0).long()
    near = eplb.rebalance_experts(total, 288, 8, 4, 32, policy="global", dispatch="nearest")[0]
    flat = eplb.rebalance_experts(total, 288, 8, 4, 32, policy="global")[0]
    # every layer is one of the two plans (the nearest-aware one, or the even-split one
    # where SGLang's rule serves that better)
    assert ((got == near).all(1) | (got == flat).all(1)).all()
    hierarchical = eplb.rebalance_experts(total, 288, 8, 4, 32, policy="hierarchical")[0]

    def served(phy2log):  # balancedness under SGLang's own runtime dispatch table
        table = sglang_dispatch_tables(phy2log[3:], 256, 32, 4, path="eplb", root=sglang_root)
        loads = table_gpu_loads(weight, table, 32, 288)
        return float(loads.mean(1).sum() / loads.amax(1).sum())

    ours, theirs = served(got), served(hierarchical)
    assert ours > 0.99 and ours > theirs + 0.1, (ours, theirs)
    assert ours >= max(served(near), served(flat)) - 1e-12
    # dispatch "even" in the options keeps the even-split plan (SGLang's algorithm choice)
    monkeypatch.setenv(plugin.OPTIONS_ENV_VAR, '{"dispatch": "even"}')
    with sglang_runtime(sglang_root, settings) as sg:
        sg.plugins.load_plugins()
        model_config = types.SimpleNamespace(
            hf_config=None, model_class=_model_class(61, 256, 8, sg.expert_location))
        even = rebalance(sg, model_config, counts, 61).installed[0][0].physical_to_logical_map
    assert torch.equal(even, hierarchical)


def test_the_locality_policy_plans_sglangs_runtime_rebalances(sglang_root, switch,
                                                              monkeypatch, caplog):
    """``{"policy": "locality"}`` under static dispatch on several nodes: SGLang's own
    rebalance chain installs eplb's locality plan, and the next rebalance re-plans it from
    the map in force (it was refused, so ``--enable-eplb`` gave back a locality start-up
    file's cross-node savings at the first rebalance; new-user pass). Elsewhere it plans
    globally and logs why."""
    caplog.set_level(logging.INFO)
    settings = make_settings(nnodes=4, ep_size=32, redundant=32)
    settings.exec.moe.ep_dispatch_algorithm = "static"
    settings.exec.moe.moe_a2a_backend = "deepep"
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: 0)
    monkeypatch.setenv(plugin.OPTIONS_ENV_VAR, '{"policy": "locality", "slack": 0.05}')
    counts = deepseek_counts()
    total = counts.sum(0).long()
    drifted = torch.stack([counts[1], counts[0] * 2])  # another window: the halves reweighed
    in_force = maps_in_force(monkeypatch)  # (None, then eplb's plans)
    with sglang_runtime(sglang_root, settings) as sg:
        sg.plugins.load_plugins()
        model_config = types.SimpleNamespace(
            hf_config=None, model_class=_model_class(61, 256, 8, sg.expert_location))
        first = rebalance(sg, model_config, counts, 61).installed[0][0]
        sg.expert_location.set_global_expert_location_metadata(first)
        installed = [first.physical_to_logical_map.clone()]  # (SGLang updates it in place)
        second = rebalance(sg, model_config, drifted, 61).installed[0][0]
        installed.append(second.physical_to_logical_map.clone())
    assert in_force[0] is None and torch.equal(in_force[1], installed[0])
    previous = None
    for got, window in zip(installed, (total, drifted.sum(0)), strict=True):
        want = eplb.plan(window.long(), 288, 32, 4, 8, policy="locality", dispatch="nearest",
                         slack=0.05, previous=previous)
        assert want.policy == "locality"
        assert torch.equal(got, want.phy2log)
        previous = want
    assert "cannot plan this rebalance" not in caplog.text
    # SGLang's default dynamic dispatch: no nearest rule to plan for, so globally
    settings.exec.moe.ep_dispatch_algorithm = "dynamic"
    with sglang_runtime(sglang_root, settings) as sg:
        sg.plugins.load_plugins()
        model_config = types.SimpleNamespace(
            hf_config=None, model_class=_model_class(61, 256, 8, sg.expert_location))
        even = rebalance(sg, model_config, counts, 61).installed[0][0].physical_to_logical_map
    # (from the map in force SGLang passes)
    assert torch.equal(even, eplb.rebalance_experts(total, 288, 8, 4, 32, policy="global",
                                                    old_phy2log=in_force[2])[0])
    assert "policy 'locality' cannot plan this rebalance" in caplog.text


@pytest.mark.parametrize("algorithm", ["auto", "deepseek_vec", "deepseek_hierarchical"])
def test_models_without_expert_groups(sglang_root, switch, algorithm):
    """``num_groups`` is None (e.g. Qwen3 MoE): SGLang picks a global algorithm; eplb plans
    globally, also when asked for a hierarchical one (SGLang's own would fail)."""
    settings = make_settings(nnodes=2, ep_size=8, redundant=16, algorithm=algorithm)
    with sglang_runtime(sglang_root, settings) as sg:
        sg.plugins.load_plugins()
        model_config = types.SimpleNamespace(
            hf_config=None, model_class=_model_class(4, 48, None, sg.expert_location))
        gen = torch.Generator().manual_seed(3)
        counts = (torch.rand(3, 4, 48, generator=gen) ** 3 * 900).to(torch.int32)
        updater = rebalance(sg, model_config, counts, 4)
        got = updater.installed[0][0].physical_to_logical_map
        want = eplb.rebalance_experts(counts.sum(0).long(), 64, 1, 2, 8, policy="global")[0]
        assert torch.equal(got, want)
        Placement.from_phy2log(got, 48, Topology(64, 8, 2, 1), "global").validate()


def test_the_next_rebalance_starts_from_the_placement_in_force(sglang_root, switch, monkeypatch):
    settings = make_settings(nnodes=1, ep_size=8, redundant=16)
    calls = maps_in_force(monkeypatch)
    with sglang_runtime(sglang_root, settings) as sg:
        sg.plugins.load_plugins()
        model_config = types.SimpleNamespace(
            hf_config=None, model_class=_model_class(4, 48, None, sg.expert_location))
        gen = torch.Generator().manual_seed(4)
        counts = (torch.rand(2, 4, 48, generator=gen) ** 3 * 900).to(torch.int32)
        first = rebalance(sg, model_config, counts, 4).installed[0][0]
        sg.expert_location.set_global_expert_location_metadata(first)  # what SGLang installs
        drifted = (counts.double() * (1 + 0.2 * torch.rand(counts.shape, generator=gen))).int()
        second = rebalance(sg, model_config, drifted, 4).installed[0][0]
    assert calls[0] is None and torch.equal(calls[1], first.physical_to_logical_map_cpu)
    assert second.physical_to_logical_map.shape == first.physical_to_logical_map.shape


def test_switch_off_keeps_sglangs_algorithm(sglang_root, monkeypatch):
    monkeypatch.delenv(plugin.ENV_VAR, raising=False)
    settings = make_settings(nnodes=1, ep_size=8, redundant=16)
    with sglang_runtime(sglang_root, settings) as sg:
        original = sg.algorithms.rebalance_experts
        sg.plugins.load_plugins()
        assert sg.algorithms.rebalance_experts is original


def test_an_unknown_switch_value_is_quoted_short(monkeypatch, caplog):
    """A switch value that means nothing is ignored with a warning every SGLang process
    logs: a long one is quoted by its first 200 characters and its length, as vLLM's
    plugin quotes its switch (it was quoted whole)."""
    monkeypatch.setenv(plugin.ENV_VAR, "x" * 100_000)
    with caplog.at_level(logging.WARNING, logger=plugin.logger.name):
        assert plugin.register() is False
    warning = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(warning) == 1
    assert "(100000 characters)" in warning[0] and len(warning[0]) < 400


def test_elastic_algorithm_stays_sglangs(switch):
    algorithm = types.SimpleNamespace(name="elasticity_aware_hierarchical")
    seen = []

    def original(**kwargs):
        seen.append(kwargs)
        return "sglang's answer"

    got = plugin._hook(original, tokens_per_expert=torch.ones(1, 2, 4),
                       num_physical_experts=8, num_local_physical_experts=2, num_groups=2,
                       num_nodes=2, algorithm=algorithm)
    assert got == "sglang's answer" and len(seen) == 1


def test_sglang_runs_its_plugins_in_the_launcher_and_every_scheduler(sglang_root):
    def calls_in(path: Path, function: str | None) -> set[str]:
        tree = ast.parse(path.read_text())
        scope = tree if function is None else next(
            n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
        return {n.func.id for n in ast.walk(scope)
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}

    assert "load_plugins" in calls_in(sglang_root / "sglang/launch_server.py", None)
    scheduler = sglang_root / "sglang/srt/managers/scheduler.py"
    assert "load_plugins" in calls_in(scheduler, "run_scheduler_process")
