"""eplb.formats on malformed, truncated and hostile load files: every one raises a
``FormatError`` (a ``ValueError``) naming the file and what is wrong.

Files that expand when read, and keys given twice: ``test_formats_hostile.py``."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import eplb
from eplb.cli import main
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
        "logical_expert_load[0][0] is true, not a load")
    # a true among numbers (NumPy reads it as 1): the load-history reader took it as a load
    add("mixed_bool_hist.json",
        json.dumps({"load_history": [{"logical_expert_load": [[1, 2]]},
                                     {"logical_expert_load": [[3, True]]}]}), None,
        "load_history[1].logical_expert_load[0][1] is true, not a load")
    add("empty.json", b"", None, "is empty")
    add("empty.pt", b"", None, "is empty")
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
    add("sglang_ragged.json", json.dumps({"logical_count": [[1, 2], [3]]}), None,
        "[1] has 1 entries where [0] has 2")
    # where the array goes wrong, in the file's terms (NumPy's "inhomogeneous shape after
    # 1 dimensions" and "float() argument ... not 'dict'" named its own internals)
    add("objects.json", json.dumps([{"domain": "math"}, {"domain": "code"}]), None,
        "[0] is an object, not a number")
    add("deep_ragged.json", json.dumps([[1, 2, [3]], [4, 5, 6]]), None,
        "[0][2] is a list where [0][0] is a number")
    add("sglang_neg.json", json.dumps({"logical_count": [[1, -2]]}), None, ">= 0")
    add("sglang_4d.json", json.dumps({"logical_count": [[[[1]]]]}), None, "expected [experts]")
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
    cases.append((tmp / "four_d.npy", None, "expected [experts]"))
    np.save(tmp / "nan.npy", np.array([[1.0, np.nan]]))
    cases.append((tmp / "nan.npy", None, "finite"))

    def npy(name: str, header: bytes, version: int, expect: str) -> None:
        width = 2 if version == 1 else 4
        add(name, b"\x93NUMPY" + bytes([version, 0]) + len(header).to_bytes(width, "little")
            + header, None, expect)

    # headers NumPy takes and then fails on outside its own errors (attacker pass): a
    # dimension past int64 beside a zero one (no bytes to check), a bool dimension, and a
    # version-2 header declaring 4 GiB of itself in a tiny file (a 4 GiB read buffer)
    huge = b"(" + str(10**23).encode() + b", 0)"
    npy("huge_dim.npy", b"{'descr': '<f8', 'fortran_order': False, 'shape': " + huge + b", }\n",
        1, "not the shape of an array")
    npy("bool_dim.npy", b"{'descr': '<f8', 'fortran_order': False, 'shape': (True, 4), }\n",
        1, "not the shape of an array")
    npy("version7.npy", b"{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), }\n", 7,
        "format version 0700")
    # an unclosed bracket (tokenize.TokenError) and a 10,000-term sum (a RecursionError in
    # NumPy's literal evaluation) escaped as internal errors, exit 1 (attacker pass)
    npy("unclosed.npy", b"{'descr': '<f8', 'fortran_order': False, 'shape': (9, }\n", 1,
        "not a valid .npy array header")
    npy("deep_sum.npy", b"{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), 'x': 1"
        + b"+1" * 10000 + b"}\n", 2, "not a valid .npy array header")
    add("long_header.npy", b"\x93NUMPY\x02\x00" + (2**32 - 1).to_bytes(4, "little") + b"{",
        None, "declares 4,294,967,295 bytes of header")
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
    # attacker pass (twenty-seventh session):
    # rank0 and rank00 are both rank 0 (an IndexError); two keys naming one entry (summed);
    # non-ASCII digits (int() reads them)
    for name, files, expect in (
        ("trt_duprank", {"rank0": {"0_3": 1}, "rank00": {"0_3": 1}},
         "rank0.safetensors and rank00.safetensors are both rank 0"),
        ("trt_dupkey", {"rank0": {"0_3": 1, "0_03": 1}}, "both name iteration 0, layer 3"),
        ("trt_digits", {"rank0": {"0_\u0663": 1}}, "'{iter}_{layer}'"),
    ):
        folder = tmp / name
        folder.mkdir()
        (folder / "meta_info.json").write_text(json.dumps({"num_experts": 2}))
        for rank, keys in files.items():
            save_file({key: torch.ones(2, dtype=torch.int64) for key in keys},
                      str(folder / f"{rank}.safetensors"))
        cases.append((folder, None, expect))
    # top-k ids saved as floats were read as [T, L, E] loads of k experts
    buffer = io.BytesIO()
    np.savez(buffer, law_topk_ids=np.zeros((4, 2, 2)))
    add("float_ids.npz", buffer.getvalue(), None, "is named like top-k expert ids but holds")
    # a load typo in the first row dropped that row as a header
    add("typo.csv", "10,20,30,4O,50\n1,2,3,4,5\n", None, "CSV row 1 column 4 is '4O'")
    add("typo_first.csv", "4O,1,2\n3,3,3\n", None, "CSV row 1 column 1 is '4O'")
    # a negative physical count, summed onto its expert with the other replica's count
    physical = torch.tensor([[-5, 7, 100, 2]])
    buffer = io.BytesIO()
    torch.save({"records": [{"forward_pass_id": 0, "rank": 0,
                             "global_physical_count": physical}],
                "last_physical_to_logical_map": torch.tensor([[0, 1, 0, 1]])}, buffer)
    add("negative_pass.pt", buffer.getvalue(), None,
        "global_physical_count[0, 0] (layer 0, slot 0) is -5.0")
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


def test_a_detected_formats_error_does_not_blame_a_flag_never_given(tmp_path):
    """New-user pass: a TensorRT-LLM folder with a bad key said "format 'trtllm'
    expects ...: leave format= (--format) out" though no format was given."""
    from safetensors.torch import save_file

    (tmp_path / "meta_info.json").write_text(json.dumps({"num_experts": 2}))
    save_file({"foo": torch.zeros(2, dtype=torch.int64)}, str(tmp_path / "rank0.safetensors"))
    with pytest.raises(FormatError) as detected:
        read_loads(tmp_path)
    assert "detected" in str(detected.value) and "--format" not in str(detected.value)
    with pytest.raises(FormatError) as forced:
        read_loads(tmp_path / "rank0.safetensors", format="trtllm")
    assert "format 'trtllm' expects" in str(forced.value)


