"""Streaming reader for vLLM-recorded load history (the ADRS benchmark format).

The file is ``{"load_history": [{"logical_expert_load": [[E numbers] x L]}, ...], ...}``,
one entry per step, and reaches hundreds of MB. Python's ``json.load`` would build a
list of lists of boxed numbers for the whole file (~30 bytes per number); here the
file is read in chunks and each entry is decoded on its own (``raw_decode``) and
copied straight into a preallocated float64 buffer, so the only large allocation is
the result itself. Untouched pages of an over-sized buffer cost no resident memory,
so the step-count estimate can be generous without ever copying the result.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import IO, Any

import numpy as np

from eplb.core.inputs import RepeatedKeyError, unique_keys
from eplb.formats._counts import number_array, refuse_booleans
from eplb.formats._files import byte_progress
from eplb.formats.errors import FormatError, json_value_error, repeated_key

#: a loads file holding both engines' keys: which of the two was meant is not the reader's
#: guess (a new-user pass found `logical_count` silently ignored beside `load_history`)
BOTH_LOAD_KEYS = ("holds both 'load_history' (vLLM's load history) and 'logical_count' "
                  "(SGLang's expert counts): eplb cannot tell which loads are meant; keep "
                  "one of the two keys")

_CHUNK = 8 << 20
_WS = re.compile(r"[ \t\r\n]*")


class ValueTooLong(FormatError):
    """A JSON value is longer than the reader allows (:meth:`JsonStream.value`)."""


class JsonStream:
    """Incremental JSON tokenizer over a file: whitespace, single chars and whole values."""

    def __init__(self, handle: IO[bytes], path: Path, advance: Any) -> None:
        self.handle = handle
        self.path = path
        self.advance = advance
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.json = json.JSONDecoder(object_pairs_hook=unique_keys)
        self.buf = ""
        self.pos = 0
        self.offset = 0  # characters dropped from the front of buf so far
        self.eof = False
        # whether the text read so far holds a true or false: only then are values
        # scanned for one (NumPy reads true among numbers as 1)
        self.literals = False

    def fill(self) -> None:
        """Read more; grow the read with the pending text so huge values stay linear."""
        size = max(_CHUNK, len(self.buf) - self.pos)
        data = self.handle.read(size)
        self.advance(len(data))
        if not data:
            self.eof = True
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise FormatError(self.path, f"is not UTF-8 text: {exc}") from None
        self.offset += self.pos
        self.buf = self.buf[self.pos :] + text
        self.pos = 0
        # (the pending text with the new: a literal cut between two reads is found whole)
        self.literals = self.literals or "true" in self.buf or "false" in self.buf

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos : self.pos + 1]
            self.fill()

    def expect(self, chars: str, where: str) -> str:
        found = self.peek()
        if not found or found not in chars:
            shown = repr(found) if found else "the end of the file"
            raise FormatError(
                self.path,
                f"malformed JSON at character {self.offset + self.pos}: expected "
                f"{' or '.join(repr(c) for c in chars)} {where}, found {shown}",
            )
        self.pos += 1
        return found

    def value(self, where: str, max_chars: int | None = None) -> Any:
        """Decode one whole JSON value, reading more of the file while it is cut off (a
        FormatError once more than ``max_chars`` characters of it are pending)."""
        while True:
            self.peek()
            try:
                obj, end = self.json.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise FormatError(self.path, f"JSON {where} is nested too deeply") from None
            except RepeatedKeyError as exc:
                raise FormatError(self.path, f"{where}: {repeated_key(exc.key)}") from None
            except json.JSONDecodeError as exc:
                if not self.eof:
                    self._more(where, max_chars)
                    continue
                raise FormatError(
                    self.path,
                    f"malformed JSON {where} at character {self.offset + exc.pos}: {exc.msg}",
                ) from None
            except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
                raise FormatError(self.path, f"{where}: {json_value_error(exc)}") from None
            if end == len(self.buf) and not self.eof:  # a number may continue in the next chunk
                self._more(where, max_chars)
                continue
            self.pos = end
            return obj

    def _more(self, where: str, max_chars: int | None) -> None:
        """Read more for a value cut off at the end of the text read so far."""
        if max_chars is not None and len(self.buf) - self.pos > max_chars:
            raise ValueTooLong(self.path, f"JSON {where} is longer than {max_chars:,} characters")
        self.fill()


def read_vllm_history(path: Path, progress: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Stream ``path`` into ``(counts [T, L, E] float64, meta)``.

    ``meta`` holds the other top-level keys of the file when they are small scalars.
    Peak memory is the result plus a few chunks of text (see the module docstring).
    """
    size = path.stat().st_size
    meta: dict[str, Any] = {}
    out: np.ndarray | None = None
    num_steps = 0
    seen_history = False
    keys: set[str] = set()  # the top-level keys so far
    with open(path, "rb") as handle, byte_progress(progress, size, f"reading {path.name}") as adv:
        stream = JsonStream(handle, path, adv)
        stream.expect("{", "at the start of a vLLM load-history file")
        if stream.peek() == "}":
            stream.pos += 1
        else:
            while True:
                key = stream.value("(an object key)")
                if not isinstance(key, str):
                    raise FormatError(
                        path, f"expected a string key at the top level, found {key!r}"
                    )
                if key in keys:
                    raise FormatError(path, repeated_key(key))
                keys.add(key)
                stream.expect(":", f"after key {key!r}")
                if key == "load_history":
                    seen_history = True
                    out, num_steps = _read_entries(stream, path, size)
                else:
                    other = stream.value(f"in the value of {key!r}")
                    if isinstance(other, (int, float, str, bool)) or other is None:
                        meta[key] = other
                if stream.expect(",}", "between top-level entries") == "}":
                    break
        if stream.peek():
            raise FormatError(
                path,
                "unexpected text after the closing brace at character "
                f"{stream.offset + stream.pos}",
            )
    if not seen_history:
        raise FormatError(path, "expected a top-level 'load_history' list, found none")
    if "logical_count" in keys:
        raise FormatError(path, BOTH_LOAD_KEYS)
    if out is None or num_steps == 0:
        raise FormatError(path, "'load_history' is empty: expected at least one step")
    return out[:num_steps], meta


