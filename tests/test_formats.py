"""eplb.formats: reading every engine's load statistics, writing/reading every placement format."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REAL_DATA as REAL
from helpers import counts_tle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
import eplb.tools
from eplb.formats import (
    FORMATS,
    FormatError,
    LoadTrace,
    detect_format,
    read_loads,
    read_routing,
    write_loads,
    write_placement,
)

L, E, T = 3, 8, 4  # the shape of counts_tle()


# ----------------------------------------------------------------------- writers of inputs
def write_sglang_pt(path: Path, counts: torch.Tensor) -> Path:
    torch.save(
        {
            "rank": 0,
            "logical_count": counts.to(torch.int32),
            "average_utilization_rate_over_window": None,
        },
        path,
    )
    return path


def write_per_pass(path: Path, counts: torch.Tensor, rank: int = 0, first_pass: int = 0) -> Path:
    """An SGLang per-pass dump whose physical slots map back to ``counts`` [T, L, E]."""
    num_slots = E + 4
    phys_map = torch.arange(num_slots).repeat(L, 1) % E  # experts 0..3 have two slots
    records = []
    for t in range(counts.shape[0]):
        phys = torch.zeros(L, num_slots, dtype=torch.int32)
        for s in range(num_slots):
            e = s % E
            share = counts[t, :, e] // 2 if e < 4 else counts[t, :, e]
            extra = counts[t, :, e] - share if (e < 4 and s >= E) else 0
            phys[:, s] = (share if s < E or e >= 4 else extra).to(torch.int32)
        records.append(
            {
                "forward_pass_id": first_pass + t,
                "rank": rank,
                "gatherer_key": "primary",
                "global_physical_count": phys,
            }
        )
    torch.save({"records": records, "last_physical_to_logical_map": phys_map}, path)
    return path


def write_trtllm(folder: Path, counts: torch.Tensor, layers=(3, 4, 5), ranks=2) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "meta_info.json").write_text(
        json.dumps({"num_experts": E, "num_experts_per_token": 2})
    )
    share = counts // ranks
    for r in range(ranks):
        part = share if r < ranks - 1 else counts - share * (ranks - 1)
        tensors = {
            f"{10 + t}_{layer}": part[t, i].to(torch.int64).contiguous()
            for t in range(counts.shape[0])
            for i, layer in enumerate(layers)
        }
        save_file(tensors, str(folder / f"rank{r}.safetensors"))
    return folder


def write_history(path: Path, counts: torch.Tensor, extra: bool = True) -> Path:
    doc = {
        "load_history": [
            {"logical_expert_load": c.tolist(), "step": i} for i, c in enumerate(counts)
        ]
    }
    if extra:
        doc = {"model": "synthetic", **doc, "window": 100}
    path.write_text(json.dumps(doc))
    return path


def topk_ids(tokens: int = 50, k: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(L)]) for _ in range(tokens)]
    ).to(torch.int8)


def bincount_ids(ids: torch.Tensor) -> torch.Tensor:
    ids = ids.to(torch.int64)
    return torch.stack(
        [
            torch.bincount(ids[:, layer][ids[:, layer] >= 0].flatten(), minlength=E)
            for layer in range(ids.shape[1])
        ]
    ).to(torch.float64)


# ------------------------------------------------------------------------ detection + reads
def test_formats_constant_lists_every_reader():
    assert set(FORMATS) >= {
        "sglang",
        "sglang-per-pass",
        "trtllm",
        "vllm-history",
        "topk",
        "npy",
        "npz",
        "pt",
        "safetensors",
        "json",
        "csv",
    }


def test_sglang_pt_dump(tmp_path):
    c = counts_tle()
    path = write_sglang_pt(tmp_path / "expert_distribution_recorder_1.pt", c)
    assert detect_format(path) == "sglang"
    trace = read_loads(path)
    assert trace.format == "sglang"
    assert trace.counts.dtype == torch.float64
    assert torch.equal(trace.counts, c.double())
    assert trace.layer_ids == list(range(L))
    assert trace.meta["rank"] == 0


def test_folder_of_sglang_json_dumps(tmp_path):
    """The form the SGLang team published their DeepSeek statistics in."""
    first, second = counts_tle(1), counts_tle(2)
    folder = tmp_path / "dumps"
    folder.mkdir()
    (folder / "a_decode.json").write_text(json.dumps({"logical_count": first.tolist()}))
    (folder / "b_prefill.json").write_text(json.dumps({"logical_count": second.tolist()}))
    assert detect_format(folder) == "sglang"
    trace = read_loads(folder)
    assert torch.equal(trace.counts, torch.cat([first, second]).double())
    (folder / "notes.json").write_text(json.dumps({"comment": "not a dump"}))
    with pytest.raises(FormatError, match="logical_count"):
        read_loads(folder)


def test_a_copy_of_a_dump_in_its_folder_is_said_to_count_twice(tmp_path):
    """Two dumps of one folder with the same counts (a copy beside its original) were read
    as two steps, the window's loads counted twice, without a word; an idle (all-zero)
    dump may be recorded twice and is not named."""
    folder = tmp_path / "dumps"
    folder.mkdir()
    first = counts_tle(1)
    for name in ("a.json", "a (1).json"):
        (folder / name).write_text(json.dumps({"logical_count": first.tolist()}))
    with pytest.warns(UserWarning, match=r"a \(1\).json and a.json hold the same counts"):
        assert read_loads(folder).num_steps == 2 * first.shape[0]
    zero = tmp_path / "zero"
    zero.mkdir()
    for name in ("a.json", "b.json", "c.json"):
        counts = first if name == "c.json" else torch.zeros_like(first)
        (zero / name).write_text(json.dumps({"logical_count": counts.tolist()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_loads(zero).num_steps == 3 * first.shape[0]


@pytest.mark.parametrize("shape", ["LE", "TLE"])
def test_sglang_json(tmp_path, shape):
    c = counts_tle()
    value = c[0] if shape == "LE" else c
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"logical_count": value.tolist()}))
    assert detect_format(path) == "sglang"
    trace = read_loads(path)
    want = value.double() if shape == "TLE" else value.double()[None]
    assert torch.equal(trace.counts, want)


def test_sglang_per_pass_maps_slots_to_logical_experts(tmp_path):
    c = counts_tle()
    path = write_per_pass(tmp_path / "dump.pt", c)
    assert detect_format(path) == "sglang-per-pass"
    trace = read_loads(path)
    assert torch.equal(trace.counts, c.double())
    assert trace.meta["forward_pass_ids"] == list(range(T))


def test_sglang_per_pass_folder_sums_ranks(tmp_path):
    c0, c1 = counts_tle(0), counts_tle(1)
    folder = tmp_path / "dumps"
    folder.mkdir()
    write_per_pass(folder / "expert_distribution_recorder_1.0_0.pt", c0, rank=0)
    write_per_pass(folder / "expert_distribution_recorder_1.0_1.pt", c1, rank=1)
    assert detect_format(folder) == "sglang-per-pass"
    trace = read_loads(folder)
    assert torch.equal(trace.counts, (c0 + c1).double())
    assert trace.meta["ranks"] == [0, 1]


def test_sglang_per_pass_dumps_repeating_a_rank_s_pass_are_refused(tmp_path):
    """Two dumps of one rank taken without restarting the recorder both hold its earlier
    passes: they were summed twice (attacker pass). Other ranks' passes still sum."""
    c = counts_tle(0)
    folder = tmp_path / "dumps"
    folder.mkdir()
    write_per_pass(folder / "expert_distribution_recorder_1.pt", c[:2], rank=0)
    write_per_pass(folder / "expert_distribution_recorder_2.pt", c, rank=0)
    with pytest.raises(FormatError, match=r"recorder_2.pt: records\[0\] repeats forward pass "
                                          r"0 of rank 0, the same counts as "
                                          r"expert_distribution_recorder_1.pt records\[0\]"):
        read_loads(folder)
    # a restarted server numbers its passes anew: other counts under the same ids sum, as
    # do records of other gatherers (second attacker pass)
    write_per_pass(folder / "expert_distribution_recorder_2.pt", counts_tle(1), rank=0)
    assert torch.equal(read_loads(folder).counts[:2], (c[:2] + counts_tle(1)[:2]).double())


