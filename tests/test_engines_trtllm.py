"""eplb's TensorRT-LLM load-balancer YAML against TensorRT-LLM's own constraints.

TensorRT-LLM is not testable from its wheel here: PyPI's ``tensorrt_llm`` is a stub sdist
that downloads the real (multi-GB, CUDA-only) wheel from NVIDIA's own index at install
time. So :class:`MoeLoadBalancerConfigMirror` restates, check for check, the code that
consumes the YAML, read from TensorRT-LLM's public sources:

- ``tensorrt_llm/llmapi/llm_args.py``, ``TorchLlmArgs.validate_load_balancer``: a string
  ``moe_config.load_balancer`` is a path; the file is read with ``yaml.safe_load`` and
  passed as ``MoeLoadBalancerConfig(**doc)``.
- same file, ``class MoeLoadBalancerConfig`` (pydantic; fields ``num_slots: Optional[int]``,
  ``initial_global_assignments: Optional[Dict[int, List[int]]]``,
  ``layer_updates_per_iter: int = 0``): ``setup(ep_rank, ep_size)`` raises unless
  ``num_slots`` is set and ``num_slots % ep_size == 0``; ``slot_start = ep_rank *
  num_slots // ep_size``; ``get_layer_initial_global_assignments(layer_idx)`` raises
  ``KeyError`` for a missing layer and ``ValueError`` unless ``len == num_slots``.
- ``tensorrt_llm/_torch/modules/fused_moe/interface.py`` (MoE module set-up with a load
  balancer): asserts the assignment is a ``list``, ``num_slots >= num_experts`` and
  ``set(assignment) == set(range(num_experts))``; it asks for the layer's own
  ``layer_idx`` (DeepSeek-V3's MoE layers are 3..60).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import DEEPSEEK_DIR as REAL

import eplb
from eplb import formats
from eplb.cli import main as cli_main
from eplb.core.policies import resolve_policy

NUM_EXPERTS, REPLICAS, GPUS, NODES, GROUPS = 256, 288, 32, 4, 8
MOE_IDS = list(range(3, 61))


class MoeLoadBalancerConfigMirror:
    """The checks TensorRT-LLM runs on a load-balancer config (see the module docstring)."""

    FIELDS = ("num_slots", "initial_global_assignments", "layer_updates_per_iter")

    def __init__(self, **doc):
        unknown = set(doc) - set(self.FIELDS)
        if unknown:  # pydantic model: unknown keyword arguments are rejected
            raise TypeError(f"unexpected fields {sorted(unknown)}")
        self.num_slots = doc.get("num_slots")
        self.initial_global_assignments = doc.get("initial_global_assignments")
        self.layer_updates_per_iter = doc.get("layer_updates_per_iter", 0)
        if self.num_slots is not None and not isinstance(self.num_slots, int):
            raise TypeError("num_slots must be an int")
        if not isinstance(self.layer_updates_per_iter, int):
            raise TypeError("layer_updates_per_iter must be an int")
        if self.initial_global_assignments is not None:
            if not isinstance(self.initial_global_assignments, dict):
                raise TypeError("initial_global_assignments must be a dict")
            for key, row in self.initial_global_assignments.items():
                if not isinstance(key, int) or not isinstance(row, list):
                    raise TypeError("initial_global_assignments must map int -> list[int]")
                if not all(isinstance(v, int) for v in row):
                    raise TypeError(f"layer {key}: assignments must be ints")

    def setup(self, ep_rank: int, ep_size: int) -> None:
        self.ep_rank, self.ep_size = ep_rank, ep_size
        if self.num_slots is None:
            raise ValueError("`num_slots` cannot be None when calling setup().")
        if self.num_slots % ep_size != 0:
            raise ValueError(f"`num_slots` ({self.num_slots}) must be divisible by `ep_size`")

    @property
    def slot_start(self) -> int:
        return self.ep_rank * (self.num_slots // self.ep_size)

    def get_layer_initial_global_assignments(self, layer_idx: int) -> list[int] | None:
        if self.initial_global_assignments is None:
            return None
        if layer_idx not in self.initial_global_assignments:
            raise KeyError(f"layer_idx {layer_idx} not found in `initial_global_assignments`.")
        row = self.initial_global_assignments[layer_idx]
        if len(row) != self.num_slots:
            raise ValueError(f"Assignment length ({len(row)}) does not match `num_slots`")
        return row

    def moe_layer_init(self, layer_idx: int, num_experts: int) -> list[int]:
        """The MoE module's own checks on its layer's assignment."""
        row = self.get_layer_initial_global_assignments(layer_idx)
        assert isinstance(row, list)
        if not (len(row) == self.num_slots and self.num_slots >= num_experts
                and set(row) == set(range(num_experts))):
            raise AssertionError(f"layer {layer_idx}: assignment rejected by the MoE module")
        return row


def trtllm_loads(path: Path, ep_size: int, moe_layers: list[int], num_experts: int):
    """Load ``path`` exactly as TensorRT-LLM does and run every check for every rank."""
    with open(path) as handle:
        doc = yaml.safe_load(handle)
    config = MoeLoadBalancerConfigMirror(**doc)
    rows = {}
    for rank in range(ep_size):
        config.setup(ep_rank=rank, ep_size=ep_size)
        for layer in moe_layers:
            rows[layer] = config.moe_layer_init(layer, num_experts)
    return config, rows


def real_loads(name: str = "prefill_in1024.json") -> torch.Tensor:
    path = REAL / name
    if not path.is_file():
        pytest.skip(f"real DeepSeek-V3 loads not found at {path}"
                    " (set EPLB_REAL_DATA to the real-data folder)")
    return torch.tensor(json.loads(path.read_text())["logical_count"], dtype=torch.int64)[MOE_IDS]


@pytest.mark.parametrize("policy", ["auto", "global"])
def test_our_yaml_satisfies_moe_load_balancer_config(tmp_path, policy):
    placement = eplb.plan(real_loads(), REPLICAS, GPUS, NODES, GROUPS, policy=policy)
    placement.validate()
    path = formats.write_placement(placement, tmp_path / "lb.yaml", emit="trtllm",
                                   layer_ids=MOE_IDS)
    config, rows = trtllm_loads(path, GPUS, MOE_IDS, NUM_EXPERTS)
    assert config.num_slots == REPLICAS and config.layer_updates_per_iter == 0
    # TensorRT-LLM's rank r serves slots [r*S, (r+1)*S): the same slot order as eplb
    assert torch.equal(torch.tensor([rows[i] for i in MOE_IDS]), placement.phy2log)


def test_mirror_rejects_what_tensorrt_llm_rejects(tmp_path):
    placement = eplb.plan(real_loads()[:2], REPLICAS, GPUS)
    good = {"num_slots": REPLICAS, "layer_updates_per_iter": 0,
            "initial_global_assignments": dict(
                zip([3, 4], placement.phy2log.tolist(), strict=True))}
    trtllm_loads(_dump(tmp_path / "ok.yaml", good), GPUS, [3, 4], NUM_EXPERTS)
    bad = [
        ({**good, "comment": "x"}, TypeError),  # unknown field
        ({**good, "num_slots": 290}, ValueError),  # not divisible by ep_size 32
        ({**good, "initial_global_assignments": {3: good["initial_global_assignments"][3]}},
         KeyError),  # layer 4 missing
        ({**good, "initial_global_assignments": {3: [0] * REPLICAS, 4: [0] * REPLICAS}},
         AssertionError),  # experts without a slot
    ]
    for i, (doc, error) in enumerate(bad):
        with pytest.raises(error):
            trtllm_loads(_dump(tmp_path / f"bad{i}.yaml", doc), GPUS, [3, 4], NUM_EXPERTS)


def _dump(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_round_trip_stats_folder_plan_yaml(tmp_path):
    """TensorRT-LLM statistics folder -> ``eplb plan ... -o lb.yaml`` -> TensorRT-LLM checks."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    loads = real_loads("decode_in500out1500.json")
    stats = tmp_path / "expert_statistic"
    stats.mkdir()
    (stats / "meta_info.json").write_text(
        json.dumps({"num_experts": NUM_EXPERTS, "num_experts_per_token": 8})
    )
    # 4 ranks x 3 iterations, keys "{iter}_{layer}" -> int64 [E]; ranks sum to the load
    share = torch.tensor([0.4, 0.3, 0.2, 0.1])
    for rank in range(4):
        tensors = {
            f"{it}_{layer}": (loads[row] * share[rank] / 3).round().to(torch.int64)
            for it in range(3) for row, layer in enumerate(MOE_IDS)
        }
        safetensors_torch.save_file(tensors, str(stats / f"rank{rank}.safetensors"))
    out = tmp_path / "lb.yaml"
    assert cli_main(["plan", str(stats), "-r", str(REPLICAS), "-g", str(GPUS),
                     "--nodes", str(NODES), "--groups", str(GROUPS), "-o", str(out)]) == 0
    config, rows = trtllm_loads(out, GPUS, MOE_IDS, NUM_EXPERTS)
    assert sorted(config.initial_global_assignments) == MOE_IDS
    topo = eplb.Topology(REPLICAS, GPUS, NODES, GROUPS)
    served = eplb.Placement.from_phy2log(torch.tensor([rows[i] for i in MOE_IDS]), NUM_EXPERTS,
                                         topo, resolve_policy("auto", topo, NUM_EXPERTS))
    served.validate()


