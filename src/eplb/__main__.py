"""``python -m eplb`` and the ``eplb`` command (its console script is :func:`main` here).

The command's modules import torch, NumPy and SciPy, which takes seconds. A Ctrl-C in
that time used to end in a ``KeyboardInterrupt`` traceback, a ``RecursionError`` or
``ImportError`` one (a library's import swallowed the interrupt and a later import met
its half-made module), or an abort (the interrupt raised inside a pybind11 call of
torch's) (attacker pass). Here the first Ctrl-C of that time is noted and the imports
finish, then the command ends as a Ctrl-C during a command does (:mod:`eplb.cli`): one
``eplb: interrupted`` line and exit code 130. A second Ctrl-C raises at once, as
Python's own handler does. ``import eplb`` is light (:mod:`eplb`), so this module is
reached before those imports.
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


# only the main thread may set a handler, and only Python's own is replaced (not an
# ignored SIGINT, as under ``nohup``, nor a handler a host program installed)
_watch = (threading.current_thread() is threading.main_thread()
          and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
if _watch:
    signal.signal(signal.SIGINT, _on_interrupt)
try:
    from eplb.cli import main as _run_command
except BaseException:
    if not _interrupts:
        raise
finally:
    if _watch:
        signal.signal(signal.SIGINT, signal.default_int_handler)
if _interrupts:
    print("eplb: interrupted", file=sys.stderr)
    # (SystemExit, not a return: an import has no exit code; the console script's
    # wrapper imports this module, and SystemExit ends it without a traceback)
    sys.exit(128 + signal.SIGINT)

__all__ = ["main"]


def main() -> int:
    """Run the ``eplb`` command with ``sys.argv[1:]``; return its exit code."""
    return _run_command()


if __name__ == "__main__":
    sys.exit(main())
