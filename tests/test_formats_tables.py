"""Reading plain loads files: tensors and arrays of every dtype, CSV (headers, row labels,
comments, separators), JSON records and nested arrays, keys inside ``.pt``/``.npz``/
``.safetensors``/JSON files, and top-k ids saved where counts are expected.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import counts_tle
from test_formats import write_history, write_trtllm

import eplb
import eplb.tools
from eplb.formats import (
    FormatError,
    detect_format,
    read_loads,
    read_routing,
    write_placement,
)


@pytest.mark.parametrize(
    ("container", "rank"),
    [
        (c, r)
        for c in ("pt", "npy", "npz", "safetensors", "json", "csv")
        for r in (2, 3)
        if (c, r) != ("csv", 3)
    ],  # csv holds one [L, E] table
)
def test_plain_tensors(tmp_path, container, rank):
    c = counts_tle().double()
    value = c if rank == 3 else c[0]
    path = tmp_path / f"w.{container}"
    if container == "pt":
        torch.save(value, path)
    elif container == "npy":
        np.save(path, value.numpy())
    elif container == "npz":
        np.savez(path, weight=value.numpy())
    elif container == "safetensors":
        from safetensors.torch import save_file

        save_file({"weight": value.contiguous()}, str(path))
    elif container == "json":
        path.write_text(json.dumps(value.tolist()))
    else:
        path.write_text("\n".join(",".join(str(x) for x in row) for row in value.tolist()))
    assert detect_format(path) == container
    trace = read_loads(path)
    assert trace.format == container
    assert torch.equal(trace.counts, value if rank == 3 else value[None])


def test_csv_with_header_and_layer_column(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("layer,e0,e1,e2\n3,1,2,3\n4,4,5,6\n")
    trace = read_loads(path)
    assert trace.layer_ids == [3, 4]
    assert trace.counts.tolist() == [[[1, 2, 3], [4, 5, 6]]]
    path2 = tmp_path / "w2.csv"
    path2.write_text("e0,e1\n1,2\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a header of words (or a layer column) is plain
        assert read_loads(path2).counts.tolist() == [[[1, 2]]]
        assert read_loads(path).layer_ids == [3, 4]
    # a first cell that is no number over numbers: a header, or data with a typo; said
    # (new-user pass: "x,1,2" lost a layer without a word)
    typo = tmp_path / "typo.csv"
    typo.write_text("x,1,2\n3,4,5\n")
    with pytest.warns(UserWarning, match=r"typo.csv: first row 'x,1,2' read as a header "
                                         r"\(its first cell is not a number\)"):
        assert read_loads(typo).counts.tolist() == [[[3, 4, 5]]]


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_cell(tmp_path):
    # spreadsheets and Windows editors save "UTF-8" text with a BOM; the CSV reader took
    # "\ufeff1" for a header cell and dropped the first layer, and "\ufefflayer" for an
    # expert column (the layer ids read as loads); JSON with one was refused as malformed
    bom = "\ufeff"
    plain = tmp_path / "plain.csv"
    plain.write_text(f"{bom}1,2,3\r\n4,5,6\r\n", encoding="utf-8")
    assert read_loads(plain).counts.tolist() == [[[1, 2, 3], [4, 5, 6]]]
    ids = tmp_path / "ids.csv"
    ids.write_text(f"{bom}layer,e0,e1\n3,1,2\n4,3,4\n", encoding="utf-8")
    trace = read_loads(ids)
    assert trace.layer_ids == [3, 4] and trace.counts.tolist() == [[[1, 2], [3, 4]]]
    doc = tmp_path / "d.json"
    doc.write_text(bom + json.dumps({"logical_count": [[[1, 2], [3, 4]]]}), encoding="utf-8")
    assert read_loads(doc).counts.tolist() == [[[1, 2], [3, 4]]]
    history = write_history(tmp_path / "h.json", counts_tle())
    history.write_bytes(bom.encode() + history.read_bytes())
    assert torch.equal(read_loads(history, format="vllm-history").counts,
                       read_loads(write_history(tmp_path / "h2.json", counts_tle())).counts)
    placement = write_placement(eplb.plan(torch.rand(2, 8), 8, 4), tmp_path / "p.json")
    placement.write_bytes(bom.encode() + placement.read_bytes())
    assert eplb.formats.read_placement(placement).phy2log.shape == (2, 8)


def test_a_long_double_array_is_read_as_float64(tmp_path):
    # np.longdouble (float128 on x86-64) has no torch dtype: torch.from_numpy's TypeError
    # came out of read_loads (and the CLI) as a traceback
    path = tmp_path / "w.npy"
    np.save(path, np.full((2, 4), 7, dtype=np.longdouble))
    assert read_loads(path).counts.tolist() == [[[7.0] * 4] * 2]
    np.savez(tmp_path / "w.npz", w=np.full((2, 4), 7, dtype=np.longdouble))
    assert read_loads(tmp_path / "w.npz").counts.tolist() == [[[7.0] * 4] * 2]


def test_csv_row_labels_and_missing_cells(tmp_path):
    # pandas' DataFrame.to_csv writes its index under an empty header cell: the labels
    # were read as expert 0's loads; a first row with a value missing ("1,,3") was taken
    # for a header and dropped, without a word
    labelled = tmp_path / "labelled.csv"
    labelled.write_text(",0,1,2\n3,5,6,7\n4,8,9,10\n")
    trace = read_loads(labelled)
    assert trace.layer_ids == [3, 4] and trace.counts.tolist() == [[[5, 6, 7], [8, 9, 10]]]
    missing = tmp_path / "missing.csv"
    missing.write_text("1,,3\n4,5,6\n")
    with pytest.raises(FormatError, match="row 1 column 2 is ''; expected a number"):
        read_loads(missing)
    # a header of another width labels another table ("layer,a,b" over four-cell rows
    # was read silently)
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("layer,a,b\n3,1,2,3\n4,4,5,6\n")
    with pytest.raises(FormatError, match="the CSV header has 3 cells but the rows have 4"):
        read_loads(narrow)


@pytest.mark.parametrize("separator", [";", "\t"])
def test_a_csv_of_other_separators_is_told_to_use_commas(tmp_path, separator):
    # (new-user pass: "1;2;3" rows were "unrecognised content", with no word of why)
    path = tmp_path / "other.csv"
    path.write_text("\n".join(separator.join(row) for row in (("1", "2", "3"),
                                                               ("4", "5", "6"))) + "\n")
    with pytest.raises(FormatError, match="CSV cells are separated by commas"):
        read_loads(path)


def test_pandas_column_labels_are_a_header_not_a_layer(tmp_path):
    # pd.DataFrame(array).to_csv(index=False) writes "0,1,2,3" over the rows: it was read
    # as a layer of loads 0, 1, 2, 3 (one layer too many, silently)
    labels = tmp_path / "labels.csv"
    labels.write_text("0,1,2,3\n5,6,7,8\n9,10,11,12\n")
    # ... said, not silently (new-user pass: a layer 0,1,2,3 of real data would be lost)
    with pytest.warns(UserWarning, match=r"first row '0,1,2,3' read as a header \(pandas' "):
        assert read_loads(labels).counts.tolist() == [[[5, 6, 7, 8], [9, 10, 11, 12]]]
    # a first row of other numbers, or too short a table to tell, stays data
    data = tmp_path / "data.csv"
    data.write_text("0,1,2,4\n5,6,7,8\n")
    assert read_loads(data).counts.tolist() == [[[0, 1, 2, 4], [5, 6, 7, 8]]]
    pair = tmp_path / "pair.csv"
    pair.write_text("0,1\n5,6\n")
    assert read_loads(pair).counts.tolist() == [[[0, 1], [5, 6]]]


@pytest.mark.parametrize("text", ["0,1,2,3\n5,6,7\n8,9,10\n", "0,1,2\n5,6,7,8\n8,9,10,11\n"])
def test_column_labels_must_label_every_column(tmp_path, text):
    # a first row 0..n-1 over rows of another width labels no table pandas writes: it was
    # dropped as a header and the ragged table read silently (one layer lost); as data,
    # the row widths disagree
    path = tmp_path / "ragged.csv"
    path.write_text(text)
    with pytest.raises(FormatError, match="row 2 has"):
        read_loads(path)


@pytest.mark.parametrize("key", ["", [], [""], 5, 5.0, {"weight": 1}, b"weight"])
def test_a_key_that_names_no_array_is_refused_by_name(tmp_path, key):
    # key=5 raised "TypeError: 'int' object is not iterable" from inside the reader
    path = tmp_path / "w.npz"
    np.savez(path, weight=np.ones((2, 4)))
    with pytest.raises(ValueError, match="key must be an array name or a list of them"):
        read_loads(path, key=key)


def test_several_count_arrays_without_a_key_name_the_way_to_read_them_all(tmp_path):
    """Found by a new-user pass: gpt-oss-20b's think and answer frequencies (two count
    arrays of one shape) were refused with "choose one", though --key A,B reads both as
    steps, as a file of several top-k arrays already said."""
    shape = (3, 2, 4)
    np.savez(tmp_path / "freq.npz", think=np.ones(shape), answer=np.ones(shape))
    json_path = tmp_path / "freq.json"
    json_path.write_text(json.dumps({"think": np.ones(shape).tolist(),
                                     "answer": np.ones(shape).tolist()}))
    for path in (tmp_path / "freq.npz", json_path):
        with pytest.raises(FormatError, match=r"choose one .*or several of one shape to read "
                                              r"them one after another as steps \(CLI: --key "
                                              r"A,B\)"):
            read_loads(path)
        assert read_loads(path, key=["think", "answer"]).counts.shape == (6, 2, 4)


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
    folder = write_trtllm(tmp_path / "stats", counts_tle())
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    # the extra's requirement: eplb itself is on no package index
    with pytest.raises(ImportError, match=r"pip install 'safetensors>=0\.4'"):
        read_loads(folder)


# ----------------------------------------------------------------- nested JSON and records
def test_json_records_and_nested_arrays(tmp_path):
    rows = [[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]
    doc = {"olmoe/arxiv": {"layers": [0, 7], "counts": rows},  # a record (flat key)
           "mixtral": {"c4": {"counts": rows}, "raw": {"deep": rows}}}  # nested
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(doc))
    record = read_loads(path, key="olmoe/arxiv")
    assert record.layer_ids == [0, 7] and record.counts.shape == (1, 2, 4)
    assert read_loads(path, key="mixtral/c4").counts.shape == (1, 2, 4)
    assert torch.equal(read_loads(path, key="mixtral/raw/deep").counts[0],
                       torch.tensor(rows, dtype=torch.float64))
    with pytest.raises(FormatError, match=r"holds 3 arrays \(olmoe/arxiv, mixtral/c4, "
                                          r"mixtral/raw/deep\)"):
        read_loads(path)
    with pytest.raises(FormatError, match="'mixtral' is an object, not an array; it holds "
                                          "mixtral/c4, mixtral/raw/deep"):
        read_loads(path, key="mixtral")
    with pytest.raises(FormatError, match="has no array 'mixtral/nope'"):
        read_loads(path, key="mixtral/nope")
    doc["olmoe/arxiv"]["layers"] = [0, True]
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="olmoe/arxiv: layer ids must be integers, got True"):
        read_loads(path, key="olmoe/arxiv")


def test_a_csv_table_after_comment_lines_is_read(tmp_path):
    # the CSV reader skips '#' lines, but a file starting with one was "unrecognised
    # content": the format detection looked at the comment only (found by the review pass)
    path = tmp_path / "w.csv"
    path.write_text("# routed tokens of model X\n# one row per layer\n1,2,3\n4,5,6\n")
    assert read_loads(path).counts.tolist() == [[[1, 2, 3], [4, 5, 6]]]
    prose = tmp_path / "notes.md"  # a title over a sentence with a comma stays no CSV
    prose.write_text("# Notes\nHello, world\nmore, prose\n")
    with pytest.raises(FormatError, match="unrecognised content"):
        read_loads(prose)


def test_a_commented_csv_of_long_rows_is_read(tmp_path):
    # numpy's savetxt(..., delimiter=",", header=...) writes "# header" over rows of
    # "%.18e" cells: a DeepSeek-V3 row of 256 is 6.4 kB, longer than the head the format
    # detection reads, which then saw one cut-off row and called the file "unrecognised
    # content" (new-user pass); a one-layer table after a comment was refused alike
    counts = np.arange(2 * 256, dtype=np.float64).reshape(2, 256) * 1000.0
    path = tmp_path / "w.csv"
    np.savetxt(path, counts, delimiter=",", header="routed tokens, one row per layer")
    assert np.array_equal(read_loads(path).counts[0].numpy(), counts)
    one = tmp_path / "one.csv"
    one.write_text("# layer 3\n1,2,3\n")
    assert read_loads(one).counts.tolist() == [[[1, 2, 3]]]

    # comments longer than that head leave no row to judge by: a .csv name gets the hint
    long = tmp_path / "long.csv"
    np.savetxt(long, counts, delimiter=",", header="\n".join(["a long comment line" * 10] * 30))
    with pytest.raises(FormatError, match=r"if it is CSV, say so with format='csv' "
                                          r"\(CLI: --format csv\)"):
        read_loads(long)
    assert np.array_equal(read_loads(long, format="csv").counts[0].numpy(), counts)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_torch_tensors_read_as_numpy_ones_are(tmp_path, dtype):
    # torch implements few operations on them: a .pt of uint64 top-k ids failed with
    # '"max_all" not implemented for UInt64' (attacker pass); an .npz of them was read
    ids = torch.randint(0, 16, (50, 3, 2))
    counts = torch.randint(0, 100, (2, 3, 16))
    torch.save({"topk_ids": ids.to(dtype)}, tmp_path / "ids.pt")
    torch.save({"counts": counts.to(dtype)}, tmp_path / "counts.pt")
    torch.save({"topk_ids": ids}, tmp_path / "ids64.pt")
    assert torch.equal(read_routing(tmp_path / "ids.pt"), read_routing(tmp_path / "ids64.pt"))
    assert torch.equal(read_loads(tmp_path / "counts.pt").counts, counts.double())


def test_text_is_recognised_past_blank_space_and_csv_headers_with_parentheses(tmp_path):
    """Valid files the content sniffing refused (attacker pass): JSON after more than 4 KiB
    of blank space, CSV whose header cells hold parentheses or slashes; and forcing
    format='csv' on other text could not override it."""
    lead = tmp_path / "lead.json"
    lead.write_text(" " * 5000 + "\n" * 3 + "[[1, 2, 3, 4], [5, 6, 7, 8]]")
    paren = tmp_path / "paren.csv"
    paren.write_text("layer,expert(0),expert(1),tokens/s,expert(3)\n3,1,2,3,4\n4,5,6,7,8\n")
    colon = tmp_path / "colon.csv"
    colon.write_text("layer,a:0,b[1]\n3,1,2\n4,5,6\n")
    want = torch.tensor([[[1.0, 2, 3, 4], [5, 6, 7, 8]]])
    assert torch.equal(read_loads(lead).counts, want)
    assert torch.equal(read_loads(paren).counts, want)
    assert read_loads(paren).layer_ids == [3, 4]
    with pytest.raises(FormatError, match=r"unrecognised content .*format='csv'"):
        read_loads(colon)
    assert torch.equal(read_loads(colon, format="csv").counts, torch.tensor([[[1.0, 2], [5, 6]]]))
    blank = tmp_path / "blank.json"
    blank.write_text(" " * 9000)
    with pytest.raises(FormatError, match="unrecognised content"):
        read_loads(blank)


def test_a_pt_dict_of_dicts_names_its_arrays_by_path(tmp_path):
    # {"a": {"b": tensor}} held "0 arrays" and no key read it (attacker pass); arrays
    # beside nested dicts keep the dicts as metadata, as before
    counts = torch.rand(2, 3, 8)
    torch.save({"a": {"b": counts}, "c": {"d": {"e": counts * 2}}}, tmp_path / "nested.pt")
    with pytest.raises(FormatError, match=r"holds 2 arrays \['a/b', 'c/d/e'\]"):
        read_loads(tmp_path / "nested.pt")
    assert torch.equal(read_loads(tmp_path / "nested.pt", key="c/d/e").counts, counts * 2)
    torch.save({"a/b": {"c": counts}, "a": {"b/c": counts * 2}}, tmp_path / "alike.pt")
    with pytest.raises(FormatError, match=r"several arrays are named 'a/b/c'"):
        read_loads(tmp_path / "alike.pt")
    torch.save({"counts": counts, "meta": {"ranks": [0, 1]}}, tmp_path / "meta.pt")
    assert torch.equal(read_loads(tmp_path / "meta.pt").counts, counts.double())


def test_json_keys_holding_the_separator(tmp_path):
    # a key holding '/' could not be read, the error suggesting the name that failed; two
    # arrays whose names read alike gave the first without a word (attacker pass)
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"a/b": {"c": [[1, 2, 3, 4]] * 2}}))
    assert read_loads(one).counts.shape == (1, 2, 4)
    assert read_loads(one, key="a/b/c").counts.shape == (1, 2, 4)
    alike = tmp_path / "alike.json"
    alike.write_text(json.dumps({"a/b": [[100, 1, 1, 1]] * 2, "a": {"b": [[1, 1, 1, 100]] * 2}}))
    with pytest.raises(FormatError, match=r"2 arrays are named 'a/b' .*'a/b' and 'a' → 'b'"):
        read_loads(alike, key="a/b")


def test_ids_saved_under_an_unknown_name_are_flagged_when_read_as_counts(tmp_path) -> None:
    """Attacker pass: top-k ids ``[tokens, L, k]`` saved as ``expert_indices`` in an npz,
    or as a bare ``.npy``, were read as a ``k``-expert model's counts without a word."""
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(256, 8, replace=False) for _ in range(4)])
                    for _ in range(64)])
    np.savez(tmp_path / "ids.npz", expert_indices=ids)
    np.save(tmp_path / "ids.npy", ids)
    for name in ("ids.npz", "ids.npy"):
        with pytest.warns(UserWarning, match="as top-k expert ids do.*--format topk"):
            trace = read_loads(tmp_path / name)
        assert trace.num_experts == 8  # still read as asked: a warning, not a refusal
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the format named: the user said what it is
        assert read_loads(tmp_path / "ids.npy", format="npy").num_experts == 8
        assert read_loads(tmp_path / "ids.npy", format="topk").num_experts == 256
        # counts of one batch: every layer's total the same in a step (a generated trace)
        counts = eplb.tools.generator.generate_trace("mixtral-8x7b", steps=20).counts
        np.save(tmp_path / "counts.npy", counts.numpy())
        assert read_loads(tmp_path / "counts.npy").num_experts == 8
        # random loads: in the thousands (beyond 64x the width), or wider than any top-k
        # and hand-made loads of a few experts in the tens and hundreds (review pass: 53 %
        # of random [16, 4, 2] arrays of 10..99 were flagged before the cover of 0..N-1)
        for seed in range(20):
            small = np.random.default_rng(seed).integers(10, 100, (16, 4, 2))
            np.save(tmp_path / "small.npy", small)
            read_loads(tmp_path / "small.npy")
        for name, shape, high in (("wide", (64, 4, 256), 5000), ("big", (64, 4, 8), 5000)):
            np.save(tmp_path / f"{name}.npy", np.stack([np.stack([
                rng.choice(high, shape[2], replace=False) for _ in range(shape[1])])
                for _ in range(shape[0])]))
            read_loads(tmp_path / f"{name}.npy")