def test_float_arrays_named_like_ids_beside_ids_or_forced_plain_are_read(tmp_path):
    # second attacker pass: refusing every npz with a float array named like ids refused
    # a router dump's ids beside their weights, and loads so named even under format="npz"
    rng = np.random.default_rng(0)
    ids = rng.random((64, 2, 8)).argsort(2)[..., :2]  # distinct per row, as a router's
    dump = tmp_path / "router.npz"
    np.savez(dump, topk_ids=ids, topk_weights=rng.random((64, 2, 2)).astype(np.float32))
    trace = read_loads(dump, num_experts=8)
    assert trace.format == "topk" and trace.counts.sum() == ids.size
    loads = rng.uniform(0, 100, (4, 2, 8))
    named = tmp_path / "named.npz"
    np.savez(named, routed_experts_load=loads)
    with pytest.raises(FormatError, match="read it with format='npz'"):
        read_loads(named)
    assert torch.equal(read_loads(named, format="npz").counts, torch.from_numpy(loads))


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


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_trtllm_rank_counts_that_are_no_integers_are_refused(tmp_path, dtype):
    # bool counts were read as 0/1 loads, where every other reader refuses bool (attacker
    # pass)
    from safetensors.torch import save_file

    (tmp_path / "meta_info.json").write_text(json.dumps({"num_experts": 4}))
    save_file({"0_3": torch.tensor([1, 0, 1, 1]).to(dtype)}, str(tmp_path / "rank0.safetensors"))
    with pytest.raises(FormatError, match=r"must be an integer \[experts\] vector, found "
                                          + str(dtype).replace(".", r"\.")):
        read_loads(tmp_path)


def test_trtllm_rank_entry_that_is_a_folder_is_named(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "meta_info.json").write_text(json.dumps({"num_experts": 4}))
    save_file({"0_3": torch.ones(4, dtype=torch.int32)}, str(tmp_path / "rank0.safetensors"))
    (tmp_path / "rank1.safetensors").mkdir()
    with pytest.raises(FormatError, match=r"rank1\.safetensors: is a folder"):
        read_loads(tmp_path)