def test_yaml_problems_name_the_model_layer_not_the_row(tmp_path, capsys):
    """A YAML keyed 3..4 whose key 4 misses an expert, or whose key 3 stacks one on a GPU:
    eval names model layer 4 / 3, not 'layer 1' / 'layer 0' (its row indices)."""
    weight = torch.arange(1, 9, dtype=torch.float64).repeat(2, 1)
    rows = {3: [0, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2], 4: [*range(8), 0, 1, 2, 3]}
    out = _dump(tmp_path / "lb.yaml", {"num_slots": 12, "layer_updates_per_iter": 0,
                                       "initial_global_assignments": rows})
    torch.save(weight, tmp_path / "w.pt")
    assert cli_main(["eval", "--placement", str(out), str(tmp_path / "w.pt"), "-g", "4",
                     "--first-layer", "3", "--summary"]) == 0
    err = capsys.readouterr().err
    assert "model layer 3 (row 0) GPU 0 holds 2 replicas of expert 0" in err
    rows[4] = [0] * 12
    _dump(out, {"num_slots": 12, "layer_updates_per_iter": 0, "initial_global_assignments": rows})
    assert cli_main(["eval", "--placement", str(out), str(tmp_path / "w.pt"), "-g", "4",
                     "--first-layer", "3", "--summary"]) == 2
    assert "model layer 4 (row 1) expert 1 has 0 replicas" in capsys.readouterr().err


