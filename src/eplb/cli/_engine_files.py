"""What ``eplb plan`` checks and says about the engine file it writes: SGLang's
``--init-expert-location`` file (a row per model layer) and TensorRT-LLM's YAML (a key per
MoE layer), each read by an engine that fails late, or serves badly, on what it lacks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from eplb.cli._common import CliError
from eplb.cli._inputs import warn
from eplb.core.messages import integer_runs
from eplb.core.trace import MAX_MODEL_LAYERS, LoadTrace


def check_engine_output(args: argparse.Namespace, emit: str, out: Path) -> None:
    """Refuse the output name and flags the format ``emit`` cannot take, before any
    reading."""
    # SGLang tests the name with endswith (".pt" itself passes), case-sensitively
    if emit == "sglang" and not out.name.endswith((".json", ".pt")):
        raise CliError(f"SGLang reads --init-expert-location from a .json or .pt file (lower "
                       f"case); name OUT *.json or *.pt (*.sglang.json or *.sglang.pt imply "
                       f"--emit sglang), not {out.name!r}")
    if args.num_model_layers is not None and emit != "sglang":
        raise CliError("--num-model-layers applies to SGLang output only")
    if args.mtp_layers and emit != "trtllm":
        # (SGLang 0.5.23 gives its draft layers no expert placement: is_draft in
        # ExpertLocationDispatchInfo.init_new)
        raise CliError("--mtp-layers applies to TensorRT-LLM output only: TensorRT-LLM looks "
                       "its multi-token-prediction layers up in the file, SGLang places no "
                       "draft layer's experts")


def engine_rows(args: argparse.Namespace, emit: str, trace: LoadTrace, layer_ids: list[int],
                loads: str) -> int | None:
    """The model's layer count for an SGLang file (``None`` for other formats), after
    warning about the model layers the file will lack or get wrong, and about a dispatch
    rule the engine does not use. ``layer_ids``: the model layer of each row of the loads
    ``loads`` (their names, for messages)."""
    model_layers = _sglang_layers(trace, layer_ids, args, loads) if emit == "sglang" else None
    if model_layers is not None and model_layers <= MAX_MODEL_LAYERS:  # larger: refused below
        # rows the loads lack get SGLang's trivial map; before the first row that is the
        # dense layers (DeepSeek-V3's 0..2), after it MoE layers as likely (OLMoE's
        # published counts name layers 0, 7 and 15 of 16)
        unplanned = sorted(set(range(min(layer_ids), model_layers)) - set(layer_ids))
        if unplanned:
            warn(f"{loads} has no loads for model layers {integer_runs(unplanned)} (its rows "
                 f"are layers {integer_runs(sorted(layer_ids))}); the SGLang file gives them the "
                 "trivial map (slot s -> expert s % E), which balances nothing where they "
                 "are MoE layers: plan on loads of every MoE layer")
    gaps = sorted(set(range(min(layer_ids), max(layer_ids) + 1)) - set(layer_ids))
    if emit == "trtllm" and gaps:
        # TensorRT-LLM looks every MoE layer up in initial_global_assignments and raises
        # KeyError at start-up for one it lacks (OLMoE's published counts name layers 0, 7
        # and 15 of 16); models that interleave dense layers lack them rightly. Rows that
        # skip layers may well stop before the model's last (Mixtral's counts of the same
        # file name 0, 7, 15 of 32 layers): that is said too (new-user pass)
        last = max(layer_ids)
        warn(f"{loads} has no loads for model layers {integer_runs(gaps)} (its rows are "
             f"layers {integer_runs(sorted(layer_ids))}), so the TensorRT-LLM file has no "
             f"assignments for them, nor for any model layer after {last}: TensorRT-LLM "
             "raises KeyError at start-up for any of them that is a MoE layer; plan on loads "
             "of every MoE layer")
    if emit == "trtllm" and not trace.meta.get("model_layer_ids") and args.first_layer is None:
        warn(f"{loads} does not name its model layers, so the TensorRT-LLM keys are rows "
             f"{layer_ids[0]}..{layer_ids[-1]}; pass --first-layer K when the first row is "
             "model layer K (3 for DeepSeek-V3)")

    if emit == "sglang" and args.nodes > 1 and args.dispatch != "nearest":
        warn("SGLang's --ep-dispatch-algorithm static (with DeepEP) sends a token to the "
             "nearest replica, not evenly over replicas: for it, plan with --dispatch nearest "
             "(--policy global or locality); this plan is for an even split (SGLang's "
             "dynamic dispatch)")
    if emit == "trtllm" and args.dispatch == "nearest":
        # moeComputeRouteKernel deals an expert's tokens round-robin over its replicas
        warn("TensorRT-LLM splits an expert's tokens round-robin over its replicas, not to "
             "the nearest one: this plan is for SGLang's nearest dispatch; for TensorRT-LLM "
             "plan with the default --dispatch even")
    return model_layers


def warn_idle_engine_rows(emit: str, trace: LoadTrace, weight: torch.Tensor,
                          layer_ids: list[int], loads: str) -> None:
    """Say where a TensorRT-LLM file gets keys for rows without load (``weight [L, E]``,
    rows the model layers ``layer_ids``), as an SGLang dump's dense layers."""
    if emit == "trtllm" and trace.meta.get("model_layer_ids"):
        totals = weight.sum(1).tolist()
        idle = [layer for layer, total in zip(layer_ids, totals, strict=True) if total <= 0]
        if idle:
            # SGLang dumps carry a row for every model layer; the dense ones are all zero.
            # Their keys are written as planned (an even placement); say so, not guess
            warn(f"{loads}: layers {integer_runs(idle)} saw no tokens (the dense layers of an "
                 "SGLang dump?); the TensorRT-LLM YAML has keys for them too, delete those "
                 "if your model's MoE layers start later")


def _sglang_layers(trace: LoadTrace, layer_ids: list[int], args: argparse.Namespace,
                   loads: str) -> int:
    """The model's layer count for an SGLang file (one row per model layer), or an error."""
    if args.num_model_layers is not None:
        if args.num_model_layers <= max(layer_ids):
            raise CliError(
                f"--num-model-layers {args.num_model_layers} is too small: the rows are model "
                f"layers {integer_runs(layer_ids)}"
            )
        if (not trace.meta.get("model_layer_ids") and args.first_layer is None
                and args.num_model_layers != len(layer_ids)):
            raise CliError(
                f"{loads} holds {len(layer_ids)} rows for a model of {args.num_model_layers} "
                "layers; say which model layer the first row is with --first-layer K (3 for "
                "DeepSeek-V3's MoE layers)"
            )
        return args.num_model_layers
    if trace.meta.get("model_layer_ids") or args.first_layer is not None:
        return max(layer_ids) + 1
    raise CliError(
        f"SGLang needs a row for every model layer, but {loads} holds {len(layer_ids)} rows "
        "without model layer ids; say which model layer the first row is with --first-layer "
        "K (3 for DeepSeek-V3's MoE layers, 0 where every layer is MoE, as in Qwen3; the "
        "file then covers the model up to its last row), and give the model's layer count "
        "with --num-model-layers N (61 for DeepSeek-V3) where it has layers after the last "
        "row"
    )