@pytest.mark.parametrize("first", ["load_history", "logical_count"])
def test_loads_file_with_both_engines_keys_is_refused(tmp_path, first, capsys):
    """A JSON holding vLLM's load_history and SGLang's logical_count: which loads were meant
    is not guessed (the history used to be read and the counts silently dropped)."""
    history = {"load_history": [{"logical_expert_load": [[1, 2, 3, 4]]}]}
    counts = {"logical_count": [[5, 6, 7, 8]]}
    doc = {**history, **counts} if first == "load_history" else {**counts, **history}
    path = tmp_path / "both.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"both 'load_history'.*'logical_count'"):
        read_loads(path)
    for fmt in ("vllm-history", "sglang"):
        with pytest.raises(FormatError, match="keep one of the two keys"):
            read_loads(path, format=fmt)
    from eplb.cli import main

    assert main(["plan", str(path), "-r", "8", "-g", "2", "-o", str(tmp_path / "p.json")]) == 2
    assert "keep one of the two keys" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["loads.safetensors", "rank0.safetensors"])
def test_safetensors_header_naming_a_tensor_twice_is_refused(tmp_path, name):
    """The safetensors library keeps one of two tensors of one name silently; eplb refuses
    a repeated key in every other file, and here too (plain containers and TensorRT-LLM's
    rank files)."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    path = tmp_path / name
    key = "0_3" if name.startswith("rank") else "counts"
    save_file({key: torch.arange(4), "other": torch.arange(4) + 10}, str(path))
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + size].decode().replace('"other"', f'"{key}"').encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + size:])
    with pytest.raises(FormatError, match=f"names tensor '{key}' twice"):
        read_loads(path)
