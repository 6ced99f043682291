"""Placement files eplb refuses to read, each named with what is wrong: malformed tables
and fields, entries that are no expert ids, absurd expert counts, TensorRT-LLM keys
that are not one layer each, eplb's metadata checked field by field, huge values quoted
short, and recorded clusters or GPU counts the file contradicts.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from test_formats_placements import make_placement

import eplb
from eplb.formats import (
    FormatError,
    read_placement,
    read_placement_meta,
    write_placement,
)


@pytest.mark.parametrize("field", ["phy2log", "active_gpus", "gpu_speed", "layer_ids",
                                   "physical_to_logical_map"])
@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_a_pt_placement_field_without_plain_data_is_named(tmp_path, field, kind):
    # torch raised "Tensor.item() cannot be called on meta tensors", "Cannot copy out of
    # meta tensor" or NotImplementedError (aten::max on SparseCPU) out of read_placement
    placement, _ = make_placement(0, 2, 8, 4, 3)
    path = write_placement(placement, tmp_path / "p.pt")
    doc = torch.load(path)
    if field == "physical_to_logical_map":  # SGLang's file
        doc = {field: doc["phy2log"]}
    value = doc.get(field)
    if value is None:
        value = (torch.ones(4, dtype=torch.bool) if field == "active_gpus" else
                 torch.ones(4) if field == "gpu_speed" else torch.arange(2))
    doc[field] = value.to("meta") if kind == "meta" else value.to_sparse()
    torch.save(doc, path)
    with pytest.raises(FormatError, match=f"{field} is a .*{kind}.* tensor"):
        read_placement(path, num_gpus=4)


def test_read_placement_malformed(tmp_path):
    cases = {
        "loads.json": (json.dumps({"logical_count": [[1, 2]]}), "read_loads"),
        "keys.json": (json.dumps({"foo": 1}), "expected a placement"),
        "bad.json": ("{", "malformed JSON"),
        "float.json": (json.dumps({"physical_to_logical_map": [[0.5, 1.0]]}), "integer"),
        "missing_expert.json": (
            json.dumps(
                {
                    "format": "eplb.placement",
                    "format_version": 1,
                    "num_experts": 3,
                    "topology": {"num_replicas": 2, "num_gpus": 1, "num_nodes": 1, "num_groups": 1},
                    "phy2log": [[0, 1]],
                }
            ),
            "invalid placement",
        ),
        "future.json": (
            json.dumps({"format": "eplb.placement", "format_version": 99}),
            "format_version",
        ),
        "lb.yaml": ("num_slots: 3\ninitial_global_assignments:\n  3: [0, 1]\n", "num_slots is 3"),
        "float_slots.yaml": ("num_slots: 2.0\ninitial_global_assignments:\n  3: [0, 1]\n",
                             "num_slots must be a positive integer, got 2.0"),
        "junk.bin": ("\x01\x02", "expected a placement"),
    }
    for name, (text, expect) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(FormatError, match=expect) as info:
            read_placement(path, num_gpus=1)
        assert str(path) in str(info.value)


def test_a_placement_file_cannot_ask_for_absurd_expert_counts(tmp_path):
    placement, _ = make_placement(1, 2, 8, 2, 5)
    path = write_placement(placement, tmp_path / "p.json")
    doc = json.loads(path.read_text())
    doc["num_experts"] = 10**9  # would allocate tens of GiB for log2phy
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="num_experts 1000000000 is outside"):
        read_placement(path)


@pytest.mark.parametrize(("keys", "message"), [
    (["3", "3.9"], "must be integers, got 3.9"),   # once truncated onto layer 3
    (["3", "'3'"], "layer id 3 appears twice"),
    (["3", "true"], "must be integers, got True"),
    (["3", "-1"], "outside 0..4095"),
    (["3", "'²'"], "must be integers, got '²'"),  # str.isdigit() took it; int() did not
    (["3", "'١'"], "must be integers, got '١'"),  # an Arabic-Indic 1: int() read it as 1
])
def test_trtllm_keys_that_are_not_one_layer_each_are_refused(tmp_path, keys, message):
    rows = ["[0, 1, 2, 3, 0, 1, 2, 3]", "[3, 3, 2, 2, 1, 1, 0, 0]"]
    path = tmp_path / "lb.yaml"
    path.write_text("num_slots: 8\ninitial_global_assignments:\n"
                    + "".join(f"  {k}: {r}\n" for k, r in zip(keys, rows, strict=True)))
    with pytest.raises(FormatError, match=message):
        read_placement(path, num_gpus=4)
    path.write_text(f"num_slots: 8\ninitial_global_assignments:\n  '4': {rows[0]}\n"
                    f"  3: {rows[1]}\n")
    assert read_placement_meta(path, num_gpus=4)[1]["layer_ids"] == [3, 4]


@pytest.mark.parametrize(("row", "message"), [
    ("null", r"initial_global_assignments\[4\] is None, not a list of expert ids"),
    ("7", r"initial_global_assignments\[4\] is 7, not a list of expert ids"),
    ("[0, 1, 2]", "one length .a slot each.: layer 3 has 8 entries, layer 4 3"),
])
def test_a_trtllm_row_that_is_no_row_of_slots_is_named(tmp_path, row, message):
    """A null row said 'rows must be lists of one length, found {-1}' (a length eplb made
    up for it), and rows of two lengths named no layer (attacker pass)."""
    path = tmp_path / "lb.yaml"
    path.write_text("initial_global_assignments:\n  3: [0, 1, 2, 3, 0, 1, 2, 3]\n"
                    f"  4: {row}\n")
    with pytest.raises(FormatError, match=message):
        read_placement(path, num_gpus=4)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_experts", "abc", "num_experts must be an integer, got 'abc'"),
    ("num_experts", None, "num_experts must be an integer"),
    ("active_gpus", "yes", "active_gpus must be null or 4 booleans"),
    ("active_gpus", [1, 1, 1, 1], "active_gpus must be null or 4 booleans"),
    ("num_layers", 5, "num_layers is 5 but phy2log has 2 rows"),
    ("layer_ids", [0, 0], "layer id 0 appears twice"),
    ("layer_ids", [0], "has 1 layer ids for 2 rows"),
    ("format_version", True, "format_version must be an integer"),
    ("format_version", -5, "must be a positive integer"),
])
def test_eplb_json_metadata_is_checked_field_by_field(tmp_path, field, value, message):
    placement = eplb.plan(torch.rand(2, 8) + 0.1, 12, 4)
    path = tmp_path / "p.json"
    write_placement(placement, path)
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=re.escape(message)):
        read_placement(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [(True, r"\[0\]\[1\] is true, not an expert id"),
     ("1", r"\[0\]\[1\] is '1', not an expert id"),
     (None, r"\[0\]\[1\] is None, not an expert id"),
     (2**70, r"\[0\]\[1\] is 1180591620717411303424, not an expert id \(beyond int64\)")],
)
@pytest.mark.parametrize("emit", ["json", "sglang", "trtllm"])
def test_a_placement_entry_that_is_not_an_expert_id_is_named(tmp_path, entry, message, emit):
    """A hand-edited map with a JSON ``true`` (torch read it as expert 1, and the file
    planned as a valid map), a string or a number beyond int64 (reported as a table that
    is not rectangular) names the entry."""
    path = tmp_path / {"json": "p.json", "sglang": "p.sglang.json", "trtllm": "lb.yaml"}[emit]
    write_placement(eplb.plan(torch.ones(2, 4), 4, 2), path, emit=emit)
    if emit == "trtllm":
        doc = yaml.safe_load(path.read_text())
        first = next(iter(doc["initial_global_assignments"]))
        doc["initial_global_assignments"][first][1] = entry
        path.write_text(yaml.safe_dump(doc))
    else:
        doc = json.loads(path.read_text())
        key = "phy2log" if emit == "json" else "physical_to_logical_map"
        doc[key][0][1] = entry
        path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=message):
        read_placement(path, num_gpus=2)


@pytest.mark.parametrize("key", ["phy2log", "physical_to_logical_map"])
def test_a_complex_pt_placement_table_is_refused_as_floats_are(tmp_path, key):
    """A complex tensor of ids (expert 2.5 + 0.7j) was read as expert 2, with only torch's
    warning about the discarded imaginary part; a float table is refused."""
    placement, _ = make_placement(0, 2, 8, 4, 3)
    path = write_placement(placement, tmp_path / "p.pt")
    doc = torch.load(path)
    if key == "physical_to_logical_map":  # SGLang's file
        doc = {key: doc["phy2log"]}
    doc[key] = doc[key].to(torch.complex64) + (0.5 + 0.7j)
    torch.save(doc, path)
    with pytest.raises(FormatError, match=f"{key} must be integer .*complex64"):
        read_placement(path, num_gpus=4)


_MILLION = list(range(10**6))


@pytest.mark.parametrize("field", ["phy2log entry", "num_experts", "topology", "meta_info",
                                   "layer ids"])
def test_a_huge_wrong_value_is_quoted_short_in_the_error(tmp_path, capsys, field) -> None:
    """Found by the twelfth-session hostile-files pass: a field holding a million-entry
    list where a number belongs was quoted whole, one ``eplb: error:`` line of 7.9 MB."""
    from eplb.cli import main

    loads = tmp_path / "loads.npy"
    np.save(loads, np.arange(64.0).reshape(4, 16))
    out = tmp_path / "p.json"
    assert main(["plan", str(loads), "-r", "32", "-g", "8", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    bad = tmp_path / "bad.json"
    argv = ["eval", "--placement", str(bad), str(loads)]
    if field == "phy2log entry":
        doc["phy2log"][0][0] = _MILLION
    elif field == "num_experts":
        doc["num_experts"] = _MILLION
    elif field == "topology":
        doc["topology"]["num_gpus"] = _MILLION
    elif field == "meta_info":
        bad.mkdir()
        (bad / "meta_info.json").write_text(json.dumps({"num_experts": _MILLION}))
        argv = ["plan", str(bad), "-r", "32", "-g", "8", "-o", str(tmp_path / "q.json")]
    else:
        doc = {"counts": [[1, 2]], "layers": [_MILLION]}
        argv = ["plan", str(bad), "-r", "2", "-g", "1", "-o", str(tmp_path / "q.json")]
    if field != "meta_info":
        bad.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("eplb: error: ") and "[0, 1, 2, 3, 4, 5, ...]" in err
    assert len(err) < 400


def test_a_yaml_integer_beyond_pythons_digit_limit_names_the_file(tmp_path) -> None:
    """Found by the twelfth-session hostile-files pass: PyYAML raised Python's own
    ValueError ("use sys.set_int_max_str_digits()"), naming no file."""
    path = tmp_path / "lb.yaml"
    path.write_text("num_slots: 2\ninitial_global_assignments:\n  0: [" + "9" * 5000 + ", 1]\n")
    with pytest.raises(FormatError, match=r"lb\.yaml: .*more than 4300 digits") as info:
        read_placement(path, num_gpus=1)
    assert "set_int_max_str_digits" not in str(info.value)


@pytest.mark.parametrize("topology", ["x", [288, 32], {"num_gpus": 8},
                                      {"num_replicas": 32, "num_gpus": 8, "gpus": 8}])
def test_a_topology_that_is_not_eplbs_mapping_is_named_without_python_internals(
        tmp_path, topology) -> None:
    """Found by the newbie/attacker pass: a topology that was not a mapping of eplb's keys
    reported Python's call error ("Topology() argument after ** must be a mapping, not
    str", "got an unexpected keyword argument")."""
    placement = eplb.plan(torch.arange(64.0).reshape(4, 16), 32, 8)
    path = tmp_path / "p.json"
    write_placement(placement, path)
    doc = json.loads(path.read_text())
    doc["topology"] = topology
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"p\.json: bad topology .*expected a mapping of "
                       r"num_replicas, num_gpus, num_nodes, num_groups") as info:
        read_placement(path)
    assert "argument" not in str(info.value)


