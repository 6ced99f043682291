"""``python -m eplb.integrations.vllm``: the set-up check runs vLLM's own plugin loader.

vLLM's real plugin loader (``vllm.plugins.load_general_plugins``) and EPLB policy registry
come from the fetched wheel (0.33.0 and 0.34.0, ``scripts/fetch_engines.py``), as in
``test_engines_vllm_switch.py``; the loader finds eplb through the installed package's
``vllm.general_plugins`` entry point, as it does in a vLLM process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Literal

import pytest
from test_engines_vllm_switch import SWITCHES, switched_off_vllm

from eplb.integrations import vllm as plugin
from eplb.integrations import vllm_check


@pytest.fixture
def vllm(vllm_root, monkeypatch):
    with switched_off_vllm(vllm_root, monkeypatch) as ns:
        yield ns


def _check() -> tuple[bool, list[str]]:
    said: list[str] = []
    return vllm_check.check(said.append), said


def test_the_check_passes_where_vllms_loader_installs_eplb(vllm, monkeypatch):
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    monkeypatch.setenv(plugin.OPTIONS_ENV_VAR, '{"max_moves": 64}')
    ready, said = _check()
    assert ready, said
    assert not [line for line in said if line.startswith("problem")], said
    assert said[-1].startswith("ok: vLLM") and "installed eplb as EPLB policy 'default'" in said[-1]
    assert 'VLLM_EPLB_OPTIONS {"max_moves": 64}' in "\n".join(said)
    # what the check saw is what vLLM's registry holds
    assert vllm.policy.EPLB_POLICIES["default"].__module__ == "eplb.integrations.vllm"


def test_register_mode_fails_where_vllms_config_cannot_choose_eplb(vllm, monkeypatch):
    # vLLM 0.33/0.34: EPLBPolicyOption = Literal["default"], so 'eplb' is registered but
    # no --eplb-config can choose it and vLLM's own policy plans (the check said ok, exit 0)
    monkeypatch.setenv(plugin.ENV_VAR, "register")
    ready, said = _check()
    assert vllm.policy.EPLB_POLICIES["eplb"].__module__ == "eplb.integrations.vllm"
    assert vllm.policy.EPLB_POLICIES["default"].__module__ != "eplb.integrations.vllm"
    assert not ready, said
    assert said[-1].startswith("problem") and "accepts policy only 'default'" in said[-1]
    assert "VLLM_EPLB_POLICY=eplb" in said[-1]


def test_register_mode_passes_where_vllms_config_accepts_eplb(vllm, monkeypatch):
    monkeypatch.setattr(sys.modules["vllm.config.parallel"], "EPLBPolicyOption",
                        Literal["default", "eplb"])
    monkeypatch.setenv(plugin.ENV_VAR, "register")
    ready, said = _check()
    assert ready, said
    assert "policy 'eplb'" in said[-1] and "where vLLM's --eplb-config chooses" in said[-1]


@pytest.mark.parametrize(("env", "problem"), [
    ({}, "VLLM_EPLB_POLICY is not set"),
    ({plugin.ENV_VAR: "maybe"}, "is not a switch value"),
    ({plugin.ENV_VAR: "eplb", "VLLM_PLUGINS": "other"}, "does not name 'eplb'"),
    ({plugin.ENV_VAR: "eplb", plugin.OPTIONS_ENV_VAR: '{"bogus": 1}'}, "unknown option"),
])
def test_each_problem_is_named_and_fails_the_check(vllm, monkeypatch, env, problem):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ready, said = _check()
    assert not ready
    assert any(line.startswith("problem") and problem in line for line in said), said


@pytest.mark.parametrize(("env", "warning"), [
    ({plugin.LEGACY_ENV_VAR: "eplb"}, "old switch name"),
    ({plugin.ENV_VAR: "eplb", plugin.LEGACY_OPTIONS_ENV_VAR: '{"max_moves": 1}'},
     "old options name"),
])
def test_the_old_names_work_here_and_warn_about_ray(vllm, monkeypatch, env, warning):
    """The old names act in this process (eplb plans: the check passes) but Ray does not
    copy them to other nodes: a warning line, not a problem (attacker pass: it exited 1
    where eplb was active)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ready, said = _check()
    assert ready, said
    assert any(line.startswith("warning") and warning in line for line in said), said
    assert not [line for line in said if line.startswith("problem")], said


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="vLLM is installed in this environment")
def test_without_vllm_the_command_says_so_and_exits_1(monkeypatch):
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    done = subprocess.run([sys.executable, "-m", "eplb.integrations.vllm"],
                          capture_output=True, text=True,
                          env={**os.environ, plugin.ENV_VAR: "eplb"})
    assert done.returncode == 1, done.stderr
    assert "problem: vLLM is not installed" in done.stdout
    assert "ok: VLLM_EPLB_POLICY=eplb" in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("argv", "code"), [(["--help"], 0), (["--bogus"], 2)])
