"""Placement files: writing and reading eplb, SGLang, TensorRT-LLM and torch placements.

The files eplb refuses to read: ``test_formats_placements_refused.py``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb.formats import (
    EMITS,
    FormatError,
    read_loads,
    read_placement,
    read_placement_meta,
    write_placement,
)


# --------------------------------------------------------------------------- placements
def make_placement(seed: int, layers: int, experts: int, gpus: int, slots_per_gpu: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(layers, experts, generator=g) ** 3 * 1000
    return eplb.plan(w, gpus * slots_per_gpu, gpus), w


def with_dead_gpu(placement, dead: int):
    """The same plan with GPU ``dead`` appended as dead (its slots -1)."""
    topo = placement.topology
    s = topo.slots_per_gpu
    rows = placement.phy2log
    rows = torch.cat(
        [rows[:, : dead * s], torch.full((rows.shape[0], s), -1), rows[:, dead * s :]], 1
    )
    active = torch.ones(topo.num_gpus + 1, dtype=torch.bool)
    active[dead] = False
    new_topo = eplb.Topology(topo.num_replicas + s, topo.num_gpus + 1)
    return eplb.Placement.from_phy2log(rows, placement.num_experts, new_topo, active_gpus=active)


def _suffix(emit: str) -> str:
    """A file name suffix the format's readers (and engines) accept."""
    return {"sglang": "json", "trtllm": "yaml"}.get(emit, emit)


