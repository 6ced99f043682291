"""``--key`` on a ``torch.save`` dict reads the arrays it names, and only those.

A dict ``{"counts": tensor, "tags": ["prefill", "decode"]}`` (a list of text beside the
loads, as a hand-made dump may carry) was refused even with ``--key counts``: every
list of the dict was read as numbers before the key chose one (attacker pass). Without
a key the list is still read, and refused by name.
"""

from __future__ import annotations

import pytest
import torch

from eplb.cli import main
from eplb.formats import FormatError, read_loads


def test_key_reads_only_the_named_array(tmp_path, capsys):
    counts = torch.arange(64, dtype=torch.float64).reshape(4, 16) + 1
    path = tmp_path / "loads.pt"
    torch.save({"counts": counts, "tags": ["prefill", "decode"]}, path)
    assert torch.equal(read_loads(path, key="counts").total(), counts)
    out = tmp_path / "p.json"
    assert main(["plan", str(path), "--key", "counts", "-r", "32", "-g", "8",
                 "-o", str(out)]) == 0, capsys.readouterr().err
    assert out.exists()
    with pytest.raises(FormatError, match="tags holds text"):
        read_loads(path)  # no key: every array is read, and the text named
