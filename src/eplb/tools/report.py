"""Pictures and a Markdown/HTML report for ``eplb demo``, ``eplb bench`` and ``eplb simulate``.

matplotlib is an optional extra (:data:`INSTALL_HINT`). It is imported lazily with
the non-interactive Agg backend; without it :class:`Report` still writes the text report and
says how to get the pictures.

Loads in pictures are *normalised to the layer mean*: a GPU at 1.0 carries exactly its fair
share; the slowest GPU of a layer sets that layer's time.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from eplb.core.map_tables import ratio_or_one
from eplb.formats._files import atomic_write

#: eplb is on no package index, so ``pip install 'eplb[plot]'`` would fail there (or fetch
#: another project's "eplb"): name the [plot] extra's own requirement (pyproject.toml)
INSTALL_HINT = "pip install 'matplotlib>=3.6'"

# a fixed palette so one planner has one colour in every picture
_COLOURS = {
    "no rebalancing": "#7f7f7f",
    "greedy": "#ff7f0e",
    "reference greedy": "#ff7f0e",
    "eplb": "#1f77b4",
    "ceiling": "#2ca02c",
}


# distinct colours for labels outside the fixed palette (e.g. "oracle ..."), in order
_EXTRA_COLOURS = ("#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#000000")


def series_colours(labels: Sequence[str]) -> dict[str, str]:
    """A colour per label: the fixed palette for known planners, and for any other label
    (e.g. an oracle curve) a colour no other label of this picture uses."""
    out = {label: _COLOURS[label] for label in labels if label in _COLOURS}
    spare = [c for c in _EXTRA_COLOURS if c not in out.values()]
    for label in labels:
        if label not in out:
            out[label] = spare.pop(0) if spare else "#333333"
    return out


def matplotlib_problem() -> str | None:
    """Why pictures cannot be drawn, ``None`` where they can: matplotlib not installed (the
    ``plot`` extra), or failing to import (a half-installed one, or an ``MPLBACKEND``
    naming a backend that is not there, as a Jupyter session leaves it). Such a failure
    stopped every report command after all its planning (attacker pass); the report is
    now written without pictures, and says why."""
    try:
        _pyplot()
    except ImportError as exc:
        if getattr(exc, "name", None) == "matplotlib":
            return f"matplotlib is not installed (run {INSTALL_HINT})"
        return f"matplotlib cannot be imported: {exc}"
    except Exception as exc:  # matplotlib raises ValueError for a bad rcParams entry
        backend = os.environ.get("MPLBACKEND")
        named = f" (MPLBACKEND={backend!r} is set: unset it)" if backend else ""
        return f"matplotlib cannot be imported: {exc}{named}"
    return None


def matplotlib_available() -> bool:
    """True when pictures can be drawn (:func:`matplotlib_problem`)."""
    return matplotlib_problem() is None


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _as_2d(loads: torch.Tensor) -> torch.Tensor:
    loads = torch.as_tensor(loads, dtype=torch.float64).cpu()
    return loads[None] if loads.dim() == 1 else loads


def normalised_loads(gpu_loads: torch.Tensor) -> torch.Tensor:
    """``[L, P]`` per-GPU loads divided by each layer's mean (1.0 = perfectly balanced).

    Layers with no load come out as all 1.0.
    """
    loads = _as_2d(gpu_loads)
    mean = loads.mean(1, keepdim=True)
    return ratio_or_one(loads, mean)


def _layer_ticks(ax, layer_ids: Sequence[int] | None, num_layers: int, axis: str = "y") -> None:
    """Label at most ~12 layer ticks with the model's own layer numbers."""
    ids = list(layer_ids) if layer_ids is not None else list(range(num_layers))
    step = max(1, -(-num_layers // 12))
    pos = list(range(0, num_layers, step))
    labels = [str(ids[i]) for i in pos]
    if axis == "y":
        ax.set_yticks(pos, labels)
    else:
        ax.set_xticks(pos, labels)


def plot_gpu_heatmaps(
    panels: Sequence[tuple[str, torch.Tensor]],
    path: str | Path,
    *,
    layer_ids: Sequence[int] | None = None,
    title: str = "Per-GPU load, normalised to the layer mean",
    dead_gpus: Sequence[int] = (),
) -> Path:
    """Side-by-side heatmaps of per-GPU load, one panel per placement, one colour scale.

    Args:
        panels: ``(label, gpu_loads [L, P])`` pairs, e.g. before and after planning.
        path: where to write the PNG.
        layer_ids: the model's layer number of each row (for the y axis).
        dead_gpus: GPU columns to grey out (they carry no load).

    Colours: white is 1.0 (fair share), red is overloaded, blue is underloaded, on one
    shared symmetric-log colour scale (:func:`heatmap_norm`) so that panels compare
    directly *and* a near-perfect plan (deviations of 0.1 %) is not drawn blank next to
    an unbalanced one (deviations of 100 %). Each panel's subtitle states its worst GPU
    (max/mean) and balancedness.
    """
    plt = _pyplot()

    norm_panels = []
    for label, loads in panels:
        loads = _as_2d(loads)
        live = torch.ones(loads.shape[1], dtype=torch.bool)
        live[list(dead_gpus)] = False
        mean = loads[:, live].mean(1, keepdim=True)
        norm = ratio_or_one(loads, mean)
        peak = loads[:, live].max(1).values
        bal = float(mean.sum() / peak.sum()) if float(peak.sum()) > 0 else 1.0
        norm_panels.append((label, norm, live, bal))
    colour_norm, ticks = heatmap_norm([n[:, live] for _, n, live, _ in norm_panels])
    num_layers, num_gpus = norm_panels[0][1].shape
    width = min(6.0, 2.0 + num_gpus * 0.12)
    height = min(9.0, 2.4 + num_layers * 0.09)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width * len(panels) + 1.2, height), squeeze=False,
        constrained_layout=True,
    )
    import matplotlib

    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#bbbbbb")  # grey = dead GPU
    image = None
    for ax, (label, norm, live, bal) in zip(axes[0], norm_panels, strict=True):
        data = (norm - 1.0).numpy().copy()  # deviation from the fair share
        data[:, ~live.numpy()] = float("nan")  # dead GPUs show as grey
        image = ax.imshow(
            data, aspect="auto", cmap=cmap, norm=colour_norm, interpolation="nearest"
        )
        worst = float(norm[:, live].max())
        ax.set_title(f"{label}\nworst GPU {worst:.4f}× mean, balancedness {bal:.4f}", fontsize=10)
        ax.set_xlabel("GPU index")
        ax.set_ylabel("MoE layer")
        _layer_ticks(ax, layer_ids, num_layers)
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, ticks=ticks)
    bar.ax.set_yticklabels([f"{1 + t:.4g}" for t in ticks])
    bar.set_label("load / layer mean (log scale)")
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def heatmap_norm(panels: Sequence[torch.Tensor]) -> tuple[object, list[float]]:
    """Colour scale for ``load / mean - 1`` of every panel ``[L, P]`` (live GPUs).

    A symmetric-log norm around 0: linear within ``±t`` and logarithmic beyond, where ``t``
    is half the typical deviation (90th percentile of ``|load / mean - 1|``) of the *best*
    panel, so its structure shows; the range reaches the largest deviation of any panel
    (at most 1, i.e. twice the mean; hotter GPUs saturate). Returns ``(norm, ticks)``.
    """
    from matplotlib.colors import SymLogNorm

    typical, largest = [], 1e-3
    for panel in panels:
        dev = (torch.as_tensor(panel, dtype=torch.float64) - 1.0).abs().flatten()
        if dev.numel():
            typical.append(float(torch.quantile(dev, 0.9)))
            largest = max(largest, float(dev.max()))
    linthresh = min(max(min(typical, default=0.01) / 2, 1e-4), 0.05)
    span = min(max(largest, 2 * linthresh), 1.0)
    norm = SymLogNorm(linthresh=linthresh, linscale=0.5, vmin=-span, vmax=span, base=10)
    steps = [t for t in (0.001, 0.01, 0.1, 1.0) if linthresh <= t <= span] or [span]
    ticks = sorted({0.0, *steps, *(-t for t in steps)})
    return norm, ticks


