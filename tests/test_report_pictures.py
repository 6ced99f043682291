"""What the report pictures show, and the progress of long commands.

- heatmaps of near-perfect plans are not blank next to an unbalanced one;
- the per-layer chart's axes fit the planners, not the baseline far below;
- every curve of the simulator picture has its own colour, and its legend gives the
  table's figures;
- "no rebalancing" reports no rebalances;
- ``eplb generate`` shows progress on long runs, and ``--quiet`` silences it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import eplb.tools.report as report_mod
from eplb.cli import main
from eplb.tools.report import heatmap_norm, layer_panels, series_colours

pytest.importorskip("matplotlib")


def _panel(deviation: float, layers: int = 6, gpus: int = 16, seed: int = 0) -> torch.Tensor:
    """``[L, P]`` load / mean with deviations of about ``deviation`` (mean exactly 1)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(layers, gpus, generator=gen, dtype=torch.float64)
    noise = noise - noise.mean(1, keepdim=True)
    return 1.0 + deviation * noise / noise.abs().max(1, keepdim=True).values


def _whiteness(values: torch.Tensor, norm) -> float:
    """How far the most coloured cell is from white (0 = blank, 1 = saturated)."""
    import matplotlib

    cmap = matplotlib.colormaps["RdBu_r"]
    rgba = cmap(norm((values - 1.0).numpy()))
    return float(abs(1.0 - rgba[..., :3]).max())


def test_heatmaps_of_good_plans_are_not_blank_next_to_a_bad_one() -> None:
    static, greedy, best = _panel(1.5), _panel(0.03, seed=1), _panel(0.003, seed=2)
    norm, ticks = heatmap_norm([static, greedy, best])
    assert _whiteness(best, norm) > 0.15  # a 0.3 % deviation is visible
    assert _whiteness(greedy, norm) > 0.4
    assert _whiteness(static, norm) > 0.7
    assert 0.0 in ticks


def test_heatmap_picture_is_written_with_the_new_scale(tmp_path) -> None:
    out = report_mod.plot_gpu_heatmaps(
        [("no rebalancing", _panel(1.2) * 10), ("eplb", _panel(0.002) * 10)],
        tmp_path / "h.png", dead_gpus=[3])
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_layer_chart_separates_the_planners() -> None:
    layers = 10
    series = {
        "no rebalancing": torch.linspace(0.3, 0.5, layers),
        "reference greedy": torch.linspace(0.990, 0.994, layers),
        "eplb": torch.linspace(0.9995, 0.9999, layers),
    }
    # without a ceiling: a zoom on the planners' values
    panels = layer_panels(series)
    assert len(panels) == 2
    labels, (lo, hi), kind = panels[1]
    assert kind == "value" and "no rebalancing" not in labels
    assert 0.985 < lo < 0.990 and 0.9999 < hi < 1.001
    assert panels[0][1][0] < 0.3
    # with a ceiling: their distance below it, from 0 to the largest gap
    panels = layer_panels(series, torch.ones(layers))
    labels, (lo, hi), kind = panels[1]
    assert kind == "gap" and "no rebalancing" not in labels
    assert lo == 0.0 and 0.010 < hi < 0.0106
    # planners that swing across layers (hierarchical): the gap still separates them
    swing = torch.linspace(0.6, 0.98, layers)
    panels = layer_panels({"no rebalancing": swing - 0.3, "reference greedy": swing - 0.004,
                           "eplb": swing - 0.0004}, swing)
    assert panels[1][2] == "gap" and panels[1][1][1] < 0.005
    # two close planners and no baseline or ceiling: one panel, fitted
    (only,) = layer_panels({"eplb": torch.full((3,), 0.999), "greedy": torch.full((3,), 0.99)})
    assert only[1][0] > 0.98


def test_layer_chart_draws_two_fitted_panels(tmp_path, monkeypatch) -> None:
    figures = []
    real_save = report_mod._save
    monkeypatch.setattr(report_mod, "_save", lambda fig, path: (figures.append(fig),
                                                                real_save(fig, path))[1])
    series = {"no rebalancing": torch.full((5,), 0.4), "eplb": torch.full((5,), 0.9997)}
    report_mod.plot_layer_balancedness(series, tmp_path / "l.png", ceiling=torch.ones(5))
    axes = figures[0].axes
    assert len(axes) == 2
    lo, hi = axes[1].get_ylim()
    assert lo == 0.0 and hi < 0.001


def test_every_curve_has_its_own_colour() -> None:
    labels = ["eplb", "no rebalancing", "reference greedy", "oracle (eplb on the scored window)",
              "something else"]
    colours = series_colours(labels)
    assert len(set(colours.values())) == len(labels)


