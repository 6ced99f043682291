"""Frequencies read as they are, or weighted by tokens: what it costs a gpt-oss-20b plan.

gpt-oss-20b's real data (``../shared/data/real/gptoss20b_domain_expert_freq``, never
copied here; skipped, visibly, where absent) hold per-subset expert *selection
frequencies* (each subset's rows sum to about top-4), for think and answer tokens, with
each subset's ``sample_count``, ``mean_think_tokens`` and ``mean_answer_tokens``. eplb
reads frequency arrays as they are (``--key think_count_frequency,answer_count_frequency``
sums them unweighted: a subset of 10 samples counts as much as one of 3,000); the README
says to weight them by the tokens first. This scores both plans on the token-weighted
loads (think frequencies × sample_count × mean_think_tokens, plus the same for answers):
the plan of the unweighted sum, as the CLI reads the file, and the plan of the weighted
loads, each eplb's default (``eplb.plan``) at ``R`` slots on ``P`` GPUs, one node.

    python benchmarks/bench_weighting.py
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from _harness import REAL_DATA, REAL_DATA_HINT, markdown_table, start

import eplb
from eplb.core.bounds import balancedness_ceiling
from eplb.formats import read_loads

GPTOSS = REAL_DATA / "gptoss20b_domain_expert_freq"
#: (R, P): the shapes of bench_real_models.py with spare slots
SHAPES = ((40, 8), (72, 8), (136, 8), (48, 16), (64, 32))


def weighted_loads(think_only: bool = False) -> torch.Tensor:
    """``[L, E]`` token-weighted loads: each subset's frequencies times its tokens (the
    think frequencies alone with ``think_only``, as the README's one-liner weights them)."""
    arrays = np.load(GPTOSS / "gptoss20b_domain_freq.npz")
    index = json.loads((GPTOSS / "gptoss20b_domain_index.json").read_text())
    samples = np.array([entry["sample_count"] for entry in index], float)
    think = samples * np.array([entry["mean_think_tokens"] or 0 for entry in index], float)
    answer = samples * np.array([entry["mean_answer_tokens"] or 0 for entry in index], float)
    loads = (arrays["think_count_frequency"] * think[:, None, None]).sum(0)
    if not think_only:
        loads = loads + (arrays["answer_count_frequency"] * answer[:, None, None]).sum(0)
    return torch.from_numpy(loads.astype(np.float64))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--think-only", action="store_true",
                        help="the think frequencies alone (key think_count_frequency), as the "
                             "README's one-liner weights them")
    args = parser.parse_args(argv)
    print(start("bench_weighting"))
    if not GPTOSS.is_dir():
        print(f"skipped: gpt-oss-20b frequencies not found at {GPTOSS} {REAL_DATA_HINT}")
        return 0
    # as `eplb plan FILE --key think_count_frequency,answer_count_frequency` reads it
    keys = ["think_count_frequency"] + ([] if args.think_only else ["answer_count_frequency"])
    unweighted = read_loads(GPTOSS / "gptoss20b_domain_freq.npz", key=keys).total()
    weighted = weighted_loads(args.think_only)
    rows = []
    for replicas, gpus in SHAPES:
        scores = [eplb.plan(planned, replicas, gpus).balancedness(weighted)
                  for planned in (unweighted, weighted)]
        ceiling = balancedness_ceiling(weighted, replicas, gpus)
        rows.append([f"R={replicas} P={gpus}", f"{scores[0]:.4f}", f"{scores[1]:.4f}",
                     f"{ceiling:.4f}"])
    what = "think frequencies alone" if args.think_only else "think and answer frequencies"
    print(f"gpt-oss-20b (24 layers × 32 experts), {what}, balancedness on the "
          "token-weighted loads:\n")
    print(markdown_table(["shape", "plan of the unweighted frequencies",
                          "plan of the weighted loads", "ceiling"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