def test_multi_token_prediction_layers_are_written_when_asked(tmp_path, capsys):
    """TensorRT-LLM builds DeepSeek-V3's multi-token-prediction layer as layer 61 and looks
    it up like every MoE layer: a file of the statistics' layers 3..60 stops it at start-up
    (TensorRT-LLM pull request 13974). ``--mtp-layers 1`` writes it, spread evenly, in a
    file that eval and --previous still pair with the loads by layer."""
    gen = torch.Generator().manual_seed(5)
    loads = (torch.rand(len(MOE_IDS), NUM_EXPERTS, generator=gen) ** 4 * 1e4).round()
    torch.save(loads, tmp_path / "w.pt")
    cluster = ["-r", str(REPLICAS), "-g", str(GPUS), "--nodes", str(NODES), "--groups",
               str(GROUPS), "--first-layer", "3"]
    plain, mtp = tmp_path / "plain.yaml", tmp_path / "mtp.yaml"
    assert cli_main(["plan", str(tmp_path / "w.pt"), *cluster, "-o", str(plain)]) == 0
    with pytest.raises(KeyError, match="layer_idx 61 not found"):
        trtllm_loads(plain, GPUS, [*MOE_IDS, 61], NUM_EXPERTS)
    assert cli_main(["plan", str(tmp_path / "w.pt"), *cluster, "-o", str(mtp),
                     "--mtp-layers", "1"]) == 0
    assert "multi-token-prediction layer 61 spread evenly" in capsys.readouterr().out
    assert cli_main(["plan", str(tmp_path / "w.pt"), *cluster, "-o", str(mtp), "--force",
                     "--mtp-layers", "1", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["layer_ids"] == MOE_IDS and said["mtp_layer_ids"] == [61]
    config, rows = trtllm_loads(mtp, GPUS, [*MOE_IDS, 61], NUM_EXPERTS)
    assert sorted(config.initial_global_assignments) == [*MOE_IDS, 61]
    # the statistics' layers as planned without it; layer 61 an even spread that keeps
    # each expert group on one node, as the hierarchical plan's other rows
    assert yaml.safe_load(plain.read_text())["initial_global_assignments"] == {
        k: v for k, v in config.initial_global_assignments.items() if k != 61}
    counts = torch.bincount(torch.tensor(rows[61]), minlength=NUM_EXPERTS)
    assert int(counts.min()) == 1 and int(counts.max()) == 2
    topo = eplb.Topology(REPLICAS, GPUS, NODES, GROUPS)
    eplb.Placement.from_phy2log(torch.tensor([rows[61]]), NUM_EXPERTS, topo,
                                "hierarchical").validate()
    assert cli_main(["eval", "--placement", str(mtp), str(tmp_path / "w.pt"),
                     "--first-layer", "3", "--summary"]) == 0
    again = tmp_path / "again.yaml"
    assert cli_main(["plan", str(tmp_path / "w.pt"), *cluster, "-o", str(again),
                     "--previous", str(mtp), "--mtp-layers", "1"]) == 0
    assert yaml.safe_load(again.read_text())["initial_global_assignments"][61] == rows[61]
    capsys.readouterr()
    # other outputs place those layers themselves: refused, as a bad count is
    assert cli_main(["plan", str(tmp_path / "w.pt"), *cluster, "-o", str(tmp_path / "p.json"),
                     "--mtp-layers", "1"]) == 2
    assert "--mtp-layers applies to TensorRT-LLM output only" in capsys.readouterr().err
    assert cli_main(["plan", str(tmp_path / "w.pt"), *cluster, "-o", str(tmp_path / "n.yaml"),
                     "--mtp-layers", "-1"]) == 2
    assert "--mtp-layers must be in 0.." in capsys.readouterr().err


def test_previous_with_mtp_layers_replanned_without_them_is_warned(tmp_path, capsys):
    """A YAML written with --mtp-layers 1 re-planned with --previous but without the flag
    lost layer 61 without a word, and TensorRT-LLM then stops at start-up on it."""
    torch.save(torch.arange(1, 17, dtype=torch.float64).reshape(2, 8), tmp_path / "w.pt")
    cluster = [str(tmp_path / "w.pt"), "-r", "12", "-g", "4", "--first-layer", "59"]
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    assert cli_main(["plan", *cluster, "-o", str(old), "--mtp-layers", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["plan", *cluster, "-o", str(new), "--previous", str(old)]) == 0
    err = capsys.readouterr().err
    assert "holds model layer 61 after the loads' last, 60" in err
    assert "pass --mtp-layers 1" in err
    with pytest.raises(KeyError, match="layer_idx 61"):
        trtllm_loads(new, 4, [59, 60, 61], 8)
    assert cli_main(["plan", *cluster, "-o", str(new), "--previous", str(old), "--force",
                     "--mtp-layers", "1"]) == 0
    assert "--mtp-layers" not in capsys.readouterr().err
    trtllm_loads(new, 4, [59, 60, 61], 8)


def test_mtp_layers_follow_the_loads_last_layer_where_previous_lacks_it(tmp_path, capsys):
    """Loads of layers 58..60 whose last row routes no token, re-planned with --previous of
    a YAML of layers 58, 59 and the MTP layer 61: --previous leaves the idle row out, and
    the MTP layer was written as layer 60 (the kept rows' last + 1), with a warning that
    61 would be dropped, asking for --mtp-layers 2."""
    loads = torch.arange(1, 25, dtype=torch.float64).reshape(3, 8)
    loads[2] = 0
    (tmp_path / "w.json").write_text(json.dumps({"counts": loads.tolist(),
                                                 "layers": [58, 59, 60]}))
    (tmp_path / "w2.json").write_text(json.dumps({"counts": loads[:2].tolist(),
                                                  "layers": [58, 59]}))
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    cluster = ["-r", "12", "-g", "4"]
    assert cli_main(["plan", str(tmp_path / "w2.json"), *cluster, "-o", str(old),
                     "--mtp-layers", "1"]) == 0
    # the model's layer 60 dense, its MTP layer 61: the file a model of that shape has
    old.write_text(old.read_text().replace("\n  60: ", "\n  61: "))
    assert sorted(yaml.safe_load(old.read_text())["initial_global_assignments"]) == [
        58, 59, 61]
    capsys.readouterr()
    assert cli_main(["plan", str(tmp_path / "w.json"), *cluster, "-o", str(new),
                     "--previous", str(old), "--mtp-layers", "1", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["mtp_layer_ids"] == [61]
    assert "--mtp-layers" not in err, err
    written = yaml.safe_load(new.read_text())["initial_global_assignments"]
    assert 61 in written and 62 not in written


def test_an_mtp_file_from_loads_without_layer_ids_says_which_k_pairs_it(tmp_path, capsys):
    """plan --mtp-layers 1 on loads that name no layers writes rows 0, 1 and MTP layer 2;
    eval of the same loads, and --previous, then asked for '--first-layer K' without a
    word on which K (0 here): the refusal now names the file's layers, and K=0 pairs."""
    torch.save(torch.arange(1, 17, dtype=torch.float64).reshape(2, 8), tmp_path / "w.pt")
    old = tmp_path / "old.yaml"
    assert cli_main(["plan", str(tmp_path / "w.pt"), "-r", "12", "-g", "4", "-o", str(old),
                     "--mtp-layers", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["eval", "--placement", str(old), str(tmp_path / "w.pt"), "-g", "4",
                     "--summary"]) == 2
    err = capsys.readouterr().err
    assert "has 3 × 8 (it holds model layers 0..2); if the loads" in err, err
    assert "pass --first-layer K" in err
    assert cli_main(["eval", "--placement", str(old), str(tmp_path / "w.pt"), "-g", "4",
                     "--summary", "--first-layer", "0"]) == 0


def test_a_yaml_from_rows_that_skip_layers_names_the_layers_after_the_last(tmp_path, capsys):
    """New-user pass: Mixtral-8x7B's published counts name model layers 0, 7 and 15 of its
    32; the warning named only 1..6 and 8..14 as missing from the YAML, though TensorRT-LLM
    raises KeyError for 16..31 as well. The file cannot know the model's last layer, so the
    warning says that any layer after the last row is missing too."""
    counts = [[float(10 + 3 * row + expert) for expert in range(8)] for row in range(3)]
    loads = tmp_path / "counts.json"
    loads.write_text(json.dumps({"counts": counts, "layers": [0, 7, 15]}))
    out = tmp_path / "lb.yaml"
    assert cli_main(["plan", str(loads), "-r", "16", "-g", "8", "-o", str(out)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "model layers 1..6, 8..14" in err
    assert "nor for any model layer after 15: TensorRT-LLM raises KeyError" in err
    assert sorted(yaml.safe_load(out.read_text())["initial_global_assignments"]) == [0, 7, 15]