def test_simulator_report_legend_gives_the_table_figures(capsys, tmp_path, monkeypatch) -> None:
    legends: list[list[str]] = []
    real_save = report_mod._save

    def capture(fig, path):
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None:
                legends.append([t.get_text() for t in legend.get_texts()])
                colours = [line.get_color() for line in ax.get_lines()
                           if not line.get_label().startswith(("_", "rebalance"))]
                assert len(set(colours)) == len(colours)  # eplb vs oracle: distinct
        return real_save(fig, path)

    monkeypatch.setattr(report_mod, "_save", capture)
    trace = tmp_path / "trace.pt"
    assert main(["generate", "--preset", "mixtral-8x7b", "--steps", "60", "-o", str(trace),
                 "-q"]) == 0
    capsys.readouterr()
    code = main(["simulate", str(trace), "--window", "10", "--interval", "20", "-r", "12",
                 "-g", "4", "--compare", "--report", str(tmp_path / "sim"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    runs = {r["summary"]["planner"]: r["summary"] for r in json.loads(out)["runs"]}
    assert runs["none"]["rebalances"] == 0  # "no rebalancing" never rebalances
    assert runs["eplb"]["rebalances"] == 2
    (texts,) = legends
    table = (tmp_path / "sim" / "report.md").read_text()
    for planner, label in (("eplb", "eplb"), ("none", "no rebalancing"),
                           ("greedy", "reference greedy")):
        figure = f"{runs[planner]['window_balancedness']:.4f}"
        assert f"{label}: {figure}" in texts, (label, texts)
        assert f"| {label} | {figure} |" in table
    oracle = f"{runs['eplb']['oracle_balancedness']:.4f}"
    assert any(t.startswith("oracle") and oracle in t for t in texts)


def test_generate_shows_progress_and_quiet_silences_it(capsys, tmp_path, monkeypatch) -> None:
    import eplb.cli.sim as sim

    ticks = iter(range(0, 10_000, 6))  # every update looks 6 s after the previous one
    monkeypatch.setattr(sim.time, "monotonic", lambda: float(next(ticks)))
    # deepseek-v3 is generated in chunks of 35 steps: three progress updates
    code = main(["generate", "--preset", "deepseek-v3", "--steps", "72", "-o",
                 str(tmp_path / "a.pt")])
    _, err = capsys.readouterr()
    assert code == 0
    assert "generating 72 steps" in err
    assert any("steps (" in line and "%" in line for line in err.splitlines()), err
    code = main(["generate", "--preset", "mixtral-8x7b", "--steps", "40", "-o",
                 str(tmp_path / "b.pt"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and err == "" and "wrote" in out


def test_generate_progress_does_not_change_the_trace() -> None:
    from eplb.tools.generator import generate_trace

    seen: list[tuple[int, int]] = []
    a = generate_trace("mixtral-8x7b", 30, seed=4)
    b = generate_trace("mixtral-8x7b", 30, seed=4, progress=lambda d, t: seen.append((d, t)))
    assert torch.equal(a.counts, b.counts)
    assert seen and seen[-1] == (30, 30) and all(t == 30 for _, t in seen)


def test_generate_checks_the_format_before_the_work(capsys, tmp_path) -> None:
    code = main(["generate", "--steps", "5", "-o", str(tmp_path / "t.bin")])
    _, err = capsys.readouterr()
    assert code == 2 and "cannot tell the trace format" in err
    for fmt, name in (("load_history", "h.json"), ("sglang", "s.json"), ("npz", "n.npz")):
        code = main(["generate", "--preset", "mixtral-8x7b", "--steps", "5", "-o",
                     str(tmp_path / name), "--format", fmt, "-q"])
        capsys.readouterr()
        assert code == 0, fmt
        assert (tmp_path / name).exists()
    assert Path(tmp_path / "h.json").read_text().startswith('{"load_history"')


def test_generate_refuses_an_unwritable_name_before_the_work(capsys, tmp_path,
                                                            monkeypatch) -> None:
    # write_loads refuses .safetensors and .csv names whatever the format; the CLI's check
    # "before the work" missed them, and a long trace was generated, then refused
    import eplb.cli.sim as sim

    def no_work(*args, **kwargs):
        raise AssertionError("the trace was generated before its name was refused")

    monkeypatch.setattr(sim, "generate_trace", no_work)
    for name, kind in (("t.safetensors", "safetensors"), ("t.csv", "CSV")):
        code = main(["generate", "--preset", "deepseek-v3", "--steps", "20000", "-q",
                     "--format", "pt", "-o", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and f"no {kind}: name the file t.pt" in err, err
        assert not (tmp_path / name).exists()


def test_report_picture_name_taken_by_a_folder_is_named_before_any_file_changes(
        capsys, tmp_path) -> None:
    # `--report DIR --force` where a picture's name is a folder: the error named a hidden
    # temporary file (".simulation_over_time.png.<hex>.tmp"), after report files were written
    trace = tmp_path / "trace.pt"
    assert main(["generate", "--preset", "mixtral-8x7b", "--steps", "40", "-o", str(trace),
                 "-q"]) == 0
    out = tmp_path / "sim"
    (out / "simulation_over_time.png").mkdir(parents=True)
    (out / "report.md").write_text("mine")
    capsys.readouterr()
    code = main(["simulate", str(trace), "--window", "10", "-r", "12", "-g", "4",
                 "--report", str(out), "--force"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{out / 'simulation_over_time.png'} is a directory" in err, err
    assert ".tmp" not in err and "Traceback" not in err
    assert (out / "report.md").read_text() == "mine"  # nothing was replaced
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "simulation_over_time.png"]
