"""Per-token routing traces (top-k expert ids) to per-step expert counts."""

from __future__ import annotations

from pathlib import Path

import torch

from eplb.formats.errors import FormatError

#: Expert ids at or above this are refused: no MoE model has this many experts, and a
#: stray huge id (a corrupt file, or a token id array) would make the per-expert count
#: tensor absurdly large.
MAX_EXPERTS = 1 << 16
#: At most this many counts (2 GiB as float64) from one top-k file: a small file of ids
#: cut into one-token steps must not fill the host's memory.
MAX_COUNT_CELLS = 1 << 28


def topk_to_counts(
    segments: list[tuple[str, torch.Tensor]],
    path: Path,
    num_experts: int | None = None,
    tokens_per_step: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Count top-k ids into ``(counts [T, L, E] float64, meta)``.

    Args:
        segments: ``(name, ids [tokens, L, k])`` arrays in order (e.g. one per batch or
            task); ids ``< 0`` are padding and are not counted.
        num_experts: ``E``; inferred as the largest id + 1 when ``None``.
        tokens_per_step: window size. ``None`` makes every segment one step (a whole
            batch is what one engine iteration sees); otherwise each segment is cut into
            windows of that many consecutive tokens, the last window possibly shorter.
            Windows never straddle two segments.

    ``meta`` records ``segments`` (name, first step, steps), ``step_tokens`` [T] and ``top_k``.
    """
    if tokens_per_step is not None and (
        isinstance(tokens_per_step, bool)
        or not isinstance(tokens_per_step, int)
        or tokens_per_step < 1
    ):
        raise ValueError(
            "tokens_per_step (CLI: --tokens-per-step) must be a positive integer or None, got "
            f"{tokens_per_step!r}"
        )
    if not segments:
        raise FormatError(path, "expected at least one top-k id array, found none")
    shape = None
    largest = -1
    for name, ids in segments:
        if ids.dim() != 3 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise FormatError(
                path,
                f"top-k ids {name!r} must be an integer array [tokens, layers, k]; found "
                f"{ids.dtype} with shape {tuple(ids.shape)}",
            )
        if shape is None:
            shape = ids.shape[1:]
        elif ids.shape[1:] != shape:
            raise FormatError(
                path,
                f"top-k ids {name!r} has [layers, k] = {tuple(ids.shape[1:])}, but "
                f"{segments[0][0]!r} has {tuple(shape)}",
            )
        if ids.numel():
            largest = max(largest, int(ids.max()))
            if largest >= MAX_EXPERTS:
                raise FormatError(
                    path,
                    f"top-k ids {name!r} hold expert id {largest}; expert ids must be below "
                    f"{MAX_EXPERTS} (is this really an array of expert ids?)",
                )
    num_layers, top_k = shape
    from_ids = num_experts is None
    if num_experts is None:
        if largest < 0:
            raise FormatError(
                path,
                "top-k ids hold no expert id (all padding); give the expert count with "
                "num_experts= (CLI: --num-experts)",
            )
        num_experts = largest + 1
    elif (isinstance(num_experts, bool) or not isinstance(num_experts, int)
          or not 1 <= num_experts <= MAX_EXPERTS):
        raise ValueError(f"num_experts must be an integer in 1..{MAX_EXPERTS}, got {num_experts!r}")
    elif largest >= num_experts:
        raise FormatError(
            path,
            f"top-k ids reach expert {largest}, but the expert count is {num_experts} "
            "(num_experts= / --num-experts)",
        )
    total_steps = sum(
        max(-(-ids.shape[0] // (tokens_per_step or max(ids.shape[0], 1))), 1)
        for _, ids in segments
    )
    cells = total_steps * num_layers * num_experts
    if cells > MAX_COUNT_CELLS:
        raise FormatError(
            path,
            f"counting these ids would make {total_steps} steps x {num_layers} layers x "
            f"{num_experts} experts = {cells:,} float64 counts ({cells * 8 / 2**30:.1f} GiB); "
            "use a larger tokens_per_step (CLI: --tokens-per-step)",
        )

    # the counts are written in place, segment by segment: a list of per-segment tensors
    # joined at the end held the counts twice, plus each segment's int64 bincount (an
    # 800 kB file of 3,000 one-token arrays peaked at 4.1 GB; files attacker pass)
    out = torch.zeros((total_steps, num_layers, num_experts), dtype=torch.float64)
    step_tokens: list[int] = []
    seg_meta = []
    for name, ids in segments:
        if ids.numel() and ids.shape[2] > 1:
            # a router's top-k never names an expert twice: counted, it would be two tokens
            # (the same file given as a routing trace is refused; attacker pass). -1 is
            # padding and may repeat
            ordered = ids.sort(2).values
            twice = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(2)
            if bool(twice.any()):
                token, layer = (int(x) for x in twice.nonzero()[0])
                raise FormatError(
                    path, f"top-k ids {name!r}: token {token} names an expert twice in layer "
                          f"{layer} (top-k {ids[token, layer].tolist()}); a top-k row holds "
                          "distinct experts (-1 padding aside)")
        tokens = ids.shape[0]
        window = tokens if tokens_per_step is None else tokens_per_step
        num_windows = max(-(-tokens // max(window, 1)), 1)
        seg_meta.append({"name": name, "first_step": len(step_tokens), "steps": num_windows})
        for w in range(num_windows):
            step_tokens.append(min(window, tokens - w * window) if tokens else 0)
        # one bincount per segment: flat index (window, layer, expert)
        ids64 = ids.to(torch.int64)
        live = ids64 >= 0
        win = (torch.arange(tokens) // max(window, 1))[:, None, None]
        layer = torch.arange(num_layers)[None, :, None]
        flat = (win * num_layers + layer) * num_experts + ids64.clamp(min=0)
        first = len(step_tokens) - num_windows
        out[first:first + num_windows] = torch.bincount(
            flat[live], minlength=num_windows * num_layers * num_experts
        ).view(num_windows, num_layers, num_experts)
    meta = {
        "top_k": int(top_k),
        "segments": seg_meta,
        "step_tokens": step_tokens,
        "tokens_per_step": tokens_per_step,
        "num_experts_from_ids": from_ids,  # the largest id + 1: the file does not say
    }
    return out, meta


def topk_steps(
    segments: list[tuple[str, torch.Tensor]], tokens_per_step: int | None = None
) -> list[torch.Tensor]:
    """The ids of every step :func:`topk_to_counts` counts, ``[tokens, L, k]`` each, in
    order: each segment whole, or cut into windows of ``tokens_per_step`` consecutive
    tokens (the last possibly shorter; an empty segment one empty step), so step ``t``'s
    ids count to step ``t``'s counts."""
    steps = []
    for _, ids in segments:
        tokens = ids.shape[0]
        window = tokens if tokens_per_step is None else tokens_per_step
        for w in range(max(-(-tokens // max(window, 1)), 1)):
            steps.append(ids[w * window:(w + 1) * window])
    return steps

