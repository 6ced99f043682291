"""The ``eplb`` command: plan, evaluate, benchmark, simulate and demo expert placement.

Exit codes: 0 success, 2 a usage or input mistake (bad option, missing or malformed file,
impossible topology, existing output without ``--force``), 1 a failure while running,
130 after a Ctrl-C, 143 after a SIGTERM and 129 after a SIGHUP (each stops the run with
its clean-ups).
Errors print one ``eplb: error: ...`` line; ``--debug`` shows the traceback first (the
exit code is the same).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import re
import signal
import sys
import threading
import traceback
import typing
import warnings
from collections.abc import Iterator, Sequence

import torch

from eplb.cli._common import EXIT_FAILURE, EXIT_USAGE, CliError, cli_words
from eplb.cli._inputs import warn
from eplb.cli._parser import _Parser, build_parser
from eplb.formats.errors import MissingPackage

__all__ = ["build_parser", "main"]


def _run(func_ref: str, args: argparse.Namespace) -> int:
    """Run the subcommand ``func_ref`` (``"module:function"`` in :mod:`eplb.cli`, set by
    its parser's ``set_defaults``): only the module of the command asked for is imported."""
    torch.set_num_threads(args.threads)
    module, name = func_ref.split(":")
    func = getattr(importlib.import_module(f"eplb.cli.{module}"), name)
    return int(func(args) or 0)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: typing.TextIO | None = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for the CLI: a warning is one ``eplb: warning:`` line."""
    warn(str(message))


def _one_line(message: object) -> str:
    return " ".join(str(message).split()) or "unknown error"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``eplb`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    # help texts hold "×" too: printed under the same escaping as a command's output
    with _printable_stdout():
        try:
            args = parser.parse_args(_glued_lists(sys.argv[1:] if argv is None else argv,
                                                  _flags(parser)))
        except SystemExit as exc:  # --help, --version or a usage error: already printed
            return exc.code if isinstance(exc.code, int) else (
                0 if exc.code is None else EXIT_USAGE)
        if args.command is None:
            commands = ", ".join(parser.commands())
            print(f"eplb: error: a COMMAND is needed: one of {commands} ('eplb --help' "
                  f"describes them)", file=sys.stderr)
            return EXIT_USAGE
        return _main(args)


#: options whose value is a comma-separated list of numbers
_LIST_OPTIONS = ("--gpu-speed", "--dead-gpus")
_NUMBER_LIST = re.compile(r"-([\d.]|inf|nan)", re.IGNORECASE)
#: options whose value is a slice START:STOP, and such a value of a negative start
#: (``--step-range -10:`` was "expected one argument", where ``:-10`` worked), or a
#: negative bound with no colon (``-10%``: glued, the range's own check names it)
_RANGE_OPTIONS = ("--step-range",)
_NEGATIVE_START = re.compile(r"\s*-[\d.]*%?\s*(:|$)")
#: a negative number argparse takes for an option: ``-inf``, ``-nan``, ``-1e5`` (it lets
#: ``-1`` and ``-.5`` through by itself)
_NEGATIVE_WORD = re.compile(r"-(inf(inity)?|nan|(\d+\.?\d*|\.\d+)e[+-]?\d+)", re.IGNORECASE)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings of ``parser`` and its subcommands that take no value."""
    found: set[str] = set()
    for each in (parser, *_Parser.commands(parser).values()):
        for action in each._actions:
            if action.nargs == 0:
                found.update(action.option_strings)
    return found


def _names(item: str, options: Sequence[str]) -> bool:
    """``item`` is one of ``options`` or an abbreviation argparse reads as one: ``--step-r
    -10:`` was "expected one argument" where ``--step-range -10:`` worked (new-user pass).
    An abbreviation argparse finds ambiguous stays its error, glued or not."""
    return (item.startswith("--") and len(item) > 2 and "=" not in item
            and any(option.startswith(item) for option in options))


def _glued_lists(argv: Sequence[str], flags: set[str] = frozenset()) -> list[str]:
    """``argv`` with an option's value that begins with a minus sign glued to it
    (``--gpu-speed -1,1`` → ``--gpu-speed=-1,1``, ``--move-price -inf`` →
    ``--move-price=-inf``, ``--step-range -10:`` → ``--step-range=-10:``): argparse reads
    such a value as an option and answered "expected one argument"; glued, eplb's own
    check names the value that is wrong (attacker passes). Only a list option's value, a
    range whose start is negative, or a whole negative number that argparse would not
    take, is glued, and only to a long option that takes a value (neither one of
    ``flags`` nor an abbreviation of one) and has no ``=``; nothing after a bare ``--`` is
    touched. Nothing else changes: argparse refused these."""
    out: list[str] = []
    items = list(argv)
    k = 0
    while k < len(items):
        item = items[k]
        if item == "--":  # the rest are values (file names such as "-1e5"): as given
            out += items[k:]
            break
        value = items[k + 1] if k + 1 < len(items) else ""
        # (a flag's abbreviation, "--js" for --json, is left alone as the flag is)
        takes_value = (item.startswith("--") and "=" not in item
                       and not any(flag.startswith(item) for flag in flags))
        if ((_names(item, _LIST_OPTIONS) and _NUMBER_LIST.match(value))
                or (_names(item, _RANGE_OPTIONS) and _NEGATIVE_START.match(value))
                or (takes_value and _NEGATIVE_WORD.fullmatch(value))):
            out.append(f"{item}={value}")
            k += 2
            continue
        out.append(item)
        k += 1
    return out


@contextlib.contextmanager
def _printable_stdout() -> Iterator[None]:
    """Print what stdout's encoding cannot hold (``×`` under ``PYTHONIOENCODING=ascii``, a
    file name of undecodable bytes) escaped, as Python does on stderr: a strict stdout
    raised UnicodeEncodeError after the work was done (a plan already written), reported
    as a usage error."""
    stream = sys.stdout
    errors = getattr(stream, "errors", None)
    if errors != "strict" or not hasattr(stream, "reconfigure"):
        yield
        return
    try:
        stream.reconfigure(errors="backslashreplace")
    except (ValueError, OSError):  # a stream that cannot change now: leave it alone
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):
            stream.reconfigure(errors=errors)


