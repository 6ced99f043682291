"""SGLang's weight cache (``--weight-cache-mode daemon|client``) and eplb's start-up layout.

With ``--enable-eplb``, SGLang 0.5.23's weight-cache daemon builds "the same initial
physical expert layout as the engine" (``sglang/srt/weight_cache/daemon.py``,
``WeightCacheDaemon._initialize_eplb_expert_location_metadata``, which calls
``compute_initial_expert_location_metadata``), loads the experts by it, and the engine
maps those weights zero-copy. The daemon never runs ``load_plugins`` (it is a ``spawn``
child whose target is ``run_weight_cache_daemon``), so for an ``--init-expert-location``
holding logical counts it gets SGLang's own algorithm. The engine's layout must then be
SGLang's too, or its tokens go to the wrong experts; runtime rebalances (with a placement
in force) still plan with eplb.

Runs SGLang's real ``load_plugins``, ``compute_initial_expert_location_metadata`` →
``init_by_eplb`` → ``rebalance_experts`` and ``EPLBManager.rebalance`` through the harness
of ``test_engines_sglang_runtime`` (its docstring lists the stubs). The daemon's process is
the same chain without ``load_plugins``.
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import pytest
import torch
from test_engines_sglang_runtime import _model_class, make_settings, rebalance, sglang_runtime

import eplb
from eplb.integrations import sglang as plugin

LAYERS, EXPERTS, GPUS, REDUNDANT = 4, 48, 8, 16


@pytest.fixture
def switch(monkeypatch):
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    monkeypatch.delenv(plugin.OPTIONS_ENV_VAR, raising=False)
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")


def counts() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(2, LAYERS, EXPERTS, generator=gen) ** 3 * 900).to(torch.int32)


def start_up_layout(root: Path, init_file: Path, mode: str, plugins: bool) -> torch.Tensor:
    """The initial ``physical_to_logical_map`` a process computes at start-up: an engine's
    scheduler (``plugins``: it ran ``load_plugins``) or the weight-cache daemon (it did not)."""
    settings = make_settings(nnodes=1, ep_size=GPUS, redundant=REDUNDANT)
    settings.exec.moe.init_expert_location = str(init_file)
    settings.model.weight_cache_mode = mode
    with sglang_runtime(root, settings) as sg:
        if plugins:
            sg.plugins.load_plugins()
        model_config = types.SimpleNamespace(
            hf_config=None, model_class=_model_class(LAYERS, EXPERTS, None, sg.expert_location))
        metadata = sg.expert_location.compute_initial_expert_location_metadata(
            model_config=model_config, moe_ep_rank=0)
        return metadata.physical_to_logical_map


@pytest.fixture
def init_file(tmp_path) -> Path:
    path = tmp_path / "logical_count.json"
    path.write_text(json.dumps({"logical_count": counts().sum(0).tolist()}))
    return path


@pytest.mark.parametrize("mode", ["daemon", "client"])
def test_the_engine_starts_on_the_layout_the_weight_cache_daemon_loaded(
        sglang_root, switch, init_file, caplog, mode):
    daemon = start_up_layout(sglang_root, init_file, mode, plugins=False)
    with caplog.at_level(logging.WARNING):
        engine = start_up_layout(sglang_root, init_file, mode, plugins=True)
    assert torch.equal(engine, daemon)  # else the engine's slots hold other experts
    assert "--weight-cache-mode" in caplog.text and "--init-expert-location" in caplog.text


def test_without_the_weight_cache_the_start_up_layout_is_eplbs(sglang_root, switch, init_file):
    engine = start_up_layout(sglang_root, init_file, "off", plugins=True)
    sglang_own = start_up_layout(sglang_root, init_file, "off", plugins=False)
    want = eplb.rebalance_experts(counts().sum(0).long(), EXPERTS + REDUNDANT, 1, 1, GPUS,
                                  policy="global")[0]
    assert torch.equal(engine, want) and not torch.equal(engine, sglang_own)


def test_with_the_weight_cache_runtime_rebalances_still_plan_with_eplb(sglang_root, switch):
    settings = make_settings(nnodes=1, ep_size=GPUS, redundant=REDUNDANT)
    settings.model.weight_cache_mode = "daemon"
    with sglang_runtime(sglang_root, settings) as sg:
        sg.plugins.load_plugins()
        model_config = types.SimpleNamespace(
            hf_config=None, model_class=_model_class(LAYERS, EXPERTS, None, sg.expert_location))
        trivial = sg.expert_location.ExpertLocationMetadata.init_trivial(model_config, 0)
        sg.expert_location.set_global_expert_location_metadata(trivial)  # what SGLang installs
        got = rebalance(sg, model_config, counts(), LAYERS).installed[0][0]
    want = eplb.rebalance_experts(counts().sum(0).long(), EXPERTS + REDUNDANT, 1, 1, GPUS,
                                  policy="global",
                                  old_phy2log=trivial.physical_to_logical_map_cpu)[0]
    assert torch.equal(got.physical_to_logical_map, want)
