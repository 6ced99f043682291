"""The switch reaches every vLLM process, and each says so in vLLM's own log.

Checked against vLLM's released files (0.33.0 and 0.34.0) (fetched by ``scripts/fetch_engines.py``):
``vllm/envs.py``, ``vllm/logger.py`` + ``vllm/logging_utils/``, ``vllm/plugins``,
``vllm/ray/ray_env.py`` (what Ray data-parallel engine cores receive),
``vllm/v1/executor/ray_env_utils.py`` (what Ray executor workers receive),
``vllm/v1/engine/utils.py`` and ``Platform.validate_environ`` from
``vllm/platforms/interface.py``, all real. Stubs: the package shells ``vllm``,
``vllm.config``, ``vllm.distributed``, ``vllm.ray``, ``vllm.v1``, ``vllm.v1.executor``
(their real ``__init__`` start the engine) and ``vllm.config.parallel`` holding only
``EPLBPolicyOption`` from the real file.
"""

from __future__ import annotations

import ast
import importlib
import io
import json
import logging
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import pytest
import torch
from engines import _extract_assignment, _isolated_modules, _package

from eplb import __version__
from eplb.integrations import vllm as plugin

SWITCHES = (plugin.ENV_VAR, plugin.OPTIONS_ENV_VAR, plugin.LEGACY_ENV_VAR,
            plugin.LEGACY_OPTIONS_ENV_VAR, "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", "VLLM_PLUGINS")


@contextmanager
def _saved_logging() -> Iterator[None]:
    """vLLM's logging config sets the "vllm" logger's handler and propagate=False and a
    record factory: put everything back so later tests' caplog still sees records."""
    vllm_logger = logging.getLogger("vllm")
    saved = (vllm_logger.handlers[:], vllm_logger.level, vllm_logger.propagate,
             logging.getLogRecordFactory())
    try:
        yield
    finally:
        vllm_logger.handlers[:] = saved[0]
        vllm_logger.setLevel(saved[1])
        vllm_logger.propagate = saved[2]
        logging.setLogRecordFactory(saved[3])


@contextmanager
def real_vllm(root: Path) -> Iterator[types.SimpleNamespace]:
    """vLLM's real envs, logger (configured as a vLLM process configures it), plugin
    loader, policy registry and Ray environment helpers, imported from ``root``."""
    with _isolated_modules("vllm"), _saved_logging():
        pkg = root / "vllm"
        for name, path in (("vllm", pkg), ("vllm.config", pkg / "config"),
                           ("vllm.distributed", pkg / "distributed"), ("vllm.ray", pkg / "ray"),
                           ("vllm.v1", pkg / "v1"), ("vllm.v1.executor", pkg / "v1/executor")):
            sys.modules[name] = _package(name, path)
        parallel = types.ModuleType("vllm.config.parallel")
        parallel.EPLBPolicyOption = _extract_assignment(
            pkg / "config" / "parallel.py", "EPLBPolicyOption", {"Literal": Literal})
        sys.modules["vllm.config.parallel"] = parallel
        envs = importlib.import_module("vllm.envs")
        logger_mod = importlib.import_module("vllm.logger")
        logger_mod._configure_vllm_root_logger()  # as every vLLM process does at start
        handler = logging.getLogger("vllm").handlers[0]
        stream = io.StringIO()
        handler.setStream(stream)
        yield types.SimpleNamespace(
            envs=envs,
            log=stream,
            plugins=importlib.import_module("vllm.plugins"),
            policy=importlib.import_module("vllm.distributed.eplb.policy"),
            ray_env=importlib.import_module("vllm.ray.ray_env"),
            ray_env_utils=importlib.import_module("vllm.v1.executor.ray_env_utils"),
            validate_environ=_validate_environ(pkg / "platforms" / "interface.py"),
        )


def _validate_environ(path: Path):
    """``Platform.validate_environ`` from the real file, as a plain function."""
    tree = ast.parse(path.read_text())
    platform = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Platform")
    method = next(n for n in platform.body
                  if isinstance(n, ast.FunctionDef) and n.name == "validate_environ")
    method.decorator_list = []
    namespace = {"os": os, "logger": logging.getLogger("vllm.platforms.interface")}
    exec(compile(ast.Module([method], []), str(path), "exec"), namespace)
    return lambda hard_fail: namespace["validate_environ"](None, hard_fail)


@contextmanager
def switched_off_vllm(root: Path, monkeypatch: pytest.MonkeyPatch
                      ) -> Iterator[types.SimpleNamespace]:
    """:func:`real_vllm` with none of eplb's switch or options variables set."""
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    with real_vllm(root) as ns:
        yield ns