def test_trtllm_folder_sums_ranks(tmp_path):
    c = counts_tle()
    folder = write_trtllm(tmp_path / "stats", c)
    assert detect_format(folder) == "trtllm"
    trace = read_loads(folder)
    assert torch.equal(trace.counts, c.double())
    assert trace.layer_ids == [3, 4, 5]
    assert trace.meta["iterations"] == [10, 11, 12, 13]
    assert trace.meta["num_experts_per_token"] == 2
    single = read_loads(folder / "rank0.safetensors")
    assert single.format == "trtllm" and single.counts.shape == (T, L, E)


def test_trtllm_folder_without_its_meta_file_is_named(tmp_path):
    # new-user pass: a statistics folder that lost meta_info.json read "found none of them"
    folder = write_trtllm(tmp_path / "stats", counts_tle())
    (folder / "meta_info.json").unlink()
    with pytest.raises(FormatError, match=r"TensorRT-LLM statistics \(rank0.safetensors, "
                                          r"\.\.\.\) but no meta_info.json"):
        read_loads(folder)


def test_trtllm_folder_with_a_rank_gap_warns(tmp_path):
    """meta_info.json does not record the EP size, so a lost rank file is only visible as a
    gap: summed without a word, its tokens were silently missing."""
    folder = write_trtllm(tmp_path / "stats", counts_tle(), ranks=3)
    (folder / "rank1.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"no rank1.safetensors between rank0 and rank2"):
        trace = read_loads(folder)
    assert trace.meta["ranks"] == [0, 2]


def test_a_rank_lacking_entries_the_others_record_is_refused(tmp_path):
    """Each rank records every (iteration, layer): a rank file lacking some was summed
    without a word, those entries carrying the other ranks' tokens alone (attacker pass)."""
    from safetensors.torch import load_file, save_file

    folder = write_trtllm(tmp_path / "stats", counts_tle())
    rank1 = folder / "rank1.safetensors"
    tensors = load_file(str(rank1))
    del tensors["11_4"], tensors["12_4"]
    save_file(tensors, str(rank1))
    with pytest.raises(FormatError, match=r"rank1.safetensors: lacks 2 \(iteration, layer\) "
                                          r"entries of its layers that other ranks record, "
                                          r"e\.g\. \[\(11, 4\)"):
        read_loads(folder)
    # pipeline parallelism: a rank records only its stage's layers, every iteration of them
    # (the first version of this check refused such folders; attacker pass)
    del tensors["10_4"], tensors["13_4"]
    save_file(tensors, str(rank1))  # rank 1 runs layers 3 and 5 only
    trace = read_loads(folder)
    assert trace.layer_ids == [3, 4, 5] and trace.counts.shape == (T, L, E)


def test_vllm_history_streams_with_tiny_chunks(tmp_path, monkeypatch):
    import eplb.formats.history as history

    c = counts_tle(steps=7)
    path = write_history(tmp_path / "hist.json", c)
    assert detect_format(path) == "vllm-history"
    want = read_loads(path)
    assert torch.equal(want.counts, c.double())
    assert want.meta == {"model": "synthetic", "window": 100, "model_layer_ids": False}
    for chunk in (1, 3, 17, 64):  # entry and number boundaries split across chunks
        monkeypatch.setattr(history, "_CHUNK", chunk)
        assert torch.equal(read_loads(path).counts, c.double())


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.lists(
        st.lists(
            st.lists(st.floats(0, 1e6, allow_nan=False), min_size=2, max_size=2),
            min_size=2,
            max_size=2,
        ),
        min_size=1,
        max_size=4,
    ),
    chunk=st.integers(1, 40),
    spaces=st.booleans(),
)
def test_vllm_history_matches_json_load(tmp_path, monkeypatch, data, chunk, spaces):
    import eplb.formats.history as history

    path = tmp_path / "h.json"
    doc = {"load_history": [{"logical_expert_load": d} for d in data]}
    path.write_text(json.dumps(doc, indent=2 if spaces else None))
    monkeypatch.setattr(history, "_CHUNK", chunk)
    trace = read_loads(path, format="vllm-history")
    assert torch.equal(trace.counts, torch.tensor(data, dtype=torch.float64))


