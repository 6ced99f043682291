"""SGLang plugin and launcher: SGLang's runtime rebalancing (``--enable-eplb``) plans with eplb.

SGLang 0.5.23 re-plans every ``--eplb-rebalance-num-iterations`` forward passes on every
rank: ``EPLBManager.rebalance`` → ``ExpertLocationMetadata.init_by_eplb`` →
``sglang.srt.eplb.eplb_algorithms.rebalance_experts(tokens_per_expert [T, L, E] on the
GPU, num_physical_experts, num_local_physical_experts, num_groups (None for models
without expert groups), num_nodes, algorithm)``, where ``algorithm`` is a member of its
closed ``EplbAlgorithm`` enum (``--eplb-algorithm``, ``auto`` → ``deepseek`` or
``deepseek_hierarchical``). There is no policy registry, but SGLang has general plugins:
entry points of group ``sglang.srt.plugins`` that ``load_plugins()`` runs in every process
(the launcher, every scheduler process that hosts a model runner, the DP controller),
with a ``HookRegistry`` that wraps functions by dotted path.

Installing eplb declares ``sglang.srt.plugins: eplb = eplb.integrations.sglang:register``.
With ``SGLANG_EPLB_POLICY=eplb`` in the environment, :func:`register` wraps
``eplb_algorithms.rebalance_experts`` (an AROUND hook): SGLang's call then returns
eplb's plan, computed as :func:`eplb_rebalance` describes. Unset, it does nothing.

The launcher sets the switch for you and starts SGLang's own server::

    python -m eplb.integrations.sglang --model-path ... --enable-eplb ...
    python -m eplb.integrations.sglang --eplb-options '{"max_moves": 2000}' <launch_server args>

(every node of a multi-node deployment runs it, as it would run ``sglang.launch_server``).
``SGLANG_EPLB_OPTIONS`` holds planner options as JSON (:data:`PLANNER_OPTIONS`). Under
SGLang's static dispatch (an all-to-all backend such as DeepEP) the plan is made for its
nearest-replica rule, on one node for the table its runtime rebalance builds (see
:func:`eplb_rebalance`, option ``dispatch``).
SGLang's ``--use-ray`` scheduler actors do not run ``load_plugins`` in 0.5.23, so that
mode keeps SGLang's own algorithm. Nor does SGLang's weight-cache daemon, which builds the
start-up layout of an ``--init-expert-location`` holding logical counts and loads the
experts by it: with ``--weight-cache-mode`` on, that one call keeps SGLang's algorithm too.

**One plan on every rank.** SGLang computes the plan on every rank and broadcasts
nothing. At a runtime rebalance (a placement is in force) the ranks of the
``torch.distributed`` world then agree through its store, as vLLM's EP ranks do
(:mod:`eplb.integrations.agreement`): unanimous plans are kept; a rank that failed alone
(``MemoryError``) or diverged takes the lowest successful rank's plan; if no rank could
plan, SGLang's own algorithm answers on every rank; a rank that never publishes (a node
started without the switch: a half-switched cluster) makes the others raise
:class:`~eplb.integrations.agreement.AgreementError` after ``agree_timeout_s`` (default
120; 0 turns the agreement off) instead of exchanging weights by mismatched maps. That
error stops SGLang's server (its scheduler exits on an exception of a forward pass); so
does a node with an eplb from before this agreement, or with ``agree_timeout_s`` 0 where
the others agree (:data:`SILENT_CAUSES`).
Start-up placements (``--init-expert-location`` with counts) are not agreed: processes
compute them at different moments (a scale-up joiner alone, draft workers not at all),
each from the same file. Nor are rebalances under SGLang's elastic EP: after a scale-up
rank 0 alone plans and SGLang broadcasts its map, after a rank fault the dead ranks
never plan.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import reprlib
import sys
import threading
from typing import Any

import torch

from eplb._version import __version__
from eplb.core.map_tables import build_log2phy
from eplb.integrations.agreement import PlanAgreement, agree_and_log, check_timeout_option
from eplb.integrations.sglang_call import (
    AUTO_NEAREST_MAX_WORK,
    DISPATCH_CHOICES,
    PLANNER_OPTIONS,
    PLUGIN_OPTIONS,
    checked_options,
    eplb_rebalance,
)
from eplb.integrations.threads import check_threads_option, planning_threads
from eplb.online.settings import quoted_setting

__all__ = [
    "AUTO_NEAREST_MAX_WORK",
    "DISPATCH_CHOICES",
    "ENV_VAR",
    "HOOK_TARGET",
    "OPTIONS_ENV_VAR",
    "PLANNER_OPTIONS",
    "PLUGIN_OPTIONS",
    "eplb_rebalance",
    "main",
    "options_from_env",
    "register",
]

logger = logging.getLogger(__name__)

ENV_VAR = "SGLANG_EPLB_POLICY"
OPTIONS_ENV_VAR = "SGLANG_EPLB_OPTIONS"
HOOK_TARGET = "sglang.srt.eplb.eplb_algorithms.rebalance_experts"
PLUGIN_GROUP = "sglang.srt.plugins"
def options_from_env(environ: Any = None) -> dict[str, Any]:
    """Options from ``$SGLANG_EPLB_OPTIONS`` (a JSON object), ``{}`` when unset."""
    env = os.environ if environ is None else environ
    return checked_options(env.get(OPTIONS_ENV_VAR, ""), OPTIONS_ENV_VAR)



_ON = frozenset({"eplb", "1", "on", "true", "yes"})
_OFF = frozenset({"", "0", "off", "false", "no", "none"})
_ANNOUNCED = False


def _sglang_dispatch() -> str | None:
    """SGLang's ``--ep-dispatch-algorithm`` in this process (``None`` when unknown)."""
    try:
        from sglang.srt.runtime_context import get_exec

        return get_exec().moe.ep_dispatch_algorithm
    except Exception:
        return None