def _save(fig: object, path: str | Path) -> Path:
    """Write a figure as PNG and free it."""
    path = Path(path)
    try:  # complete or absent, with the umask's permissions, like every eplb output
        atomic_write(path, lambda handle: fig.savefig(handle, dpi=110, format="png"), "wb",
                     force=True)
    finally:
        _pyplot().close(fig)
    return path


def _save_with_legend(fig: object, ax: object, path: str | Path, title: str | None = None) -> Path:
    """Legend under the axes (never over the curves), then :func:`_save`."""
    labels = ax.get_legend_handles_labels()[1]
    ncol = 1 if max((len(t) for t in labels), default=0) > 45 else 2
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol, fontsize=9,
              frameon=False, title=title, title_fontsize=9)
    return _save(fig, path)


def layer_panels(
    series: Mapping[str, torch.Tensor], ceiling: torch.Tensor | None = None
) -> list[tuple[list[str], tuple[float, float], str]]:
    """The per-layer chart's panels: ``(labels, y range, kind)``, ranges fitted to the data
    (``series``: label → ``[L]`` balancedness per layer; ``ceiling [L]``).

    The first panel (kind ``"value"``) shows every series and the ceiling. When a far
    lower series (e.g. "no rebalancing" at 0.4) squashes the planners (0.993 vs 0.9997)
    into one line, a second panel shows the others: with a ceiling, as their distance
    below it per layer (kind ``"gap"``, which also separates planners whose values swing
    from 0.6 to 1.0 across layers); without, zoomed on their values (kind ``"value"``).
    Ranges pad the data by 5 % of their span.
    """
    def fit(values: list[torch.Tensor], floor: float | None = None) -> tuple[float, float]:
        lo = min(float(v.min()) for v in values)
        hi = max(float(v.max()) for v in values)
        pad = max((hi - lo) * 0.05, 1e-4)
        return (lo - pad if floor is None else floor), hi + pad

    data = {k: torch.as_tensor(v, dtype=torch.float64).cpu() for k, v in series.items()}
    ceil = None if ceiling is None else torch.as_tensor(ceiling, dtype=torch.float64).cpu()
    labels = list(data)
    panels = [(labels, fit([*data.values(), *([] if ceil is None else [ceil])]), "value")]
    lowest = min(labels, key=lambda k: float(data[k].mean())) if len(labels) >= 2 else None
    rest = [k for k in labels if k != lowest]
    if ceil is not None and rest:
        gaps = [(ceil - data[k]).clamp(min=0) for k in rest]
        panels.append((rest, fit(gaps, floor=0.0), "gap"))
    elif lowest is not None:
        full = panels[0][1]
        zoom = fit([data[k] for k in rest])
        # zoom only when the baseline stretches the axis far beyond the planners' spread
        # (at least 0.01: planners 0.99 vs 0.999 already read well on one axis)
        if (full[1] - full[0]) > 4 * max(zoom[1] - zoom[0], 0.01):
            panels.append((rest, zoom, "value"))
    return panels