def test_vllm_history_progress_bar(tmp_path, capsys):
    path = write_history(tmp_path / "hist.json", counts_tle())
    trace = read_loads(path, progress=True)
    assert trace.num_steps == T
    assert "hist.json" in capsys.readouterr().err


def test_a_forced_plain_format_on_top_k_ids_warns_that_they_are_read_as_counts(tmp_path):
    # --format npz on a routing file planned "26 layers x 6 experts" (the k axis as
    # experts) without a word (fifteenth-session newcomer pass, the ESFT file); forcing a
    # plain format stays allowed: it reads a counts array whose name looks like ids
    path = tmp_path / "r.npz"
    np.savez(path, batch_topk_ids=topk_ids().numpy())
    with pytest.warns(UserWarning, match="named like top-k expert ids"):
        trace = read_loads(path, format="npz", key="batch_topk_ids")
    assert trace.format == "npz"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_loads(path, num_experts=E)  # detected as ids: nothing to warn about


@pytest.mark.parametrize("container", ["npz", "pt", "npy", "safetensors"])
def test_topk_trace_counts(tmp_path, container):
    ids = topk_ids()
    if container == "npz":
        path = tmp_path / "r.npz"
        np.savez(path, batch_topk_ids=ids.numpy(), batch_seq_lens=np.array([20, 30]))
    elif container == "pt":
        path = tmp_path / "r.pt"
        torch.save({"topk_ids": ids}, path)
    elif container == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "r.safetensors"
        save_file({"topk_ids": ids}, str(path))
    else:
        path = tmp_path / "r.npy"
        np.save(path, ids.numpy())
    fmt = None if container != "npy" else "topk"  # a bare int array is counts unless told
    if fmt is None:
        assert detect_format(path) == "topk"
    trace = read_loads(path, format=fmt, num_experts=E)
    assert trace.format == "topk"
    assert trace.num_steps == 1
    assert torch.equal(trace.counts[0], bincount_ids(ids))
    assert trace.meta["top_k"] == 2


