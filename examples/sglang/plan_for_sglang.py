"""Write an SGLang ``--init-expert-location`` file from loads, with the Python API.

    python examples/sglang/plan_for_sglang.py LOADS OUT.json

LOADS is anything ``eplb.formats.read_loads`` reads, e.g. SGLang's recorder dump
(``expert_distribution_recorder_*.pt``) or a ``{"logical_count": [L][E]}`` JSON. The
topology below is DeepSeek-V3 at EP32: 288 slots, 32 GPUs, 4 nodes, 8 expert groups.
"""

import sys

import eplb
from eplb.formats import read_loads, write_placement

loads_path, out_path = sys.argv[1], sys.argv[2]
trace = read_loads(loads_path).drop_empty_layers()  # DeepSeek's dense layers 0-2 are empty
weight = trace.counts.sum(0)  # [L, E]: sum of the recorded steps
placement = eplb.plan(weight, 288, 32, num_nodes=4, num_groups=8)
placement.validate()
# SGLang wants a row for every model layer: dense layers get its trivial map
write_placement(placement, out_path, emit="sglang", layer_ids=trace.layer_ids)
print(f"balancedness {placement.balancedness(weight):.4f}; wrote {out_path}")
print(f"start SGLang with: --ep-num-redundant-experts 32 --init-expert-location {out_path}")