#: the signals whose default ends the process outright, which the CLI turns into
#: :class:`Terminated` (SIGHUP: not on Windows)
_ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                        if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a job scheduler), raised like a Ctrl-C so that every
    clean-up runs: Python's default for SIGTERM ends the process on the spot, which left
    a report's hidden staging folder ``.eplb-report-*.tmp`` (and, where a file system
    lacks ``O_TMPFILE``, a hidden temporary file) beside the output (attacker pass). SIGHUP
    (the terminal closed) alike. ``signum``: the signal's number."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = signum


@contextlib.contextmanager
def interrupts_seen() -> Iterator[list[int]]:
    """A list that gets the signal's number when SIGINT, SIGTERM or SIGHUP arrives inside
    the block. For SIGINT the handler in force before (Python's own raises
    KeyboardInterrupt) still runs; SIGTERM and SIGHUP, where they have the system's
    default (end the process at once), raise :class:`Terminated` instead, so the command
    cleans up before it exits. The handlers in force before are back afterwards. A
    signal inside torch's C++ file writer comes out as a RuntimeError ("enforce fail ...
    unexpected pos"): with this the command can still report it as an interrupt (attacker
    pass). Off the main thread, or where a signal is ignored or not Python's to handle, it
    is left alone."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    restore: dict[int, typing.Any] = {}
    previous = signal.getsignal(signal.SIGINT)
    if callable(previous):  # not SIG_IGN, SIG_DFL or a C handler
        def on_interrupt(signum: int, frame: object, previous: typing.Any = previous) -> None:
            seen.append(signum)
            previous(signum, frame)

        restore[signal.SIGINT] = previous
        signal.signal(signal.SIGINT, on_interrupt)

    def on_terminate(signum: int, frame: object) -> None:
        seen.append(signum)
        raise Terminated(signum)

    for number in _ENDING_SIGNALS:  # (a SIG_IGN, from nohup, is left alone)
        if signal.getsignal(number) == signal.SIG_DFL:
            restore[number] = signal.SIG_DFL
            signal.signal(number, on_terminate)
    try:
        yield seen
    finally:
        for number, handler in restore.items():
            signal.signal(number, handler)


def _main(args: argparse.Namespace) -> int:
    """:func:`main` after parsing: run the command, its errors as one line and a code."""
    interrupts: list[int] = []
    try:
        with warnings.catch_warnings(), interrupts_seen() as interrupts:
            warnings.showwarning = _show_warning  # one "eplb: warning:" line, no source line
            return _run(args.func, args)
    except CliError as exc:
        return _fail(args, str(exc), exc.code)
    except KeyboardInterrupt as exc:
        return _interrupted(exc.signum if isinstance(exc, Terminated) else signal.SIGINT)
    except BrokenPipeError:  # e.g. `eplb ... --json | head`: the reader left; stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
            PermissionError) as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        said = cli_words(_one_line(exc.strerror or str(exc)))
        return _fail(args, f"{said}{where}", EXIT_USAGE)
    except (ValueError, TypeError) as exc:  # bad input: FormatError, PlacementError, topology
        return _fail(args, cli_words(str(exc)), EXIT_USAGE)
    except MissingPackage as exc:  # an optional package the input needs: set-up to fix
        return _fail(args, str(exc), EXIT_USAGE)
    except ModuleNotFoundError as exc:
        package = _LAZY_DEPENDENCIES.get(exc.name or "")
        if package is None:
            return _fail_running(args, exc)
        # a dependency imported only where a command needs it, missing from a broken
        # environment (attacker pass: "ModuleNotFoundError: No module named 'yaml'")
        return _fail(args, f"the Python package {package!r}, which eplb needs here, is not "
                           f"installed for {sys.executable}: pip install {package}",
                     EXIT_USAGE)
    except OSError as exc:
        if exc.errno not in _BAD_NAME:  # a full disk, an I/O error: a failure while running
            return _fail_running(args, exc)
        # a name the file system refuses (too long, a symlink loop): the user's to fix
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return _fail(args, f"{_one_line(exc.strerror or str(exc))}{where}", EXIT_USAGE)
    except Exception as exc:  # a failure while running, not the user's input
        if interrupts:  # a Ctrl-C or SIGTERM that a C++ writer turned into its own error
            if args.debug:
                traceback.print_exc()
            return _interrupted(interrupts[-1])
        return _fail_running(args, exc)


_BAD_NAME = {errno.ENAMETOOLONG, errno.ELOOP}
#: runtime dependencies (``pyproject.toml``) imported only where a command needs them, by
#: module, with the distribution to install (the console script names the ones every
#: command imports, ``src/_eplb_command.py``)
_LAZY_DEPENDENCIES = {"yaml": "pyyaml", "rich": "rich"}


def _interrupted(signum: int) -> int:
    """Say the command was stopped by ``signum``; the shell's code for it (128 + its number)."""
    what = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}.get(signum, "hung up")
    print(f"eplb: {what}", file=sys.stderr)
    return 128 + signum


def _fail_running(args: argparse.Namespace, exc: BaseException) -> int:
    """A failure while running (exit 1), with a hint at ``--debug``."""
    hint = "" if args.debug else " (rerun with --debug for the traceback)"
    return _fail(args, f"{type(exc).__name__}: {_one_line(exc)}{hint}", EXIT_FAILURE)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Print the error line (after the traceback with ``--debug``); return the exit code,
    the same with or without ``--debug``."""
    if args.debug:
        traceback.print_exc()
    print(f"eplb: error: {_one_line(message)}", file=sys.stderr)
    return code

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
