"""The ``eplb`` command's start-up: ``import eplb`` is light, and a Ctrl-C while the
command imports torch ends with one line and exit code 130 (attacker pass: a traceback,
a ``RecursionError`` from a half-imported NumPy, or an abort inside torch's pybind11
code, depending on when the Ctrl-C came)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

import eplb


def _python(code: str) -> subprocess.CompletedProcess[str]:
    # SIGINT as a terminal gives it: a test run in the background (a shell without job
    # control) ignores SIGINT, its children inherit that, and eplb rightly leaves an
    # ignored SIGINT alone, so the Ctrl-C tests below saw the command run on (exit 0)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, check=False, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_import_eplb_loads_no_torch_and_every_public_name_resolves() -> None:
    done = _python("""
        import sys
        import eplb
        assert "torch" not in sys.modules, "import eplb loaded torch"
        names = [getattr(eplb, name) for name in eplb.__all__]
        assert "torch" in sys.modules
        from eplb import Placement, plan
        assert plan is eplb.plan and Placement is eplb.Placement
        # a bare `import eplb` has always reached these (README examples use eplb.core)
        assert eplb.core.plan_greedy and eplb.online.Rebalancer and eplb.api.plan
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_threads_that_first_use_different_public_names_all_get_them() -> None:
    # an engine's threads may each be the first to touch eplb.plan, eplb.Placement, ...:
    # each name imported its own module, and the threads' module locks crossed: an
    # ImportError from a half-made module or importlib's _DeadlockError. Five rounds, each
    # with the eplb modules dropped (torch stays loaded, so a round is quick)
    done = _python("""
        import sys, threading
        failures = []
        for _ in range(5):
            for name in [m for m in sys.modules if m == "eplb" or m.startswith("eplb.")]:
                del sys.modules[name]
            import eplb
            names = [*eplb.__all__, "api", "core", "online"]
            barrier = threading.Barrier(len(names))

            def first_use(name):
                barrier.wait()
                try:
                    getattr(eplb, name)
                except Exception as error:
                    failures.append(f"{name}: {error!r}")

            threads = [threading.Thread(target=first_use, args=(name,)) for name in names]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        print(failures[:3] or "ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_the_lazy_package_answers_like_an_eager_one() -> None:
    assert set(eplb.__all__) <= set(dir(eplb))
    assert eplb.plan.__module__ == "eplb.api"
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        eplb.no_such_name  # noqa: B018
    # formats and tools were never loaded by `import eplb` (README: import them first)
    assert "formats" not in eplb._LOADED_WITH_THE_API


def test_the_console_script_is_the_start_up_that_takes_a_ctrl_c() -> None:
    (script,) = entry_points(group="console_scripts", name="eplb")
    assert script.value == "eplb.__main__:main"


@pytest.mark.parametrize("module", ["torch", "numpy._core.multiarray", "scipy.optimize"])
def test_a_ctrl_c_during_the_start_up_imports_ends_with_one_line(module: str) -> None:
    # the SIGINT arrives while `module` is being imported by `python -m eplb`: a finder
    # at the front of sys.meta_path sends it the first time the module is looked up
    done = _python(f"""
        import os, runpy, signal, sys

        class Interrupt:
            sent = False

            def find_spec(self, name, path=None, target=None):
                if name == {module!r} and not Interrupt.sent:
                    Interrupt.sent = True
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, Interrupt())
        sys.argv = ["eplb", "--version"]
        runpy.run_module("eplb", run_name="__main__", alter_sys=True)
        print("the command ran on")
    """)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "eplb: interrupted\n"
    assert done.stdout == ""
