"""The ``eplb`` command's start-up: a Ctrl-C while it imports torch, NumPy and SciPy ends
with one line and exit code 130 (attacker pass: a traceback, a ``RecursionError`` from a
half-imported NumPy, or an abort inside torch's pybind11 code, depending on when the
Ctrl-C came), and ``import eplb`` stays eager, so threads that first import eplb's
modules at once never cross their import locks (a lazy package did: attacker pass)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest


def _python(code: str) -> subprocess.CompletedProcess[str]:
    # SIGINT as a terminal gives it: a test run in the background (a shell without job
    # control) ignores SIGINT, its children inherit that, and eplb rightly leaves an
    # ignored SIGINT alone, so the Ctrl-C tests below saw the command run on (exit 0)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, check=False, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _console_script(argv: list[str], missing: str | None = None,
                    interrupt: bool = False) -> subprocess.CompletedProcess[str]:
    """The console script's ``main()`` run on ``argv`` in a fresh process, where importing
    the module ``missing`` fails as it does where its package is not installed (a finder
    at the front of ``sys.meta_path`` answers for it), after a Ctrl-C with ``interrupt``."""
    lines = ["import os, signal, sys"]
    if missing is not None:
        lines += ["class Missing:",
                  "    def find_spec(self, name, path=None, target=None):",
                  f"        if name == {missing!r}:",
                  "            os.kill(os.getpid(), signal.SIGINT)" if interrupt else "",
                  "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)",
                  "        return None",
                  "sys.meta_path.insert(0, Missing())"]
    lines += [f"sys.argv = {['eplb', *argv]!r}", "import _eplb_command",
              "sys.exit(_eplb_command.main())"]
    return _python("\n".join(line for line in lines if line))


def test_threads_that_first_import_different_eplb_modules_all_get_them() -> None:
    # after a bare `import eplb` (the README's), with the package lazy, six threads
    # importing eplb.online, eplb.core.placement, eplb.formats, ... and reaching
    # eplb.plan at once got importlib's _DeadlockError, "cannot import name ... from
    # partially initialized module" or KeyError('eplb.core') in 9 of 12 fresh processes;
    # the eager package has loaded them in the one thread's import. (Threads whose very
    # first eplb import is at once race in CPython's module locks either way: README)
    done = _python("""
        import importlib, sys, threading
        failures = []
        for _ in range(10):
            for name in [m for m in sys.modules if m == "eplb" or m.startswith("eplb.")]:
                del sys.modules[name]
            import eplb
            uses = [lambda: importlib.import_module("eplb.online"),
                    lambda: importlib.import_module("eplb.core.placement"),
                    lambda: importlib.import_module("eplb.formats"),
                    lambda: importlib.import_module("eplb.core.options"),
                    lambda: importlib.import_module("eplb").plan,
                    lambda: importlib.import_module("eplb").Placement]
            barrier = threading.Barrier(len(uses))

            def first_use(use):
                barrier.wait()
                try:
                    use()
                except Exception as error:
                    failures.append(repr(error))

            threads = [threading.Thread(target=first_use, args=(use,)) for use in uses]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        print(failures[:3] or "ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_the_console_script_is_the_start_up_that_takes_a_ctrl_c() -> None:
    (script,) = entry_points(group="console_scripts", name="eplb")
    assert script.value == "_eplb_command:main"


@pytest.mark.parametrize("module", ["torch", "numpy._core.multiarray", "scipy.optimize",
                                    "eplb.cli._parser"])
def test_a_ctrl_c_during_the_start_up_imports_ends_with_one_line(module: str) -> None:
    # the SIGINT arrives while `module` is being imported by the console script's main:
    # a finder at the front of sys.meta_path sends it the first time the module is looked
    # up (before the fix: a KeyboardInterrupt traceback, exit -2)
    done = _python(f"""
        import os, signal, sys

        class Interrupt:
            sent = False

            def find_spec(self, name, path=None, target=None):
                if name == {module!r} and not Interrupt.sent:
                    Interrupt.sent = True
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, Interrupt())
        sys.argv = ["eplb", "--version"]
        import _eplb_command
        sys.exit(_eplb_command.main())
    """)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "eplb: interrupted\n"
    assert done.stdout == ""  # the command did not run on: no version printed


@pytest.mark.parametrize("module, package", [("torch", "torch"), ("scipy", "scipy")])
def test_a_missing_dependency_is_named_in_one_line(module: str, package: str) -> None:
    # as Python answers where the package is not installed (before: a ModuleNotFoundError
    # traceback)
    done = _console_script(["--version"], missing=module)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"eplb: the Python package {package!r}, which eplb needs, "
                                  "is not installed"), done.stderr
    assert f"pip install {package}" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("module", ["torch", "eplb.cli._parser"])
def test_a_ctrl_c_wins_over_a_module_missing_at_start_up(module: str) -> None:
    # a Ctrl-C noted while the imports ran, then a module missing: the user asked to stop,
    # so one "interrupted" line, as for any other import failure after a Ctrl-C (the
    # missing-dependency branch re-raised it: a ModuleNotFoundError traceback, exit 1)
    done = _console_script(["--version"], missing=module, interrupt=True)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "eplb: interrupted\n"


def test_a_dependency_a_command_imports_late_is_named_with_its_install(tmp_path) -> None:
    # PyYAML is imported only to write or read YAML (attacker pass: a missing one ended in
    # "eplb: error: ModuleNotFoundError: No module named 'yaml'", with no install hint)
    loads = tmp_path / "loads.json"
    loads.write_text("[[1, 2, 3, 4], [4, 3, 2, 1]]")
    done = _console_script(["plan", str(loads), "-r", "8", "-g", "2",
                            "-o", str(tmp_path / "lb.yaml")], missing="yaml")
    assert done.returncode == 2, done.stderr
    assert "the Python package 'pyyaml', which eplb needs here, is not installed" in done.stderr
    assert "pip install pyyaml" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "lb.yaml").exists()


def test_a_missing_submodule_of_eplb_keeps_its_traceback() -> None:
    done = _python("""
        import sys
        sys.modules["eplb.cli._parser"] = None
        sys.argv = ["eplb", "--version"]
        import _eplb_command
        sys.exit(_eplb_command.main())
    """)
    assert done.returncode == 1 and "ModuleNotFoundError" in done.stderr, done.stderr


def test_the_console_script_runs_the_command() -> None:
    done = _python("""
        import sys
        sys.argv = ["eplb", "--version"]
        import _eplb_command
        sys.exit(_eplb_command.main())
    """)
    assert done.returncode == 0 and done.stdout.startswith("eplb "), done.stderr


def test_a_ctrl_c_during_one_start_up_does_not_end_the_next_call_in_the_process() -> None:
    # a host program that calls main() again after a Ctrl-C ended its first call: the
    # second call printed "eplb: interrupted" and returned 130 without any Ctrl-C of
    # its own (the first one's was still noted)
    done = _python("""
        import os, signal, sys

        class Interrupt:
            sent = False

            def find_spec(self, name, path=None, target=None):
                if name == "torch" and not Interrupt.sent:
                    Interrupt.sent = True
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, Interrupt())
        sys.argv = ["eplb", "--version"]
        import _eplb_command
        print(_eplb_command.main(), _eplb_command.main())
    """)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "eplb: interrupted\n"
    # the second call printed the version (before the returned codes are printed)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("eplb ") and lines[1:] == ["130 0"], done.stdout
