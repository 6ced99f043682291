"""Picture of the balance vs cross-node traffic trade-off (``benchmarks/bench_dispatch.py``).

matplotlib is optional (:data:`eplb.tools.report.INSTALL_HINT`), imported lazily with the Agg
backend as in :mod:`eplb.tools.report`; :func:`plot_tradeoff` raises ``ImportError`` naming the
extra when it is missing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from eplb.formats._files import atomic_write, output_file
from eplb.tools.report import INSTALL_HINT

_MARKERS = {"corner": ("*", 220), "engine": ("s", 70), "plan": ("o", 50)}


def picture_format(path: str | Path) -> str:
    """The format :func:`plot_tradeoff` writes ``path`` in: its suffix's (``png`` without
    one). ``ValueError`` for a suffix matplotlib cannot write and ``ImportError`` without
    matplotlib, so that a script can check its ``--plot`` before a long run."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"the picture needs matplotlib: {INSTALL_HINT}") from exc
    matplotlib.use("Agg", force=True)
    from matplotlib.backend_bases import FigureCanvasBase

    kind = Path(path).suffix.lstrip(".").lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if kind not in known:
        raise ValueError(f"{path}: a picture cannot be written as .{kind}; use one of "
                         + ", ".join(f".{name}" for name in sorted(known)))
    return kind


def plot_tradeoff(
    curves: Mapping[str, Sequence[tuple[float, float, str]]],
    points: Sequence[tuple[str, float, float, str]],
    path: str | Path,
    *,
    title: str = "Balance vs cross-node traffic",
    force: bool = False,
) -> Path:
    """Write a scatter/line picture and return its path: complete or absent, with the
    umask's permissions, in the format its suffix names (``.png``, ``.svg``, ``.pdf``);
    an existing ``path`` raises ``FileExistsError`` unless ``force``.

    Args:
        curves: label → ``(remote nodes per token, balancedness, knob label)`` points, drawn
            as a line in order (e.g. the locality policy over its ``slack`` knob).
        points: ``(label, remote nodes per token, balancedness, kind)`` single plans;
            ``kind`` is ``"corner"`` (a star: the hierarchical and the dispatch-aware global
            plans), ``"engine"`` (a square: vLLM's or SGLang's own plan) or ``"plan"``.
            Points at the same place share one marker and a joined label.
    """
    path = output_file(path)
    if os.path.lexists(path) and not force:  # before the drawing (atomic_write checks too)
        raise FileExistsError(f"{path} exists; pass force=True to overwrite it")
    file_format = picture_format(path)  # (a bad suffix fails before the drawing)
    try:  # the folder too: mkdir names a file in the way as "exists", which force cannot help
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(
            f"cannot write {path}: part of {path.parent} is a file, not a folder") from None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.2), constrained_layout=True)
    for label, curve in curves.items():
        xs = [c[0] for c in curve]
        ys = [c[1] for c in curve]
        (line,) = ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, label=label)
        for x, y, knob in curve:
            ax.annotate(knob, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                        color=line.get_color())
    merged: dict[tuple[float, float, str], list[str]] = {}
    for label, x, y, kind in points:  # identical plans (e.g. one algorithm in two engines)
        merged.setdefault((round(x, 6), round(y, 6), kind), []).append(label)
    for (x, y, kind), labels in merged.items():
        label = " = ".join(labels)
        marker, size = _MARKERS.get(kind, _MARKERS["plan"])
        ax.scatter([x], [y], marker=marker, s=size, label=label, zorder=3,
                   edgecolors="black", linewidths=0.5)
    ax.set_xlabel("expected distinct remote nodes per token per MoE layer (lower is better)")
    ax.set_ylabel("expected-load balancedness under the nearest rule (higher is better)")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # keep points clear
    try:
        atomic_write(path, lambda handle: fig.savefig(
            handle, dpi=130, format=file_format), "wb", force=force)
    finally:
        plt.close(fig)
    return path
