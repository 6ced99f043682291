"""CSV load tables: one row per layer, one column per expert, an optional header (a first
header cell ``layer``, or an empty one over row labels as pandas' ``to_csv`` writes its
index, makes the first column the layer ids; a first row ``0,1,2,…`` is the column labels
pandas writes for an unnamed table); ``#`` lines are comments."""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import numpy as np

from eplb.formats._files import require_regular_file
from eplb.formats.errors import FormatError

_LAYER_HEADERS = {"layer", "layer_id", "layer_idx", "layer_index", "layers"}
#: how a number begins (a sign, a point, a digit): a header label does not
_NUMBER_START = re.compile(r"[+-]?\.?[0-9]")


def read_csv_table(path: Path) -> tuple[np.ndarray, list[float] | None]:
    """``(values [L, E] float64, layer ids or None)`` of a CSV load table. The ids are as
    written (whole numbers are checked where they become layer ids)."""
    require_regular_file(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = [
                [cell.strip() for cell in row]
                for row in csv.reader(handle)
                if row and any(c.strip() for c in row) and not row[0].lstrip().startswith("#")
            ]
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"is not UTF-8 text: {exc}") from None
    except csv.Error as exc:
        raise FormatError(path, f"malformed CSV: {exc}") from None
    if not rows:
        raise FormatError(path, "expected CSV rows of expert loads (one row per layer), found none")
    header = None
    first = rows[0]
    # a header starts with a word (``layer``, ``expert_0``, ...) or with an empty cell over
    # a column of row labels (pandas' to_csv writes its index so). A row that starts with
    # a number, or with what begins like one (``4O``: a typo), is data: a typo anywhere
    # in it is named below (such a row was dropped as a header, and the table lost a
    # layer: attacker passes), and an empty cell there is a value missing
    labels = _column_labels(first, rows)
    if ((first[0] and not _is_number(first[0]) and not _NUMBER_START.match(first[0]))
            or (len(first) > 1 and not first[0]) or labels):
        header, rows = first, rows[1:]
    layer_col = header is not None and (header[0].lower() in _LAYER_HEADERS or not header[0])
    if header is not None and not layer_col and (labels or any(map(_is_number, header[1:]))):
        # a header that could be a layer (numbers in it): said, not dropped in silence
        # (new-user pass: "0,1,2,3" and "x,1,2" lost a layer without a word)
        shown = ",".join(header) if len(header) <= 8 else ",".join(header[:8]) + ",…"
        warnings.warn(f"{path}: first row '{shown}' read as a header ("
                      + ("pandas' column labels 0,1,2,…" if labels
                         else "its first cell is not a number")
                      + "), not a layer of loads: if it is data, correct or remove it",
                      stacklevel=2)
    if not rows:
        raise FormatError(path, "has a header but no data rows")
    width = len(rows[0])
    if header is not None and len(header) != width:
        # a header names every column: one of another width labels some other table (its
        # names would be read against the wrong columns, the layer column among them)
        raise FormatError(path, f"the CSV header has {len(header)} cells but the rows have "
                                f"{width}")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise FormatError(
                path,
                f"CSV row {i + 1 + (header is not None)} has {len(row)} cells; expected {width}",
            )
        for j, cell in enumerate(row):
            if not _is_number(cell):
                raise FormatError(
                    path,
                    f"CSV row {i + 1 + (header is not None)} column {j + 1} is {cell!r}; "
                    "expected a number" + ("; CSV cells are separated by commas"
                                           if any(c in cell for c in ";\t") else ""),
                )
    values = np.array([[float(c) for c in row] for row in rows], dtype=np.float64)
    if values.size == 1 and header is None:
        raise FormatError(path, "holds a single number; expected a table of loads (a row per "
                                "layer, a column per expert)")
    ids = None
    if layer_col:
        ids = values[:, 0].tolist()  # whole numbers, checked by LoadTrace (3.7 is refused)
        values = values[:, 1:]
    return values, ids


def _column_labels(first: list[str], rows: list[list[str]]) -> bool:
    """Whether ``first`` is the header ``0,1,…,E−1`` that pandas' ``to_csv(index=False)``
    writes over a table built from an array: read as data it would be a layer of its own
    (loads 0, 1, …, E−1). Taken as a header where the table has three or more columns
    and rows after it, as wide as it (pandas labels every column): real routed-token
    counts are not 0, 1, 2, … in expert order."""
    if len(first) < 3 or len(rows) < 2 or len(rows[1]) != len(first):
        return False
    return first == [str(i) for i in range(len(first))]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