def plot_layer_balancedness(
    series: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    ceiling: torch.Tensor | None = None,
    layer_ids: Sequence[int] | None = None,
    title: str = "Balancedness per layer",
    overall: Mapping[str, float] | None = None,
) -> Path:
    """Line plot of balancedness (mean / max GPU load, 1.0 = perfect) per layer.

    Args:
        series: planner label -> ``[L]`` balancedness per layer.
        ceiling: ``[L]`` a bound no placement can pass on each layer (dashed line).
        overall: planner label -> its overall balancedness (Σ mean / Σ max over the
            layers), shown in the legend, as the report's tables give it; without it the
            legend shows the plain average of the layers' values.

    The y axes fit the data (:func:`layer_panels`): next to the values, a second panel
    shows how far below the ceiling each planner stays per layer (or, without a
    ceiling, zooms on the planners when a far lower baseline would hide them).
    """
    plt = _pyplot()
    panels = layer_panels(series, ceiling)
    colours = series_colours(list(series))
    ceil = None if ceiling is None else torch.as_tensor(ceiling, dtype=torch.float64).cpu()
    fig, axes = plt.subplots(1, len(panels), figsize=(8.5 if len(panels) == 1 else 13, 4.8),
                             constrained_layout=True, squeeze=False)
    num_layers = 0
    for i, (ax, (labels, (lo, hi), kind)) in enumerate(zip(axes[0], panels, strict=True)):
        for label in labels:
            values = torch.as_tensor(series[label], dtype=torch.float64).cpu()
            num_layers = values.numel()
            shown = (ceil - values).clamp(min=0) if kind == "gap" else values
            ax.plot(
                range(num_layers), shown.numpy(), marker="o", markersize=3, linewidth=1.2,
                label=None if i else (
                    f"{label} (layer average {float(values.mean()):.4f})"
                    if overall is None or overall.get(label) is None
                    else f"{label} (overall {overall[label]:.4f})"),
                color=colours[label],
            )
        if ceil is not None and kind == "value":
            num_layers = ceil.numel()
            ax.plot(
                range(num_layers), ceil.numpy(), linestyle="--", linewidth=1.5,
                color=_COLOURS["ceiling"], label=None if i else "ceiling (upper bound)",
            )
        ax.set_xlabel("MoE layer")
        if kind == "gap":
            ax.set_ylabel("ceiling − balancedness (0 = at the bound)")
            ax.set_title("distance below the ceiling (lower is better)", fontsize=10)
        else:
            ax.set_ylabel("balancedness = mean / max GPU load")
            if i:
                ax.set_title("zoom on the planners", fontsize=10)
        ax.set_ylim(lo, hi)
        ax.grid(alpha=0.3)
        _layer_ticks(ax, layer_ids, num_layers, axis="x")
    fig.suptitle(f"{title}\n(higher is better; MoE time scales as 1 / balancedness)",
                 fontsize=11)
    return _save_with_legend(fig, axes[0][0], path)


