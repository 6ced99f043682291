"""eplb on the real loads of models other than DeepSeek-V3: in sample, across domains, time.

The other real expert-load data in ``../shared/data/real`` (never copied here; a model
whose files are absent is skipped, visibly), each read as a user would, with
:func:`eplb.formats.read_loads` where the file is one eplb reads:

- gpt-oss-20b (24 layers × 32 experts): per-subset decode-token selection frequencies,
  weighted by each subset's think tokens (``sample_count × mean_think_tokens``) and summed
  per dataset (mmlu_test, gpqa_main, sorry_bench_base, …): one load window per dataset;
- OLMoE (layers 0, 7, 15 × 64 experts) and Mixtral (× 8): per-domain routing counts;
- Qwen3-30B-A3B (48 × 128): three prefill batches of top-8 ids;
- DeepSeek-V2-Lite ESFT (26 × 64): four tasks' top-6 ids.

Per model and shape (``R`` slots on ``P`` GPUs, one node; the first shape of each with
no spare slot, ``R = E``, as vLLM runs without redundant experts): eplb's default plan and
DeepSeek's greedy as vLLM 0.33 ships it (``DefaultEplbPolicy.rebalance_experts(w, R, 1, 1,
P, None)``, the released wheel's code: ``scripts/fetch_engines.py``), planned on each
window and scored on it
(**in sample**, with the ceiling: Σ mean / Σ lower bound, which no plan exceeds) and on
the next window of the list (**across windows**, out of sample: a plan made on one
domain serving another, the harder case these data allow), with the placement no
rebalancing gives (``slot i → expert i % E``) beside it; and the median planning time
(the greedy's: its call alone, as vLLM makes it).

    python benchmarks/bench_real_models.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import numpy as np
import torch
from _harness import REAL_DATA, REAL_DATA_HINT, markdown_table, median_ms, start
from engines import FETCH_HINT, engine_root, vllm_sources

import eplb
from eplb.core.bounds import balancedness_ceiling
from eplb.formats import read_loads

GPTOSS = REAL_DATA / "gptoss20b_domain_expert_freq"
OLMOE = REAL_DATA / "olmoe_mixtral_routing_counts" / "expert_counts.json"
QWEN = REAL_DATA / "qwen3_30b_a3b_sharegpt_prefill_vllm" / "qwen3_30b_sharegpt_prefill_topk_ids.npz"
ESFT = REAL_DATA / "esft_deepseek_v2_lite_routing" / "esft_topk_ids.npz"

#: per model: (R, P) shapes, one node (slots per GPU 2–17, as the engines run these models);
#: the first of each has no spare slot (R = E: vLLM's default of no redundant experts,
#: where the packing is the whole plan)
SHAPES = {
    "gpt-oss-20b": ((32, 4), (40, 8), (72, 8), (136, 8), (48, 16), (64, 32)),
    "OLMoE": ((64, 8), (72, 8), (80, 16), (128, 64)),
    "Mixtral": ((8, 2), (12, 4), (24, 4), (24, 8)),
    "Qwen3-30B-A3B": ((128, 8), (144, 16), (160, 32), (256, 128)),
    "DeepSeek-V2-Lite (ESFT)": ((64, 8), (72, 8), (80, 16), (128, 64)),
}


def gptoss_windows() -> dict[str, torch.Tensor]:
    """One ``[24, 32]`` load window per dataset: token-weighted selection frequencies."""
    freq = np.load(GPTOSS / "gptoss20b_domain_freq.npz")["think_count_frequency"]
    index = json.loads((GPTOSS / "gptoss20b_domain_index.json").read_text())
    out: dict[str, np.ndarray] = {}
    for row, subset in enumerate(index):
        tokens = subset["sample_count"] * (subset["mean_think_tokens"] or 0.0)
        if tokens > 0:
            out[subset["dataset"]] = out.get(subset["dataset"], 0.0) + freq[row] * tokens
    return {name: torch.from_numpy(np.asarray(w, np.float64)) for name, w in sorted(out.items())}


def counts_windows(prefix: str) -> dict[str, torch.Tensor]:
    """OLMoE's or Mixtral's per-domain counts, read as a user would (``key=``)."""
    keys = [k for k in json.loads(OLMOE.read_text()) if k.startswith(prefix)]
    return {key.rsplit("/", 1)[1]: read_loads(OLMOE, key=key).total() for key in keys}


def topk_windows(path, keys: list[str]) -> dict[str, torch.Tensor]:
    return {key.removesuffix("_topk_ids"): read_loads(path, key=key).total() for key in keys}


MODELS: dict[str, tuple[object, Callable[[], dict[str, torch.Tensor]]]] = {
    "gpt-oss-20b": (GPTOSS, gptoss_windows),
    "OLMoE": (OLMOE, lambda: counts_windows("olmoe/expert_counts/")),
    "Mixtral": (OLMOE, lambda: counts_windows("mistral/expert_counts/")),
    "Qwen3-30B-A3B": (QWEN, lambda: topk_windows(QWEN, ["ep_states_topk_ids",
                                                        "token_distri_8_topk_ids",
                                                        "token_distri_16_topk_ids"])),
    "DeepSeek-V2-Lite (ESFT)": (ESFT, lambda: topk_windows(ESFT, [
        "intent_topk_ids", "law_topk_ids", "summary_topk_ids", "translation_topk_ids"])),
}


def span(values: list[float]) -> str:
    return f"{min(values):.4f}–{max(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def measure(greedy_policy, repeats: int) -> list[list[object]]:
    """The table's rows; ``greedy_policy``: vLLM's ``DefaultEplbPolicy`` class."""

    def greedy_call(w: torch.Tensor, replicas: int, gpus: int) -> torch.Tensor:
        return greedy_policy.rebalance_experts(w, replicas, 1, 1, gpus, None)

    def plan_greedy(w: torch.Tensor, replicas: int, gpus: int) -> eplb.Placement:
        return eplb.Placement.from_phy2log(greedy_call(w, replicas, gpus), w.shape[1],
                                           eplb.Topology(replicas, gpus))

    rows = []
    for model, (path, read) in MODELS.items():
        if not path.exists():
            print(f"SKIPPED {model}: {path} not found {REAL_DATA_HINT}")
            continue
        windows = read()
        names, loads = list(windows), list(windows.values())
        for replicas, gpus in SHAPES[model]:
            experts = loads[0].shape[1]
            static = torch.arange(replicas).remainder(experts).repeat(loads[0].shape[0], 1)
            none = eplb.Placement.from_phy2log(static, experts, eplb.Topology(replicas, gpus))
            scores: dict[str, list[float]] = {k: [] for k in (
                "ceiling", "eplb", "greedy", "ratio", "next eplb", "next greedy", "next none")}
            for i, weight in enumerate(loads):
                following = loads[(i + 1) % len(loads)]
                ours = eplb.plan(weight, replicas, gpus)
                theirs = plan_greedy(weight, replicas, gpus)
                ceiling = balancedness_ceiling(weight, replicas, gpus)
                scores["ceiling"].append(ceiling)
                scores["eplb"].append(ours.balancedness(weight))
                scores["greedy"].append(theirs.balancedness(weight))
                scores["ratio"].append(ours.balancedness(weight) / ceiling)
                scores["next eplb"].append(ours.balancedness(following))
                scores["next greedy"].append(theirs.balancedness(following))
                scores["next none"].append(none.balancedness(following))
            weight = loads[0]
            ms_ours = median_ms(lambda w=weight, r=replicas, g=gpus: eplb.plan(w, r, g),
                                repeats)
            ms_greedy = median_ms(lambda w=weight, r=replicas, g=gpus: greedy_call(w, r, g),
                                  repeats)
            mean = statistics.mean
            rows.append([
                model, f"{loads[0].shape[0]}×{experts}", f"R={replicas} P={gpus} "
                f"(S={replicas // gpus})", len(loads), span(scores["ceiling"]),
                span(scores["eplb"]), f"{mean(scores['ratio']):.4f} ({min(scores['ratio']):.4f})",
                span(scores["greedy"]), f"{mean(scores['next eplb']):.4f}",
                f"{mean(scores['next greedy']):.4f}", f"{mean(scores['next none']):.4f}",
                f"{ms_ours:.1f}", f"{ms_greedy:.1f}"])
        print(f"{model}: windows {', '.join(names)}")
    return rows



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (default 5)")
    args = parser.parse_args(argv)
    root = engine_root("vllm")
    if root is None:
        sys.exit(f"vLLM 0.33.0 (the greedy): {FETCH_HINT}")
    print(start("bench_real_models"))
    with vllm_sources(root) as vllm:
        rows = measure(vllm.DefaultEplbPolicy, args.repeats)
    print()
    print(markdown_table(
        ["model", "layers × experts", "shape", "windows", "ceiling", "eplb in sample",
         "eplb / ceiling: mean (worst)", "greedy in sample", "next window: eplb",
         "greedy", "no rebalancing", "eplb ms", "greedy ms"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
