"""eplb placements for SGLang 0.5.23, parsed by SGLang's own released code.

The tests import the real ``sglang/srt/eplb/expert_location.py`` of the sglang==0.5.23
wheel fetched by ``scripts/fetch_engines.py`` and run the very function SGLang runs at
start-up for ``--init-expert-location`` (``compute_initial_expert_location_metadata``)
on files eplb wrote. ``sglang_sources`` in ``tests/engines.py`` documents the stub
modules (runtime settings, model loader, elastic EP off). DeepSeek-V3's
``get_model_config_for_expert_location`` is executed from the real
``sglang/srt/models/deepseek_v2.py``. Without the cache the tests skip visibly.
"""

from __future__ import annotations

import ast
import json
import logging
import types
from pathlib import Path

import pytest
import torch
from engines import extract_function, sglang_sources
from helpers import DEEPSEEK_DIR as REAL

import eplb
from eplb import Placement, Topology, formats
from eplb.cli import main as cli_main
from eplb.core.policies import resolve_policy

NUM_LAYERS, NUM_EXPERTS, REPLICAS, GPUS, NODES, GROUPS = 61, 256, 288, 32, 4, 8
MOE_IDS = list(range(3, 61))  # DeepSeek-V3: layers 0-2 are dense
METHOD = "get_model_config_for_expert_location"


def real_counts(name: str = "prefill_in4096.json") -> torch.Tensor:
    """``[61, 256]`` int64 counts as SGLang dumped them (dense rows 0-2 are zero)."""
    path = REAL / name
    if not path.is_file():
        pytest.skip(f"real DeepSeek-V3 loads not found at {path}"
                    " (set EPLB_REAL_DATA to the real-data folder)")
    return torch.tensor(json.loads(path.read_text())["logical_count"], dtype=torch.int64)


def _deepseek_model_class(root: Path, expert_location: types.ModuleType) -> type:
    """A model class whose ``get_model_config_for_expert_location`` is SGLang's own code."""
    path = root / "sglang/srt/models/deepseek_v2.py"
    tree = ast.parse(path.read_text())
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for node in cls.body:
            if isinstance(node, ast.FunctionDef) and node.name == METHOD:
                node.decorator_list = []  # re-wrapped as a classmethod below
                namespace = {
                    "ModelConfigForExpertLocation": expert_location.ModelConfigForExpertLocation
                }
                exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
                method = classmethod(namespace[node.name])
                return type(cls.name, (), {node.name: method})
    raise LookupError(f"{path}: no get_model_config_for_expert_location")


@pytest.fixture
def sglang(sglang_root):
    """SGLang's expert-location code with DeepSeek-V3 on 32 GPUs x 4 nodes, 32 redundant."""
    settings = types.SimpleNamespace(
        device=types.SimpleNamespace(device="cpu"),
        exec=types.SimpleNamespace(moe=types.SimpleNamespace(
            init_expert_location="trivial",
            ep_num_redundant_experts=REPLICAS - NUM_EXPERTS,
            ep_dispatch_algorithm="dynamic",
            moe_a2a_backend="none",
            eplb_algorithm="auto",
            ep_join_mode="none",
        )),
        parallel=types.SimpleNamespace(
            ep_size=GPUS, nnodes=NODES, tp_size=GPUS, elastic_ep_initial_size=None,
            ep_join_rank_offset=0,
        ),
    )
    with sglang_sources(sglang_root, settings) as ns:
        model_class = _deepseek_model_class(sglang_root, ns.expert_location)
        hf_config = types.SimpleNamespace(
            num_hidden_layers=NUM_LAYERS, n_routed_experts=NUM_EXPERTS, n_group=GROUPS
        )
        ns.model_config = types.SimpleNamespace(hf_config=hf_config, model_class=model_class)
        yield ns


def sglang_start(sglang, init_expert_location: str, moe_ep_rank: int = 0):
    """What an SGLang rank computes at start-up from ``--init-expert-location``."""
    sglang.settings.exec.moe.init_expert_location = init_expert_location
    return sglang.expert_location.compute_initial_expert_location_metadata(
        sglang.model_config, moe_ep_rank=moe_ep_rank
    )