def test_a_topk_row_naming_an_expert_twice_is_refused_but_padding_may_repeat(tmp_path):
    # counted as loads, [3, 3] was two tokens on expert 3, where the same file given as a
    # routing trace is refused (attacker pass); -1 padding repeats freely
    ids = topk_ids(10, seed=3)
    ids[4, 1] = torch.tensor([-1, -1])
    path = tmp_path / "r.npz"
    np.savez(path, a_topk_ids=ids.numpy())
    assert read_loads(path, num_experts=E).counts.sum() == ids.ge(0).sum()
    ids[6, 0] = torch.tensor([3, 3])
    np.savez(path, a_topk_ids=ids.numpy())
    with pytest.raises(FormatError, match=r"token 6 names an expert twice in layer 0 "
                                          r"\(top-k \[3, 3\]\)"):
        read_loads(path, num_experts=E)


def test_topk_windows_and_segments(tmp_path):
    a, b = topk_ids(50, seed=1), topk_ids(23, seed=2)
    a[0, 0, 0] = -1  # padding is not counted
    path = tmp_path / "r.npz"
    np.savez(path, a_topk_ids=a.numpy(), b_topk_ids=b.numpy())
    with pytest.raises(FormatError, match=r"2 top-k id arrays.*--key"):
        read_loads(path, num_experts=E)  # never mixed silently
    both = ["a_topk_ids", "b_topk_ids"]
    whole = read_loads(path, num_experts=E, key=both)
    assert whole.num_steps == 2  # one step per array by default
    assert torch.equal(whole.counts[0], bincount_ids(a))
    win = read_loads(path, tokens_per_step=20, num_experts=E, key=both)
    assert win.meta["step_tokens"] == [20, 20, 10, 20, 3]
    assert [s["steps"] for s in win.meta["segments"]] == [3, 2]
    assert torch.equal(win.counts[:3].sum(0), bincount_ids(a))
    assert torch.equal(win.counts[1], bincount_ids(a[20:40]))
    only_b = read_loads(path, key="b_topk_ids", num_experts=E)
    assert torch.equal(only_b.counts[0], bincount_ids(b))


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