@pytest.mark.parametrize("fmt", ["trtllm", "sglang-per-pass"])
def test_a_forced_format_given_another_kind_of_file_names_both(tmp_path, capsys, fmt):
    """Found by an attacker pass: --format trtllm on a .npy said "header too large" (the
    safetensors parser), --format sglang-per-pass on JSON "Unsupported operand 123" (the
    unpickler). The error names the file, the format asked for, what the file holds and
    what it reads as."""
    from safetensors.torch import save_file

    from eplb.cli import main

    np.save(tmp_path / "loads.npy", np.ones((4, 16)))
    (tmp_path / "dump.json").write_text(json.dumps({"logical_count": [[[1] * 16] * 4]}))
    torch.save(torch.ones(3, 4, 16), tmp_path / "trace.pt")
    save_file({"loads": torch.ones(4, 16)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "folder" / "loads.npy", np.ones((4, 16)))
    found = {"loads.npy": ("npy content", "'npy'"), "dump.json": ("json content", "'sglang'"),
             "trace.pt": ("pt-zip content" if fmt == "trtllm" else "found a Tensor", "'pt'"),
             "plain.safetensors": ("key 'loads'" if fmt == "trtllm" else "safetensors content",
                                   "'safetensors'"),
             "folder": ("a folder without", None)}
    for name, (holds, reads_as) in found.items():
        with pytest.raises(FormatError) as info:
            read_loads(tmp_path / name, format=fmt)
        message = str(info.value)
        assert message.startswith(str(tmp_path / name)), message
        assert f"format {fmt!r} expects" in message and holds in message, message
        assert reads_as is None or f"reads as {reads_as} load statistics" in message, message
        assert "header too" not in message and "operand" not in message
    # a placement given as loads says so; the CLI puts it on one line, exit code 2
    assert main(["plan", str(tmp_path / "loads.npy"), "-r", "32", "-g", "8", "-o",
                 str(tmp_path / "p.json")]) == 0
    capsys.readouterr()
    assert main(["eval", "--placement", str(tmp_path / "p.json"), str(tmp_path / "p.json"),
                 "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"format {fmt!r} expects" in err and "holds a placement" in err


def test_a_negative_count_in_one_rank_file_is_named_not_summed_away(tmp_path):
    """Found by an attacker pass: a -5 in one TensorRT-LLM rank file, summed with another
    rank's 100, read as 95 and was planned on (the same -5 alone was refused)."""
    from safetensors.torch import save_file

    folder = tmp_path / "neg"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": 4,
                                                       "num_experts_per_token": 2}))
    good = {f"{i}_{layer}": torch.tensor([1, 2, 3, 4]) for i in range(2) for layer in (3, 4)}
    save_file({k: torch.tensor([-5, 2, 3, 4]) if k == "0_3" else v for k, v in good.items()},
              str(folder / "rank0.safetensors"))
    save_file({k: v * 100 for k, v in good.items()}, str(folder / "rank1.safetensors"))
    with pytest.raises(FormatError, match=r"rank0.safetensors: '0_3'\[0\] is -5; token counts "
                                          r"must be >= 0"):
        read_loads(folder)


def test_wide_unsigned_counts_read_as_loads_whatever_their_size(tmp_path):
    """Found by an attacker pass: a uint64 count of 2**63 or more was refused in an .npy or
    .pt file alone; a TensorRT-LLM rank file, a JSON number and eplb_rebalance read such
    values as float64 loads. Now every reader does."""
    big = np.array([[1, 2, 2**64 - 1, 4]], dtype=np.uint64)
    np.save(tmp_path / "big.npy", big)
    counts = read_loads(tmp_path / "big.npy").counts
    assert counts.dtype == torch.float64 and float(counts[0, 0, 2]) == float(2**64 - 1)
    small = np.array([[1, 2, 3, 4]], dtype=np.uint64)
    np.save(tmp_path / "small.npy", small)
    assert read_loads(tmp_path / "small.npy").counts.tolist() == [[[1.0, 2.0, 3.0, 4.0]]]


