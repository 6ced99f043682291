"""SGLang per-pass dumps that disagree on the model's shape: a clear input error.

Two dumps of one folder whose ``last_physical_to_logical_map`` name different layer or
expert counts, and that share a forward-pass id, were summed pass by pass and raised
torch's own ``RuntimeError`` ("The size of tensor a (16) must match ..."): exit 1, a
failure while running, naming neither dump (attacker pass).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eplb.cli import main
from eplb.formats import FormatError, read_loads


def _dump(path: Path, layers: int, experts: int, rank: int) -> None:
    slots = 32
    phys_map = (torch.arange(slots) % experts).repeat(layers, 1)
    records = [{"forward_pass_id": p, "rank": rank,
                "global_physical_count": torch.full((layers, slots), p + 1)} for p in (0, 1)]
    torch.save({"records": records, "last_physical_to_logical_map": phys_map}, path)


@pytest.mark.parametrize("other", [(4, 15), (5, 16)], ids=["experts", "layers"])
def test_per_pass_dumps_of_other_shapes_are_named(tmp_path, capsys, other):
    folder = tmp_path / "dumps"
    folder.mkdir()
    _dump(folder / "expert_distribution_recorder_1.pt", 4, 16, rank=0)
    _dump(folder / "expert_distribution_recorder_2.pt", *other, rank=1)
    with pytest.raises(FormatError, match=r"disagree on \[layers, experts\]: "
                                          r"expert_distribution_recorder_2.pt maps "):
        read_loads(folder)
    code = main(["plan", str(folder), "-r", "32", "-g", "8", "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "expert_distribution_recorder_1.pt" in err and "RuntimeError" not in err
    assert not (tmp_path / "p.json").exists()
