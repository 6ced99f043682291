"""Load the pure-Python EPLB code of the released engines from a local cache.

This test helper (not part of the eplb package) backs the engine proof tests
(``tests/test_engines_*.py``) and the engine benchmarks. ``scripts/fetch_engines.py``
downloads the released wheels (``pip download --no-deps``) and extracts only the files
listed in :data:`ENGINES` into
``$EPLB_ENGINE_CACHE`` (default ``~/.cache/eplb-engines``); nothing of the engines is
ever copied into the repository.

The engines' package ``__init__`` files pull in CUDA kernels, distributed runtimes and
servers, so the context managers here put a few *stub* modules into ``sys.modules``
(listed in each docstring, the minimum needed) and then import the real extracted
files under their real module names. On exit ``sys.modules`` is restored, so the stubs
never leak into other tests. Module top level imports only the standard library.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ENGINES",
    "FETCH_HINT",
    "VLLM_RELEASES",
    "EngineSpec",
    "engine_cache_dir",
    "engine_root",
    "extract_function",
    "fetched_root",
    "sglang_sources",
    "vllm_sources",
]

FETCH_HINT = "engine wheels not fetched: run python scripts/fetch_engines.py"
MARKER = "FETCHED.json"


@dataclass(frozen=True)
class EngineSpec:
    """One released engine: PyPI name, pinned version and the wheel members we keep."""

    name: str
    version: str
    members: tuple[str, ...]  # path prefixes ("dir/") or exact paths inside the wheel

    @property
    def folder(self) -> str:
        return f"{self.name}-{self.version}"

    def wants(self, member: str) -> bool:
        """True when wheel member ``member`` is one we extract (only ``.py`` and METADATA)."""
        if not (member.endswith(".py") or member.endswith("/METADATA")):
            return False
        return any(member == m or (m.endswith("/") and member.startswith(m)) for m in self.members)


def _vllm_members(version: str) -> tuple[str, ...]:
    """The files of a vLLM wheel the tests run (the same list for every tested release)."""
    return (
        "vllm/distributed/eplb/",  # policy/, eplb_state.py (compute_logical_maps), ...
        "vllm/config/parallel.py",  # EPLBConfig and EPLBPolicyOption
        "vllm/plugins/__init__.py",  # load_general_plugins (entry-point loader)
        "vllm/engine/arg_utils.py",  # CLI flag names (--enable-eplb, --eplb-config)
        # the plugin's switch, log line and rank agreement (tests/test_engines_vllm_*.py)
        "vllm/envs.py",  # environment_variables, VLLM_RAY_EXTRA_ENV_VARS_TO_COPY
        "vllm/logger.py",  # the "vllm" logger hierarchy and its handler
        "vllm/logging_utils/",  # formatters logger.py configures
        "vllm/ray/ray_env.py",  # get_env_vars_to_copy (Ray DP engine cores)
        "vllm/v1/engine/utils.py",  # CoreEngineActorManager copies that env to actors
        "vllm/v1/executor/ray_env_utils.py",  # Ray executor workers: driver env
        "vllm/platforms/interface.py",  # validate_environ: unknown VLLM_* variables
        "vllm/distributed/parallel_state.py",  # get_ep_group, GroupCoordinator fields
        "vllm/utils/math_utils.py",  # round_up (0.34's eplb_communicator imports it)
        f"vllm-{version}.dist-info/METADATA",
    )


# Keys are what engine_root() and the fixtures take. "vllm" stays the release the issues'
# figures were measured against (0.33.0: the benchmarks run it); every vLLM key in
# VLLM_RELEASES is tested. DefaultEplbPolicy (policy/default.py) is byte-identical in
# 0.33.0 and 0.34.0; 0.34.0 changed the weight-moving code around it.
ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec("vllm", "0.33.0", _vllm_members("0.33.0")),
    "vllm-0.34": EngineSpec("vllm", "0.34.0", _vllm_members("0.34.0")),
    "sglang": EngineSpec(
        "sglang",
        "0.5.23",
        (
            "sglang/srt/eplb/",  # expert_location.py parses --init-expert-location
            "sglang/srt/arg_groups/fields/exec_.py",  # server-arg fields (flag names)
            "sglang/srt/models/deepseek_v2.py",  # get_model_config_for_expert_location
            # runtime rebalancing through SGLang's plugin framework (eplb.integrations.sglang)
            "sglang/srt/plugins/",  # load_plugins, HookRegistry
            "sglang/srt/environ.py",  # envs (SGLANG_PLUGINS), read by plugins and eplb_manager
            "sglang/launch_server.py",  # the entry point the launcher runs
            "sglang/srt/managers/scheduler.py",  # run_scheduler_process loads the plugins
            "sglang-0.5.23.dist-info/METADATA",
        ),
    ),
}


VLLM_RELEASES = ("vllm", "vllm-0.34")  # the ENGINES keys of every vLLM release tested


def engine_cache_dir() -> Path:
    """The cache folder: ``$EPLB_ENGINE_CACHE`` or ``~/.cache/eplb-engines``."""
    env = os.environ.get("EPLB_ENGINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eplb-engines"


def engine_root(name: str, cache: Path | None = None) -> Path | None:
    """Folder holding the extracted files of engine ``name`` (an :data:`ENGINES` key), or
    None when not fetched."""
    return fetched_root(ENGINES[name], cache)


def fetched_root(spec: EngineSpec, cache: Path | None = None) -> Path | None:
    """Folder holding the extracted files of ``spec``'s release, or None when not fetched."""
    root = (cache or engine_cache_dir()) / spec.folder
    marker = root / MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if info.get("version") != spec.version:
        return None
    # a cache fetched for an older file table lacks files: fetch again
    files = info.get("files", [])
    if not all(any(f == m or f.startswith(m) for f in files) for m in spec.members):
        return None
    return root


