"""The error types of :mod:`eplb.formats`: a malformed file, a missing optional package."""

from __future__ import annotations

import reprlib
from os import PathLike
from typing import Any


class MissingPackage(ImportError):
    """An optional package a file format needs is not installed; the message says how to
    install it (a set-up to fix, not a failure of eplb's)."""


class FormatError(ValueError):
    """A file is malformed or of an unknown kind.

    The message names the file, what was expected and what was found. ``path`` keeps
    the offending file for callers that want to report it themselves.
    """

    def __init__(self, path: str | PathLike[str], message: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


def json_value_error(exc: ValueError) -> str:
    """Words for a ``ValueError`` from Python's JSON decoder, without Python advice."""
    text = str(exc)
    if "digits" in text and "integer" in text:  # CPython's int-from-string length limit
        return "holds an integer literal of more than 4300 digits, which no load or id needs"
    return f"malformed JSON: {text}"


def repeated_key(key: str, language: str = "JSON") -> str:
    """Words for a ``language`` mapping that gives ``key`` twice (:class:`eplb.core.inputs.
    RepeatedKeyError`): JSON and YAML readers keep the last silently, so which one was
    meant is the user's call."""
    return (f"gives key {shown(key)} twice in one {language} object (a {language} reader "
            f"keeps only the last, silently): remove the one that is not meant")


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 3, 6, 6, 6
    short.maxstring = short.maxother = short.maxlong = 60
    return short


_SHORT = _short_repr()


def shown(value: Any) -> str:
    """``repr(value)`` cut to a line's length, for a value read from a file that an error
    message quotes: a wrong field may hold a million-entry list, which printed whole
    made one ``eplb: error:`` line of megabytes."""
    try:
        return _SHORT.repr(value)
    except ValueError:  # an integer beyond Python's 4300-digit conversion limit
        return "an integer of more than 4300 digits"