def _read_entries(stream: JsonStream, path: Path, size: int) -> tuple[np.ndarray | None, int]:
    stream.expect("[", "to open 'load_history'")
    if stream.peek() == "]":
        stream.pos += 1
        return None, 0
    out: np.ndarray | None = None
    step = 0
    while True:
        start = stream.offset + stream.pos
        entry = stream.value(f"in load_history[{step}]")
        # each entry named as the file has it (second attacker pass: a null entry read
        # "found keys NoneType", a null load "has no 'logical_expert_load' (found keys
        # ['logical_expert_load'])")
        if isinstance(entry, dict):
            if "logical_expert_load" not in entry:
                raise FormatError(path, f"load_history[{step}] has no 'logical_expert_load' "
                                        f"(found keys {sorted(entry)})")
            load, what = entry["logical_expert_load"], f"load_history[{step}].logical_expert_load"
        else:  # a bare [L][E] list per step
            load, what = entry, f"load_history[{step}]"
        if load is None:
            expected = ("[layers][experts] loads" if isinstance(entry, dict) else
                        "an object with 'logical_expert_load' (or [layers][experts] loads)")
            raise FormatError(path, f"{what} is null; expected {expected}")
        if stream.literals:
            refuse_booleans(load, path, what)
        arr = number_array(load, path, what)
        one_layer = arr.ndim == 1  # (named by its expert alone below)
        if one_layer:
            arr = arr[None]
        if out is None:
            if arr.ndim != 2 or arr.size == 0:
                raise FormatError(
                    path,
                    f"load_history[0].logical_expert_load has shape {arr.shape}; expected "
                    "[layers][experts]",
                )
            per_entry = max(stream.offset + stream.pos - start, 1)
            capacity = int(size / per_entry * 1.25) + 4  # unused pages are never touched
            out = np.empty((capacity, *arr.shape), dtype=np.float64)
        elif arr.shape != out.shape[1:]:
            raise FormatError(
                path,
                f"load_history[{step}].logical_expert_load has shape {arr.shape}, but step 0 has "
                f"{out.shape[1:]}",
            )
        if not np.isfinite(arr).all() or (arr < 0).any():
            # which entry, and what it is, as the other readers name it (attacker pass)
            layer, expert = (int(i) for i in np.argwhere(~np.isfinite(arr) | (arr < 0))[0])
            value = float(arr[layer, expert])
            kind = ("a NaN" if value != value else "an infinite" if abs(value) == np.inf
                    else "a negative")
            where = f"[{expert}]" if one_layer else f"[{layer}][{expert}]"
            raise FormatError(path, f"{what}{where} is {value} ({kind} load); "
                                    "loads must be finite and >= 0")
        if step == out.shape[0]:
            grown = np.empty((int(step * 1.5) + 4, *out.shape[1:]), dtype=np.float64)
            grown[:step] = out
            out = grown
        out[step] = arr
        step += 1
        if stream.expect(",]", f"after load_history[{step - 1}]") == "]":
            return out, step
