"""Reading a JSON loads file (plain arrays, SGLang's ``{"logical_count": ...}``, count
records) in memory bounded by its loads, not by a dozen times its text.

``json.loads`` builds a Python list of boxed numbers for every array, about 30 bytes a
number (12 times the text of a counts file), before any check can look at the size: a
69 MB file peaked at 818 MB, and 10**8 numbers would need ~8 GB. So a file of more
than :data:`WHOLE_BYTES` is streamed instead (with :class:`history.JsonStream`, as the
vLLM load-history reader does): objects and one-level arrays are decoded as usual, but
an array of arrays is read row by row into one float64 buffer, which becomes an
``ndarray`` of the same values NumPy gives the parsed lists. The only large allocation
is then the loads themselves.

Errors stay those of the whole parse: a streamed file that holds anything else in an
array of arrays (text, booleans, ``null``, ragged rows), or is malformed, is parsed
whole when its numbers are at most :data:`MAX_UNPACKED_VALUES` (its usual error then
names the fault), and refused, naming that limit, when they are more.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from eplb.core.inputs import RepeatedKeyError, unique_keys
from eplb.formats._arrays import ID_FIELDS
from eplb.formats._expand import MAX_UNPACKED_VALUES
from eplb.formats._files import require_regular_file
from eplb.formats.errors import FormatError, json_value_error, repeated_key
from eplb.formats.history import JsonStream, ValueTooLong

#: Files up to this size are parsed whole (they hold at most 2**20 numbers: each takes
#: a digit and a separator); the SGLang dumps people share are ~150 KB.
WHOLE_BYTES = 2 << 20
#: Text decoded to Python objects in a streamed file (its keys, scalars, one-level
#: arrays, and each row on its way into the float64 buffer), at most: the same bound
#: in Python objects as a file parsed whole.
_KEPT_CHARS = WHOLE_BYTES
_MAX_DEPTH = 64  # deeper files are parsed whole (or refused), for json.loads' own error
_READ = 8 << 20
_BLANK = re.compile(r"[ \t\r\n]*")


class _Fallback(Exception):
    """Streaming stops: the file holds something only the whole parse names well."""


def load_json_literals(path: Path) -> tuple[Any, bool]:
    """``(the parsed JSON, whether its text may hold a true or false)``: NumPy reads a
    ``true`` among numbers as 1, and only a file holding one needs its loads scanned.
    In a streamed file (see the module docstring) arrays of arrays are float64
    ``ndarray``s, and the flag is always true (it scans only the one-level lists)."""
    require_regular_file(path)
    if path.stat().st_size <= WHOLE_BYTES:
        return _parse_whole(path)
    try:
        return _Streamed(path).document(), True
    except ValueTooLong as exc:
        reason: Exception = _Fallback(str(exc).removeprefix(f"{path}: JSON "))
    except (_Fallback, FormatError) as exc:
        reason = exc
    numbers = _count_bound(path)
    if numbers <= MAX_UNPACKED_VALUES:
        return _parse_whole(path)
    if isinstance(reason, FormatError):
        raise reason
    raise FormatError(
        path,
        f"holds up to {numbers:,} numbers, more than the {MAX_UNPACKED_VALUES:,} eplb reads "
        f"as Python objects (the most slots it plans over all layers), and cannot be "
        f"streamed: {reason}; eplb streams large JSON loads that are arrays of plain numbers",
    )


def _parse_whole(path: Path) -> tuple[Any, bool]:
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
        return (json.loads(text, object_pairs_hook=unique_keys),
                "true" in text or "false" in text)
    except RepeatedKeyError as exc:
        raise FormatError(path, repeated_key(exc.key)) from None
    except json.JSONDecodeError as exc:
        raise FormatError(path, f"malformed JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"is not UTF-8 text: {exc}") from None
    except RecursionError:
        raise FormatError(path, "JSON nested too deeply to be load statistics") from None
    except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
        raise FormatError(path, json_value_error(exc)) from None


def _count_bound(path: Path) -> int:
    """At least the numbers in the JSON text of ``path``: every array element but the
    first follows a comma, and the first follows a ``[`` (read in chunks)."""
    count = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ):
            count += chunk.count(b",") + chunk.count(b"[")
    return count


class _Rows:
    """A growing float64 buffer that the rows of one array of arrays are copied into."""

    def __init__(self, stream: JsonStream, size: int) -> None:
        self.stream, self.size = stream, size
        self.data = np.empty(0)
        self.count = 0

    def add(self, row: np.ndarray, chars: int) -> None:
        end = self.count + row.size
        if end > self.data.size:
            if not self.data.size:  # sized from the first row: the rest of the file alike;
                # pages of an over-sized buffer that are never written cost no memory
                left = self.size - self.stream.offset - self.stream.pos
                capacity = int(left / max(chars, 1) * max(row.size, 1) * 1.25) + end
            else:
                capacity = int(self.data.size * 1.5) + end
            grown = np.empty(capacity)
            grown[: self.count] = self.data[: self.count]
            self.data = grown
        self.data[self.count : end] = row  # ints become float64 as NumPy casts them
        self.count = end

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        values = self.data[: self.count]
        # a buffer sized for a whole file holds one of its arrays: keep just that one
        return (values.copy() if self.data.size > 2 * self.count else values).reshape(shape)


class _Streamed:
    """One streamed parse of a JSON file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        self.kept = 0  # characters decoded to Python objects that stay so

    def document(self) -> Any:
        with open(self.path, "rb") as handle:
            self.stream = JsonStream(handle, self.path, lambda _n: None)
            obj = self._value(0, "the top-level value")
            if self.stream.peek():
                raise _Fallback("text after the end of the JSON document")
        return obj

    def _value(self, depth: int, where: str) -> Any:
        if depth > _MAX_DEPTH:
            raise _Fallback(f"{where} is nested more than {_MAX_DEPTH} deep")
        first = self.stream.peek()
        if first == "{":
            return self._object(depth, where)
        if first == "[" and self._after_bracket() == "[":
            rows = _Rows(self.stream, self.size)
            return rows.array(self._rows(rows, depth, where))
        return self._kept(where)  # a number, text, or an array of them

    def _kept(self, where: str) -> Any:
        start = self.stream.offset + self.stream.pos
        value = self.stream.value(where, _KEPT_CHARS - self.kept)
        self.kept += self.stream.offset + self.stream.pos - start
        if self.kept > _KEPT_CHARS:
            raise _Fallback(f"{where} and the text before it hold more than "
                            f"{_KEPT_CHARS:,} characters that are not arrays of arrays")
        return value

    def _object(self, depth: int, where: str) -> dict[str, Any]:
        stream = self.stream
        stream.pos += 1  # the "{" peeked at
        out: dict[str, Any] = {}
        if stream.peek() == "}":
            stream.pos += 1
            return out
        while True:
            key = self._kept(f"a key in {where}")
            if not isinstance(key, str):
                raise _Fallback(f"{where} has a key that is not a string")
            if key in out:
                raise FormatError(self.path, repeated_key(key))
            stream.expect(":", f"after key {key!r}")
            # layer ids are checked as the lists they are (a few thousand numbers at most)
            out[key] = (self._kept(repr(key)) if key in ID_FIELDS
                        else self._value(depth + 1, repr(key)))
            if stream.expect(",}", f"after the value of {key!r}") == "}":
                return out

    def _after_bracket(self) -> str:
        """The first non-blank character after the ``[`` at the current position."""
        stream = self.stream
        while True:
            i = _BLANK.match(stream.buf, stream.pos + 1).end()
            if i < len(stream.buf) or stream.eof:
                return stream.buf[i : i + 1]
            stream.fill()  # keeps the text from the "[" on

    def _rows(self, rows: _Rows, depth: int, where: str) -> tuple[int, ...]:
        """Copy the array at the current position into ``rows``; return its shape."""
        stream = self.stream
        if depth > _MAX_DEPTH:
            raise _Fallback(f"{where} is nested more than {_MAX_DEPTH} deep")
        if self._after_bracket() != "[":  # innermost: one row of numbers
            start = stream.offset + stream.pos
            row = stream.value(f"a row of {where}", _KEPT_CHARS)
            chars = stream.offset + stream.pos - start
            numbers = _numbers(row, stream.buf.find("t", stream.pos - chars, stream.pos) >= 0
                               or stream.buf.find("f", stream.pos - chars, stream.pos) >= 0)
            if numbers is None:
                raise _Fallback(f"{where} holds a row that is not plain numbers")
            rows.add(numbers, chars)
            return numbers.shape
        stream.pos += 1
        shape: tuple[int, ...] | None = None
        count = 0
        while True:
            if stream.peek() != "[":
                raise _Fallback(f"{where} mixes arrays with other values")
            inner = self._rows(rows, depth + 1, where)
            if shape is not None and inner != shape:
                raise _Fallback(f"{where} has rows of different lengths")
            shape, count = inner, count + 1
            if stream.expect(",]", f"between the rows of {where}") == "]":
                return (count, *shape)


def _numbers(row: Any, letters: bool) -> np.ndarray | None:
    """``row`` (a decoded JSON array) as a 1-D int or float array, or ``None`` where it
    holds anything but numbers (``letters``: its text has a ``t`` or ``f``, so it may
    hold a boolean, which NumPy would read as 1 or 0)."""
    try:
        array = np.asarray(row)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.ndim != 1 or array.dtype.kind not in "iuf":
        return None
    if letters and any(type(x) is bool for x in row):
        return None
    return array