def test_read_placement_refuses_a_gpu_count_the_file_contradicts(tmp_path):
    # a file that records its cluster was read on it whatever num_gpus said: asked for 2
    # GPUs, the caller got a placement on 4 without a word
    placement = eplb.plan(torch.rand(2, 8), 8, 4)
    for name in ("p.json", "p.pt", "p.trtllm.yaml"):
        path = write_placement(placement, tmp_path / name)
        assert read_placement(path, num_gpus=4).topology.num_gpus == 4
        assert read_placement(path).topology.num_gpus == 4
        with pytest.raises(ValueError, match="records 4 GPUs; num_gpus=2 contradicts it"):
            read_placement(path, num_gpus=2)


def test_a_recorded_cluster_whose_nodes_do_not_split_its_gpus_is_refused(tmp_path):
    # eplb never writes one; a hand-edited file with 3 nodes on 4 GPUs was accepted, and
    # eval then blamed flags the user never gave ("--gpus (4) must be a multiple of
    # --nodes (3)") while plan --previous took it silently
    path = write_placement(eplb.plan(torch.rand(2, 8), 8, 4), tmp_path / "p.json")
    doc = json.loads(path.read_text())
    doc["topology"]["num_nodes"] = 3
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=r"bad topology .*num_gpus \(4\) is not a multiple "
                                          r"of num_nodes \(3\)"):
        read_placement(path)
    yaml_path = write_placement(eplb.plan(torch.rand(2, 8), 8, 4), tmp_path / "p.yaml")
    yaml_path.write_text(yaml_path.read_text().replace('"num_nodes":1', '"num_nodes":3'))
    with pytest.raises(FormatError, match=r"do not fit the recorded topology of 4 GPUs: "
                                          r"num_gpus \(4\) is not a multiple of num_nodes \(3\)"):
        read_placement(yaml_path)
    # an engine file records no cluster: the given one must split alike
    sglang = write_placement(eplb.plan(torch.rand(2, 8), 8, 4), tmp_path / "p.sglang.json")
    with pytest.raises(FormatError, match=r"do not fit the given topology of 4 GPUs: "
                                          r"num_gpus \(4\) is not a multiple of num_nodes \(3\)"):
        read_placement(sglang, num_gpus=4, num_nodes=3)


