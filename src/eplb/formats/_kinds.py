"""What kind of file a reader was given, in the words of its errors: shared by the
load readers (:mod:`eplb.formats.readers`, :mod:`eplb.formats.trtllm_stats`)."""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any

from eplb.formats.detect import detect_format, sniff_container
from eplb.formats.errors import FormatError

#: whether the read under way was given its format (format= / --format) or detected it:
#: a detected format's error must not tell the user to leave out a flag never given
FORMAT_FORCED: ContextVar[bool] = ContextVar("eplb_format_forced", default=True)


def require_container(path: Path, fmt: str, kinds: tuple[str, ...],
                      expected: str | None = None) -> None:
    """Refuse ``path`` unless its container is one of ``kinds`` (``expected``: the words
    for them in the error; default ``a {kinds[0]} file``)."""
    kind = sniff_container(path)
    if kind not in kinds:
        raise wrong_kind(path, fmt, expected or f"a {kinds[0]} file", f"{kind} content")


def wrong_kind(path: Path, fmt: str, expected: str, kind: str) -> FormatError:
    """The error for a file given as ``fmt`` (format= / --format) that is another kind of
    file (``kind``: what it holds, e.g. ``"npy content"``): the format asked for, what it
    expects, what the file holds, and what it reads as. Without this, a forced
    ``trtllm`` or ``sglang-per-pass`` surfaced the deserialiser's own words ("header too
    large", "Unsupported operand 147")."""
    if not FORMAT_FORCED.get():  # detected, e.g. from the folder holding this file
        return FormatError(path, f"read as {fmt!r} (detected from its contents), expected "
                                 f"{expected}, found {kind}")
    try:
        detected = detect_format(path)
        hint = (f"; it reads as {detected!r} load statistics: leave format= (--format) out"
                if detected != fmt else "")
    except FormatError as exc:  # a placement, say: detection names it
        said = str(exc).removeprefix(f"{exc.path}: ")
        hint = f"; it {said}" if said.startswith("holds ") else ""
    except (OSError, RuntimeError, ValueError):
        hint = ""
    return FormatError(path, f"format {fmt!r} expects {expected}, found {kind}{hint}")


def is_scalar(value: Any) -> bool:
    """Whether a file's metadata value is kept in a trace's ``meta`` (JSON scalars)."""
    return value is None or isinstance(value, (int, float, str, bool))