@pytest.mark.parametrize(("name", "emit"), [("lb.json", "trtllm"), ("plan.json", "pt"),
                                            ("plan.pt", "json"), ("plan.yaml", "pt"),
                                            ("lb.PT", "trtllm")])
def test_an_emit_whose_content_its_name_cannot_be_read_as_is_refused(tmp_path, name, emit):
    """Found by an attacker pass: ``--emit trtllm -o lb.json`` wrote YAML with comments
    into a .json file, which ``json.load`` then failed on. Content that fits the name is
    still written: eplb's JSON is YAML too, and any other suffix implies nothing."""
    from eplb.formats import write_placement

    placement = eplb.plan(torch.rand(2, 8, generator=torch.Generator().manual_seed(0)), 12, 4)
    with pytest.raises(ValueError, match=rf"emit='{emit}' writes .*{re.escape(name)}' is read "
                                         r"as"):
        write_placement(placement, tmp_path / name, emit)
    assert not (tmp_path / name).exists()
    for fits, fitting in (("plan.yaml", "json"), ("lb.txt", "trtllm"), ("x.sglang.pt", "sglang")):
        write_placement(placement, tmp_path / fits, fitting)


def test_a_recorded_ep_size_names_the_rank_files_that_are_missing(tmp_path):
    """Found by a new-user pass: meta_info.json recording ep_size 32 beside 2 rank files was
    read without a word (only a gap between rank files was a sign of a lost rank)."""
    from safetensors.torch import save_file

    folder = tmp_path / "stats"
    folder.mkdir()
    counts = {f"{i}_3": torch.tensor([1, 2, 3, 4]) for i in range(2)}
    for rank in (0, 1):
        save_file(counts, str(folder / f"rank{rank}.safetensors"))
    for ep_size, fine in ((2, True), (32, False)):
        (folder / "meta_info.json").write_text(json.dumps(
            {"num_experts": 4, "num_experts_per_token": 2, "ep_size": ep_size}))
        if fine:
            assert read_loads(folder).counts.shape == (2, 1, 4)
            continue
        with pytest.warns(UserWarning, match=r"no rank2.safetensors \(nor 29 more\) between "
                                             r"rank0 and rank31"):
            read_loads(folder)
    (folder / "meta_info.json").write_text(json.dumps(
        {"num_experts": 4, "num_experts_per_token": 2, "ep_size": 1}))
    with pytest.raises(FormatError, match="records ep_size 1, but there are rank files up to "
                                          "rank1"):
        read_loads(folder)
    # a huge one is counted, not enumerated (a review pass: it took the host's memory), and
    # one that is no positive integer is named ("32" or 32.0 skipped the check silently)
    (folder / "meta_info.json").write_text(json.dumps(
        {"num_experts": 4, "num_experts_per_token": 2, "ep_size": 10**11}))
    with pytest.warns(UserWarning, match=r"no rank2.safetensors \(nor 99999999997 more\)"):
        read_loads(folder)
    for bad in ("32", 32.0, 0, True, None):
        (folder / "meta_info.json").write_text(json.dumps(
            {"num_experts": 4, "num_experts_per_token": 2, "ep_size": bad}))
        with pytest.raises(FormatError, match=r"ep_size is .*; expected a positive integer"):
            read_loads(folder)


@pytest.mark.parametrize(("name", "format"), [("topk_ids_{}", None), ("w{}", "npz"),
                                              ("w{}", "topk")])
def test_a_file_of_thousands_of_arrays_is_refused_in_one_short_line(tmp_path, capsys, name,
                                                                    format):
    """Every name of a file holding thousands of arrays was listed: one ``eplb: error:``
    line of 50 kB (attacker pass)."""
    path = tmp_path / "many.npz"
    np.savez(path, **{name.format(i): np.zeros((1, 2, 2), dtype=np.int64) for i in range(3000)})
    args = ["plan", str(path), "-r", "8", "-g", "2", "-o", str(tmp_path / "p.json")]
    assert main(args + (["--format", format] if format else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("eplb: error: ") and "3000" in err and "..." in err
    assert len(err) < 600, err