def _current_map() -> torch.Tensor | None:
    """SGLang's placement in force, if its runtime holds one."""
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        metadata = get_global_expert_location_metadata()
    except Exception:
        return None
    return None if metadata is None else metadata.physical_to_logical_map_cpu


def _weight_cache_mode() -> str | None:
    """SGLang's ``--weight-cache-mode`` in this process (``None`` when unknown)."""
    try:
        from sglang.srt.runtime_context import get_model

        return get_model().weight_cache_mode
    except Exception:
        return None


def _hook(original: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on SGLang's ``eplb_algorithms.rebalance_experts``."""
    global _ANNOUNCED
    names = ("tokens_per_expert", "num_physical_experts", "num_local_physical_experts",
             "num_groups", "num_nodes", "algorithm")
    call = dict(zip(names, args, strict=False)) | kwargs
    algorithm = call["algorithm"]
    name = getattr(algorithm, "name", str(algorithm))
    if name.startswith("elasticity_aware"):
        # SGLang's elastic EP reads its active ranks from its own state: keep its algorithm
        return original(*args, **kwargs)
    old = _current_map()
    cache_mode = _weight_cache_mode()
    if old is None and cache_mode not in (None, "off"):
        # No placement in force: the start-up layout of an --init-expert-location holding
        # logical counts. SGLang's weight-cache daemon builds that layout too and loads the
        # experts by it, but it never runs load_plugins (sglang/srt/weight_cache/daemon.py,
        # _initialize_eplb_expert_location_metadata), so it gets SGLang's algorithm; the
        # engine maps the daemon's expert weights zero-copy, and an eplb layout here would
        # route tokens to the wrong experts. Runtime rebalances (a map in force) plan with eplb.
        logger.warning("eplb: SGLang's weight cache (--weight-cache-mode %s) loads experts by "
                       "the start-up layout SGLang's own algorithm computes; keeping it so the "
                       "engine's weights match. eplb plans the runtime rebalances. For an eplb "
                       "start-up layout, pass a file of `eplb plan --emit sglang` to "
                       "--init-expert-location.", cache_mode)
        return original(*args, **kwargs)
    options = options_from_env()
    timeout = check_timeout_option(options, OPTIONS_ENV_VAR)
    planner = {k: v for k, v in options.items() if k in PLANNER_OPTIONS}
    sglang_dispatch = _sglang_dispatch()
    if not _ANNOUNCED:  # here SGLang's logging is configured; at plugin load it is not yet
        _ANNOUNCED = True
        logger.info("eplb %s plans SGLang's expert rebalancing (SGLang algorithm %s, "
                    "dispatch %s, options %s)", __version__, name, sglang_dispatch,
                    json.dumps(options, sort_keys=True))
    tokens = call["tokens_per_expert"]
    # a runtime rebalance (a map in force) runs on every rank of the world at once, right
    # after SGLang's all-reduce of the counts: there the ranks agree (module docstring)
    agreement = None if old is None else _world_agreement(timeout)

    threads = check_threads_option(options, OPTIONS_ENV_VAR)

    def plan() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with planning_threads(threads):
            return eplb_rebalance(
                tokens, call["num_physical_experts"], call["num_local_physical_experts"],
                call["num_groups"], call["num_nodes"],
                hierarchical=name.endswith("_hierarchical"), options=planner, old_phy2log=old,
                sglang_dispatch=sglang_dispatch,
            )

    if agreement is None:
        return plan()
    result, error = None, None
    try:
        result = plan()
    except Exception as exc:  # MemoryError too: the other ranks must learn of it
        error = exc
    # what an adopted plan must fit: SGLang's shapes (the other arguments shape quality)
    question = (f"loads {list(tokens.shape[-2:])}, {call['num_physical_experts']} slots, "
                f"{call['num_local_physical_experts']} per GPU")
    tag = f"eplb {__version__} {json.dumps(planner, sort_keys=True)} dispatch {sglang_dispatch}"
    outcome = agree_and_log(agreement, None if result is None else result[0], error, tag=tag,
                            question=question, logger=logger, ranks="ranks")
    if outcome.plan is None:
        logger.error("eplb: no rank could plan this rebalance (%s); SGLang's algorithm %s "
                     "answers it on every rank", outcome.describe(), name, exc_info=error)
        return original(*args, **kwargs)
    if outcome.source is None and result is not None:
        return result  # every rank's own plan is the agreed one
    phy2log = outcome.plan.to(torch.int64)
    log2phy, logcnt = build_log2phy(phy2log, tokens.shape[-1])
    return phy2log, log2phy, logcnt


#: why an SGLang rank never publishes, for the timeout's message (which stops SGLang's
#: server): each of these plans (or not) without taking part in the agreement
SILENT_CAUSES = (f"those ranks do not take part in eplb's agreement: {ENV_VAR} unset there (a "
                 "node started with plain sglang.launch_server), eplb not installed there or an "
                 "older eplb that does not agree on SGLang's plans (install one eplb on every "
                 "node), agree_timeout_s 0 there (set one value on every node), or they failed "
                 "before planning.")

# one agreement per torch.distributed world (its round counter); the default group is kept
# so that its id is never reused while the entry lives
_WORLD: list[tuple[Any, PlanAgreement]] = []
_WORLD_LOCK = threading.Lock()


def _world_agreement(timeout: float) -> PlanAgreement | None:
    """The agreement among this process's ``torch.distributed`` world (every rank runs
    SGLang's rebalance at once), or ``None``: agreement off (``timeout`` 0), no
    multi-rank world, or SGLang's elastic EP on (:func:`_elastic_ep`)."""
    if timeout <= 0:
        return None
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        world, rank = dist.get_world_size(), dist.get_rank()
        if world <= 1 or _elastic_ep():
            return None
        from torch.distributed.distributed_c10d import _get_default_group, _get_default_store

        group, store = _get_default_group(), _get_default_store()
    except Exception:  # not inside an SGLang rank (tests, offline use)
        return None
    with _WORLD_LOCK:
        if _WORLD and _WORLD[0][0] is group:
            _WORLD[0][1].timeout_s = timeout
            return _WORLD[0][1]
        agreement = PlanAgreement(store, rank, world, f"eplb/sglang/world{world}", timeout,
                                  silent_causes=SILENT_CAUSES)
        _WORLD[:] = [(group, agreement)]
        logger.info("eplb: rank %d of %d plans with eplb %s; plans are agreed through the "
                    "torch.distributed store (timeout %g s)", rank, world, __version__,
                    timeout)
        return agreement


def _elastic_ep() -> bool:
    """SGLang's elastic EP is on in this process. Its rebalances do not run on every rank
    of the world at once: after a scale-up rank 0 alone plans (SGLang broadcasts its map),
    and after a rank fault the dead ranks never plan."""
    try:
        from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager

        return ElasticEPStateManager.instance() is not None
    except Exception:
        return False


_hook._eplb_hook = True  # type: ignore[attr-defined]


def register() -> bool:
    """SGLang ``sglang.srt.plugins`` hook: route SGLang's rebalancing to eplb when
    ``SGLANG_EPLB_POLICY=eplb``. Returns True when the hook was registered; never raises."""
    try:
        mode = os.environ.get(ENV_VAR, "").strip().lower()
        if mode in _OFF:
            return False
        if mode not in _ON:
            # quoted short, as vLLM's plugin quotes its switch: every process logs it
            logger.warning("eplb: ignoring %s=%s; use 'eplb' or unset it", ENV_VAR,
                           quoted_setting(os.environ.get(ENV_VAR, "")))
            return False
        options_from_env()  # refuse bad options now, not at the first rebalance
        problem = _sglang_problem()
        if problem is not None:  # SGLang would log that it failed to apply the hook, or
            # nothing at all, and rebalance with its own algorithm
            logger.warning("eplb: SGLang plugin not registered: %s", problem)
            return False
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        if any(getattr(h, "_eplb_hook", False) for _, h, _ in HookRegistry._hooks[HOOK_TARGET]):
            return True  # already registered in this process
        HookRegistry.register(HOOK_TARGET, _hook, HookType.AROUND)
        logger.info("eplb %s: SGLang's EPLB algorithm will be eplb (%s=%s)", __version__,
                    ENV_VAR, mode)
        return True
    except Exception as exc:  # a plugin must never take SGLang down
        logger.warning("eplb: SGLang plugin not registered: %s", exc)
        return False


#: the SGLang release whose plugin framework and EPLB code eplb is tested against
TESTED_SGLANG = "0.5.23"


def _sglang_problem() -> str | None:
    """Why the installed SGLang cannot take eplb as its rebalancing algorithm, or None: no
    plugin framework (``sglang.srt.plugins``: older releases never load eplb) or no
    :data:`HOOK_TARGET` (``apply_hooks`` logs and skips it). Either way SGLang rebalances
    with its own algorithm, while the launcher said eplb plans (attacker pass). Imports
    SGLang's EPLB algorithm module, as ``apply_hooks`` does."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = f"SGLang {version('sglang')}"
    except PackageNotFoundError:
        release = "this SGLang"
    try:
        framework = importlib.util.find_spec("sglang.srt.plugins.hook_registry")
    except ImportError:  # a parent package is missing (sglang.srt, sglang.srt.plugins)
        framework = None
    if framework is None:
        return (f"{release} has no plugin framework (sglang.srt.plugins), so its processes "
                f"never load eplb; eplb is tested with SGLang {TESTED_SGLANG}")
    module_name, name = HOOK_TARGET.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # whatever fails, SGLang's own planner would run
        return f"{release}: {module_name} cannot be imported ({exc})"
    if not callable(getattr(module, name, None)):
        return (f"{release} has no {HOOK_TARGET}, the function eplb replaces (tested with "
                f"SGLang {TESTED_SGLANG})")
    return None


def _plugin_declared() -> str | None:
    """Why SGLang's processes would not load eplb's plugin, or None when they will."""
    from importlib.metadata import entry_points

    points = {p.name: p.value for p in entry_points(group=PLUGIN_GROUP)}
    # the module's import name, not __name__ (``__main__`` under ``python -m``)
    if points.get("eplb") != "eplb.integrations.sglang:register":
        return ("eplb is not installed as a package, so SGLang's scheduler processes "
                "cannot load its plugin: pip install /path/to/eplb (or pip install -e .)")
    # parsed as SGLang's load_plugins_by_group parses it: any non-empty value is an
    # allow-list, so one of only spaces or commas allows no plugin at all
    allowed = os.environ.get("SGLANG_PLUGINS", "")
    if allowed and "eplb" not in {x.strip() for x in allowed.split(",") if x.strip()}:
        return f"SGLANG_PLUGINS={allowed!r} does not name 'eplb'"
    return None


USAGE = """\
usage: python -m eplb.integrations.sglang [--eplb-options JSON] <sglang.launch_server args>

Starts SGLang's own server (sglang.launch_server) with eplb planning SGLang's runtime
expert rebalancing (pass --enable-eplb to SGLang, or it never rebalances). Run it on every
node, as you would run sglang.launch_server.

options:
  --eplb-options JSON  eplb's options, e.g. '{"max_moves": 2000}' (also read from
                       $SGLANG_EPLB_OPTIONS); planner keys:
                       """ + ", ".join(sorted(PLANNER_OPTIONS)) + """;
                       the plugin's own: """ + ", ".join(sorted(PLUGIN_OPTIONS)) + """
  -h, --help           show this message and exit

