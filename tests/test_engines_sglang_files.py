"""SGLang files written by ``eplb plan``, parsed by SGLang 0.5.23's own start-up code.

- ``*.sglang.pt`` holds what SGLang ``torch.load``s (a dict with a tensor), not JSON text;
- a MoE-only plan gets a row for every model layer, or a clear error naming
  ``--num-model-layers`` / ``--first-layer``;
- ``--first-layer`` never relabels a dump that names its own layers.

The fixtures come from ``test_engines_sglang`` (SGLang's real
``compute_initial_expert_location_metadata`` on DeepSeek-V3 with 61 layers).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from test_engines_sglang import (
    GPUS,
    GROUPS,
    MOE_IDS,
    NODES,
    NUM_EXPERTS,
    NUM_LAYERS,
    REPLICAS,
    check_sglang_view,
    real_counts,
    sglang,  # noqa: F401  (a fixture: the tests below take it as an argument)
    sglang_start,
)

from eplb.cli import main
from eplb.formats import read_placement, read_placement_meta, write_placement

TOPO = ["-r", str(REPLICAS), "-g", str(GPUS), "--nodes", str(NODES), "--groups", str(GROUPS)]


def plan(capsys, *argv: str) -> tuple[int, str]:
    code = main(["plan", *argv])
    return code, capsys.readouterr().err


def stat_dump(path, counts: torch.Tensor, steps: int = 2):
    """An SGLang stat-mode recorder dump ``{"rank", "logical_count": [T, 61, 256] int32}``."""
    buffer = torch.stack([counts * (i + 1) for i in range(steps)]).to(torch.int32)
    torch.save({"rank": 0, "logical_count": buffer, "average_utilization_rate_over_window": None},
               path)
    return path


def one_error_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("eplb: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_sglang_pt_output_is_what_sglang_torch_loads(sglang, tmp_path, capsys) -> None:  # noqa: F811
    dump = stat_dump(tmp_path / "expert_distribution_recorder_1700000000.0.pt", real_counts())
    out = tmp_path / "init.sglang.pt"
    code, err = plan(capsys, str(dump), *TOPO, "-o", str(out))
    assert code == 0, err
    raw = torch.load(out, weights_only=True)
    assert list(raw) == ["physical_to_logical_map"]
    assert isinstance(raw["physical_to_logical_map"], torch.Tensor)
    assert raw["physical_to_logical_map"].shape == (NUM_LAYERS, REPLICAS)
    placement = read_placement(out, num_gpus=GPUS, num_nodes=NODES, num_groups=GROUPS)
    meta = sglang_start(sglang, str(out))  # SGLang: path ends .pt -> torch.load
    check_sglang_view(meta, placement, list(range(NUM_LAYERS)))


def test_sglang_json_output_from_a_dump_covers_every_layer(sglang, tmp_path, capsys) -> None:  # noqa: F811
    dump = stat_dump(tmp_path / "expert_distribution_recorder_1700000000.0.pt", real_counts())
    out = tmp_path / "init.sglang.json"
    code, err = plan(capsys, str(dump), *TOPO, "-o", str(out))
    assert code == 0, err
    assert len(json.loads(out.read_text())["physical_to_logical_map"]) == NUM_LAYERS
    placement = read_placement(out, num_gpus=GPUS)
    check_sglang_view(sglang_start(sglang, str(out)), placement, list(range(NUM_LAYERS)))


def test_moe_only_rows_are_refused_without_the_model_layer_count(tmp_path, capsys) -> None:
    moe = tmp_path / "moe_only.npy"
    np.save(moe, real_counts()[MOE_IDS].numpy())  # 58 rows, no layer ids
    out = tmp_path / "init.sglang.json"
    code, err = plan(capsys, str(moe), *TOPO, "-o", str(out))
    one_error_line(code, err, "58 rows", "--num-model-layers", "--first-layer")
    code, err = plan(capsys, str(moe), *TOPO, "-o", str(out), "--num-model-layers", "61")
    one_error_line(code, err, "--first-layer")
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--first-layer", "3"],
                                   ["--first-layer", "3", "--num-model-layers", "61"]])
def test_moe_only_rows_with_their_layers_start_in_sglang(sglang, tmp_path, capsys,  # noqa: F811
                                                         extra) -> None:
    moe = tmp_path / "moe_only.npy"
    np.save(moe, real_counts()[MOE_IDS].numpy())
    out = tmp_path / "init.sglang.json"
    code, err = plan(capsys, str(moe), *TOPO, "-o", str(out), *extra)
    assert code == 0, err
    rows = torch.tensor(json.loads(out.read_text())["physical_to_logical_map"])
    assert rows.shape == (NUM_LAYERS, REPLICAS)  # SGLang would fail at layer 60 otherwise
    placement = read_placement(out, num_gpus=GPUS, num_nodes=NODES, num_groups=GROUPS)
    meta = sglang_start(sglang, str(out))
    moe_plan = type(placement).from_phy2log(rows[MOE_IDS], NUM_EXPERTS, placement.topology)
    check_sglang_view(meta, moe_plan, MOE_IDS)


def test_first_layer_cannot_relabel_a_dump_that_names_its_layers(tmp_path, capsys) -> None:
    dump = stat_dump(tmp_path / "expert_distribution_recorder_1700000000.0.pt", real_counts())
    yaml_out = tmp_path / "lb.yaml"
    code, err = plan(capsys, str(dump), *TOPO, "-o", str(yaml_out), "--first-layer", "3")
    one_error_line(code, err, "--first-layer 3", "0..60")
    assert not yaml_out.exists()
    code, err = plan(capsys, str(dump), *TOPO, "-o", str(yaml_out))
    assert code == 0, err
    keys = list(yaml.safe_load(yaml_out.read_text())["initial_global_assignments"])
    assert keys == list(range(NUM_LAYERS))  # the dump's own ids, never 3..63
    _, meta = read_placement_meta(yaml_out)
    assert meta["layer_ids"] == list(range(NUM_LAYERS))


def test_sglang_output_names_sglang_reads(tmp_path, capsys) -> None:
    dump = stat_dump(tmp_path / "expert_distribution_recorder_1700000000.0.pt", real_counts())
    code, err = plan(capsys, str(dump), *TOPO, "-o", str(tmp_path / "init.txt"),
                     "--emit", "sglang")
    one_error_line(code, err, ".json or .pt")


@pytest.mark.parametrize("name", ["init.sglang.JSON", "INIT.SGLANG.PT", "init.Json"])
def test_an_upper_case_suffix_sglang_would_not_read_is_refused(sglang, tmp_path, capsys,  # noqa: F811
                                                               name) -> None:
    dump = stat_dump(tmp_path / "expert_distribution_recorder_1700000000.0.pt", real_counts())
    good = tmp_path / "init.sglang.json"
    assert plan(capsys, str(dump), *TOPO, "-o", str(good))[0] == 0
    # SGLang tests the name with str.endswith: any other case is parsed as inline JSON
    odd = tmp_path / ("copy_" + name)
    odd.write_bytes(good.read_bytes())
    with pytest.raises(json.JSONDecodeError):
        sglang_start(sglang, str(odd))
    out = tmp_path / name
    code, err = plan(capsys, str(dump), *TOPO, "-o", str(out), "--emit", "sglang")
    one_error_line(code, err, "lower case", repr(name))
    assert not out.exists()
    placement = read_placement(good, num_gpus=GPUS)
    with pytest.raises(ValueError, match="lower case"):
        write_placement(placement, out, emit="sglang")
    assert not out.exists()


def test_several_dumps_and_a_folder_of_stat_dumps(sglang, tmp_path, capsys) -> None:  # noqa: F811
    counts = real_counts()
    folder = tmp_path / "dumps"
    folder.mkdir()
    first = stat_dump(folder / "expert_distribution_recorder_1700000000.5.pt", counts, 1)
    second = stat_dump(folder / "expert_distribution_recorder_1700000100.25.pt", counts, 3)
    for source in ([str(first), str(second)], [str(folder)]):  # a shell glob, or the folder
        out = tmp_path / "init.sglang.json"
        code, err = plan(capsys, *source, *TOPO, "-o", str(out), "--force")
        assert code == 0, err
        placement = read_placement(out, num_gpus=GPUS)
        check_sglang_view(sglang_start(sglang, str(out)), placement, list(range(NUM_LAYERS)))


def test_an_sglang_file_from_rows_that_skip_layers_says_to_give_the_layer_count(
        tmp_path, capsys) -> None:
    """New-user pass: Mixtral-8x7B's published counts name model layers 0, 7 and 15 of its
    32, and the SGLang file was written with 16 rows, said as "16 model layers" only (SGLang
    does not compare the rows with its model's layers). As for bare rows, the written line
    now says to give --num-model-layers; a file of every layer up to its last stays as it
    was."""
    counts = [[float(10 + 3 * row + expert) for expert in range(8)] for row in range(3)]
    sparse = tmp_path / "counts.json"
    sparse.write_text(json.dumps({"counts": counts, "layers": [0, 7, 15]}))
    assert main(["plan", str(sparse), "-r", "16", "-g", "8", "-o",
                 str(tmp_path / "a.sglang.json")]) == 0
    out = capsys.readouterr().out
    assert ("(sglang, 16 model layers, 0..15: give --num-model-layers N where the model has "
            "more)") in out
    assert main(["plan", str(sparse), "-r", "16", "-g", "8", "--num-model-layers", "32", "-o",
                 str(tmp_path / "b.sglang.json")]) == 0
    assert "(sglang, 32 model layers)" in capsys.readouterr().out
    rows = json.loads((tmp_path / "b.sglang.json").read_text())["physical_to_logical_map"]
    assert len(rows) == 32
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps({"counts": counts, "layers": [0, 1, 2]}))
    assert main(["plan", str(whole), "-r", "16", "-g", "8", "-o",
                 str(tmp_path / "c.sglang.json")]) == 0
    assert "(sglang, 3 model layers)" in capsys.readouterr().out
