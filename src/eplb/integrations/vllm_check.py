"""``python -m eplb.integrations.vllm``: check, before serving, that vLLM will plan with eplb.

The plugin announces itself in every vLLM process's log ("eplb ... active"), but only
once vLLM runs, on GPUs; a user setting up a cluster wants to know before that (new-user
pass: the README left the log line as the only way). Run in the environment (and with the
variables) vLLM will run with, this goes through what vLLM does at start-up:

1. eplb's entry point in the ``vllm.general_plugins`` group (present only where eplb is
   installed as a package: a source tree on ``PYTHONPATH`` has none);
2. ``VLLM_PLUGINS``, vLLM's allow-list of plugins, where set;
3. the switch (``VLLM_EPLB_POLICY``) and the options (``VLLM_EPLB_OPTIONS``), checked as
   the plugin checks them;
4. vLLM's own plugin loader (``vllm.plugins.load_general_plugins``), then which class
   vLLM's EPLB policy registry holds under ``"default"``.

It prints one line per step and exits 0 where vLLM's default EPLB policy is eplb's (or,
with ``VLLM_EPLB_POLICY=register``, where policy ``"eplb"`` is and vLLM's
``--eplb-config`` accepts that name: 0.33 and 0.34 do not), 1 where it is not, naming
what to change. It checks this process only: run it on every node (Ray copies the
``VLLM_*`` variables to its workers, not the older ``EPLB_VLLM_*`` names).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import typing
from collections.abc import Callable, Mapping
from typing import Any

from eplb._version import __version__
from eplb.integrations.vllm_settings import (
    ENV_VAR,
    LEGACY_ENV_VAR,
    LEGACY_OPTIONS_ENV_VAR,
    OPTIONS_ENV_VAR,
    SWITCH_OFF,
    SWITCH_REGISTER,
    SWITCH_REPLACE,
    options_from_env,
    setting,
)
from eplb.online.settings import quoted_setting

#: the entry point vLLM's plugin loader runs (``pyproject.toml``)
ENTRY_POINT = "eplb.integrations.vllm:register"
#: the module of the policy class the plugin installs
PLUGIN_MODULE = "eplb.integrations.vllm"


def check(say: Callable[[str], Any] = print) -> bool:
    """Run the checks of the module docstring, each said through ``say``; whether vLLM
    will plan its rebalances with eplb in this environment."""
    say(f"eplb {__version__}")
    ready = True
    entry = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins")
             if ep.name == "eplb"]
    if not entry:
        say("problem: eplb's vLLM plugin entry point is not installed in this Python "
            "environment (a source tree on PYTHONPATH has none): install eplb here, e.g. "
            "pip install <path to the eplb repository>")
        ready = False
    elif entry[0].value != ENTRY_POINT:
        say(f"problem: the 'eplb' vLLM plugin entry point runs {entry[0].value!r}, not "
            f"{ENTRY_POINT!r}: another package takes the name; reinstall eplb")
        ready = False
    else:
        say(f"ok: vLLM plugin entry point eplb = {ENTRY_POINT}")
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and "eplb" not in allowed.split(","):
        # vLLM splits it on commas and matches the names exactly, spaces included
        spaced = "eplb" in (n.strip() for n in allowed.split(","))
        # (quoted_setting, as register()'s warning: a 100,000-character value was printed
        # whole, one line of 100 KB; attacker pass)
        say(f"problem: VLLM_PLUGINS={quoted_setting(allowed)} does not name 'eplb'"
            f"{' without spaces (vLLM keeps them)' if spaced else ''}, so vLLM loads no "
            f"eplb: {'remove the spaces' if spaced else 'add it'}, or unset VLLM_PLUGINS")
        ready = False
    raw: str | None
    try:
        name, raw = setting(os.environ, ENV_VAR, LEGACY_ENV_VAR)
    except ValueError as exc:  # both names, asking for different things: register() refuses
        say(f"problem: {exc} (the plugin then does nothing)")
        name, raw, ready = ENV_VAR, None, False
    mode = (raw or "").strip().lower()
    if raw is None:  # the two names disagree: said above
        mode = ""
    elif mode in SWITCH_OFF:
        # a value that means off is named as set (it said "not set" for =off)
        # (a value of blanks is set, and means off as an empty one: it said "not set")
        which = (f"{name}={quoted_setting(raw)} turns the plugin off" if raw
                 else f"{ENV_VAR} is not set")
        say(f"problem: {which}, so vLLM keeps its own policy: export {ENV_VAR}=eplb")
        ready = False
    elif mode not in SWITCH_REPLACE | SWITCH_REGISTER:
        say(f"problem: {name}={quoted_setting(raw)} is not a switch value: use 'eplb' "
            "(replace vLLM's default policy) or 'register' (add policy 'eplb' only)")
        ready = False
    else:
        what = ("replaces vLLM's default EPLB policy" if mode in SWITCH_REPLACE
                else "adds EPLB policy 'eplb' (choose it in vLLM's --eplb-config)")
        say(f"ok: {name}={raw.strip()} {what}")
    if name == LEGACY_ENV_VAR:
        # it works in this process (the exit code says so); only Ray's other nodes miss it
        say(f"warning: {LEGACY_ENV_VAR} is the old switch name, which Ray does not copy to "
            f"other nodes: use {ENV_VAR}")
    try:
        options = options_from_env()
    except ValueError as exc:
        say(f"problem: {exc}")
        ready = False
    else:
        options_name, _ = setting(os.environ, OPTIONS_ENV_VAR, LEGACY_OPTIONS_ENV_VAR)
        say(f"ok: {options_name} {json.dumps(options, sort_keys=True, default=str)}"
            if options else "ok: no options (the defaults)")
        if options and options_name == LEGACY_OPTIONS_ENV_VAR:
            say(f"warning: {LEGACY_OPTIONS_ENV_VAR} is the old options name, which Ray does "
                f"not copy to other nodes, whose ranks would plan without these options: use "
                f"{OPTIONS_ENV_VAR}")
    return _through_vllm(mode, say) and ready


def _through_vllm(mode: str, say: Callable[[str], Any]) -> bool:
    """Run vLLM's own plugin loader and say which EPLB policy vLLM's registry holds."""
    try:
        found = importlib.util.find_spec("vllm") is not None
    except ValueError:  # a vllm module without a spec (made by hand): already imported
        found = "vllm" in sys.modules
    if not found:
        say("problem: vLLM is not installed in this Python environment (run this with the "
            "Python that serves vLLM)")
        return False
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        version = "(version not recorded)"
    try:
        plugins = importlib.import_module("vllm.plugins")
        plugins.load_general_plugins()
        registry = importlib.import_module("vllm.distributed.eplb.policy").EPLB_POLICIES
    except Exception as exc:  # a broken or too old vLLM: say so, do not crash the check
        say(f"problem: vLLM {version} could not load its plugins or EPLB policies "
            f"({type(exc).__name__}: {exc}); eplb supports vLLM 0.33 and 0.34")
        return False
    if not isinstance(registry, Mapping):
        # another vLLM's layout: register() writes into it inside its own try and logs why
        # it failed; here a .get on it raised a traceback out of the check (attacker pass)
        say(f"problem: vLLM {version}'s EPLB_POLICIES is a {type(registry).__name__}, not "
            "the dict of policy classes eplb installs into; eplb supports vLLM 0.33 and 0.34")
        return False
    name = "eplb" if mode in SWITCH_REGISTER else "default"
    chosen = registry.get(name)
    if chosen is not None and getattr(chosen, "__module__", "") == PLUGIN_MODULE:
        accepted = _config_policies()
        if name != "default" and accepted is not None and name not in accepted:
            # vLLM 0.33/0.34: EPLBPolicyOption = Literal["default"], so no config can
            # choose 'eplb' and vLLM's own policy plans (the check said "ok", exit 0)
            say(f"problem: vLLM {version}: its plugin loader added eplb as EPLB policy "
                f"{name!r}, but its --eplb-config accepts policy only "
                f"{', '.join(map(repr, accepted))}, so vLLM's own policy plans: set "
                f"{ENV_VAR}=eplb (replaces 'default')")
            return False
        plans = ("eplb plans the rebalances of a vLLM started like this" if name == "default"
                 else "eplb plans where vLLM's --eplb-config chooses policy 'eplb'")
        say(f"ok: vLLM {version}: its plugin loader installed eplb as EPLB policy "
            f"{name!r}, so {plans}")
        return True
    held = "nothing" if chosen is None else getattr(chosen, "__qualname__", repr(chosen))
    say(f"problem: vLLM {version}: after its plugin loader, EPLB policy {name!r} is "
        f"{held}, not eplb's (see the problems above, or vLLM's log for the plugin's "
        "warning)")
    return False


def _config_policies() -> tuple[str, ...] | None:
    """The policy names vLLM's ``--eplb-config`` accepts (``EPLBPolicyOption``), or
    ``None`` where this vLLM does not say."""
    try:
        option = importlib.import_module("vllm.config.parallel").EPLBPolicyOption
    except Exception:  # another layout: the registry's verdict stands alone
        return None
    names = typing.get_args(option)
    return names if names and all(isinstance(n, str) for n in names) else None


def main(argv: list[str] | None = None) -> int:
    """``python -m eplb.integrations.vllm [--help]``: the checks; 0 where eplb is active."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if args:
        print(f"eplb: unexpected arguments {args}; run it without any (--help says what it "
              "checks)", file=sys.stderr)
        return 2
    return 0 if check() else 1
