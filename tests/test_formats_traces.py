"""``LoadTrace`` and ``write_loads``: layer ids and the placements keyed by them, the
trace's checks, and writing traces in every format (round trips, names that imply a
format, compact integer counts).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import yaml
from helpers import counts_tle
from test_formats import E, T, write_sglang_pt

import eplb
import eplb.tools
from eplb.formats import (
    LoadTrace,
    read_loads,
    write_loads,
    write_placement,
)


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