def extract_function(path: Path, name: str, namespace: dict[str, Any]) -> Any:
    """Run the source of top-level function (or class) ``name`` of file ``path`` alone.

    Used for functions whose module imports half the engine but whose body needs only
    torch/numpy (e.g. vLLM's ``compute_logical_maps``): the real code runs, unchanged,
    in ``namespace``.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
            exec(code, namespace)
            return namespace[name]
    raise LookupError(f"{path}: no top-level function or class {name!r}")


def _extract_assignment(path: Path, name: str, namespace: dict[str, Any]) -> Any:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == name
        ):
            code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
            exec(code, namespace)
            return namespace[name]
    raise LookupError(f"{path}: no top-level assignment {name!r}")


def _package(name: str, path: Path | None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []  # a package: submodules load
    module.__package__ = name
    return module


@contextmanager
def _isolated_modules(prefix: str) -> Iterator[None]:
    """Remove ``prefix``/``prefix.*`` from sys.modules for the block, then put back."""
    saved = {k: v for k, v in sys.modules.items() if k == prefix or k.startswith(prefix + ".")}
    for key in saved:
        del sys.modules[key]
    try:
        yield
    finally:
        for key in [k for k in sys.modules if k == prefix or k.startswith(prefix + ".")]:
            del sys.modules[key]
        sys.modules.update(saved)
        importlib.invalidate_caches()


@contextmanager
def vllm_sources(root: Path) -> Iterator[types.SimpleNamespace]:
    """Import vLLM's real EPLB policy package and plugin loader from ``root``.

    Stubs (package shells whose real ``__init__`` would import the whole engine):

    - ``vllm``, ``vllm.config``, ``vllm.distributed``: empty packages pointing at the
      extracted folders, so real submodules load from the wheel's files.
    - ``vllm.config.parallel``: holds only ``EPLBPolicyOption``, executed from the real
      ``vllm/config/parallel.py`` assignment (the policy registry asserts against it).
    - ``vllm.envs``: only ``VLLM_PLUGINS``, parsed from the environment as vLLM does.

    Real code used unchanged: ``vllm.distributed.eplb.policy`` (``AbstractEplbPolicy``,
    ``DefaultEplbPolicy``, ``EPLB_POLICIES``), ``vllm.plugins`` (``load_general_plugins``)
    and ``compute_logical_maps`` (executed alone from ``eplb_state.py``).
    """
    with _isolated_modules("vllm"):
        pkg = root / "vllm"
        sys.modules["vllm"] = _package("vllm", pkg)
        sys.modules["vllm.config"] = _package("vllm.config", pkg / "config")
        sys.modules["vllm.distributed"] = _package("vllm.distributed", pkg / "distributed")

        from typing import Literal

        parallel = types.ModuleType("vllm.config.parallel")
        option = _extract_assignment(
            pkg / "config" / "parallel.py", "EPLBPolicyOption", {"Literal": Literal}
        )
        parallel.EPLBPolicyOption = option
        sys.modules["vllm.config.parallel"] = parallel

        envs = types.ModuleType("vllm.envs")
        raw = os.environ.get("VLLM_PLUGINS")
        envs.VLLM_PLUGINS = None if raw is None else raw.split(",")
        sys.modules["vllm.envs"] = envs

        policy = importlib.import_module("vllm.distributed.eplb.policy")
        plugins = importlib.import_module("vllm.plugins")
        import torch

        compute_logical_maps = extract_function(
            pkg / "distributed" / "eplb" / "eplb_state.py",
            "compute_logical_maps",
            {"torch": torch},
        )
        yield types.SimpleNamespace(
            root=root,
            policy=policy,
            EPLB_POLICIES=policy.EPLB_POLICIES,
            AbstractEplbPolicy=policy.AbstractEplbPolicy,
            DefaultEplbPolicy=policy.DefaultEplbPolicy,
            EPLBPolicyOption=option,
            plugins=plugins,
            compute_logical_maps=compute_logical_maps,
        )


@contextmanager
def sglang_sources(root: Path, settings: types.SimpleNamespace) -> Iterator[types.SimpleNamespace]:
    """Import SGLang's real ``sglang.srt.eplb.expert_location`` from ``root``.

    ``settings`` carries what SGLang reads from its server args and runtime:
    ``settings.exec`` (``moe.init_expert_location``, ``moe.ep_num_redundant_experts``,
    ``moe.ep_dispatch_algorithm``, ``moe.moe_a2a_backend``, ``moe.eplb_algorithm``,
    ``moe.ep_join_mode``), ``settings.parallel`` (``ep_size``, ``nnodes``,
    ``elastic_ep_initial_size``, ``tp_size``, ``ep_join_rank_offset``) and
    ``settings.device`` (``device``). Tests may change them between calls.

    Stubs: ``sglang``, ``sglang.srt`` (package shells; the real ``sglang/__init__``
    starts the server stack), ``sglang.srt.runtime_context`` (returns ``settings``),
    ``sglang.srt.elastic_ep.elastic_ep`` (elastic EP disabled) and
    ``sglang.srt.model_loader`` (``get_model_architecture`` returns the model class the
    caller attaches to its model config as ``model_class``). Real code used unchanged:
    ``sglang.srt.eplb.expert_location`` and ``sglang.srt.eplb.eplb_algorithms``.
    """
    with _isolated_modules("sglang"):
        pkg = root / "sglang"
        sys.modules["sglang"] = _package("sglang", pkg)
        sys.modules["sglang.srt"] = _package("sglang.srt", pkg / "srt")

        runtime = types.ModuleType("sglang.srt.runtime_context")
        runtime.get_device = lambda: settings.device
        runtime.get_exec = lambda: settings.exec
        runtime.get_parallel = lambda: settings.parallel
        runtime.get_resources = lambda: getattr(settings, "resources", None)
        sys.modules["sglang.srt.runtime_context"] = runtime

        sys.modules["sglang.srt.elastic_ep"] = _package("sglang.srt.elastic_ep", None)
        elastic = types.ModuleType("sglang.srt.elastic_ep.elastic_ep")
        elastic.elastic_expanded_world_enabled = lambda: False
        sys.modules["sglang.srt.elastic_ep.elastic_ep"] = elastic

        loader = types.ModuleType("sglang.srt.model_loader")
        loader.get_model_architecture = lambda model_config: (model_config.model_class, None)
        sys.modules["sglang.srt.model_loader"] = loader

        expert_location = importlib.import_module("sglang.srt.eplb.expert_location")
        yield types.SimpleNamespace(
            root=root,
            expert_location=expert_location,
            settings=settings,
        )
