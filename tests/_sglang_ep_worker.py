"""One rank of SGLang 0.5.23's runtime expert rebalancing, on CPU, for
``test_engines_sglang_multiproc``.

Run as ``python tests/_sglang_ep_worker.py RANK WORLD WORKDIR SCENARIO`` with
``EPLB_SGLANG_ROOT`` naming the fetched SGLang files; the test starts WORLD of them per
scenario. They join a gloo process group (``file://WORKDIR/store-SCENARIO``), load
SGLang's released EPLB package with the stubs of ``test_engines_sglang_runtime`` (its
docstring lists them: nothing of the rebalancing chain), run SGLang's own plugin loader
(``SGLANG_EPLB_POLICY=eplb``) and then SGLang's ``EPLBManager.rebalance`` three or four times on
the same drifting counts (SGLang all-reduces them before the call, so every rank sees the
same): the first with no placement in force (as at start-up), the next two from the one
SGLang installed. Scenarios:

- ``agree``: at the second rebalance rank 1's planner fails (``MemoryError``); a fourth
  rebalance fails on every rank (SGLang's own algorithm must then answer everywhere);
- ``half``: rank 3 runs without the switch (SGLang's own algorithm), as a node started
  with plain ``sglang.launch_server`` would.

Each rank writes ``WORKDIR/SCENARIO-RANK.json``: per rebalance the digest of the map
SGLang installed (or the error it raised), and the agreement's round count.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import types
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_engines_sglang_runtime import (
    _model_class,
    make_settings,
    rebalance,
    sglang_runtime,
)

from eplb.integrations import agreement as agreement_module
from eplb.integrations import sglang as plugin

LAYERS, EXPERTS, REDUNDANT = 4, 48, 16


def counts_at(step: int) -> torch.Tensor:
    """``[T=2, L, E]`` int32 counts of rebalance ``step`` (the same on every rank)."""
    gen = torch.Generator().manual_seed(11)
    base = torch.rand(2, LAYERS, EXPERTS, generator=gen, dtype=torch.float64) ** 3 * 900
    for _ in range(step):
        base = base * torch.exp(0.3 * torch.randn(base.shape, generator=gen,
                                                  dtype=torch.float64))
    return base.round().to(torch.int32)


def main() -> None:
    rank, world, workdir, scenario = (int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]),
                                      sys.argv[4])
    if scenario == "half" and rank == world - 1:
        os.environ.pop(plugin.ENV_VAR, None)  # this node never got the switch
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store-{scenario}",
                            rank=rank, world_size=world)
    report: dict = {"rank": rank, "steps": []}
    settings = make_settings(nnodes=1, ep_size=world, redundant=REDUNDANT)
    settings.parallel.tp_rank = rank
    real_plan = plugin.eplb_rebalance
    try:
        with sglang_runtime(Path(os.environ["EPLB_SGLANG_ROOT"]), settings) as sg:
            sg.plugins.load_plugins()  # SGLang's own loader: eplb's entry point
            report["hooked"] = getattr(sg.algorithms.rebalance_experts, "__wrapped__",
                                       None) is not None
            model_config = types.SimpleNamespace(
                hf_config=None, model_class=_model_class(LAYERS, EXPERTS, None,
                                                         sg.expert_location))
            for step in range(4 if scenario == "agree" else 3):
                if scenario == "agree" and ((rank == 1 and step == 1) or step == 3):
                    def fail(*args, step=step, **kwargs):
                        raise MemoryError(f"rank {rank} out of memory at rebalance {step}")

                    plugin.eplb_rebalance = fail
                else:
                    plugin.eplb_rebalance = real_plan
                try:
                    metadata = rebalance(sg, model_config, counts_at(step), LAYERS).installed[0][0]
                except Exception as exc:
                    report["steps"].append({"error": f"{type(exc).__name__}: {exc}"})
                    break
                phy2log = metadata.physical_to_logical_map_cpu
                report["steps"].append({"digest": agreement_module.plan_digest(phy2log),
                                        "map": phy2log.tolist()})
                # as SGLang installs it: the first map set, later ones copied in by layer
                current = sg.expert_location.get_global_expert_location_metadata()
                if current is None:
                    sg.expert_location.set_global_expert_location_metadata(metadata)
                else:
                    current.update(metadata, update_layer_ids=list(range(LAYERS)))
        report["rounds"] = plugin._WORLD[0][1].round if plugin._WORLD else 0
    except Exception:
        report["error"] = traceback.format_exc()
    (workdir / f"{scenario}-{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
