"""eplb.formats on malformed, truncated and hostile load files: every one raises a
``FormatError`` (a ``ValueError``) naming the file and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eplb.formats import FormatError, read_loads


# -------------------------------------------------------------------------- malformed input
def _malformed_cases(tmp: Path) -> list[tuple[Path, str | None, str]]:
    """(path, forced format, text the FormatError must contain)."""
    cases = []

    def add(name: str, content: bytes | str, fmt: str | None, expect: str) -> None:
        path = tmp / name
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        cases.append((path, fmt, expect))

    add("garbage.bin", b"\x01\x02\x03 not anything", None, "unrecognised content")
    # quoted numbers and booleans among the loads: NumPy read "1e3" as 1000.0, true as 1
    add("text_loads.json", json.dumps([[["1e3", 2]]]), None, "holds text where numbers")
    add("text_sglang.json", json.dumps({"logical_count": [[5, "7"]]}), None,
        "holds text where numbers")
    add("text_hist.json", json.dumps({"load_history": [{"logical_expert_load": [["1", 2]]}]}),
        None, "holds text where numbers")
    add("bool_hist.json",
        json.dumps({"load_history": [{"logical_expert_load": [[True, False]]}]}), None,
        "holds booleans where numbers")
    add("empty.json", b"", None, "unrecognised")
    add(
        "trunc_hist.json",
        '{"load_history": [{"logical_expert_load": [[1, 2], [3',
        None,
        "malformed JSON",
    )
    add(
        "ragged_hist.json",
        json.dumps({"load_history": [{"logical_expert_load": [[1, 2], [3]]}]}),
        None,
        "rectangular",
    )
    add(
        "shape_hist.json",
        json.dumps(
            {
                "load_history": [
                    {"logical_expert_load": [[1, 2]]},
                    {"logical_expert_load": [[1, 2, 3]]},
                ]
            }
        ),
        None,
        "but step 0 has",
    )
    add(
        "nokey_hist.json",
        json.dumps({"load_history": [{"loads": [[1]]}]}),
        None,
        "no 'logical_expert_load'",
    )
    add("empty_hist.json", json.dumps({"load_history": []}), None, "is empty")
    add(
        "neg_hist.json",
        json.dumps({"load_history": [{"logical_expert_load": [[1, -2]]}]}),
        None,
        "negative",
    )
    add("tail_hist.json", '{"load_history": [[[1, 2]]]} trailing', None, "after the closing")
    add("sglang_ragged.json", json.dumps({"logical_count": [[1, 2], [3]]}), None, "rectangular")
    add("sglang_neg.json", json.dumps({"logical_count": [[1, -2]]}), None, ">= 0")
    add("sglang_4d.json", json.dumps({"logical_count": [[[[1]]]]}), None, "expected [layers")
    add("bad.json", '{"logical_count": [[1, 2]', None, "malformed JSON")
    add("dict.json", json.dumps({"a": [[1]], "b": [[2]]}), None, "--key")
    add("placement.json", json.dumps({"physical_to_logical_map": [[0, 1]]}), None, "read_placement")
    add("ragged.csv", "1,2,3\n4,5\n", None, "has 2 cells")
    add("word.csv", "1,2\n3,x\n", None, "expected a number")
    add("notpt.pt", b"\x80\x04garbage", None, "torch")
    add(
        "badsafe.safetensors",
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
        None,
        "safetensors",
    )
    add("lb.yaml", "num_slots: 4\ninitial_global_assignments: {}\n", None, "YAML")
    add("hist_as_sglang.json", json.dumps({"load_history": []}), "sglang", "'logical_count'")
    add("json_as_npz.json", json.dumps([[1, 2]]), "npz", "expects a npz file")

    np.save(tmp / "four_d.npy", np.zeros((1, 1, 1, 2)))
    cases.append((tmp / "four_d.npy", None, "expected [layers"))
    np.save(tmp / "nan.npy", np.array([[1.0, np.nan]]))
    cases.append((tmp / "nan.npy", None, "finite"))
    np.savez(tmp / "float_topk.npz", x_topk_ids=np.zeros((2, 1, 2)))
    cases.append((tmp / "float_topk.npz", "topk", "integer array"))
    np.savez(tmp / "big_topk.npz", x_topk_ids=np.full((2, 1, 2), 9, dtype=np.int8))
    cases.append((tmp / "big_topk.npz", "topk", "expert count is 4"))
    torch.save(
        {
            "records": [{"global_physical_count": torch.zeros(2, 3)}],
            "last_physical_to_logical_map": torch.zeros(2, 4, dtype=torch.int64),
        },
        tmp / "perpass.pt",
    )
    cases.append((tmp / "perpass.pt", None, "expected (2, 4)"))
    torch.save(
        {
            "records": [{"forward_pass_id": 0}],
            "last_physical_to_logical_map": torch.zeros(2, 4, dtype=torch.int64),
        },
        tmp / "perpass2.pt",
    )
    cases.append((tmp / "perpass2.pt", None, "no 'global_physical_count'"))
    torch.save(
        {
            "records": [{"forward_pass_id": "abc", "global_physical_count": torch.ones(2, 4)}],
            "last_physical_to_logical_map": torch.zeros(2, 4, dtype=torch.int64),
        },
        tmp / "perpass3.pt",
    )
    cases.append((tmp / "perpass3.pt", None, "forward_pass_id must be an integer"))
    torch.save(
        {
            "records": [{"forward_pass_id": 0, "global_physical_count": torch.ones(2, 4)}],
            "last_physical_to_logical_map": torch.full((2, 4), 10**9, dtype=torch.int64),
        },
        tmp / "perpass_huge_id.pt",
    )
    cases.append((tmp / "perpass_huge_id.pt", None, "ids outside [0, 65536)"))
    torch.save({"something": torch.zeros(2)}, tmp / "other.pt")
    cases.append((tmp / "other.pt", "sglang", "'logical_count'"))

    from safetensors.torch import save_file

    folder = tmp / "trt_badkey"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": 2}))
    save_file({"weights": torch.zeros(2, dtype=torch.int64)}, str(folder / "rank0.safetensors"))
    cases.append((folder, None, "'{iter}_{layer}'"))
    folder = tmp / "trt_missing"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": 2}))
    save_file(
        {"0_3": torch.zeros(2, dtype=torch.int64), "1_4": torch.zeros(2, dtype=torch.int64)},
        str(folder / "rank0.safetensors"),
    )
    cases.append((folder, None, "missing"))
    folder = tmp / "trt_meta"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"experts": 2}))
    cases.append((folder, None, "num_experts"))
    folder = tmp / "trt_width"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": 3}))
    save_file({"0_3": torch.zeros(2, dtype=torch.int64)}, str(folder / "rank0.safetensors"))
    cases.append((folder, None, "expected 3"))
    (tmp / "emptydir").mkdir()
    cases.append((tmp / "emptydir", None, "found none of them"))
    return cases


def test_malformed_files_raise_format_error_naming_the_file(tmp_path):
    cases = _malformed_cases(tmp_path)
    assert len(cases) > 30
    for path, fmt, expect in cases:
        with pytest.raises(FormatError) as info:
            read_loads(path, format=fmt, num_experts=4 if "topk" in path.name else None)
        message = str(info.value)
        assert str(path) in message or path.name in message, message
        assert expect in message, (path.name, message)
        assert isinstance(info.value, ValueError)


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        read_loads("/nonexistent/loads.json")


@pytest.mark.parametrize("experts", [True, 0, -4])
def test_trtllm_meta_info_with_a_bad_expert_count_is_named(tmp_path, experts):
    # the mismatch was blamed on the rank file: "'0_3' has 4 experts; expected True"
    from safetensors.torch import save_file

    (tmp_path / "meta_info.json").write_text(json.dumps({"num_experts": experts}))
    save_file({"0_3": torch.ones(4, dtype=torch.int32)}, str(tmp_path / "rank0.safetensors"))
    with pytest.raises(FormatError, match=r"meta_info\.json: expected \{'num_experts'"):
        read_loads(tmp_path)


def test_trtllm_rank_entry_that_is_a_folder_is_named(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "meta_info.json").write_text(json.dumps({"num_experts": 4}))
    save_file({"0_3": torch.ones(4, dtype=torch.int32)}, str(tmp_path / "rank0.safetensors"))
    (tmp_path / "rank1.safetensors").mkdir()
    with pytest.raises(FormatError, match=r"rank1\.safetensors: is a folder"):
        read_loads(tmp_path)