def test_layer_ids_override_and_trace_helpers(tmp_path):
    c = counts_tle()
    c[:, 0] = 0
    path = write_sglang_pt(tmp_path / "d.pt", c)
    trace = read_loads(path, layer_ids=[0, 3, 4])
    assert trace.layer_ids == [0, 3, 4]
    moe = trace.drop_empty_layers()
    assert moe.layer_ids == [3, 4] and moe.counts.shape == (T, 2, E)
    assert torch.equal(trace.windows(3).counts[0], c[:3].double().sum(0))
    assert trace.windows(3).num_steps == 2
    assert torch.equal(trace.total(), c.double().sum(0))
    assert trace.select_layers([4, 3]).layer_ids == [4, 3]
    # helper pass: with no empty layer it copied the whole trace, which set the peak
    # memory of eplb simulate on a long trace (142 MB for 1,200 DeepSeek-V3 steps)
    assert moe.drop_empty_layers() is moe
    with pytest.raises(ValueError, match="has 2 layer ids for 3 rows"):
        read_loads(path, layer_ids=[1, 2])
    with pytest.raises(ValueError, match="unknown load format"):
        read_loads(path, format="bogus")


def test_write_placement_keys_rows_by_the_layers_a_trace_names(tmp_path):
    """weight= given as a LoadTrace whose file names its model layers: the rows are
    written as those layers, as the CLI writes them (new-user pass: the API wrote them as
    layers 0..L-1, layer 3's plan keyed as layer 1, with no warning)."""
    c = counts_tle()
    trace = read_loads(write_sglang_pt(tmp_path / "d.pt", c), layer_ids=[0, 3, 4])
    placement = eplb.plan(trace.total(), 2 * E, 4)
    with warnings.catch_warnings():
        # the trace's layer ids are written: no word that its loads are not (new-user
        # pass: the warning came on every engine file written this way)
        warnings.simplefilter("error")
        yaml_path = write_placement(placement, tmp_path / "lb.yaml", weight=trace)
        sglang_path = write_placement(placement, tmp_path / "init.sglang.json", weight=trace)
    keys = yaml.safe_load(yaml_path.read_text())["initial_global_assignments"]
    assert sorted(keys) == [0, 3, 4]
    for row, layer in enumerate([0, 3, 4]):
        assert keys[layer] == placement.phy2log[row].tolist()
    rows = json.loads(sglang_path.read_text())["physical_to_logical_map"]
    assert len(rows) == 5 and rows[3] == placement.phy2log[1].tolist()
    record = write_placement(placement, tmp_path / "p.json", weight=trace)
    assert json.loads(record.read_text())["layer_ids"] == [0, 3, 4]
    # row numbers are no claim: a trace that names no layers leaves the default
    plain = LoadTrace(trace.counts)
    assert not plain.meta.get("model_layer_ids")
    out = write_placement(placement, tmp_path / "plain.yaml", emit="trtllm", weight=plain)
    assert sorted(yaml.safe_load(out.read_text())["initial_global_assignments"]) == [0, 1, 2]
    names = r"differ from the model layers weight= .* names, 0, 3\.\.4"
    with pytest.raises(ValueError, match=names):
        write_placement(placement, tmp_path / "x.yaml", emit="trtllm", weight=trace,
                        layer_ids=[0, 1, 2])
    short = eplb.plan(trace.total()[:2], 2 * E, 4)
    with pytest.raises(ValueError, match=r"weight= .* has 3 layers, the placement 2"):
        write_placement(short, tmp_path / "y.yaml", emit="trtllm", weight=trace)
    # a trace of other rows with the rows named: the caller pairs them (second attacker
    # pass: a 58-row plan written with its 61-row dump as weight= was refused)
    out = write_placement(short, tmp_path / "z.yaml", emit="trtllm", weight=trace,
                          layer_ids=[3, 4])
    assert sorted(yaml.safe_load(out.read_text())["initial_global_assignments"]) == [3, 4]
    # layer ids given in code name layers too (a generated trace's 3..60)
    coded = LoadTrace(trace.counts, [2, 5, 9])
    out = write_placement(placement, tmp_path / "coded.yaml", emit="trtllm", weight=coded)
    assert sorted(yaml.safe_load(out.read_text())["initial_global_assignments"]) == [2, 5, 9]