def read_back(path: Path, emit: str, placement):
    kwargs = {"num_gpus": placement.topology.num_gpus} if emit == "sglang" else {}
    return read_placement(path, **kwargs)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10_000),
    layers=st.integers(1, 4),
    experts=st.sampled_from([4, 8, 16]),
    gpus=st.sampled_from([1, 2, 4]),
    extra=st.integers(0, 3),
)
def test_round_trip_every_emit(tmp_path_factory, seed, layers, experts, gpus, extra):
    slots_per_gpu = -(-experts // gpus) + extra
    placement, w = make_placement(seed, layers, experts, gpus, slots_per_gpu)
    placement.validate()
    folder = tmp_path_factory.mktemp("rt")
    for emit in EMITS:
        path = write_placement(placement, folder / f"p_{emit}.{_suffix(emit)}", emit, weight=w)
        back = read_back(path, emit, placement)
        back.validate()
        assert torch.equal(back.phy2log, placement.phy2log), emit
        assert torch.equal(back.logcnt, placement.logcnt)
        assert back.topology == placement.topology, emit
        assert back.policy == placement.policy


def test_eplb_json_contents(tmp_path):
    placement, w = make_placement(0, 3, 8, 4, 3)
    path = write_placement(placement, tmp_path / "p.json", weight=w, layer_ids=[3, 4, 5])
    doc = json.loads(path.read_text())
    assert doc["format"] == "eplb.placement" and doc["format_version"] == 1
    assert doc["eplb_version"] == eplb.__version__
    assert doc["topology"] == placement.topology.as_dict()
    assert doc["layer_ids"] == [3, 4, 5]
    assert doc["phy2log"] == placement.phy2log.tolist()
    assert doc["balancedness"] == pytest.approx(placement.balancedness(w))
    assert doc["layer_balancedness"] == pytest.approx(placement.layer_balancedness(w).tolist())
    assert len(doc["layer_ceiling"]) == 3
    assert doc["balancedness"] <= doc["ceiling"] + 1e-9
    _, meta = read_placement_meta(path)
    assert meta["layer_ids"] == [3, 4, 5] and meta["format"] == "json"
    with pytest.raises(FormatError, match="read_placement"):
        read_loads(path)
    # the .pt form holds tensors and loads with weights_only=True
    pt = write_placement(placement, tmp_path / "p.pt", "pt", weight=w)
    obj = torch.load(pt, weights_only=True)
    assert torch.equal(obj["phy2log"], placement.phy2log)
    assert obj["format"] == "eplb.placement"


def test_the_file_name_picks_the_format_unless_emit_does(tmp_path):
    """write_placement(p, "lb.yaml") wrote eplb's JSON into a .yaml file (the CLI picks the
    format from OUT's name, the API took JSON whatever the name): TensorRT-LLM then
    failed on it. Now the name decides, as on the command line, and emit= still wins."""
    placement, _ = make_placement(1, 2, 8, 4, 3)
    yaml_path = write_placement(placement, tmp_path / "lb.yaml")
    assert yaml_path.read_text().startswith("# TensorRT-LLM")
    assert yaml.safe_load(yaml_path.read_text())["num_slots"] == 12
    pt_path = write_placement(placement, tmp_path / "plan.pt")
    assert torch.equal(torch.load(pt_path, weights_only=True)["phy2log"], placement.phy2log)
    sglang = write_placement(placement, tmp_path / "init.SGLANG.json")
    assert json.loads(sglang.read_text()).keys() == {"physical_to_logical_map"}
    other = write_placement(placement, tmp_path / "plan.txt")
    assert json.loads(other.read_text())["format"] == "eplb.placement"
    forced = write_placement(placement, tmp_path / "lb2.yaml", emit="json")
    assert json.loads(forced.read_text())["format"] == "eplb.placement"
    for path in (yaml_path, pt_path, other):
        assert torch.equal(read_placement(path).phy2log, placement.phy2log)
    # loads to record where the name picked a format without a place for them: said
    with pytest.warns(UserWarning, match="cannot record balancedness.*'lb3.yaml' implies"):
        write_placement(placement, tmp_path / "lb3.yaml", weight=torch.rand(2, 8))


def test_a_name_of_another_format_is_refused_unless_emit_says(tmp_path):
    """write_placement(p, "plan.npy") wrote eplb's JSON under a NumPy name without a word
    (np.load then fails on it), where the CLI's -o plan.npy is refused (new-user pass).
    Now the API refuses it too, naming the file, and emit= still writes it."""
    placement, _ = make_placement(1, 2, 8, 4, 3)
    for name in ("plan.npy", "plan.CSV", "plan.json.gz", ".npz"):
        with pytest.raises(ValueError, match=rf"{re.escape(name)}: the name says .*emit="):
            write_placement(placement, tmp_path / name)
        assert not (tmp_path / name).exists()
    forced = write_placement(placement, tmp_path / "plan.npy", emit="json")
    assert json.loads(forced.read_text())["format"] == "eplb.placement"


def test_a_refusal_of_the_format_the_name_implies_says_the_name_chose_it(tmp_path):
    """A caller who passed no emit= learns that the file's name picked the format its
    arguments do not fit, and how to pick another: write_placement(p, "lb.yaml",
    gpu_speed=s) wrote eplb's JSON before names implied formats; now it is refused, and
    "trtllm files have no place for it" named a format the caller never asked for."""
    placement, _ = make_placement(1, 2, 8, 4, 3)
    with pytest.raises(ValueError, match=r"'lb\.yaml' implies emit='trtllm'; pass emit="):
        write_placement(placement, tmp_path / "lb.yaml", gpu_speed=[1.0, 1.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"'x\.txt' implies emit='json'"):  # x.npz: refused
        write_placement(placement, tmp_path / "x.txt", num_model_layers=3)
    dead = with_dead_gpu(placement, 1)
    with pytest.raises(ValueError, match=r"'x\.sglang\.json' implies emit='sglang'"):
        write_placement(dead, tmp_path / "x.sglang.json")
    with pytest.raises(ValueError, match=r"have no place for it$"):  # emit= given: no note
        write_placement(placement, tmp_path / "lb.yaml", "trtllm", gpu_speed=[1.0] * 4)
    write_placement(placement, tmp_path / "lb.yaml", "json", gpu_speed=[1.0, 1.0, 1.0, 2.0])


def test_dead_gpus_round_trip_in_eplb_formats_and_are_refused_by_engines(tmp_path):
    base, _ = make_placement(1, 2, 8, 3, 4)
    placement = with_dead_gpu(base, 1)
    placement.validate()
    for emit in ("json", "pt"):
        back = read_placement(write_placement(placement, tmp_path / f"d.{emit}", emit))
        back.validate()
        assert torch.equal(back.phy2log, placement.phy2log)
        assert back.active_gpus.tolist() == [True, False, True, True]
    for emit in ("sglang", "trtllm"):
        with pytest.raises(ValueError, match=r"cannot express empty slots.*GPUs \[1\]"):
            write_placement(placement, tmp_path / f"d.{emit}", emit)
        assert not (tmp_path / f"d.{emit}").exists()


def test_sglang_file_is_engine_loadable(tmp_path):
    placement, _ = make_placement(2, 3, 8, 4, 3)
    path = write_placement(placement, tmp_path / "init.json", "sglang", layer_ids=[3, 4, 5])
    doc = json.loads(path.read_text())
    # SGLang calls init_by_mapping(**doc): the only key allowed
    assert list(doc) == ["physical_to_logical_map"]
    rows = torch.tensor(doc["physical_to_logical_map"])
    assert rows.shape == (6, 12)
    assert torch.equal(rows[3:], placement.phy2log)
    assert torch.equal(rows[0], torch.arange(12) % 8)  # dense rows: SGLang's trivial map
    full = read_placement(path, num_gpus=4)
    full.validate()
    with pytest.raises(ValueError, match="num_gpus="):
        read_placement(path)
    with pytest.raises(FormatError, match="multiple of num_gpus"):
        read_placement(path, num_gpus=5)


def test_trtllm_yaml_constraints(tmp_path):
    placement, _ = make_placement(3, 3, 8, 4, 3)
    path = write_placement(placement, tmp_path / "lb.yaml", "trtllm", layer_ids=[3, 4, 5])
    doc = yaml.safe_load(path.read_text())
    assert doc["num_slots"] == 12 and doc["layer_updates_per_iter"] == 0
    assert list(doc["initial_global_assignments"]) == [3, 4, 5]
    assert all(len(v) == doc["num_slots"] for v in doc["initial_global_assignments"].values())
    assert doc["num_slots"] % placement.topology.num_gpus == 0
    back, meta = read_placement_meta(path)
    assert meta["layer_ids"] == [3, 4, 5]
    assert torch.equal(back.phy2log, placement.phy2log)
    # a foreign YAML (no eplb comment), nested in a full LLM-API config, needs num_gpus
    foreign = tmp_path / "config.yaml"
    foreign.write_text(yaml.safe_dump({"moe_config": {"load_balancer": doc}}))
    with pytest.raises(ValueError, match="num_gpus="):
        read_placement(foreign)
    assert torch.equal(read_placement(foreign, num_gpus=4).phy2log, placement.phy2log)


def test_overwrite_refused_without_force(tmp_path):
    placement, _ = make_placement(4, 2, 8, 2, 5)
    for emit in EMITS:
        path = tmp_path / f"out_{emit}.{_suffix(emit)}"
        path.write_bytes(b"precious")
        with pytest.raises(FileExistsError, match="force") as info:
            write_placement(placement, path, emit)
        assert str(path) in str(info.value)
        assert path.read_bytes() == b"precious"
        write_placement(placement, path, emit, force=True)
        assert path.read_bytes() != b"precious"
        assert torch.equal(read_back(path, emit, placement).phy2log, placement.phy2log)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_placement_rejects_bad_arguments(tmp_path):
    placement, w = make_placement(5, 2, 8, 2, 5)
    with pytest.raises(ValueError, match="unknown emit"):
        write_placement(placement, tmp_path / "x", "yaml")
    with pytest.raises(ValueError, match="layer_ids has 3 layer ids for 2 rows"):
        write_placement(placement, tmp_path / "x", layer_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="weight has shape"):
        write_placement(placement, tmp_path / "x", weight=w[:1])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_placement(placement, tmp_path / "nodir" / "x.json")
    with pytest.raises(TypeError):
        write_placement(placement.phy2log, tmp_path / "x")


def test_hierarchical_topology_survives_round_trips(tmp_path):
    topo = eplb.Topology(num_replicas=8, num_gpus=4, num_nodes=2, num_groups=2)
    rows = torch.tensor([[0, 1, 1, 0, 2, 3, 3, 2], [0, 1, 0, 1, 3, 2, 2, 3]])
    placement = eplb.Placement.from_phy2log(rows, 4, topo, policy="hierarchical")
    placement.validate()
    for emit in EMITS:
        path = write_placement(placement, tmp_path / f"h_{emit}.{_suffix(emit)}", emit)
        if emit == "sglang":
            back = read_placement(
                path, num_gpus=4, num_nodes=2, num_groups=2, policy="hierarchical"
            )
        else:
            back = read_placement(path)
        back.validate()
        assert back.topology == topo and back.policy == "hierarchical", emit
        assert torch.equal(back.phy2log, rows)


def test_recorded_ceiling_is_the_bound_for_the_placements_own_topology(tmp_path):
    from eplb.core.bounds import balancedness_ceiling, layer_ceiling

    placement, w = make_placement(6, 2, 8, 2, 5)
    doc = json.loads(write_placement(placement, tmp_path / "p.json", weight=w).read_text())
    assert doc["ceiling"] == pytest.approx(balancedness_ceiling(w, 10, 2))
    assert doc["layer_ceiling"] == pytest.approx(layer_ceiling(w, 10, 2).tolist())
    dead = with_dead_gpu(placement, 0)
    doc = json.loads(write_placement(dead, tmp_path / "d.json", weight=w).read_text())
    live = torch.tensor([False, True, True])
    assert doc["ceiling"] == pytest.approx(balancedness_ceiling(w, 15, 3, active_gpus=live))
    assert doc["balancedness"] <= doc["ceiling"] + 1e-12


@pytest.mark.parametrize("ids", [torch.tensor([3.7, 4.2]), [torch.tensor(True), 2],
                                 np.array([3.5, 4.0])])
def test_layer_ids_from_tensors_are_not_truncated(tmp_path, ids):
    # a float tensor's __index__ truncates: 3.7 was written as layer 3
    placement = eplb.plan(torch.rand(2, 8) + 0.1, 12, 4)
    with pytest.raises(ValueError, match="layer ids must be integers"):
        write_placement(placement, tmp_path / "p.sglang.json", emit="sglang", layer_ids=ids)
    assert not (tmp_path / "p.sglang.json").exists()


def test_eplb_files_record_the_dispatch_rule_and_refuse_a_bogus_one(tmp_path):
    """New-user pass: a plan for SGLang's nearest dispatch was scored by eval under the
    even split unless --dispatch nearest was given again; eplb's files record the rule."""
    placement, _ = make_placement(0, 3, 8, 4, 3)
    for emit in ("json", "pt"):
        path = write_placement(placement, tmp_path / f"p.{emit}", emit, dispatch="nearest")
        assert read_placement_meta(path)[1]["dispatch"] == "nearest"
        plain = write_placement(placement, tmp_path / f"q.{emit}", emit)
        assert read_placement_meta(plain)[1]["dispatch"] is None
    # a NumPy string is written as a plain one (attacker pass: the .pt then failed to load)
    path = write_placement(placement, tmp_path / "s.pt", "pt", dispatch=np.str_("nearest"))
    assert read_placement_meta(path)[1]["dispatch"] == "nearest"
    # engine files have no place for it (the engine's own setting decides)
    write_placement(placement, tmp_path / "p.sglang.json", dispatch="nearest")
    with pytest.raises(ValueError, match="dispatch must be one of"):
        write_placement(placement, tmp_path / "r.json", dispatch="round-robin")
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["dispatch"] = "sideways"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="dispatch must be null or one of"):
        read_placement(tmp_path / "bad.json")


def test_a_trace_given_to_an_engine_file_asks_for_no_balancedness_record(tmp_path):
    """The README keys an engine file's rows by passing the loads' ``LoadTrace`` as
    ``weight=``; for a trace whose file names no layers (a top-k routing file) that
    warned "weight= is not written" on every SGLang or TensorRT-LLM file (new-user pass).
    Plain loads still warn: the caller asked for a record the format has no place for."""
    import warnings

    from eplb.core import LoadTrace

    placement, _ = make_placement(1, 2, 8, 4, 3)
    bare = LoadTrace(torch.rand(3, 2, 8))  # rows 0..1, named by no file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("a.sglang.json", "a.yaml"):
            write_placement(placement, tmp_path / name, weight=bare)
    with pytest.warns(UserWarning, match="cannot record balancedness"):
        write_placement(placement, tmp_path / "b.sglang.json", weight=bare.total())


def test_plan_on_a_load_trace_says_what_to_pass():
    # (new-user pass: what read_loads returns was refused as a type, with no way on)
    from eplb.core import LoadTrace

    trace = LoadTrace(torch.rand(3, 2, 8), [3, 4])
    with pytest.raises(TypeError, match=r"got a LoadTrace.*trace\.total\(\).*weight=trace"):
        eplb.plan(trace, 16, 8)
    assert eplb.plan(trace.total(), 16, 8).phy2log.shape == (2, 16)


def test_trtllm_files_are_the_same_with_or_without_libyaml(tmp_path, monkeypatch):
    """TensorRT-LLM files are written and read through libyaml where PyYAML has it (a
    200-layer, 2,048-slot file took 13.6 s to read in pure Python). The text written, and the
    placement read back, are the same as PyYAML's pure-Python emitter and parser give, so a
    file does not depend on how PyYAML was built."""
    placement, _ = make_placement(3, 5, 16, 4, 6)
    fast = write_placement(placement, tmp_path / "fast.yaml").read_text()
    # a layer given twice: keys in one mapping (the top level's repeated key)
    (tmp_path / "twice.yaml").write_text(fast.replace("\n  1: ", "\n  0: ", 1))
    refusals, loaders, real_load = [], [], yaml.load

    def spy(text, Loader):
        loaders.append(Loader.__mro__[1].__name__)
        return real_load(text, Loader=Loader)

    monkeypatch.setattr(yaml, "load", spy)
    for libyaml in (hasattr(yaml, "CSafeLoader"), False):
        if not libyaml:
            monkeypatch.delattr(yaml, "CSafeDumper", raising=False)
            monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
            assert write_placement(placement, tmp_path / "slow.yaml").read_text() == fast
        assert torch.equal(read_placement(tmp_path / "fast.yaml").phy2log, placement.phy2log)
        assert loaders[-1] == ("CSafeLoader" if libyaml else "SafeLoader")
        with pytest.raises(FormatError, match="gives key '0' twice in one YAML object") as info:
            read_placement(tmp_path / "twice.yaml")
        refusals.append(str(info.value))
    assert refusals[0] == refusals[1]


@pytest.mark.parametrize("text, named", [
    ("initial_global_assignments:\n\t0: [0, 1]\n", "found character '\\t'"),
    ("x: &a [0, 1]\ny: &a [1, 0]\ninitial_global_assignments: {0: *a}\n",
     "found duplicate anchor 'a'"),
])
def test_malformed_yaml_is_named_as_pure_python_yaml_names_it(tmp_path, text, named):
    """A YAML file libyaml refuses is refused with PyYAML's own message, which names the
    character or anchor and quotes the line; libyaml's said "found character that cannot
    start any token" for a tab."""
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(FormatError, match="malformed YAML") as info:
        read_placement(tmp_path / "bad.yaml")
    assert named in str(info.value)
    assert "^" in str(info.value)  # the line quoted, the place marked
