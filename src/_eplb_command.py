"""The ``eplb`` command's console script (``pyproject.toml``: ``eplb = "_eplb_command:main"``).

It lives outside the ``eplb`` package on purpose. Importing anything inside it runs
``eplb/__init__.py`` first, which imports torch, NumPy and SciPy, and that takes seconds.
A Ctrl-C during that import ended in a ``KeyboardInterrupt`` traceback. It could also end
in a ``RecursionError`` or ``ImportError`` traceback, where a library's import swallowed
the interrupt and a later import met its half-made module. Or the process aborted, where
the interrupt was raised inside a pybind11 call of torch's (attacker pass).

Here the first Ctrl-C of that time is noted and the imports finish; then the command
ends as a Ctrl-C during a command does (:mod:`eplb.cli`): one ``eplb: interrupted`` line
and exit code 130. A second Ctrl-C raises at once, as Python's own handler does.

``import eplb`` itself stays eager: a lazy package let threads that first imported
different eplb modules at once cross their import locks (``_DeadlockError``, half-made
modules; attacker pass). ``python -m eplb`` imports the package before its
``__main__``, so only this script takes the Ctrl-C.

A runtime dependency missing from the environment (torch is not pulled in by every
install route: its CPU and CUDA builds come from different indexes) ends with one line
naming it and how to install it, exit code 1, not an ``ImportError`` traceback.
"""

import signal
import sys
import threading

#: the runtime dependencies (``pyproject.toml``) that ``import eplb`` loads, by module,
#: with the distribution to install for each (PyYAML and rich load only where a command
#: needs them, and a missing one ends that command with its one-line error)
RUNTIME_DEPENDENCIES = {"torch": "torch", "numpy": "numpy", "scipy": "scipy"}


def main() -> int:
    """Run the ``eplb`` command with ``sys.argv[1:]``; return its exit code."""
    interrupts: list[int] = []  # this call's own (a host program may run it twice)

    def on_interrupt(signum: int, frame: object) -> None:
        # note the first SIGINT and let the imports run on (an interrupt raised inside
        # them can leave a library half-imported, or abort the process); a second one
        # raises, as Python's own handler does, for a user who will not wait
        interrupts.append(signum)
        if len(interrupts) > 1:
            raise KeyboardInterrupt

    # only the main thread may set a handler, and only Python's own is replaced (not an
    # ignored SIGINT, as under ``nohup``, nor a handler a host program installed)
    watch = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if watch:
        signal.signal(signal.SIGINT, on_interrupt)
    try:
        from eplb.cli import main as run_command
    except ModuleNotFoundError as error:
        # after a Ctrl-C the interrupt is what to say (below): a raise here would skip the
        # next clause, which only catches what the try block raised
        if not interrupts:
            # only a dependency missing as a whole: a broken install (a submodule of one
            # missing) keeps its traceback, which says more than a line could
            if error.name not in RUNTIME_DEPENDENCIES:
                raise
            package = RUNTIME_DEPENDENCIES[error.name]
            print(f"eplb: the Python package {package!r}, which eplb needs, is not installed "
                  f"for {sys.executable}; install it, e.g. pip install {package} (the "
                  f"README's set-up commands pin torch's CPU build)", file=sys.stderr)
            return 1
    except BaseException:
        if not interrupts:
            raise
    finally:
        if watch:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupts:
        print("eplb: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return run_command()


if __name__ == "__main__":
    sys.exit(main())