def test_help_and_stray_arguments(argv, code, capsys):
    assert vllm_check.main(argv) == code
    out, err = capsys.readouterr()
    assert ("VLLM_PLUGINS" in out) if code == 0 else ("unexpected arguments" in err)


def test_switch_names_that_disagree_are_a_problem_not_a_traceback(vllm, monkeypatch):
    # register() refuses them (the plugin does nothing); the check raised the ValueError
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    monkeypatch.setenv(plugin.LEGACY_ENV_VAR, "off")
    ready, said = _check()
    assert not ready
    assert any(line.startswith("problem") and "disagree" in line for line in said), said
    assert said[-1].startswith("problem: vLLM"), said  # vLLM's loader still ran
    assert vllm.policy.EPLB_POLICIES["default"].__module__ != "eplb.integrations.vllm"


@pytest.mark.parametrize(("name", "value"), [(plugin.ENV_VAR, "off"),
                                           (plugin.ENV_VAR, "0"),
                                           (plugin.LEGACY_ENV_VAR, "false"),
                                           (plugin.ENV_VAR, "   ")])  # blanks: set, off
def test_a_switch_set_off_is_named_as_set_not_as_missing(vllm, monkeypatch, name, value):
    # the check said "VLLM_EPLB_POLICY is not set" for VLLM_EPLB_POLICY=off, and for the
    # old name set off: the user who set it looked for a variable that was there
    monkeypatch.setenv(name, value)
    ready, said = _check()
    assert not ready
    (line,) = [line for line in said if line.startswith("problem") and name in line]
    assert f"{name}={value!r}" in line and "turns the plugin off" in line, said
    assert "not set" not in line and f"{plugin.ENV_VAR}=eplb" in line, said


def test_vllm_plugins_with_spaces_is_named_as_such(vllm, monkeypatch):
    # vLLM splits VLLM_PLUGINS on commas without stripping: ' eplb' loads nothing
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    monkeypatch.setenv("VLLM_PLUGINS", "other, eplb")
    ready, said = _check()
    assert not ready
    assert vllm.policy.EPLB_POLICIES["default"].__module__ != "eplb.integrations.vllm"
    assert any("without spaces" in line and "remove the spaces" in line for line in said), said


@pytest.mark.parametrize("name", [plugin.ENV_VAR, "VLLM_PLUGINS"])
def test_a_huge_setting_is_quoted_shortened_as_register_quotes_it(vllm, monkeypatch, name):
    # a 100,000-character switch or VLLM_PLUGINS was printed whole: one 100 KB line
    # (register()'s warning already shortened it; attacker pass)
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    monkeypatch.setenv(name, "x" * 100_000)
    ready, said = _check()
    assert not ready
    (line,) = [line for line in said if line.startswith("problem") and f"{name}=" in line]
    assert len(line) < 600 and "(100000 characters)" in line, line[:300]


def test_a_registry_that_is_no_dict_is_a_problem_not_a_traceback(vllm, monkeypatch):
    # a vLLM whose EPLB_POLICIES is no mapping: the check's registry.get raised
    # AttributeError out of `python -m eplb.integrations.vllm` (attacker pass)
    monkeypatch.setenv(plugin.ENV_VAR, "eplb")
    monkeypatch.setattr(vllm.policy, "EPLB_POLICIES", None)
    ready, said = _check()
    assert not ready
    assert said[-1].startswith("problem: vLLM") and "EPLB_POLICIES is a NoneType" in said[-1]