def test_load_trace_validates():
    with pytest.raises(ValueError, match="steps, layers, experts"):
        LoadTrace(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="finite"):
        LoadTrace(torch.tensor([[[1.0, float("nan")]]]))
    with pytest.raises(ValueError, match="finite"):
        LoadTrace(torch.tensor([[[1.0, -2.0]]]))
    with pytest.raises(ValueError, match="layer_ids"):
        LoadTrace(torch.zeros(1, 2, 3), [0])
    assert LoadTrace(torch.ones(1, 2, 3, dtype=torch.int32)).counts.dtype == torch.float64


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested")
def test_load_trace_refuses_a_nested_tensor_by_name():
    # a nested tensor of [E] rows is 2-D: the shape message read its shape and raised
    # torch's "Internal error: NestedTensorImpl doesn't support sizes" (review pass)
    for steps in ([torch.ones(3), torch.ones(3)], [torch.ones(2, 3), torch.ones(2, 3)]):
        with pytest.raises(TypeError, match=r"LoadTrace\.counts is a nested tensor"):
            LoadTrace(torch.nested.nested_tensor(steps))


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
    folder = write_trtllm(tmp_path / "stats", counts_tle())
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    # the extra's requirement: eplb itself is on no package index
    with pytest.raises(ImportError, match=r"pip install 'safetensors>=0\.4'"):
        read_loads(folder)


# ---------------------------------------------------------------------------- real data
def _real(folder: str) -> Path:
    path = REAL / folder
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent"
                    " (set EPLB_REAL_DATA to the real-data folder)")
    return path


def test_real_sglang_statistics_load():
    files = sorted(_real("sglang_deepseek_ep_statistics").glob("*.json"))
    assert len(files) == 12
    for path in files:
        trace = read_loads(path)
        assert trace.format == "sglang"
        assert trace.counts.shape == (1, 61, 256)
        moe = trace.drop_empty_layers()
        assert moe.layer_ids == list(range(3, 61))
        assert bool((moe.counts > 0).any(2).all())


def test_real_sglang_statistics_plan_and_emit(tmp_path):
    path = _real("sglang_deepseek_ep_statistics") / "prefill_in4096.json"
    moe = read_loads(path).drop_empty_layers()
    placement = eplb.plan(moe.total(), 288, 32)
    out = write_placement(placement, tmp_path / "init.json", "sglang", layer_ids=moe.layer_ids)
    assert torch.tensor(json.loads(out.read_text())["physical_to_logical_map"]).shape == (61, 288)
    lb = write_placement(placement, tmp_path / "lb.yaml", "trtllm", layer_ids=moe.layer_ids)
    assert min(yaml.safe_load(lb.read_text())["initial_global_assignments"]) == 3


def test_real_routing_traces_load():
    esft = _real("esft_deepseek_v2_lite_routing") / "esft_topk_ids.npz"
    tasks = ["intent_topk_ids", "law_topk_ids", "summary_topk_ids", "translation_topk_ids"]
    trace = read_loads(esft, key=tasks)
    assert trace.format == "topk" and trace.counts.shape == (4, 26, 64)
    assert trace.counts[0].sum() == 8222 * 26 * 6  # every token picks 6 experts per layer
    law = read_loads(esft, key="law_topk_ids", tokens_per_step=1024)
    assert law.num_steps == 9 and law.counts.sum() == 8327 * 26 * 6
    qwen_dir = _real("qwen3_30b_a3b_sharegpt_prefill_vllm")
    batches = ["ep_states_topk_ids", "token_distri_8_topk_ids", "token_distri_16_topk_ids"]
    qwen = read_loads(qwen_dir / "qwen3_30b_sharegpt_prefill_topk_ids.npz", key=batches)
    assert qwen.counts.shape == (3, 48, 128)
    assert qwen.meta["step_tokens"] == [1960, 2050, 2080]




