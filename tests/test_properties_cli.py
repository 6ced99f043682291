"""Property tests of ``eplb plan`` (the placement-writing command), run in-process: loads
files in every format eplb writes (and CSV, plain JSON, safetensors), every output emit,
and the CLI's ways in of the old map and the cluster (``--previous`` files of several
origins, ``--nodes/--groups``, ``--policy``, ``--dead-gpus``, ``--gpu-speed``,
``--max-moves``), and SGLang's nearest dispatch (``--dispatch nearest`` with ``--fair``,
``--policy locality`` with ``--slack`` and ``--routing``).

The other property modules drive the Python API; here the command must write a file that
reads back as a placement that passes the whole contract, leaves dead GPUs empty, and is
the placement ``eplb.plan`` makes from the same loads and options.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from helpers import assert_contract
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import eplb
from eplb.cli import main
from eplb.core import plan_greedy
from eplb.formats import EMITS, TRACE_EMITS, LoadTrace, read_placement, write_loads, write_placement

SUFFIX = {"json": ".json", "pt": ".pt", "sglang": ".sglang.json", "trtllm": ".yaml"}
LOADS_SUFFIX = {"pt": ".pt", "npz": ".npz", "npy": ".npy", "vllm-history": ".json",
                "sglang": ".sglang.json"}
#: loads formats eplb reads but does not write: a CSV table [L, E] (the steps summed), a
#: plain JSON array [T, L, E], a safetensors file of one array
HAND_WRITTEN = ("csv", "json", "safetensors")
PREVIOUS = ("none", "eplb", "eplb-global", "vllm-initial", "greedy", "shuffled", "revived")


@st.composite
def cli_calls(draw):
    """A cluster, integer loads ``[T, L, E]``, and the flags of one ``eplb plan`` call."""
    nodes = draw(st.integers(1, 3))
    gpus = nodes * draw(st.integers(1, 3))
    slots = draw(st.integers(1, 5))
    replicas = gpus * slots
    groups = nodes * draw(st.integers(1, 2)) if nodes > 1 and draw(st.booleans()) else 1
    per_group = min(draw(st.integers(1, 5)), replicas // groups)
    if per_group < 1:
        groups, per_group = 1, min(draw(st.integers(1, 5)), replicas)
    experts, layers, steps = groups * per_group, draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    counts = rng.integers(0, 200, (steps, layers, experts))
    if draw(st.integers(0, 4)) == 0:
        counts[:, 0] = 0  # an idle (dense) layer
    emit = draw(st.sampled_from(EMITS))
    grouped = groups > 1 and nodes > 1
    policy = draw(st.sampled_from(["auto", "global", "hierarchical"] if grouped
                                  else ["auto", "global"]))
    previous = draw(st.sampled_from(PREVIOUS))
    dead: list[int] = []
    # dead GPUs: eplb's own files only (the CLI refuses them for the engines' files)
    if (emit in ("json", "pt") and policy != "hierarchical" and gpus > 1
            and draw(st.integers(0, 2)) == 0):
        most = gpus - -(-experts // slots)  # keep a live slot for every expert
        if most >= 1:
            dead = sorted(rng.choice(gpus, int(rng.integers(1, most + 1)), replace=False).tolist())
    speed = None
    if previous == "none" and policy != "hierarchical" and draw(st.integers(0, 2)) == 0:
        speed = [round(float(s), 3) for s in rng.uniform(0.5, 2.0, gpus)]
    budget = None
    if previous != "none" and draw(st.booleans()):
        budget = int(rng.integers(0, layers * replicas + 1))
    return {"nodes": nodes, "gpus": gpus, "slots": slots, "replicas": replicas,
            "groups": groups, "experts": experts, "layers": layers, "counts": counts,
            "loads_format": draw(st.sampled_from((*TRACE_EMITS, *HAND_WRITTEN))), "emit": emit,
            "policy": policy, "previous": previous, "dead": dead, "speed": speed,
            "budget": budget, "seed": draw(st.integers(0, 1000)), "rng": rng}


def loads_file(counts: torch.Tensor, fmt: str, folder) -> object:
    """``counts [T, L, E]`` written as a loads file of format ``fmt``."""
    if fmt == "csv" and counts[0].numel() == 1:
        fmt = "json"  # a one-number CSV is refused as no table (a mistake more likely)
    if fmt == "csv":
        path = folder / "loads.csv"
        np.savetxt(path, counts.sum(0).numpy(), delimiter=",", fmt="%d")
        return path
    if fmt == "json":
        path = folder / "loads.json"
        path.write_text(json.dumps(counts.tolist()))
        return path
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = folder / "loads.safetensors"
        save_file({"counts": counts.contiguous()}, str(path))
        return path
    return write_loads(LoadTrace(counts), folder / f"loads{LOADS_SUFFIX[fmt]}", fmt)


def old_placement(call: dict, w: torch.Tensor) -> eplb.Placement:
    """The placement in force, of the drawn origin (every expert held: a file's contract)."""
    args = (call["replicas"], call["gpus"], call["nodes"], call["groups"])
    topo = eplb.Topology(*args)
    origin, layers, experts = call["previous"], call["layers"], call["experts"]
    initial = torch.arange(call["replicas"]).remainder(experts).repeat(layers, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if origin == "eplb" and call["policy"] == "locality":
            try:
                return eplb.plan(w, *args, policy="locality", dispatch="nearest")
            except ValueError:  # a shape the locality policy refuses
                return eplb.plan(w, *args, policy="global")
        if origin == "eplb":
            return eplb.plan(w, *args, policy=call["policy"])
        if origin == "eplb-global":
            return eplb.plan(w, *args, policy="global")
        if origin == "greedy":
            return plan_greedy(w, *args)
        if origin == "shuffled":  # vLLM's initial map, its slots shuffled (stacked replicas)
            order = torch.from_numpy(call["rng"].permutation(call["replicas"]))
            return eplb.Placement.from_phy2log(initial[:, order], experts, topo)
        if origin == "revived":  # planned while the last GPU was dead
            live = torch.ones(call["gpus"], dtype=torch.bool)
            live[-1] = (call["gpus"] - 1) * call["slots"] < experts
            return eplb.plan(w, call["replicas"], call["gpus"], active_gpus=live)
    return eplb.Placement.from_phy2log(initial, experts, topo)  # vLLM's initial map


def read_back(call: dict, path, policy: str | None = None) -> eplb.Placement:
    """``path`` read for the call's cluster; ``policy`` for a file that records none
    (SGLang's: read as global, which a hierarchical plan's unavoidable stacking fails)."""
    return read_placement(path, num_gpus=call["gpus"], num_nodes=call["nodes"],
                          num_groups=call["groups"], num_experts=call["experts"],
                          policy=policy)


def run_quietly(capsys, argv: list) -> tuple[int, str]:
    """``(exit code, stderr)`` of the CLI run with ``argv``, warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([str(a) for a in argv])
    return code, capsys.readouterr()[1]


def add_dead_gpus(call: dict, argv: list, kwargs: dict) -> torch.Tensor | None:
    """The call's dead GPUs as the CLI takes them (``argv``) and as eplb.plan does
    (``kwargs``); returns the live mask, ``None`` where every GPU is live."""
    if not call["dead"]:
        return None
    argv += ["--dead-gpus", ",".join(map(str, call["dead"]))]
    live = torch.ones(call["gpus"], dtype=torch.bool)
    live[call["dead"]] = False
    kwargs["active_gpus"] = live
    return live


def written_and_planned(call: dict, out, w: torch.Tensor, kwargs: dict,
                        live: torch.Tensor | None) -> tuple[eplb.Placement, eplb.Placement]:
    """``(the placement the CLI wrote to out, eplb.plan's from the same loads and
    options)``, the written one checked against the contract: valid, dead GPUs empty,
    the same policy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = eplb.plan(w, call["replicas"], call["gpus"], call["nodes"], call["groups"],
                         policy=call["policy"], **kwargs)
    p = read_back(call, out, want.policy if call["emit"] == "sglang" else None)
    p.validate()
    assert_contract(p)
    if live is not None:
        dead_slots = (~live).repeat_interleave(call["slots"])
        assert bool((p.phy2log[:, dead_slots] == -1).all()), "a dead GPU holds an expert"
    assert p.policy == want.policy
    return p, want


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(call=cli_calls())
def test_eplb_plan_writes_a_placement_that_keeps_the_contract(tmp_path_factory, capsys, call):
    folder = tmp_path_factory.mktemp("cli")
    counts = torch.from_numpy(call["counts"]).to(torch.int64)
    fmt = call["loads_format"]
    loads = loads_file(counts, fmt, folder)
    out = folder / f"out{SUFFIX[call['emit']]}"
    argv = ["plan", loads, "-o", out, "-r", call["replicas"], "-g", call["gpus"],
            "--nodes", call["nodes"], "--groups", call["groups"], "--policy", call["policy"],
            "--seed", call["seed"]]
    if call["emit"] == "sglang" and fmt in ("npy", "vllm-history", *HAND_WRITTEN):
        argv += ["--first-layer", 0]  # SGLang's file needs the model layers these lack
    w = counts.sum(0).to(torch.float64)
    kwargs: dict = {"seed": call["seed"]}
    live = add_dead_gpus(call, argv, kwargs)
    if call["speed"] is not None:
        argv += ["--gpu-speed", ",".join(map(str, call["speed"]))]
        kwargs["gpu_speed"] = torch.tensor(call["speed"], dtype=torch.float64)
    old = None
    if call["previous"] != "none":
        old = old_placement(call, w)
        emit = "json" if bool((old.phy2log < 0).any()) else call["emit"]  # dead GPUs: eplb's
        written = write_placement(old, folder / f"old{SUFFIX[emit]}", emit)
        argv += ["--previous", written]
        old = read_back(call, written)
        kwargs["previous"] = old
    if call["budget"] is not None:
        argv += ["--max-moves", call["budget"]]
        kwargs["max_moves"] = call["budget"]
    code, err = run_quietly(capsys, argv)
    assert code == 0, err
    assert "Traceback" not in err
    p, want = written_and_planned(call, out, w, kwargs, live)
    # the file holds the placement eplb.plan makes from the same loads and options
    assert torch.equal(p.phy2log, want.phy2log), (call["emit"], call["previous"])
    if old is not None and call["budget"] is not None and call["previous"] == "eplb" \
            and live is None:
        # eplb's own map for this cluster needs no forced move: the budget holds
        assert int(p.moved_slots(old.phy2log).sum()) <= call["budget"]


@pytest.mark.parametrize("emit", EMITS)
def test_eplb_plan_reads_its_own_output_back_as_the_placement_in_force(tmp_path, capsys, emit):
    """The file ``eplb plan`` writes is a valid ``--previous``: re-planned on the same loads
    with no budget, every slot stays (eplb's own plan is kept where nothing pays)."""
    counts = torch.from_numpy(np.random.default_rng(1).integers(0, 200, (2, 3, 8)))
    loads = write_loads(LoadTrace(counts), tmp_path / "loads.npz", "npz")
    first, second = tmp_path / f"a{SUFFIX[emit]}", tmp_path / f"b{SUFFIX[emit]}"
    cluster = ["-r", "12", "-g", "4"]
    assert main(["plan", str(loads), "-o", str(first), *cluster]) == 0
    assert main(["plan", str(loads), "-o", str(second), *cluster, "--previous", str(first)]) == 0
    capsys.readouterr()
    a = read_placement(first, num_gpus=4, num_experts=8)
    b = read_placement(second, num_gpus=4, num_experts=8)
    assert_contract(b)
    assert int(b.moved_slots(a.phy2log).sum()) == 0


@st.composite
def nearest_calls(draw):
    """``cli_calls`` for SGLang's nearest dispatch: ``--dispatch nearest`` with ``--fair``
    (global policy), ``--policy locality`` with ``--slack`` and a ``--routing`` file, or
    the hierarchical policy; dead GPUs under the global policy."""
    call = draw(cli_calls())
    call["speed"] = None
    if call["nodes"] == 1 or (call["policy"] == "auto" and call["groups"] > 1):
        call["policy"] = "global"  # (auto would resolve to hierarchical, which warns)
    if call["nodes"] > 1 and draw(st.integers(0, 2)) == 0:
        call["policy"] = "locality"
    if call["policy"] != "global":
        call["dead"] = []
    fairs = ["auto"]
    if call["policy"] in ("global", "auto"):
        fairs += ["expect"] if call["previous"] != "none" else ["expect", "avoid"]
        if call["nodes"] == 1 and not call["dead"]:
            fairs.append("divide")
    call["fair"] = draw(st.sampled_from(fairs))
    if call["policy"] in ("global", "auto") and call["nodes"] > 1 and call["dead"]:
        call["budget"] = None  # re-planned and relabelled: no budget (refused)
    if call["policy"] in ("locality", "hierarchical"):
        call["budget"] = None
    call["slack"] = draw(st.sampled_from([None, 0.0, 0.03, 0.5])) \
        if call["policy"] == "locality" else None
    call["routing"] = call["policy"] == "locality" and draw(st.booleans())
    return call


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(call=nearest_calls())
def test_eplb_plan_for_nearest_dispatch_writes_a_placement_that_keeps_the_contract(
        tmp_path_factory, capsys, call):
    folder = tmp_path_factory.mktemp("cli")
    counts = torch.from_numpy(call["counts"]).to(torch.int64)
    loads = write_loads(LoadTrace(counts), folder / "loads.npz", "npz")
    out = folder / f"out{SUFFIX[call['emit']]}"
    argv = ["plan", loads, "-o", out, "-r", call["replicas"], "-g", call["gpus"],
            "--nodes", call["nodes"], "--groups", call["groups"], "--policy", call["policy"],
            "--seed", call["seed"], "--dispatch", "nearest", "--fair", call["fair"]]
    w = counts.sum(0).to(torch.float64)
    kwargs: dict = {"seed": call["seed"], "dispatch": "nearest", "fair": call["fair"]}
    live = add_dead_gpus(call, argv, kwargs)
    if call["slack"] is not None:
        argv += ["--slack", call["slack"]]
        kwargs["slack"] = call["slack"]
    if call["routing"]:
        rng, k = call["rng"], min(2, call["experts"])
        ids = np.array([[rng.choice(call["experts"], k, replace=False)
                         for _ in range(call["layers"])] for _ in range(16)], dtype=np.int64)
        np.save(folder / "routing.npy", ids)
        argv += ["--routing", folder / "routing.npy"]
        kwargs["routing"] = torch.from_numpy(ids)
    old = None
    if call["previous"] != "none":
        old = old_placement(call, w)
        emit = "json" if bool((old.phy2log < 0).any()) else call["emit"]
        written = write_placement(old, folder / f"old{SUFFIX[emit]}", emit)
        argv += ["--previous", written]
        kwargs["previous"] = old = read_back(call, written)
    if call["budget"] is not None:
        argv += ["--max-moves", call["budget"]]
        kwargs["max_moves"] = call["budget"]
    code, err = run_quietly(capsys, argv)
    assert "Traceback" not in err
    if code != 0 and call["policy"] == "locality" and "locality policy is impossible" in err:
        event("locality refused")
        return  # a shape the locality policy refuses, in one line
    event(f"{call['policy']}, fair {call['fair']}, previous {call['previous'] != 'none'}")
    assert code == 0, err
    p, want = written_and_planned(call, out, w, kwargs, live)
    start_up_file = (call["emit"] == "sglang" and call["nodes"] == 1 and call["fair"] == "auto"
                     and old is None)
    if not start_up_file:  # (that one: per layer the even split or fair avoid, said so)
        assert torch.equal(p.phy2log, want.phy2log), (call["emit"], call["previous"])
