"""eplb's SGLang launcher: it sets the switch and runs SGLang's server, says what stays
SGLang's, refuses what would not work, reads SGLang's plugin allow-list as SGLang does,
and SGLang's option values fail at start-up. SGLang's code runs through the stubs of
``test_engines_sglang_runtime`` (its docstring lists them).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from test_engines_sglang_runtime import make_settings, sglang_runtime

from eplb.integrations import sglang as plugin

# -- the launcher ------------------------------------------------------------------------------


def test_launcher_sets_the_switch_and_runs_sglangs_server(monkeypatch, capsys):
    monkeypatch.delenv(plugin.ENV_VAR, raising=False)
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    ran = {}

    def run_module(name, run_name, alter_sys):
        ran.update(name=name, run_name=run_name, argv=list(sys.argv),
                   switch=plugin.os.environ.get(plugin.ENV_VAR),
                   options=plugin.os.environ.get(plugin.OPTIONS_ENV_VAR))

    monkeypatch.setattr("runpy.run_module", run_module)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    shell = types.ModuleType("sglang")  # the launcher first checks that SGLang is installed
    shell.__spec__ = importlib.machinery.ModuleSpec("sglang", None)
    monkeypatch.setitem(sys.modules, "sglang", shell)
    # (that this SGLang has the plugin framework and the hooked function: a user's run below)
    monkeypatch.setattr(plugin, "_sglang_problem", lambda: None)
    args = ["--eplb-options", '{"max_moves": 100}', "--model-path", "m", "--enable-eplb"]
    assert plugin.main(args) == 0
    assert ran["options"] == '{"max_moves": 100}'
    assert plugin.main(['--eplb-options={"max_moves": 100}', *args[2:]]) == 0
    assert ran == {"name": "sglang.launch_server", "run_name": "__main__",
                   "argv": ["sglang.launch_server", "--model-path", "m", "--enable-eplb"],
                   "switch": "eplb", "options": '{"max_moves": 100}'}
    assert "plans with eplb" in capsys.readouterr().err


def _dry_launcher(monkeypatch) -> None:
    """The launcher with no switch or options set, an SGLang shell that passes its checks,
    and SGLang's server not started."""
    monkeypatch.delenv(plugin.ENV_VAR, raising=False)
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    monkeypatch.delenv(plugin.OPTIONS_ENV_VAR, raising=False)
    monkeypatch.setattr("runpy.run_module", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    shell = types.ModuleType("sglang")
    shell.__spec__ = importlib.machinery.ModuleSpec("sglang", None)
    monkeypatch.setitem(sys.modules, "sglang", shell)
    monkeypatch.setattr(plugin, "_sglang_problem", lambda: None)


@pytest.mark.parametrize("flag", [["--eplb-algorithm", "elasticity_aware"],
                                  ["--eplb-algorithm=elasticity_aware_hierarchical"]])
def test_launcher_says_an_elastic_algorithm_stays_sglangs(monkeypatch, capsys, flag):
    """Attacker pass: with SGLang's elasticity-aware algorithm the launcher said "plans with
    eplb", though the hook leaves that algorithm to SGLang."""
    _dry_launcher(monkeypatch)
    assert plugin.main(["--model-path", "m", "--enable-eplb", *flag]) == 0
    err = capsys.readouterr().err
    assert "stays SGLang's own" in err and "plans with eplb" not in err
    assert plugin.main(["--model-path", "m", "--enable-eplb", "--eplb-algorithm", "deepseek"]) == 0
    assert "plans with eplb" in capsys.readouterr().err
    # given twice, the last counts, as SGLang's argparse takes it (attacker pass)
    assert plugin.main(["--model-path", "m", "--enable-eplb", *flag,
                        "--eplb-algorithm", "deepseek"]) == 0
    assert "plans with eplb" in capsys.readouterr().err
    assert plugin.main(["--model-path", "m", "--enable-eplb", "--eplb-algorithm=deepseek",
                        *flag]) == 0
    assert "stays SGLang's own" in capsys.readouterr().err


def test_launcher_says_when_locality_will_plan_globally(monkeypatch, capsys, tmp_path):
    """The locality policy plans SGLang's nearest-replica dispatch on several nodes: without
    ``--ep-dispatch-algorithm static`` and ``--nnodes`` above 1 every rebalance would log
    why and plan globally, so the launcher says it once, up front."""
    _dry_launcher(monkeypatch)
    locality = '{"policy": "locality", "slack": 0.05}'
    # (the option dispatch 'nearest' plans for the nearest replica without SGLang's flag:
    # eplb_rebalance plans the locality policy there, and the note said it would not)
    nearest = '{"policy": "locality", "dispatch": "nearest"}'
    for text, flags, noted in (
            (locality, ["--nnodes", "2", "--ep-dispatch-algorithm", "static"], False),
            (locality, ["--nnodes=4", "--ep-dispatch-algorithm=static"], False),
            # SGLang sets static dispatch itself under --enable-eplb (its
            # _handle_eplb_and_dispatch): no note without the flag (new-user pass)
            (locality, ["--nnodes", "2"], False),
            (locality, ["--nnodes", "2", "--ep-dispatch-algorithm", "dynamic"], True),
            (locality, ["--ep-dispatch-algorithm", "static"], True),
            (locality, ["--nnodes", "two", "--ep-dispatch-algorithm", "static"], True),
            # a digit int() refuses (it raised a traceback; attacker pass), and one it reads
            (locality, ["--nnodes", "\u00b2", "--ep-dispatch-algorithm", "static"], True),
            (locality, ["--nnodes", "\uff14", "--ep-dispatch-algorithm", "static"], False),
            (nearest, ["--nnodes", "2"], False),
            (nearest, ["--nnodes", "2", "--ep-dispatch-algorithm", "dynamic"], False),
            (nearest, ["--ep-dispatch-algorithm", "static"], True)):
        assert plugin.main(["--eplb-options", text, "--model-path", "m", "--enable-eplb",
                            *flags]) == 0
        err = capsys.readouterr().err
        assert ("every rebalance is planned globally" in err) is noted, (text, flags, err)
        assert "plans with eplb" in err and '"policy": "locality"' in err
    # without --enable-eplb SGLang defaults to static dispatch only for a start-up file
    # (one SGLang reads: the launcher checks it)
    monkeypatch.chdir(tmp_path)
    torch.save({"physical_to_logical_map": torch.zeros(1, 8, dtype=torch.int64)}, "p.pt")
    for flags, noted in ((["--nnodes", "2"], True),
                         (["--nnodes", "2", "--init-expert-location", "p.pt"], False),
                         (["--nnodes", "2", "--init-expert-location", "trivial"], True)):
        assert plugin.main(["--eplb-options", locality, "--model-path", "m", *flags]) == 0
        err = capsys.readouterr().err
        assert ("every rebalance is planned globally" in err) is noted, (flags, err)


@pytest.mark.parametrize(("env", "args", "message"), [
    ({"SGLANG_PLUGINS": "other"}, ["--enable-eplb"], "does not name 'eplb'"),
    ({}, ["--eplb-options", "[1]", "--enable-eplb"], "must be a JSON object"),
    ({}, ["--eplb-options", '{"bogus": 1}', "--enable-eplb"], "unknown option"),
    # the flag the user typed is named, not the variable the launcher passes it through
    ({}, ["--eplb-options", '{"max_moves": "x"}', "--enable-eplb"], "--eplb-options: max_moves"),
    ({}, ["--eplb-options", '{"dispatch": "x"}', "--enable-eplb"], "dispatch must be one of"),
    ({"SGLANG_EPLB_OPTIONS": '{"max_moves": "x"}'}, ["--enable-eplb"],
     "SGLANG_EPLB_OPTIONS: max_moves"),
    # the "=" form is read (and checked) too; anywhere but first it would reach SGLang
    ({}, ['--eplb-options={"max_moves": -1}', "--enable-eplb"], "--eplb-options: max_moves"),
    ({}, ["--enable-eplb", "--eplb-options", "{}"], "--eplb-options must come first"),
    ({}, ["--eplb-options", "{}", '--eplb-options={"seed": 1}'], "must come first, once"),
    # an empty value is no JSON object (it planned with the defaults; attacker pass)
    ({}, ["--eplb-options=", "--enable-eplb"], "needs a JSON object"),
    ({}, ["--eplb-options", " ", "--enable-eplb"], "got an empty value"),
    # Python's JSON decoder recurses per level: a traceback before (attacker pass), and
    # the whole setting quoted in the message
    ({}, ["--eplb-options", "[" * 100_000], "nests too deeply to be options"),
    ({"SGLANG_EPLB_OPTIONS": "[" * 100_000}, ["--enable-eplb"],
     "(100000 characters)"),
])
def test_launcher_refuses_what_would_not_work(monkeypatch, capsys, env, args, message):
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    shell = types.ModuleType("sglang")
    shell.__spec__ = importlib.machinery.ModuleSpec("sglang", None)
    monkeypatch.setitem(sys.modules, "sglang", shell)
    monkeypatch.delenv(plugin.OPTIONS_ENV_VAR, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("runpy.run_module", lambda *a, **k: pytest.fail("server started"))
    assert plugin.main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("options", [
    {"agree_timeout_s": "x" * 100_000}, {"policy": "x" * 100_000},
    {"max_moves": "x" * 100_000}, {"drift": "x" * 100_000}, {"move_price": [1] * 50_000},
    {"skip_threshold": "x" * 100_000}, {"group_share": "x" * 100_000}, {"x" * 100_000: 1},
    {"dispatch": "x" * 100_000}, {"incremental": "x" * 100_000},
])
def test_launcher_quotes_a_bad_option_value_short(monkeypatch, capsys, options):
    """A bad value in SGLANG_EPLB_OPTIONS is refused in one short line, as the switch's
    and num_candidates' are (most were quoted whole: 100 kB on the terminal, and in every
    SGLang process's log where the plugin refuses them)."""
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    monkeypatch.setenv(plugin.OPTIONS_ENV_VAR, json.dumps(options))
    monkeypatch.setattr("runpy.run_module", lambda *a, **k: pytest.fail("server started"))
    assert plugin.main(["--enable-eplb"]) == 2
    err = capsys.readouterr().err
    assert len(err) < 400 and plugin.OPTIONS_ENV_VAR in err
    assert next(iter(options))[:10] in err  # the option is named


@pytest.mark.parametrize("allowed", [" ", ",", " , ", "eplb", " eplb ", "other,,eplb", "other"])
def test_launcher_reads_sglangs_plugin_allow_list_as_sglang_does(sglang_root, monkeypatch,
                                                                  allowed):
    # a value of only spaces is an allow-list naming no plugin to SGLang: the launcher
    # said nothing and started a server whose rebalancing never reached eplb
    monkeypatch.setenv("SGLANG_PLUGINS", allowed)
    with sglang_runtime(sglang_root, make_settings(nnodes=1, ep_size=8, redundant=0)) as sg:
        loaded = "eplb" in sg.plugins.load_plugins_by_group(plugin.PLUGIN_GROUP)
    assert (plugin._plugin_declared() is None) == loaded


@pytest.mark.parametrize(("args", "code"), [(["--help"], 0), (["-h"], 0), ([], 2)])
def test_launcher_help_names_its_options(monkeypatch, capsys, args, code):
    monkeypatch.setattr("runpy.run_module", lambda *a, **k: pytest.fail("server started"))
    assert plugin.main(args) == code
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m eplb.integrations.sglang")
    assert "--eplb-options JSON" in out and "max_moves" in out and "--enable-eplb" in out


def test_launcher_as_a_user_runs_it(tmp_path):
    """``python -m eplb.integrations.sglang`` in a fresh process: with SGLang missing it
    says so; with an (empty) SGLang package it finds eplb's installed plugin and starts
    ``sglang.launch_server`` with the switch set."""
    env = dict(os.environ, PYTHONPATH="")
    env.pop(plugin.ENV_VAR, None)
    env.pop("SGLANG_PLUGINS", None)
    command = [sys.executable, "-m", "eplb.integrations.sglang", "--model-path", "m"]
    missing = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert missing.returncode == 2
    assert "SGLang is not installed" in missing.stderr
    fake = tmp_path / "sglang"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "launch_server.py").write_text(
        f"import os, sys\nprint('server', sys.argv[1:], os.environ.get({plugin.ENV_VAR!r}))\n")
    env["PYTHONPATH"] = str(tmp_path)
    # an SGLang without the plugin framework (older releases) never loads eplb: it would
    # rebalance with its own algorithm while the launcher said eplb plans (attacker pass)
    old = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert old.returncode == 2 and "has no plugin framework (sglang.srt.plugins)" in old.stderr
    assert "server" not in old.stdout
    for package in ("srt", "srt/plugins", "srt/eplb", "srt/eplb/eplb_algorithms"):
        (fake / package).mkdir()
        (fake / package / "__init__.py").write_text("")
    (fake / "srt/plugins/hook_registry.py").write_text("")
    # the framework, but not the function eplb's hook wraps (a later rename)
    renamed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert renamed.returncode == 2
    assert f"has no {plugin.HOOK_TARGET}, the function eplb replaces" in renamed.stderr
    (fake / "srt/eplb/eplb_algorithms/__init__.py").write_text(
        "def rebalance_experts(*args, **kwargs):\n    pass\n")
    started = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    assert "server ['--model-path', 'm'] eplb" in started.stdout
    assert "without --enable-eplb" in started.stderr


@pytest.mark.parametrize("raw", [
    '{"max_moves": -1}', '{"policy": "bogus"}', '{"incremental": "false"}', '{"drift": 9}',
    '{"group_share": 5}', '{"max_moves": 0, "max_moves": 500}',
])
def test_sglang_option_values_fail_at_start_up(raw):
    with pytest.raises(ValueError, match=plugin.OPTIONS_ENV_VAR):
        plugin.options_from_env({plugin.OPTIONS_ENV_VAR: raw})


def test_launcher_refuses_an_init_expert_location_sglang_cannot_start_from(
        monkeypatch, capsys, tmp_path):
    """``--init-expert-location`` is read as SGLang 0.5.23 reads it
    (``compute_initial_expert_location_metadata``): a missing or unreadable file, eplb's
    own plan file, or a map with other keys failed in every scheduler process after the
    launcher said eplb plans (attacker pass). What SGLang takes still starts it."""
    from eplb.cli import main as cli_main

    _dry_launcher(monkeypatch)
    monkeypatch.chdir(tmp_path)
    counts = [[(7 * layer + 3 * e) % 11 + 1 for e in range(16)] for layer in range(3)]
    (tmp_path / "dump.json").write_text(json.dumps({"logical_count": counts}))
    plan = ["plan", "dump.json", "-r", "20", "-g", "4"]
    assert cli_main([*plan, "-o", "own.json"]) == 0
    for name in ("placement.sglang.json", "placement.sglang.pt"):
        assert cli_main([*plan, "--emit", "sglang", "-o", name]) == 0
    (tmp_path / "both.json").write_text(json.dumps(
        {"physical_to_logical_map": [[0]], "logical_count": counts}))
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "list.json").write_text("[1]")
    capsys.readouterr()
    for value, message in (("missing.json", "no such file"),
                           ("own.json", "(eplb's own plan file)"),
                           ("both.json", "got also ['logical_count']"),
                           ("bad.json", "SGLang cannot read it"),
                           ("list.json", "got list"),
                           ("dump.json/x.pt", "SGLang cannot read it")):
        assert plugin.main(["--model-path", "m", "--init-expert-location", value]) == 2, value
        err = capsys.readouterr().err
        assert err.startswith(f"eplb: --init-expert-location {value}: ") and message in err
        assert len(err.splitlines()) == 1, err
    for value in ("placement.sglang.json", "placement.sglang.pt", "dump.json", "trivial",
                  json.dumps({"logical_count": counts})):  # (inline JSON: SGLang's to read)
        assert plugin.main(["--model-path", "m", f"--init-expert-location={value}"]) == 0
        assert "plans with eplb" in capsys.readouterr().err
