"""Write an SGLang ``--init-expert-location`` file from loads, with the Python API.

    python examples/sglang/plan_for_sglang.py LOADS OUT.json

LOADS is anything ``eplb.formats.read_loads`` reads, e.g. SGLang's recorder dump
(``expert_distribution_recorder_*.pt``) or a ``{"logical_count": [L][E]}`` JSON. The
topology below is DeepSeek-V3 at EP32: 288 slots, 32 GPUs, 4 nodes, 8 expert groups.
"""

import sys
from pathlib import Path

import eplb
from eplb.core import realised_gpu_loads
from eplb.formats import FormatError, read_loads, write_placement

if len(sys.argv) != 3:
    sys.exit("usage: python examples/sglang/plan_for_sglang.py LOADS OUT.json")
loads_path, out_path = sys.argv[1], sys.argv[2]
if Path(out_path).exists():  # checked before planning; write_placement refuses it too
    sys.exit(f"{out_path} exists: remove it or name another file")
if not out_path.endswith((".json", ".pt")):  # SGLang parses any other name as inline JSON
    sys.exit(f"{out_path}: SGLang reads --init-expert-location from a file named *.json "
             "(JSON) or *.pt (torch.load); name the output so")
try:
    trace = read_loads(loads_path)
except (OSError, FormatError) as err:  # a missing file; a malformed one (named in err)
    sys.exit(f"error: {err}")
if not trace.counts.any():
    sys.exit(f"{loads_path}: every layer's loads are zero (no tokens were routed); "
             "record loads under traffic")
trace = trace.drop_empty_layers()  # DeepSeek's dense layers 0-2 are empty
weight = trace.counts.sum(0)  # [L, E]: sum of the recorded steps
# SGLang's static dispatch (--ep-dispatch-algorithm static, as with DeepEP) sends a token
# to the nearest replica: plan for that rule (for its dynamic dispatch, an even split,
# leave out policy= and dispatch=)
try:
    placement = eplb.plan(weight, 288, 32, num_nodes=4, num_groups=8, policy="global",
                          dispatch="nearest")
except ValueError as err:  # e.g. more experts than the 288 slots of this topology
    sys.exit(f"{loads_path}: {err}")
placement.validate()
# SGLang wants a row for every model layer: dense layers get its trivial map
write_placement(placement, out_path, emit="sglang", layer_ids=trace.layer_ids)
served = realised_gpu_loads(weight, placement.phy2log, 32, 4)  # [L, P] as SGLang sends tokens
balance = float(served.mean(1).sum() / served.amax(1).sum())
print(f"balancedness under SGLang's static dispatch {balance:.4f}; wrote {out_path}")
print(f"start SGLang with: --ep-dispatch-algorithm static "
      f"--ep-num-redundant-experts {288 - weight.shape[1]} --init-expert-location {out_path}")
