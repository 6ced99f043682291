"""Refuse loaded objects far larger than the file they came from ("billion laughs").

A pickle (``.pt``) names an object once and refers to it again by its memo, and YAML
does the same with anchors and aliases (``&a`` / ``*a``). Both are cheap to load: the
copies are one shared object. But everything after loading sees them expanded: NumPy
and torch convert every copy, and an error message prints every copy. Nine levels of
nine references to one list make a 1.5 KB file of 9**9 numbers, which took more than
the host's memory. A torch tensor does the same with strides of 0 (one stored number
viewed as a 10**9-element tensor).

Without shared parts every number in such a file costs at least a byte of it, so an
object that expands to more entries than the file has bytes was built from shared
parts; up to a million entries are allowed whatever the file's size (a small YAML
placement may repeat one row for every layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from eplb.core.topology import MAX_TOTAL_SLOTS
from eplb.formats.errors import FormatError

#: Entries allowed whatever the file's size (beyond it, at most one per byte of the file).
MIN_BUDGET = 1 << 20

#: The most numbers eplb unpacks from a part of a loads file whose memory its size does
#: not bound: a compressed ``.npz`` member (zeros deflate ~1000-fold) or JSON text turned
#: into Python objects (~30 bytes a number, a dozen times the text). It is the planner's
#: own limit (``L·R`` slots over all layers, ``core.topology.check_total_slots``): a step of
#: loads ``[L, E]`` beyond it could not be planned anyway, as ``E <= R``.
MAX_UNPACKED_VALUES = MAX_TOTAL_SLOTS

#: How many times its compressed bytes a large compressed part (an ``.npz`` member, a
#: torch zip entry) may inflate to: real loads and top-k ids deflate a few times, a
#: crafted one (zeros) a thousandfold.
MAX_INFLATION = 100


def inflates_too_far(inflated_bytes: int, compressed_bytes: int) -> bool:
    """Whether a compressed part of ``compressed_bytes`` inflating to ``inflated_bytes``
    passes :data:`MAX_INFLATION` (each reader sets its own size below which it lets any
    part through)."""
    return inflated_bytes > MAX_INFLATION * max(compressed_bytes, 1)


_CONTAINERS = (dict, list, tuple)


def _children(node: Any) -> list[Any]:
    return [*node.keys(), *node.values()] if isinstance(node, dict) else list(node)


def _leaf_size(node: Any) -> int:
    if isinstance(node, torch.Tensor):
        return max(node.numel(), 1)
    if isinstance(node, np.ndarray):
        return max(node.size, 1)
    return 1


def check_expansion(obj: Any, path: Path, what: str = "the file") -> None:
    """Raise :class:`FormatError` when ``obj`` (read from ``path``) holds more values,
    every shared part counted each time it is used and every tensor by its elements,
    than ``path`` has bytes (and more than :data:`MIN_BUDGET`), or contains itself.
    Time and memory are linear in the distinct objects."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    budget = max(size, MIN_BUDGET)
    too_big = (f"{what} holds more than {budget:,} values when every part used several "
               f"times (a YAML alias, a pickle reference, a tensor of stride 0) is counted "
               f"each time, from a file of {size:,} bytes; eplb refuses such files, which "
               "would take the host's memory")
    if not isinstance(obj, _CONTAINERS):
        if _leaf_size(obj) > budget:
            raise FormatError(path, too_big)
        return
    sizes: dict[int, int] = {}  # id -> counted-out size of a container already measured
    open_ids: set[int] = set()  # the containers being measured: the current path down
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_ids.discard(key)
            total = 1 + sum(sizes[id(c)] if isinstance(c, _CONTAINERS) else _leaf_size(c)
                            for c in _children(node))
            if total > budget:
                raise FormatError(path, too_big)
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in open_ids:  # an ancestor: the structure contains itself
            raise FormatError(path, f"{what} holds a list or mapping that contains itself")
        open_ids.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if isinstance(c, _CONTAINERS))