@pytest.mark.parametrize("num_gpus", ["4", 4.0, True])
def test_read_placement_refuses_a_gpu_count_that_is_no_integer(tmp_path, num_gpus):
    # a file that records its cluster compared num_gpus unchecked: "4" was refused as
    # "records 4 GPUs; num_gpus=4 contradicts it" and 4.0 accepted, where a file that
    # records none refuses both as no integer
    placement = eplb.plan(torch.rand(2, 8), 8, 4)
    for name in ("p.json", "p.trtllm.yaml", "p.sglang.json"):
        path = write_placement(placement, tmp_path / name)
        with pytest.raises(ValueError, match="num_gpus must be a positive integer"):
            read_placement(path, num_gpus=num_gpus)
    assert read_placement(tmp_path / "p.json", num_gpus=np.int64(4)).topology.num_gpus == 4


@pytest.mark.parametrize("table", [[], [[]], [[], []]])
def test_an_empty_placement_table_is_called_empty(tmp_path, table):
    # it read "must be integer [layers][slots]; found torch.float32 (0,)", a type mistake
    # the file does not make (attacker pass)
    own = tmp_path / "own.json"
    write_placement(make_placement(0, 2, 8, 4, 3)[0], own)
    for key, extra in (("physical_to_logical_map", {}),
                       ("phy2log", json.loads(own.read_text()))):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({**extra, key: table}))
        with pytest.raises(FormatError, match=re.escape(f"{key} is empty")):
            read_placement(path, num_gpus=4)
