"""The one error type of :mod:`eplb.formats`."""

from __future__ import annotations

from os import PathLike


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