def check_sglang_view(meta, placement: Placement, layer_ids: list[int]) -> None:
    """SGLang's metadata must hold exactly our placement on the MoE layers."""
    assert meta.physical_to_logical_map.shape == (NUM_LAYERS, REPLICAS)
    assert meta.ep_size == GPUS and meta.num_local_physical_experts == REPLICAS // GPUS
    ids = torch.tensor(layer_ids)
    assert torch.equal(meta.physical_to_logical_map_cpu[ids].long(), placement.phy2log)
    # without an all-to-all backend SGLang keeps every replica as a dispatch candidate
    l2p = meta.logical_to_all_physical_map_cpu[ids].long()
    width = placement.log2phy.shape[-1]
    assert torch.equal(l2p[..., :width], placement.log2phy)
    assert bool((l2p[..., width:] == -1).all())
    assert torch.equal(meta.logical_to_all_physical_map_num_valid[ids].long(), placement.logcnt)


def test_sglang_parses_our_json_file_into_our_placement(sglang, tmp_path):
    w = real_counts()[MOE_IDS]
    placement = eplb.plan(w, REPLICAS, GPUS, NODES, GROUPS)
    placement.validate()
    path = formats.write_placement(placement, tmp_path / "init.json", emit="sglang",
                                   layer_ids=MOE_IDS)
    meta = sglang_start(sglang, str(path))
    check_sglang_view(meta, placement, MOE_IDS)
    # the dense layers SGLang still needs a row for get its own trivial map
    trivial = torch.arange(REPLICAS) % NUM_EXPERTS
    for layer in range(3):
        assert torch.equal(meta.physical_to_logical_map_cpu[layer].long(), trivial)


def test_sglang_accepts_the_placement_as_an_inline_json_string(sglang, tmp_path):
    w = real_counts("decode_in1000out1000.json")[MOE_IDS]
    placement = eplb.plan(w, REPLICAS, GPUS, NODES, GROUPS, policy="global")
    path = formats.write_placement(placement, tmp_path / "p.json", emit="sglang", layer_ids=MOE_IDS)
    meta = sglang_start(sglang, path.read_text())  # --init-expert-location '<json>'
    check_sglang_view(meta, placement, MOE_IDS)


def test_static_dispatch_of_every_rank_picks_a_replica_of_the_right_expert(sglang, tmp_path):
    # DeepEP deployments: SGLang builds a per-rank dispatch table from our map
    sglang.settings.exec.moe.moe_a2a_backend = "deepep"
    sglang.settings.exec.moe.ep_dispatch_algorithm = "static"
    w = real_counts("decode_in2000out100.json")[MOE_IDS]
    placement = eplb.plan(w, REPLICAS, GPUS, NODES, GROUPS)
    path = formats.write_placement(placement, tmp_path / "p.json", emit="sglang", layer_ids=MOE_IDS)
    for rank in (0, GPUS - 1):
        meta = sglang_start(sglang, str(path), moe_ep_rank=rank)
        dispatch = meta.logical_to_rank_dispatch_physical_map[MOE_IDS].long()  # [58, 256]
        assert torch.equal(placement.phy2log.gather(1, dispatch),
                           torch.arange(NUM_EXPERTS).expand_as(dispatch))


