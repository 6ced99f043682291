"""Round trips through every writer/reader pair, property-tested.

Random valid placements (``eplb.plan`` on random loads: global and hierarchical, with
and without dead GPUs, layer ids from none to 3..60-like runs to scattered ones) go out
through every ``write_placement`` emit and back through ``read_placement``; random load
traces (zeros, counts past int32 and float64's 2**53, fractions, one layer, one expert)
go out through every ``write_loads`` format and back through ``read_loads``. Every file a
writer made must be detected as its own format, and read with ``format=`` forced to any
other load format it is either the same numbers or a ``FormatError`` naming the file.
A few cases run the CLI as a user does (``eplb plan -o``, ``eplb generate -o``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
from eplb.cli import main
from eplb.formats import (
    FORMATS,
    FormatError,
    LoadTrace,
    detect_format,
    read_loads,
    read_placement,
    read_placement_meta,
    write_loads,
    write_placement,
)

#: a file name for each placement emit (and the ``.yml`` and unknown-suffix spellings)
PLACEMENT_NAMES = ("plan.json", "plan.pt", "init.sglang.json", "init.sglang.pt", "lb.yaml",
                   "lb.yml", "plan.txt")
#: a file name for each ``write_loads`` format, by the format ``detect_format`` must name
TRACE_NAMES = {"pt": "trace.pt", "npz": "trace.npz", "npy": "trace.npy",
               "vllm-history": "trace.json", "sglang": "trace.sglang.json"}

EXAMPLES = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def layer_ids_for(draw: st.DrawFn, num_layers: int) -> list[int] | None:
    """None (rows 0..L-1), a run such as 3..60, or scattered (unsorted) ids."""
    kind = draw(st.sampled_from(["none", "run", "scattered"]))
    if kind == "none":
        return None
    if kind == "run":
        first = draw(st.integers(0, 60))
        return list(range(first, first + num_layers))
    return draw(st.lists(st.integers(0, 4095), min_size=num_layers, max_size=num_layers,
                         unique=True))


@st.composite
def plans(draw: st.DrawFn) -> tuple[eplb.Placement, list[int] | None]:
    """A placement planned by eplb on random loads of a small random cluster, and the
    model layer ids of its rows (or None)."""
    num_layers = draw(st.integers(1, 3))
    num_nodes = draw(st.sampled_from([1, 2]))
    num_gpus = num_nodes * draw(st.integers(1, 3))
    num_groups = draw(st.sampled_from([1, num_nodes, 2 * num_nodes]))
    num_experts = num_groups * draw(st.integers(1, 3))
    slots_per_gpu = -(-num_experts // num_gpus) + draw(st.integers(0, 2))
    active = None
    if num_gpus > 1 and draw(st.booleans()):
        dead = draw(st.lists(st.integers(0, num_gpus - 1), min_size=1, max_size=num_gpus - 1,
                             unique=True))
        if (num_gpus - len(dead)) * slots_per_gpu >= num_experts:
            active = torch.ones(num_gpus, dtype=torch.bool)
            active[dead] = False
    loads = draw(st.lists(st.integers(0, 1000), min_size=num_layers * num_experts,
                          max_size=num_layers * num_experts))
    weight = torch.tensor(loads, dtype=torch.float64).reshape(num_layers, num_experts)
    with warnings.catch_warnings():  # hierarchical requests that fall back to global
        warnings.simplefilter("ignore")
        placement = eplb.plan(weight, slots_per_gpu * num_gpus, num_gpus, num_nodes,
                              num_groups, active_gpus=active)
    return placement, layer_ids_for(draw, num_layers)


@EXAMPLES
@given(plans(), st.sampled_from(PLACEMENT_NAMES))
def test_every_placement_format_reads_back(case, name):
    placement, ids = case
    topo = placement.topology
    engine = "sglang" in name or name.endswith((".yaml", ".yml"))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        if engine and placement.active_gpus is not None:
            # engine files have no empty slot: a documented refusal that says what to do
            with pytest.raises(ValueError, match="cannot express empty slots"):
                write_placement(placement, path, layer_ids=ids)
            assert not path.exists()
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # '.txt' names no format: eplb's JSON, warned
            write_placement(placement, path, layer_ids=ids)
        if "sglang" in name:  # no cluster recorded: the caller gives it
            back, meta = read_placement_meta(
                path, num_gpus=topo.num_gpus, num_nodes=topo.num_nodes,
                num_groups=topo.num_groups, num_experts=placement.num_experts)
            rows = ids if ids is not None else list(range(placement.num_layers))
            assert meta["format"] == "sglang"
            assert back.num_layers == max(rows) + 1  # a row for every model layer
            assert torch.equal(back.phy2log[rows], placement.phy2log)
            return
        back, meta = read_placement_meta(path)
        assert back.topology == topo
        assert back.num_experts == placement.num_experts
        assert back.policy == placement.policy
        if placement.active_gpus is None:
            assert back.active_gpus is None or bool(back.active_gpus.all())
        else:
            assert torch.equal(back.active_gpus.bool(), placement.active_gpus.bool())
        if name.endswith((".yaml", ".yml")):
            # TensorRT-LLM keys rows by model layer; the reader lists them in layer order
            rows = ids if ids is not None else list(range(placement.num_layers))
            order = sorted(range(len(rows)), key=rows.__getitem__)
            assert meta["layer_ids"] == sorted(rows)
            assert torch.equal(back.phy2log, placement.phy2log[order])
        else:
            assert meta["layer_ids"] == ids
            assert torch.equal(back.phy2log, placement.phy2log)
        assert torch.equal(read_placement(path).phy2log, back.phy2log)


#: edge values of a count: zero, int32's and float64's integer limits, fractions
COUNT_VALUES = st.one_of(
    st.integers(0, 1000).map(float),
    st.sampled_from([0.0, 2.0**31 - 1, 2.0**31, 2.0**53 - 1, 2.0**53, 2.0**53 + 2, 2.0**64,
                     0.1, 0.5, 5e-324, 1e300]),
    st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
)


@st.composite
def traces(draw: st.DrawFn) -> LoadTrace:
    steps, layers, experts = (draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                              draw(st.integers(1, 5)))
    values = draw(st.lists(COUNT_VALUES, min_size=steps * layers * experts,
                           max_size=steps * layers * experts))
    counts = torch.tensor(values, dtype=torch.float64).reshape(steps, layers, experts)
    return LoadTrace(counts, layer_ids_for(draw, layers))


@EXAMPLES
@given(traces(), st.sampled_from(sorted(TRACE_NAMES)), st.sampled_from(FORMATS))
def test_every_trace_format_reads_back_and_is_told_apart(trace, fmt, other):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / TRACE_NAMES[fmt]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # npy / history files drop the layer ids, warned
            write_loads(trace, path)
        assert detect_format(path) == fmt
        back = read_loads(path)
        if fmt == "sglang":  # a row for every model layer 0..max, dense ones all zero
            assert back.layer_ids == list(range(max(trace.layer_ids) + 1))
            assert torch.equal(back.counts[:, trace.layer_ids], trace.counts)
            others = [i for i in back.layer_ids if i not in trace.layer_ids]
            assert not bool(back.counts[:, others].any())
        else:
            assert torch.equal(back.counts, trace.counts)
            kept = fmt in ("pt", "npz")
            assert back.layer_ids == (trace.layer_ids if kept
                                      else list(range(trace.num_layers)))
        if other == fmt:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                forced = read_loads(path, format=other)
        except FormatError as exc:
            assert path.name in str(exc)
        else:  # only SGLang's JSON reads as plain JSON, and then as the same numbers
            assert (fmt, other) == ("sglang", "json")
            assert torch.equal(forced.counts, back.counts)


def test_placement_and_load_files_are_not_taken_for_each_other(tmp_path):
    weight = torch.tensor([[5.0, 1, 2, 7], [3, 3, 0, 9]])
    trace = LoadTrace(weight[None], [7, 3])
    placement = eplb.plan(weight, 8, 2)
    for name in PLACEMENT_NAMES[:5]:
        path = write_placement(placement, tmp_path / name, weight=trace)
        for fmt in (None, *FORMATS):
            with pytest.raises(FormatError, match=name.replace(".", r"\.")):
                read_loads(path, format=fmt)
    for name in TRACE_NAMES.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = write_loads(trace, tmp_path / name)
        with pytest.raises(FormatError, match=name.replace(".", r"\.")):
            read_placement(path, num_gpus=2)


def test_cli_plan_writes_each_format_that_the_library_reads_back(tmp_path):
    loads = tmp_path / "loads.pt"
    counts = torch.arange(1, 1 + 2 * 3 * 8, dtype=torch.float64).reshape(2, 3, 8)
    write_loads(LoadTrace(counts, [3, 4, 5]), loads)
    planned = eplb.plan(counts.sum(0), 12, 4, 2, 2)
    for name in ("plan.json", "plan.pt", "init.sglang.json", "init.sglang.pt", "lb.yaml"):
        out = tmp_path / name
        assert main(["plan", str(loads), "-r", "12", "-g", "4", "--nodes", "2", "--groups",
                     "2", "-o", str(out)]) == 0
        if "sglang" in name:
            back, meta = read_placement_meta(out, num_gpus=4, num_nodes=2, num_groups=2)
            assert back.num_layers == 6  # model layers 0..5, the dense 0..2 trivial
            assert torch.equal(back.phy2log[3:], planned.phy2log)
        else:
            back, meta = read_placement_meta(out)
            assert meta["layer_ids"] == [3, 4, 5]
            assert back.topology == planned.topology
            assert torch.equal(back.phy2log, planned.phy2log)


def test_cli_generate_then_plan_as_a_user_would(tmp_path):
    """Two processes, as at a shell: a generated trace keeps its model layers through
    eplb's ``.npz`` and into a TensorRT-LLM file's keys."""
    trace_file, out = tmp_path / "trace.npz", tmp_path / "lb.yaml"
    for argv in (["generate", "--preset", "deepseek-v2-lite", "--steps", "2", "-q", "-o",
                  str(trace_file)],
                 ["plan", str(trace_file), "-r", "64", "-g", "8", "-o", str(out)]):
        done = subprocess.run([sys.executable, "-m", "eplb", *argv], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    trace = read_loads(trace_file)
    back, meta = read_placement_meta(out)
    assert meta["layer_ids"] == trace.layer_ids == list(range(1, 27))
    assert back.topology.num_gpus == 8 and back.num_experts == 64