Without the launcher: SGLANG_EPLB_POLICY=eplb python -m sglang.launch_server ...
Not covered: --use-ray (its scheduler actors do not load SGLang's plugins)."""


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` among SGLang's arguments ``args`` (``None``: not given).
    Given twice, the last counts, as argparse takes it (attacker pass: the first was
    read)."""
    chosen = None
    for at, arg in enumerate(args):
        if arg.startswith(flag + "="):
            chosen = arg.partition("=")[2]
        elif arg == flag and at + 1 < len(args):
            chosen = args[at + 1]
    return chosen


def _launch_dispatch(args: list[str]) -> str | None:
    """The ``--ep-dispatch-algorithm`` SGLang will run with arguments ``args``: the flag's
    value, else ``static`` where SGLang's server arguments default it so (with
    ``--enable-eplb``, or an ``--init-expert-location`` other than ``trivial``: its
    ``_handle_eplb_and_dispatch``), else ``None``. The launcher's note read only the flag,
    and told ``--enable-eplb`` users without it that locality would be planned globally
    (new-user pass), while SGLang, and so the hook, ran static dispatch."""
    chosen = _flag_value(args, "--ep-dispatch-algorithm")
    if chosen is not None:
        return chosen
    location = _flag_value(args, "--init-expert-location")
    if "--enable-eplb" in args or (location is not None and location != "trivial"):
        return "static"
    return None


def _elastic_algorithm(args: list[str]) -> str | None:
    """The ``--eplb-algorithm`` value among SGLang's arguments ``args`` where it names one
    of SGLang's elasticity-aware algorithms, which :func:`_hook` leaves to SGLang."""
    chosen = _flag_value(args, "--eplb-algorithm")
    return chosen if chosen is not None and chosen.startswith("elasticity_aware") else None


def _location_problem(value: str) -> str | None:
    """Why SGLang 0.5.23 would refuse ``--init-expert-location value`` in every scheduler
    process after the launcher said eplb plans, or None. Read as its
    ``compute_initial_expert_location_metadata`` reads it: ``trivial``; a path ending
    ``.pt`` (``torch.load``) or ``.json``; else inline JSON (left to SGLang). The file must
    hold ``logical_count`` (planned at start-up through eplb's hook), or
    ``physical_to_logical_map`` and no other key (SGLang passes the keys to
    ``init_by_mapping``). eplb's own plan file (``eplb plan -o x.json``) was passed on and
    failed there with SGLang's ``NotImplementedError`` (attacker pass)."""
    if value == "trivial" or not value.endswith((".pt", ".json")):
        return None
    hint = "write one with `eplb plan ... --emit sglang -o placement.sglang.json`"
    try:
        if value.endswith(".pt"):
            data = torch.load(value, weights_only=True, map_location="cpu")
        else:
            with open(value, encoding="utf-8") as handle:
                data = json.load(handle)
    except FileNotFoundError:
        return f"--init-expert-location {value}: no such file"
    except Exception as exc:  # what SGLang's own read would raise, said in one line
        first = (str(exc).splitlines() or [""])[0][:200]
        return f"--init-expert-location {value}: SGLang cannot read it ({first})"
    keys = sorted(map(str, data)) if isinstance(data, dict) else None
    if keys is None or not ("logical_count" in keys or "physical_to_logical_map" in keys):
        got = f"keys {reprlib.repr(keys)}" if keys is not None else type(data).__name__
        own = " (eplb's own plan file)" if keys is not None and "phy2log" in keys else ""
        return (f"--init-expert-location {value}: SGLang reads a dict with "
                f"'physical_to_logical_map' or 'logical_count', got {got}{own}; {hint}")
    # (a map wins over counts there: a file with both fails as one with any other key)
    if "physical_to_logical_map" in keys and keys != ["physical_to_logical_map"]:
        extra = [k for k in keys if k != "physical_to_logical_map"]
        return (f"--init-expert-location {value}: SGLang passes every key to its "
                f"init_by_mapping, which takes 'physical_to_logical_map' alone; got also "
                f"{reprlib.repr(extra)}; {hint}")
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m eplb.integrations.sglang [--eplb-options JSON] <launch_server args>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]) or not args:
        print(USAGE)
        return 0 if args else 2
    source = OPTIONS_ENV_VAR
    if args[0].startswith("--eplb-options="):
        args = ["--eplb-options", args[0].partition("=")[2], *args[1:]]
    if args[0] == "--eplb-options":
        if len(args) < 2 or not args[1].strip():
            # (an empty value read as no options: "--eplb-options=" planned with the
            # defaults, and said so, though the user meant to give some; attacker pass)
            print("eplb: --eplb-options needs a JSON object, e.g. '{\"max_moves\": 2000}'"
                  + ("" if len(args) < 2 else "; got an empty value"), file=sys.stderr)
            return 2
        os.environ[OPTIONS_ENV_VAR] = args[1]  # SGLang's processes read it from there
        source = "--eplb-options"
        args = args[2:]
    late = [a for a in args if a == "--eplb-options" or a.startswith("--eplb-options=")]
    if late:  # SGLang would refuse it, after eplb had said which options it plans with
        print("eplb: --eplb-options must come first, once, before SGLang's arguments",
              file=sys.stderr)
        return 2
    try:
        options = checked_options(os.environ.get(OPTIONS_ENV_VAR, ""), source)
    except ValueError as exc:
        print(f"eplb: {exc}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("sglang") is None:
        print("eplb: SGLang is not installed in this Python environment (pip install "
              "sglang, or run this with the Python that serves SGLang)", file=sys.stderr)
        return 2
    location = _flag_value(args, "--init-expert-location")
    problem = (_plugin_declared() or _sglang_problem()
               or (None if location is None else _location_problem(location)))
    if problem is not None:
        print(f"eplb: {problem}", file=sys.stderr)
        return 2
    if "--enable-eplb" not in args:
        print("eplb: note: without --enable-eplb SGLang never rebalances at runtime",
              file=sys.stderr)
    nodes = (_flag_value(args, "--nnodes") or "1").strip()
    # (the option dispatch 'nearest' plans for the nearest replica whatever SGLang's flag:
    # the note said every rebalance would be planned globally; attacker pass)
    nearest = (_launch_dispatch(args) == "static" or options.get("dispatch") == "nearest")
    if options.get("policy") == "locality" and (
            not nearest
            # (a bad value: SGLang's to refuse. isdecimal, not isdigit: a superscript '²'
            # is a digit that int() refuses, a traceback here; attacker pass)
            or not (nodes.isdecimal() and int(nodes) > 1)):
        # (each rebalance would log why and plan globally: say it once, up front)
        print("eplb: note: policy 'locality' plans for SGLang's nearest-replica dispatch "
              "on several nodes (--ep-dispatch-algorithm static, --nnodes 2 or more); "
              "without them every rebalance is planned globally", file=sys.stderr)
    os.environ[ENV_VAR] = "eplb"  # inherited by every process SGLang starts
    elastic = _elastic_algorithm(args)
    if elastic is not None:  # the hook leaves these to SGLang (_hook)
        print(f"eplb {__version__}: --eplb-algorithm {elastic} stays SGLang's own (its "
              "elastic EP reads the active ranks from SGLang's state): eplb plans none of "
              "SGLang's rebalances; drop the flag for eplb's plans", file=sys.stderr)
    else:
        print(f"eplb {__version__}: SGLang's EPLB rebalancing plans with eplb "
              f"(options {json.dumps(options, sort_keys=True)})", file=sys.stderr)
    import runpy

    sys.argv = ["sglang.launch_server", *args]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
