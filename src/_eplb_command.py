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
"""

import signal
import sys
import threading

_interrupts: list[int] = []


def _on_interrupt(signum: int, frame: object) -> None:
    """Note the first SIGINT and let the imports run on (an interrupt raised inside them
    can leave a library half-imported, or abort the process); a second one raises, as
    Python's own handler does, for a user who will not wait."""
    _interrupts.append(signum)
    if len(_interrupts) > 1:
        raise KeyboardInterrupt


def main() -> int:
    """Run the ``eplb`` command with ``sys.argv[1:]``; return its exit code."""
    # only the main thread may set a handler, and only Python's own is replaced (not an
    # ignored SIGINT, as under ``nohup``, nor a handler a host program installed)
    watch = (threading.current_thread() is threading.main_thread()
             and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    # a Ctrl-C noted by an earlier call in this process (a host program that runs the
    # command twice) is not this call's: kept, it ended this call with 130 as well
    _interrupts.clear()
    if watch:
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        from eplb.cli import main as run_command
    except BaseException:
        if not _interrupts:
            raise
    finally:
        if watch:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if _interrupts:
        print("eplb: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return run_command()


if __name__ == "__main__":
    sys.exit(main())