@pytest.mark.parametrize("fmt", ["pt", "npz", "npy", "vllm-history", "sglang"])
def test_write_loads_round_trip(tmp_path, fmt):
    trace = LoadTrace(counts_tle().double(), [3, 5, 7], "test", "synthetic")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = write_loads(trace, tmp_path / "trace.out", format=fmt)
    # formats without layer ids say so (attacker pass: they were dropped without a word)
    said = [str(w.message) for w in caught if "no place for layer ids" in str(w.message)]
    assert len(said) == (fmt in ("npy", "vllm-history")), said
    assert not said or "model layers 3, 5, 7 will read back as 0..2" in said[0]
    back = read_loads(path, format=fmt if fmt == "npy" else None)
    assert back.format == fmt
    if fmt == "sglang":
        # a row per model layer, as SGLang's recorder writes: the layers the trace lacks
        # (dense ones) are all zero, and each row is read back as its model layer
        assert back.layer_ids == list(range(8))
        assert torch.equal(back.counts[:, [3, 5, 7]], trace.counts)
        assert back.counts[:, [0, 1, 2, 4, 6]].eq(0).all()
    else:
        assert torch.equal(back.counts, trace.counts)
    if fmt in ("pt", "npz"):
        assert back.layer_ids == [3, 5, 7]
        # naming the counts keeps their layer ids too (they read back as 0..2)
        assert read_loads(path, format=fmt, key="counts").layer_ids == [3, 5, 7]
    with pytest.raises(FileExistsError, match="force"):
        write_loads(trace, path, format=fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_loads(trace, path, format=fmt, force=True)
    # row numbers are no model layers to lose: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_loads(LoadTrace(trace.counts), tmp_path / "plain.out", format=fmt)


def test_layer_ids_beside_counts_apply_where_they_fit(tmp_path):
    """key="counts" takes the layer ids beside the counts where they fit them, in one key
    or among several; an unrelated layer_ids array of another length leaves the counts
    readable alone, as they were before (attacker pass on the key="counts" fix)."""
    counts = np.arange(2 * 3 * 8, dtype=np.float64).reshape(2, 3, 8)
    np.savez(tmp_path / "ids.npz", counts=counts, layer_ids=np.array([3, 7, 9]),
             extra=counts + 1)
    assert read_loads(tmp_path / "ids.npz", key="counts").layer_ids == [3, 7, 9]
    both = read_loads(tmp_path / "ids.npz", key=["counts", "extra"])
    assert both.layer_ids == [3, 7, 9] and both.counts.shape == (4, 3, 8)
    np.savez(tmp_path / "odd.npz", counts=counts, layer_ids=np.array([5, 6]))
    odd = read_loads(tmp_path / "odd.npz", key="counts")
    assert odd.layer_ids == [0, 1, 2] and torch.equal(odd.counts, torch.from_numpy(counts))
    # as key=None reads them: float ids and an [L, 1] column count; ids that are no numbers
    # are left out, in one key or several (a later attacker pass: those raised)
    for ids, want in ((np.array([3.0, 4.0, 5.0]), [3, 4, 5]), (np.array([[3], [4], [5]]),
                      [3, 4, 5]), (np.array(7), [0, 1, 2]), (np.array(["a", "b", "c"]),
                      [0, 1, 2])):
        np.savez(tmp_path / "any.npz", counts=counts, layer_ids=ids, x=counts)
        assert read_loads(tmp_path / "any.npz", key="counts").layer_ids == want
        assert read_loads(tmp_path / "any.npz", key=["counts", "x"]).layer_ids == want


def test_write_loads_takes_the_format_its_name_implies(tmp_path):
    # the name's suffix decides by default, and one that contradicts format= or names a
    # container no format writes is refused (third attacker pass: a .safetensors name held
    # a torch file that read_loads then refused)
    trace = LoadTrace(counts_tle().double(), [3, 5, 7])
    assert read_loads(write_loads(trace, tmp_path / "t.npz")).format == "npz"
    assert read_loads(write_loads(trace, tmp_path / "t.sglang.json")).format == "sglang"
    assert read_loads(write_loads(trace, tmp_path / "t.bin")).format == "pt"
    with pytest.raises(ValueError, match=r"no safetensors: name the file t\.pt"):
        write_loads(trace, tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match=r"format 'pt' writes a \.pt file, but the name "
                                         r"'u\.npz' says \.npz"):
        write_loads(trace, tmp_path / "u.npz", format="pt")
    assert not (tmp_path / "t.safetensors").exists() and not (tmp_path / "u.npz").exists()


def test_write_loads_refuses_a_csv_name_it_would_fill_with_a_torch_archive(tmp_path):
    # no format here writes CSV: a .csv name (found by the round-trip property tests) got
    # eplb's .pt, a zip archive that pandas or a spreadsheet opening it by name cannot read
    trace = LoadTrace(counts_tle().double(), [3, 5, 7])
    for fmt, name in ((None, r"loads\.pt \(or \.npz\)"), ("pt", r"loads\.pt$"),
                      ("npz", r"loads\.npz$"), ("sglang", r"loads\.sglang\.json$")):
        with pytest.raises(ValueError, match=rf"no CSV: name the file {name}"):
            write_loads(trace, tmp_path / "loads.CSV", format=fmt)
    assert not (tmp_path / "loads.CSV").exists()


def test_write_loads_sglang_streams_the_rows_of_layers_the_trace_lacks(tmp_path):
    """A row per model layer up to the largest id: a trace of two layers, one of them
    layer 2000, is 2001 rows (zeros between), written step by step rather than as a
    padded [T, 2001, E] array and its Python lists (found by a review pass)."""
    counts = torch.arange(2 * 2 * 4, dtype=torch.float64).view(2, 2, 4)
    trace = LoadTrace(counts, [0, 2000], "test", "synthetic")
    back = read_loads(write_loads(trace, tmp_path / "far.json", format="sglang"))
    assert back.counts.shape == (2, 2001, 4) and back.layer_ids == list(range(2001))
    assert torch.equal(back.counts[:, [0, 2000]], counts)
    assert back.counts[:, 1:2000].eq(0).all()


@pytest.mark.parametrize("fmt", ["pt", "npz"])
def test_write_loads_stores_integer_counts_compactly(tmp_path, fmt):
    # int32 where the counts fit (half the file), int64 beyond, floats as they are; every
    # one reads back as the same counts
    for scale, kind in ((1.0, "int32"), (2.0**40, "int64")):
        counts = counts_tle().double() * scale
        path = write_loads(LoadTrace(counts, [3, 5, 7]), tmp_path / f"{kind}.{fmt}",
                           format=fmt)
        if fmt == "npz":
            with np.load(path) as saved:
                assert saved["counts"].dtype == np.dtype(kind)
        else:
            assert str(torch.load(path)["counts"].dtype) == f"torch.{kind}"
        assert torch.equal(read_loads(path).counts, counts)
    fractions = LoadTrace(counts_tle().double() / 3, [3, 5, 7])
    back = read_loads(write_loads(fractions, tmp_path / f"f.{fmt}", format=fmt))
    assert torch.equal(back.counts, fractions.counts)


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


def test_real_olmoe_counts_by_key():
    path = REAL / "olmoe_mixtral_routing_counts" / "expert_counts.json"
    if not path.exists():
        pytest.skip(f"real data not present: {path} (set EPLB_REAL_DATA to the real-data folder)")
    trace = read_loads(path, key="olmoe/expert_counts/arxiv")
    assert trace.counts.shape[1:] == (3, 64) and trace.layer_ids == [0, 7, 15]


def test_a_trace_prints_its_shape_not_its_numbers():
    """print() of a generated trace dumped its counts and meta (22 kB for 6000 steps)."""
    text = repr(eplb.tools.generate_trace("deepseek-v3", steps=600))
    assert text.startswith("LoadTrace(steps=600, layers=58, experts=256, layer_ids=[3..60]")
    assert len(text) < 400
    # ids that are no range are listed (OLMoE's dump has layers 0, 7 and 15), and a long
    # irregular list is cut short
    sparse = eplb.core.LoadTrace(torch.ones(1, 3, 4), layer_ids=[0, 7, 15])
    assert "layer_ids=[0, 7, 15]" in repr(sparse)
    assert len(repr(eplb.core.LoadTrace(torch.ones(1, 500, 4),
                                        layer_ids=list(range(0, 1000, 2))))) < 400


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