def test_round_trip_recorder_dump_plan_launch(sglang, tmp_path):
    """SGLang recorder dump -> ``eplb plan --emit sglang`` -> SGLang start-up."""
    first = sglang_start(sglang, "trivial")  # the server in service before rebalancing
    # per-slot counts as the recorder buffers them: [buffer, layers, slots], int32
    load = real_counts("prefill_in2048.json").double()
    per_slot = load.gather(1, first.physical_to_logical_map_cpu.long())
    per_slot = per_slot / first.logical_to_all_physical_map_num_valid.double().gather(
        1, first.physical_to_logical_map_cpu.long())
    buffer = torch.stack([per_slot * f for f in (0.5, 1.0, 1.5)]).round().to(torch.int32)
    # SGLang's own conversion to logical counts, then the dict its _dump_to_file saves
    to_logical = extract_function(
        sglang.root / "sglang/srt/eplb/expert_distribution.py",
        "_convert_global_physical_count_to_logical_count", {"torch": torch},
    )
    logical = to_logical(buffer, NUM_LAYERS, NUM_EXPERTS, first.physical_to_logical_map)
    dump = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    torch.save({"rank": 0, "logical_count": logical,
                "average_utilization_rate_over_window": None}, dump)

    out = tmp_path / "init.sglang.json"
    code = cli_main(["plan", str(dump), "-r", str(REPLICAS), "-g", str(GPUS),
                     "--nodes", str(NODES), "--groups", str(GROUPS),
                     "-o", str(out), "--emit", "sglang"])
    assert code == 0, "eplb plan failed"
    meta = sglang_start(sglang, str(out))
    # what SGLang now serves is a valid plan for the dumped loads
    trace = formats.read_loads(dump)
    weight = trace.counts.sum(0)[MOE_IDS]
    topo = Topology(REPLICAS, GPUS, NODES, GROUPS)
    served = Placement.from_phy2log(meta.physical_to_logical_map_cpu[MOE_IDS].long(), NUM_EXPERTS,
                                    topo, resolve_policy("auto", topo, NUM_EXPERTS))
    served.validate()
    assert served.balancedness(weight) > Placement.from_phy2log(
        first.physical_to_logical_map_cpu[MOE_IDS].long(), NUM_EXPERTS,
        Topology(REPLICAS, GPUS, NODES, GROUPS)).balancedness(weight)


def test_documented_sglang_flags_exist(sglang_root):
    text = (sglang_root / "sglang/srt/arg_groups/fields/exec_.py").read_text()
    for field in ("init_expert_location", "enable_eplb", "ep_num_redundant_experts",
                  "eplb_rebalance_num_iterations", "expert_distribution_recorder_mode"):
        assert f"    {field}:" in text  # becomes --{field.replace('_', '-')}


def test_each_recorder_dump_clears_what_it_wrote(sglang_root):
    """README (SGLang, Recording): a dump holds the steps since the previous one, so every
    dump is planned on. SGLang's ``dump_record`` resets the recorder after writing (the
    README said a dump wrote the whole buffer, and advised planning on the newest dump
    only, which dropped the steps of the earlier ones)."""
    source = (sglang_root / "sglang/srt/eplb/expert_distribution.py").read_text()
    dump_records = [node for node in ast.walk(ast.parse(source))
                    if isinstance(node, ast.FunctionDef) and node.name == "dump_record"]
    resets = [node for node in dump_records
              if any(isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                     and call.func.attr == "_reset" for call in ast.walk(node))]
    assert len(resets) == 1  # the real recorder's (the other one refuses to dump)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "then clears the recorder" in readme and "newest dump only" not in readme


@pytest.mark.parametrize("options", [{}, {"policy": "auto"}, {"policy": "hierarchical"}])
def test_a_policy_option_on_a_shape_hierarchy_cannot_take_logs_without_a_python_warning(
        options, caplog):
    """12 GPUs on 8 nodes (SGLang passes ``--nnodes`` as it is), DeepSeek's 8 groups: the
    option ``policy: auto`` used to reach eplb.plan's RuntimeWarning through its own
    resolution (attacker pass), which fails SGLang's rebalance under ``-W error``."""
    import warnings

    from eplb.integrations.sglang import eplb_rebalance

    tokens = torch.randint(0, 100, (1, 2, 64), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        phy2log = eplb_rebalance(tokens, 72, 6, 8, 8, hierarchical=False,
                                 options=dict(options))[0]
    Placement.from_phy2log(phy2log, 64, Topology(72, 12)).validate()
    if options:
        assert "num_gpus (12) is not a multiple of num_nodes (8)" in caplog.text


@pytest.mark.parametrize("hierarchical", [False, True])
def test_sglang_hook_plans_gpus_that_do_not_divide_over_nodes_without_a_python_warning(
        hierarchical):
    """SGLang passes its node count unchecked: 6 GPUs on 4 nodes is planned globally as
    one node, as SGLang itself does, without eplb.plan's RuntimeWarning for API callers
    (a warning raised inside the engine's rebalance, which fails it under ``-W error``:
    SGLang has no fallback)."""
    import warnings

    from eplb.integrations.sglang import eplb_rebalance

    counts = torch.randint(0, 100, (3, 2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        phy2log, _, _ = eplb_rebalance(counts, 12, 2, 2, 4, hierarchical=hierarchical)
    assert torch.equal(phy2log, eplb.plan(counts.sum(0), 12, 6).phy2log)