def plot_balancedness_over_time(
    series: Mapping[str, Sequence[float] | torch.Tensor],
    path: str | Path,
    *,
    x: Sequence[float] | None = None,
    xlabel: str = "window (scored on the next window's loads)",
    rebalance_at: Sequence[float] = (),
    title: str = "Balancedness over time",
    averages: Mapping[str, float | None] | None = None,
    average_label: str = "average",
    remote: bool = False,
) -> Path:
    """Balancedness of each planner over simulated time (``remote``: the series are
    remote nodes per token instead, as ``simulate`` models them).

    Args:
        series: label -> ``[T]`` balancedness per scoring window.
        x: the time of each point (window index or step); defaults to ``0..T-1``.
        rebalance_at: times at which a rebalance happened (thin vertical ticks).
        averages: the figure to show in each label's legend entry (e.g. the same mean a
            report's table gives); default the mean of the plotted values.
        average_label: what that figure is called in the legend.

    Every label gets its own colour (:func:`series_colours`); labels starting with
    "oracle" are dashed.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.8), constrained_layout=True)
    colours = series_colours(list(series))
    for label, values in series.items():
        values = torch.as_tensor(values, dtype=torch.float64).cpu()
        xs = list(x) if x is not None else list(range(values.numel()))
        average = (averages or {}).get(label)
        average = float(values.nanmean()) if average is None else average  # gaps: NaN
        ax.plot(
            xs, values.numpy(), linewidth=1.3, marker="." if values.numel() < 80 else None,
            label=f"{label}: {average:.4f}", color=colours[label],
            linestyle="--" if label.startswith("oracle") else "-",
        )
    for i, t in enumerate(rebalance_at):
        ax.axvline(t, color="#999999", linewidth=0.5, alpha=0.5,
                   label="rebalance" if i == 0 else None)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if remote:
        ax.set_ylabel("remote nodes per token per MoE layer (modelled)")
        ax.set_title(f"{title}\n(lower is better: fewer cross-node transfers per token)",
                     fontsize=11)
        return _save_with_legend(fig, ax, path, title=f"remote nodes, {average_label}")
    ax.set_ylabel("balancedness = mean / max GPU load")
    ax.set_ylim(top=1.005)
    ax.set_title(f"{title}\n(higher is better; 1.0 = every GPU equally loaded)", fontsize=11)
    return _save_with_legend(fig, ax, path, title=f"balancedness, {average_label}")


# ---------------------------------------------------------------------------- report


@dataclass
class _Block:
    kind: str  # "heading" | "text" | "table" | "figure" | "code"
    payload: object


@dataclass
class Report:
    """A small report builder: headings, paragraphs, tables and figures.

    Figures are drawn by callables only when matplotlib is available, so a report can be
    assembled unconditionally. ``write(directory)`` writes ``report.md``, ``report.html``
    and the PNGs, refusing to overwrite existing files unless ``force=True``.
    """

    title: str
    blocks: list[_Block] = field(default_factory=list)
    _figures: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(_Block("heading", text))

    def text(self, text: str) -> None:
        self.blocks.append(_Block("text", text))

    def code(self, text: str) -> None:
        self.blocks.append(_Block("code", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        self.blocks.append(_Block("table", (list(headers), [list(r) for r in rows])))

    def figure(self, filename: str, caption: str, draw: Callable[[Path], object]) -> None:
        """Add a picture; ``draw(path)`` writes the PNG at ``path`` when matplotlib exists."""
        self.blocks.append(_Block("figure", (filename, caption)))
        self._figures.append((filename, draw))

    def planned_files(self) -> list[str]:
        names = ["report.md", "report.html"]
        if matplotlib_available():
            names += [name for name, _ in self._figures]
        return names

    def write(self, directory: str | Path, *, force: bool = False) -> list[Path]:
        """Write the report into ``directory`` (created if needed); return the files written.

        A new folder appears whole: the report is written into a hidden sibling folder
        that is renamed into place at the end, so a run killed midway leaves no folder of
        pictures without their text under the name asked for (attacker pass; a SIGKILL
        leaves the hidden ``.eplb-report-*.tmp`` folder). Into an existing folder each
        file is replaced on its own (each complete, the set mixed if the run is killed).

        Raises ``FileExistsError`` naming the first file that exists when ``force`` is false.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise FileExistsError(f"{directory} exists and is not a directory")
        for name in self.planned_files():
            if (directory / name).is_dir():  # found before any file is replaced
                raise IsADirectoryError(f"{directory / name} is a directory; the report "
                                        "cannot replace it (even with --force)")
            if not force and (directory / name).exists():
                raise FileExistsError(
                    f"{directory / name} already exists; pass --force to overwrite it "
                    "or choose another directory"
                )
        if os.path.lexists(directory):  # a folder, or a link the mkdir below names
            directory.mkdir(parents=True, exist_ok=True)
            return self._write_files(directory, force)
        directory.parent.mkdir(parents=True, exist_ok=True)
        # beside the target (one file system: the rename is atomic), made by mkdir so the
        # folder gets the user's umask as the target would; a short fixed name, so that a
        # target name near the file system's limit still fits. A run killed outright
        # (SIGKILL) leaves this hidden folder behind, never a partial target
        staging = directory.parent / f".eplb-report-{os.urandom(4).hex()}.tmp"
        try:
            os.mkdir(staging)
        except OSError as exc:  # name the folder asked for, not the hidden one (attacker pass)
            raise type(exc)(exc.errno, f"cannot write the report folder {directory}: "
                                       f"{exc.strerror}") from None
        try:
            try:
                written = self._write_files(staging, force=False)
            except OSError as exc:  # (a full disk): the folder asked for, not the hidden one
                raise _naming(exc, staging, directory) from None
            try:
                # (an empty folder another run made meanwhile is replaced: nothing is lost)
                os.rename(staging, directory)
            except OSError:
                if not os.path.lexists(directory):
                    raise
                # another run made the folder meanwhile: with force, write into it as into
                # any existing folder; without, its files are the other run's to keep
                if not force:
                    raise FileExistsError(
                        f"{directory} appeared while the report was written; pass --force "
                        "to write into it or choose another directory") from None
                return self._write_files(directory, force)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return [directory / path.name for path in written]

    def _write_files(self, directory: Path, force: bool) -> list[Path]:
        """Every file of the report into the existing ``directory``, each atomically."""
        have_plots = matplotlib_available()
        written: list[Path] = []
        if have_plots:
            # each picture is drawn aside and published like the text files, so that without
            # ``force`` a run that loses a race for the folder fails at its first file
            # instead of replacing the winner's pictures with its own
            with tempfile.TemporaryDirectory(prefix="eplb-report-") as scratch:
                for name, draw in self._figures:
                    draw(Path(scratch) / name)
                    data = (Path(scratch) / name).read_bytes()
                    atomic_write(directory / name, lambda handle, data=data: handle.write(data),
                                 "wb", force=force)
                    written.append(directory / name)
        for name, text in (("report.md", self._markdown(have_plots)),
                           ("report.html", self._html(have_plots))):
            atomic_write(directory / name, lambda handle, text=text: handle.write(text), "w",
                         force=force)
        return [directory / "report.md", directory / "report.html", *written]

    # -------------------------------------------------------------- renderers
    def _markdown(self, have_plots: bool) -> str:
        out = [f"# {self.title}", ""]
        if not have_plots and self._figures:
            out += [f"> Pictures were skipped: {matplotlib_problem()}. Rerun the command "
                    "once it can be imported to get them.", ""]
        for block in self.blocks:
            if block.kind == "heading":
                out += [f"## {block.payload}", ""]
            elif block.kind == "text":
                out += [str(block.payload), ""]
            elif block.kind == "code":
                out += ["```", str(block.payload), "```", ""]
            elif block.kind == "table":
                headers, rows = block.payload
                out.append("| " + " | ".join(headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
                out.append("")
            elif block.kind == "figure" and have_plots:
                name, caption = block.payload
                out += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        return "\n".join(out)

    def _html(self, have_plots: bool) -> str:
        esc = html.escape
        out = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{esc(self.title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;"
            "padding:0 1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:3px 8px;text-align:right}th{background:#f0f0f0}img{max-width:100%}"
            "pre{background:#f6f6f6;padding:8px}</style></head><body>",
            f"<h1>{esc(self.title)}</h1>",
        ]
        if not have_plots and self._figures:
            out.append(f"<p><em>Pictures were skipped: {esc(str(matplotlib_problem()))}. "
                       "Rerun the command once it can be imported to get them.</em></p>")
        for block in self.blocks:
            if block.kind == "heading":
                out.append(f"<h2>{esc(str(block.payload))}</h2>")
            elif block.kind == "text":
                out.append(f"<p>{esc(str(block.payload))}</p>")
            elif block.kind == "code":
                out.append(f"<pre>{esc(str(block.payload))}</pre>")
            elif block.kind == "table":
                headers, rows = block.payload
                out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers)
                           + "</tr>")
                out += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>"
                        for row in rows]
                out.append("</table>")
            elif block.kind == "figure" and have_plots:
                name, caption = block.payload
                out.append(f"<figure><img src='{esc(name)}' alt='{esc(caption)}'>"
                           f"<figcaption>{esc(caption)}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)


def _naming(exc: OSError, staging: Path, directory: Path) -> OSError:
    """``exc`` with the hidden staging folder's name (which is gone by the time the user
    reads the message) replaced by the report folder asked for."""
    def renamed(text: object) -> object:
        return text.replace(str(staging), str(directory)) if isinstance(text, str) else text

    if exc.errno is None:
        return type(exc)(renamed(str(exc)))
    if exc.filename is None:
        return type(exc)(exc.errno, renamed(exc.strerror))
    return type(exc)(exc.errno, renamed(exc.strerror), renamed(exc.filename))