@pytest.fixture
def vllm(vllm_root, monkeypatch):
    with switched_off_vllm(vllm_root, monkeypatch) as ns:
        yield ns


# -- the switch reaches every rank ----------------------------------------------------------


def test_ray_engine_cores_get_the_vllm_prefixed_switch_but_not_the_old_name(vllm, monkeypatch):
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    monkeypatch.setenv(plugin.OPTIONS_ENV_VAR, '{"max_moves": 64}')
    monkeypatch.setenv(plugin.LEGACY_ENV_VAR, "eplb")
    copied = vllm.ray_env.get_env_vars_to_copy(destination="DPMoEEngineCoreActor")
    assert {plugin.ENV_VAR, plugin.OPTIONS_ENV_VAR} <= copied
    assert plugin.LEGACY_ENV_VAR not in copied  # why the old name breaks Ray DP clusters
    # the documented escape hatch for the old name
    monkeypatch.setenv("VLLM_RAY_EXTRA_ENV_VARS_TO_COPY", plugin.LEGACY_ENV_VAR)
    assert plugin.LEGACY_ENV_VAR in vllm.ray_env.get_env_vars_to_copy()


def test_ray_engine_core_actors_are_started_with_exactly_that_environment(vllm_root):
    """``CoreEngineActorManager`` builds its actors' ``RuntimeEnv`` from
    ``get_env_vars_to_copy`` (read from the real source, which needs Ray to run)."""
    tree = ast.parse((vllm_root / "vllm/v1/engine/utils.py").read_text())
    manager = next(n for n in tree.body
                   if isinstance(n, ast.ClassDef) and n.name == "CoreEngineActorManager")
    init = next(n for n in manager.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    calls = {n.func.id for n in ast.walk(init)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"get_env_vars_to_copy", "RuntimeEnv"} <= calls


def test_ray_executor_workers_get_the_whole_driver_environment(vllm, monkeypatch):
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    monkeypatch.setenv(plugin.LEGACY_ENV_VAR, "eplb")
    env = vllm.ray_env_utils.get_driver_env_vars(worker_specific_vars=set())
    assert env[plugin.ENV_VAR] == env[plugin.LEGACY_ENV_VAR] == "eplb"


def test_vllm_does_not_call_the_switch_unknown_once_the_plugin_loaded(vllm, monkeypatch, caplog):
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    vllm.validate_environ(hard_fail=False)
    assert f"Unknown vLLM environment variable detected: {plugin.ENV_VAR}" in caplog.text
    caplog.clear()
    vllm.plugins.load_general_plugins()  # EngineArgs runs this before validate_environ
    vllm.validate_environ(hard_fail=True)  # --fail-on-environ-validation passes too
    assert "Unknown vLLM environment variable" not in caplog.text
    assert vllm.envs.VLLM_EPLB_POLICY == "eplb"


# -- one visible line per process -------------------------------------------------------------


def test_each_process_logs_one_line_through_vllms_handler(vllm, monkeypatch):
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    monkeypatch.setenv(plugin.OPTIONS_ENV_VAR, '{"max_moves": 64}')
    vllm.plugins.load_general_plugins()
    assert issubclass(vllm.policy.EPLB_POLICIES["default"], plugin.EplbPolicy)
    lines = [line for line in vllm.log.getvalue().splitlines() if "eplb" in line]
    assert len(lines) == 1, vllm.log.getvalue()
    line = lines[0]
    assert f"eplb {__version__} active" in line and "INFO" in line
    assert f"{plugin.ENV_VAR}=eplb" in line and '"max_moves": 64' in line
    assert plugin.logger.name.startswith("vllm.")


def test_nothing_is_logged_when_the_switch_is_off(vllm):
    vllm.plugins.load_general_plugins()
    assert "eplb" not in vllm.log.getvalue()
    assert {"default": vllm.policy.DefaultEplbPolicy} == vllm.policy.EPLB_POLICIES


def test_old_switch_name_still_works_and_warns_about_ray(vllm, monkeypatch):
    monkeypatch.setenv(plugin.LEGACY_ENV_VAR, "eplb")
    assert plugin.register() is True
    log = vllm.log.getvalue()
    assert "active" in log and "Ray does not copy it" in log and "WARNING" in log


@pytest.mark.parametrize("switch", [plugin.ENV_VAR, plugin.LEGACY_ENV_VAR])
def test_old_options_name_warns_that_ray_does_not_copy_it(vllm, monkeypatch, switch):
    monkeypatch.setenv(switch, "eplb")
    monkeypatch.setenv(plugin.LEGACY_OPTIONS_ENV_VAR, '{"max_moves": 64}')
    copied = vllm.ray_env.get_env_vars_to_copy(destination="DPMoEEngineCoreActor")
    assert plugin.LEGACY_OPTIONS_ENV_VAR not in copied  # other nodes plan without them
    assert plugin.register() is True
    warnings = [line for line in vllm.log.getvalue().splitlines() if "WARNING" in line]
    assert any(plugin.LEGACY_OPTIONS_ENV_VAR in line and "Ray does not copy it" in line
               and plugin.OPTIONS_ENV_VAR in line for line in warnings), warnings


def test_the_new_options_name_gives_no_ray_warning(vllm, monkeypatch):
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    monkeypatch.setenv(plugin.OPTIONS_ENV_VAR, '{"max_moves": 64}')
    assert plugin.register() is True
    assert "WARNING" not in vllm.log.getvalue()


def test_conflicting_switch_names_change_nothing_and_say_why(vllm, monkeypatch):
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    monkeypatch.setenv(plugin.LEGACY_ENV_VAR, "off")
    assert plugin.register() is False
    assert {"default": vllm.policy.DefaultEplbPolicy} == vllm.policy.EPLB_POLICIES
    assert "disagree" in vllm.log.getvalue()


@pytest.mark.parametrize(("switch", "legacy", "options", "legacy_options"), [
    ("eplb", "EPLB", None, None), ("eplb", "1", None, None), (" on", "true ", None, None),
    ("eplb", "eplb", '{"max_moves": 64}', '{ "max_moves":64 }'),
])
def test_both_names_asking_for_the_same_thing_are_no_conflict(vllm, monkeypatch, switch, legacy,
                                                              options, legacy_options):
    # a cluster moving to the new names may set both; refusing equal requests spelt
    # differently left vLLM's own policy on that node
    monkeypatch.setenv(plugin.ENV_VAR, switch)
    monkeypatch.setenv(plugin.LEGACY_ENV_VAR, legacy)
    if options is not None:
        monkeypatch.setenv(plugin.OPTIONS_ENV_VAR, options)
        monkeypatch.setenv(plugin.LEGACY_OPTIONS_ENV_VAR, legacy_options)
    vllm.plugins.load_general_plugins()
    assert vllm.policy.EPLB_POLICIES["default"] is not vllm.policy.DefaultEplbPolicy
    assert "disagree" not in vllm.log.getvalue()
    if options is not None:
        assert vllm.policy.EPLB_POLICIES["default"].options == {"max_moves": 64}


@pytest.mark.parametrize(("switch", "legacy"), [("eplb", "register"), ("eplb", "bogus")])
def test_names_asking_for_other_things_still_conflict(vllm, monkeypatch, switch, legacy):
    monkeypatch.setenv(plugin.ENV_VAR, switch)
    monkeypatch.setenv(plugin.LEGACY_ENV_VAR, legacy)
    assert plugin.register() is False
    assert "disagree" in vllm.log.getvalue()


def test_options_name_both_planner_and_plugin_options():
    env = {plugin.OPTIONS_ENV_VAR: '{"max_moves": 5, "agree_timeout_s": 30}'}
    assert plugin.options_from_env(env) == {"max_moves": 5, "agree_timeout_s": 30}
    with pytest.raises(ValueError, match="agree_timeout_s"):
        plugin.options_from_env({plugin.OPTIONS_ENV_VAR: '{"agree_timeout_s": -1}'})
    with pytest.raises(ValueError, match="unknown option"):
        plugin.options_from_env({plugin.LEGACY_OPTIONS_ENV_VAR: '{"nope": 1}'})
    # a per-layer list would fail at every rebalance (its length is vLLM's layer count):
    # refused when the plugin loads (attacker pass)
    with pytest.raises(ValueError, match="max_moves must be one int"):
        plugin.options_from_env({plugin.OPTIONS_ENV_VAR: '{"max_moves": [1, 2]}'})


@pytest.mark.parametrize(("options", "said"), [
    ({"refine_step": 16}, "unknown option"),
    ({"policy": "locality"}, "policy must be one of"),
    ({"max_moves": -5}, "max_moves must be a non-negative int"),
    ({"max_moves": [1, 2]}, "max_moves must be one int"),
    ({"agree_timeout_s": "abc"}, "agree_timeout_s must be a number"),
    ({"seed": "x"}, "seed must be an int"),
])
def test_options_set_on_the_class_are_checked_at_the_call(monkeypatch, options, said):
    """The README's way for scripts, ``EplbPolicy.options = {...}``, skipped the start-up
    check: a typo was ignored and a bad value made every call fall back to vLLM's policy
    with an ERROR line only, or raised from float() after planning (attacker pass)."""
    weight = torch.randint(0, 1000, (2, 16), dtype=torch.int32)
    old = (torch.arange(24) % 16).expand(2, 24).contiguous()
    monkeypatch.setattr(plugin.EplbPolicy, "options", dict(options, agree_timeout_s=0)
                        if "agree_timeout_s" not in options else options)
    with pytest.raises(ValueError, match=f"EplbPolicy.options: .*{said}"):
        plugin.EplbPolicy.rebalance_experts(weight, 24, 4, 2, 8, old)
    monkeypatch.setattr(plugin.EplbPolicy, "options", {"refine_steps": 16, "agree_timeout_s": 0})
    assert plugin.EplbPolicy.rebalance_experts(weight, 24, 4, 2, 8, old).shape == (2, 24)


def test_the_agreement_uses_vllms_ep_group_fields(vllm_root):
    """The plugin reads ``get_ep_group()`` and its ``ranks``, ``rank_in_group``,
    ``world_size`` and ``unique_name``: they exist in each vLLM release's ``GroupCoordinator``."""
    tree = ast.parse((vllm_root / "vllm/distributed/parallel_state.py").read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "get_ep_group" in functions
    coordinator = next(n for n in tree.body
                       if isinstance(n, ast.ClassDef) and n.name == "GroupCoordinator")
    assigned = {t.attr for n in ast.walk(coordinator) if isinstance(n, (ast.Assign,
                ast.AnnAssign)) for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Attribute)}
    assert {"ranks", "rank_in_group", "world_size", "unique_name"} <= assigned | {
        n.name for n in coordinator.body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("options", ['{"seed": 1}', "[" * 100_000])
def test_deeply_nested_options_under_both_names_are_refused_by_name(options):
    """Both options names set, the old one nested 10**5 deep: Python's JSON decoder raised
    ``RecursionError`` while the two were compared, so ``register`` logged only "maximum
    recursion depth exceeded", naming no setting (attacker pass)."""
    env = {plugin.OPTIONS_ENV_VAR: options, plugin.LEGACY_OPTIONS_ENV_VAR: "[" * 100_000}
    said = "disagree" if options.startswith("{") else "nests too deeply"
    with pytest.raises(ValueError, match=said):
        plugin.options_from_env(env)


def test_disagreeing_options_names_are_quoted_short():
    """A long value under the old options name made the disagreement message (logged by
    every vLLM process where register() runs) quote all of it: 100,000 characters for a
    pasted file (attacker pass). Long values are quoted as the options' own errors quote
    them: their first 200 characters and their length."""
    env = {plugin.OPTIONS_ENV_VAR: '{"seed": 1}', plugin.LEGACY_OPTIONS_ENV_VAR: "x" * 100_000}
    with pytest.raises(ValueError, match=r"disagree") as raised:
        plugin.options_from_env(env)
    message = str(raised.value)
    assert len(message) < 400
    assert "(100000 characters)" in message and '{"seed": 1}' in message


def test_an_unknown_switch_value_is_quoted_short(monkeypatch, caplog):
    """A switch value that means nothing is ignored with a warning every vLLM process
    logs: a long one is quoted by its first 200 characters and its length, as the
    options' values are (it was quoted whole)."""
    monkeypatch.setenv(plugin.ENV_VAR, "x" * 100_000)
    monkeypatch.delenv(plugin.LEGACY_ENV_VAR, raising=False)
    with caplog.at_level(logging.WARNING, logger=plugin.LOGGER_NAME):
        assert plugin.register() is False
    warning = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(warning) == 1
    assert "(100000 characters)" in warning[0] and len(warning[0]) < 600


@pytest.mark.parametrize("options", [
    {"agree_timeout_s": "x" * 100_000}, {"policy": "x" * 100_000},
    {"max_moves": "x" * 100_000}, {"drift": "x" * 100_000}, {"move_price": [1] * 50_000},
    {"skip_threshold": "x" * 100_000}, {"group_share": "x" * 100_000}, {"x" * 100_000: 1},
])
def test_a_bad_option_value_is_quoted_short(monkeypatch, caplog, options):
    """A bad options value leaves the plugin unregistered with a warning every vLLM process
    logs: a long value is quoted short, as the switch's and num_candidates' are (most were
    quoted whole: a 100 kB line in each process's log)."""
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    monkeypatch.setenv(plugin.OPTIONS_ENV_VAR, json.dumps(options))
    for name in (plugin.LEGACY_ENV_VAR, plugin.LEGACY_OPTIONS_ENV_VAR):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING, logger=plugin.LOGGER_NAME):
        assert plugin.register() is False
    warning = [r.getMessage() for r in caplog.records if "not registered" in r.getMessage()]
    assert len(warning) == 1
    assert len(warning[0]) < 400 and plugin.OPTIONS_ENV_VAR in warning[0]
    assert next(iter(options))[:10] in warning[0]  # the option is named
