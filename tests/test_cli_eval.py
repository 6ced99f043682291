"""``eplb eval`` and ``eplb bench``: scoring a placement, and the planners, on a loads file;
in-process through ``eplb.cli.main`` as in ``test_cli.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import E, L, P, R, run
from test_cli import assert_one_line_error

import eplb

# ------------------------------------------------------------------------ eval


def _plan(capsys, tmp_path: Path, loads: Path) -> Path:
    out_file = tmp_path / "p.json"
    assert run(capsys, "plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(out_file))[0] == 0
    return out_file


def test_eval_reports_per_layer_and_summary(capsys, tmp_path, loads) -> None:
    placement = _plan(capsys, tmp_path, loads)
    code, out, _ = run(capsys, "eval", "--placement", str(placement), str(loads))
    assert code == 0
    assert "per layer" in out and "this placement (after)" in out
    code, out, _ = run(capsys, "eval", "--placement", str(placement), str(loads), "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["layers"]) == L
    w = torch.from_numpy(np.load(loads))
    from eplb.formats import read_placement

    expected = read_placement(placement).balancedness(w)
    assert result["balancedness_after"] == pytest.approx(expected)
    for row in result["layers"]:
        assert row["max_over_mean_after"] == pytest.approx(1 / row["balancedness_after"])


def test_eval_says_a_placement_stacks_replicas_and_scores_it(capsys, tmp_path) -> None:
    # attacker pass: an eplb JSON file with two replicas of an expert on one GPU was
    # scored without a word (engines' maps may stack, so it is a warning, not an error)
    from eplb.core import plan_greedy
    from eplb.formats import write_placement

    weight = torch.tensor([[91.0, 35, 10, 78, 27, 50, 1, 4]])
    stacked = plan_greedy(weight, 12, 4)  # GPU 3 holds two of expert 0's three replicas
    assert stacked.phy2log[0, 9:].tolist() == [0, 0, 5]
    path = tmp_path / "stacked.json"
    write_placement(stacked, path)
    loads = tmp_path / "w.npy"
    np.save(loads, weight.numpy())
    code, out, err = run(capsys, "eval", "--placement", path, loads, "--json")
    assert code == 0
    assert "breaks eplb's anti-affinity (layer 0 GPU" in err and "scored as it is" in err
    assert json.loads(out)["balancedness_after"] == pytest.approx(
        float(stacked.balancedness(weight)))


def test_eval_shape_mismatch(capsys, tmp_path, loads) -> None:
    placement = _plan(capsys, tmp_path, loads)
    other = tmp_path / "other.npy"
    np.save(other, np.ones((L + 1, E)))
    code, _, err = run(capsys, "eval", "--placement", str(placement), str(other))
    assert code == 2
    assert_one_line_error(err)


def test_eval_missing_placement(capsys, tmp_path, loads) -> None:
    code, _, err = run(capsys, "eval", "--placement", str(tmp_path / "x.json"), str(loads))
    assert code == 2
    assert_one_line_error(err)


def test_eval_nearest_on_one_node_scores_the_even_split(capsys, loads: Path,
                                                        tmp_path: Path) -> None:
    # as plan does: on one node every replica is on the token's node
    out = tmp_path / "p.json"
    assert run(capsys, "plan", loads, "-r", R, "-g", P, "-o", out)[0] == 0
    code, even, _ = run(capsys, "eval", "--placement", out, loads, "--summary", "--json")
    assert code == 0
    code, near, err = run(capsys, "eval", "--placement", out, loads, "--summary", "--json",
                          "--dispatch", "nearest")
    assert code == 0 and "one node" in err
    assert json.loads(near)["balancedness_after"] == json.loads(even)["balancedness_after"]


# ------------------------------------------------------------------------ bench


def test_bench_on_a_file_with_report(capsys, tmp_path, loads) -> None:
    report = tmp_path / "rep"
    code, out, _ = run(capsys, "bench", str(loads), "--no-builtin", "-r", str(R), "-g", str(P),
                       "--repeats", "1", "--json", "--report", str(report))
    assert code == 0
    result = json.loads(out)
    (scenario,) = result["scenarios"]
    names = [r["planner"] for r in scenario["results"]]
    assert names == ["no rebalancing", "reference greedy", "eplb"]
    for r in scenario["results"]:
        assert 0 < r["balancedness"] <= 1
    assert (report / "report.md").exists() and (report / "report.html").exists()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == ["s0_heatmap.png", "s0_layers.png"]
    # a second run refuses to overwrite the report
    code, _, err = run(capsys, "bench", str(loads), "--no-builtin", "-r", str(R), "-g", str(P),
                       "--report", str(report))
    assert code == 2
    assert_one_line_error(err)


def test_bench_table_output(capsys, loads) -> None:
    code, out, _ = run(capsys, "bench", str(loads), "--no-builtin", "--repeats", "1")
    assert code == 0
    assert "reference greedy" in out and "ceiling" in out


def test_bench_nothing_to_do(capsys) -> None:
    code, _, err = run(capsys, "bench", "--no-builtin")
    assert code == 2
    assert_one_line_error(err)


def test_eval_names_the_placements_own_shape_when_the_experts_differ(capsys, tmp_path) -> None:
    """New-user pass: loads naming model layers 0, 7 and 15 (OLMoE's published counts, 64
    experts) against a 16-layer placement of 8 experts said the placement "has 3 × 8": the
    rows picked for the loads' layers, not the file's 16."""
    from eplb.formats import write_placement

    placement = tmp_path / "p.json"
    write_placement(eplb.plan(torch.rand(16, 8) + 1, 16, 4), placement)
    loads = tmp_path / "counts.json"
    counts = (torch.rand(3, 64) * 100).round().tolist()
    loads.write_text(json.dumps({"counts": counts, "layers": [0, 7, 15]}))
    code, _, err = run(capsys, "eval", "--placement", placement, loads)
    assert code == 2
    assert_one_line_error(err)
    assert "have 3 layers × 64 experts but the placement" in err and "has 16 × 8" in err


def test_bench_checks_every_files_policy_before_benchmarking_and_names_it(
        capsys, tmp_path, monkeypatch) -> None:
    """Attacker pass: files of two models in one call, --groups dividing the experts of
    the first only. --policy hierarchical was refused only once the first file (and the
    builtins) had been timed, naming no file; the auto fallback's warning came mid-run,
    naming none either. Now each is found while the files are read, and named."""
    import eplb.cli.bench as bench

    gen = np.random.default_rng(3)
    first, second = tmp_path / "sixteen.npy", tmp_path / "twentyfour.npy"
    np.save(first, gen.integers(1, 100, (3, 16)))
    np.save(second, gen.integers(1, 100, (3, 24)))
    timed = []
    real = bench.compare
    monkeypatch.setattr(bench, "compare", lambda name, *a, **k: timed.append(name)
                        or real(name, *a, **k))
    cluster = ["-g", "4", "--nodes", "2", "--groups", "16", "--repeats", "1"]
    code, _, err = run(capsys, "bench", "--no-builtin", first, second, *cluster,
                       "--policy", "hierarchical")
    assert code == 2
    assert_one_line_error(err)
    assert f"{second}: --policy hierarchical is impossible" in err
    assert timed == []  # nothing benchmarked before the refusal
    code, out, err = run(capsys, "bench", "--no-builtin", first, second, *cluster, "--json")
    assert code == 0, err
    assert [s["policy"] for s in json.loads(out)["scenarios"]] == ["hierarchical", "global"]
    assert err.startswith(f"eplb: warning: {second}: planning globally")
    # a slot count one file's experts cannot fill names that file
    code, _, err = run(capsys, "bench", "--no-builtin", first, second, "-r", "20", "-g", "4")
    assert code == 2
    assert_one_line_error(err)
    assert f"{second}: --replicas (20) must be >= the number of experts (24)" in err


def test_eval_refusals_stay_one_line_whatever_it_would_have_warned(capsys, tmp_path,
                                                                    loads) -> None:
    """Attacker pass: eval warned as it went, so a stacked map's anti-affinity warning
    came before the error of a missing loads file, and the one-node nearest rule's
    warning before ``--gpu-speed cannot be combined with --dispatch nearest``. Warnings
    are now held until every input is checked; a placement scored gets them as before."""
    from eplb.formats import write_placement

    stacked = tmp_path / "stacked.json"
    phy2log = torch.arange(R).remainder(E).repeat(L, 1)
    phy2log[:, 1] = 0  # GPU 0 holds expert 0 twice
    phy2log[:, E] = 1  # (every expert kept)
    write_placement(eplb.Placement.from_phy2log(phy2log, E, eplb.Topology(R, P)), stacked)
    ours = _plan(capsys, tmp_path, loads)
    speeds = ",".join(["1"] * (P - 1) + ["2"])
    for argv in (["--placement", stacked, tmp_path / "missing.npy"],
                 ["--placement", stacked, loads, "--gpu-speed", "1,2"],
                 ["--placement", ours, loads, "--dispatch", "nearest", "--gpu-speed", speeds]):
        code, out, err = run(capsys, "eval", *argv)
        assert code == 2 and out == ""
        assert_one_line_error(err)
        assert "warning" not in err, err
    code, out, err = run(capsys, "eval", "--placement", stacked, loads, "--summary")
    assert code == 0, err
    assert err.startswith("eplb: warning: ") and "anti-affinity" in err


def test_bench_warns_of_a_file_only_once_every_file_is_checked(capsys, tmp_path) -> None:
    """Attacker pass: the first file's warning (the policy falling back to global) came
    before the error of the second file (too few slots for its experts)."""
    gen = np.random.default_rng(3)
    first, second = tmp_path / "twentyfour.npy", tmp_path / "thirtytwo.npy"
    np.save(first, gen.integers(1, 100, (3, 24)))
    np.save(second, gen.integers(1, 100, (3, 32)))
    cluster = ["-r", "28", "-g", "4", "--nodes", "2", "--groups", "16", "--repeats", "1"]
    code, out, err = run(capsys, "bench", "--no-builtin", first, second, *cluster)
    assert code == 2 and out == ""
    assert_one_line_error(err)
    assert f"{second}: --replicas (28)" in err and "warning" not in err
    code, out, err = run(capsys, "bench", "--no-builtin", first, *cluster, "--json")
    assert code == 0 and json.loads(out)["scenarios"][0]["policy"] == "global"
    assert err.startswith(f"eplb: warning: {first}: planning globally"), err
