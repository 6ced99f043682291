"""Load files whose numbers would take far more memory than the file: large JSON (a
dozen times its text as Python objects) is streamed, or refused naming the limit,
before the memory is taken."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from eplb.formats import FormatError, read_loads

LIMIT = "33,554,432"  # the planner's most slots over all layers, as the errors print it


def _counts(steps: int) -> np.ndarray:
    return (np.arange(steps * 58 * 256, dtype=np.int64) % 5000).reshape(steps, 58, 256)


@pytest.mark.parametrize("layout", ["sglang", "plain", "record"])
def test_large_json_loads_are_streamed(tmp_path, layout) -> None:
    counts = _counts(100)
    doc = {"sglang": {"logical_count": counts.tolist(), "note": "x"},
           "plain": counts.tolist(),
           "record": {"counts": counts.tolist(), "layers": list(range(3, 61))}}[layout]
    path = tmp_path / f"{layout}.json"
    path.write_text(json.dumps(doc))
    tracemalloc.start()
    try:
        trace = read_loads(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(trace.counts.numpy(), counts.astype(np.float64))
    assert trace.layer_ids == (list(range(3, 61)) if layout == "record" else list(range(58)))
    # json.loads took ~9 times the text (116 MB for 13 MB); streamed, the loads and a
    # few chunks of text
    assert peak < 6 * path.stat().st_size


def test_large_json_with_bad_content_keeps_its_error(tmp_path) -> None:
    # streamed, then parsed whole for the message it has always had
    rows = _counts(60).tolist()
    rows[5][3][2] = True
    path = tmp_path / "bool.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(FormatError, match=r"array\[5\]\[3\]\[2\] is true, not a load"):
        read_loads(path)


def test_huge_json_with_bad_content_is_refused_naming_the_limit(tmp_path) -> None:
    # 2**25 + 1 numbers: parsed whole, they took ~1 GB before the boolean was found
    path = tmp_path / "huge.json"
    path.write_bytes(b"[[true" + b",0" * (1 << 25) + b"]]")
    with pytest.raises(FormatError, match=rf"huge\.json: holds up to 33,554,434 numbers, "
                                          rf"more than the {LIMIT} eplb reads"):
        read_loads(path)
