"""Pieces of error and warning text that several layers write the same way.

It lives in core, the bottom layer, so that the integrations and the CLI can share it
without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence


def integer_runs(ids: Sequence[int], *, dash: str = "..", sep: str = ", ") -> str:
    """Integers with consecutive runs shortened, in the given order: ``[0, 1, 2, 7]`` ->
    ``"0..2, 7"`` (``dash="-", sep=","``: ``"0-2,7"``). A run is a stretch where each id is
    one more than the one before; an empty list gives ``""``."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return sep.join(f"{a}{dash}{b}" if b > a else f"{a}" for a, b in spans)


def counted(count: int, noun: str) -> str:
    """``"1 layer"``, ``"2 layers"``: a count and its noun, plural unless the count is 1."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
