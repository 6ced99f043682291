"""Inputs a user or an attacker hands the ``eplb`` command.

Every bad file is one ``eplb: error:`` line naming it, exit status 2, no traceback and
no hang (each case runs under a thread timeout; ``run`` here, which the split-off files
import). Top-k routing files: ``test_cli_inputs_routing.py``; model layer ids and several
loads files: ``test_cli_inputs_layers.py``.
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REAL_DATA, read_pyproject

from eplb.cli import main
from eplb.formats import FormatError, read_loads
from eplb.formats.detect import sniff_container

REAL = REAL_DATA
E = 16


def run(capsys, *argv: str, timeout: float = 60) -> tuple[int, str, str]:
    """``main(argv)`` in a thread, so a hang fails the test instead of blocking it."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", main(list(argv))),
                              daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"eplb {' '.join(argv)} hung"
    out, err = capsys.readouterr()
    return result["code"], out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("eplb: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def plan_args(path: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["plan", str(path), "-r", "20", "-g", "4", "-o", str(tmp_path / "out.json"), *extra]


# ----------------------------------------------------------------- hostile files
def _hostile(tmp: Path) -> list[tuple[str, str]]:
    """``(file name, words the error must contain)``; the files are written into ``tmp``."""
    cases = []

    def add(name: str, content: str | bytes, needle: str) -> None:
        path = tmp / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        cases.append((name, needle))

    add("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply")
    add("deep_sglang.json", '{"logical_count": ' + "[" * 50_000 + "]" * 50_000 + "}",
        "nested too deeply")
    add("deep_hist.json", '{"load_history": [' + "[" * 50_000 + "]" * 50_000 + "]}",
        "nested too deeply")
    add("big.json", '{"logical_count": [[1, 1' + "0" * 400 + "]]}", "too large")
    add("bignum_hist.json",
        '{"load_history": [{"logical_expert_load": [[1, 1' + "0" * 400 + "]]}]}", "too large")
    add("digits.json", "[[1, 1" + "0" * 5000 + "]]", "4300 digits")
    add("inf.json", '{"logical_count": [[1, 1e400]]}', "finite")
    add("SOURCE.md", "# Where this data comes from\n\nReal router decisions, token by token.\n",
        "unrecognised content (text starting '# Where")
    add("notes.txt", "some: thing\nmore text\n", "notes.txt: is text, not load statistics")
    # a Markdown file whose first line reads "Key: value" was called YAML (new-user pass)
    add("STATS.md", "# Skew\n\nConventions: max/mean per layer\n", "STATS.md: is text, not")
    add("stats.yaml", "some: thing\n", "is YAML text, not load statistics")
    # a .npy whose header claims 240 GB
    header = np.lib.format.header_data_from_array_1_0(np.zeros((2, 3)))
    header["shape"] = (9_999_999_999, 3)
    with open(tmp / "lying.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(np.zeros(6).tobytes())
    cases.append(("lying.npy", "header claims shape (9999999999, 3)"))
    np.save(tmp / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases.append(("objects.npy", "Python objects"))
    np.savez(tmp / "objects.npz", loads=np.array([{"a": 1}], dtype=object))
    cases.append(("objects.npz", "'loads' holds Python objects"))
    torch.save({"x_topk_ids": torch.full((4, 2, 2), 2**31, dtype=torch.int64)}, tmp / "id.pt")
    cases.append(("id.pt", "expert id 2147483648"))
    add("garbage.pt", b"\x80\x02garbage that is no pickle", "not a readable torch file")
    # a single number, or flags, are no loads (they were planned as 1 layer x 1 expert)
    add("scalar.json", "5", "single number")
    add("flags.json", "[[true, false, true, true]]", "the JSON array[0][0] is true, not a load")
    add("mixed.json", "[[3, 5, true, 7]]", "the JSON array[0][2] is true, not a load")
    np.save(tmp / "scalar.npy", np.array(5.0))
    cases.append(("scalar.npy", "single number"))
    # archives cut short (an interrupted copy): they were "unrecognised content"
    for name, save in (("cut.npz", lambda p: np.savez(p, loads=np.ones((4, E)))),
                       ("cut.pt", lambda p: torch.save(torch.ones(4, E), p))):
        save(tmp / name)
        whole = (tmp / name).read_bytes()
        (tmp / name).write_bytes(whole[: len(whole) // 2])
        cases.append((name, "damaged or truncated zip archive"))
    return cases


def test_hostile_files_are_clear_errors(capsys, tmp_path) -> None:
    for name, needle in _hostile(tmp_path):
        code, _, err = run(capsys, *plan_args(tmp_path / name, tmp_path))
        assert_user_error(code, err, name, needle)
        assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("command", ["plan", "eval-loads", "eval-placement", "previous",
                                     "gpu-speed", "simulate", "bench"])
def test_a_fifo_is_refused_not_read(capsys, tmp_path, command) -> None:
    fifo = tmp_path / "stats.json"
    os.mkfifo(fifo)
    good = tmp_path / "good.npy"
    np.save(good, np.ones((2, E)))
    placement = tmp_path / "p.json"
    code, _, err = run(capsys, *plan_args(good, tmp_path, "-o", str(placement)))
    assert code == 0, err
    argv = {
        "plan": plan_args(fifo, tmp_path),
        "eval-loads": ["eval", "--placement", str(placement), str(fifo)],
        "eval-placement": ["eval", "--placement", str(fifo), str(good)],
        "previous": plan_args(good, tmp_path, "--previous", str(fifo)),
        "gpu-speed": plan_args(good, tmp_path, "--gpu-speed", str(fifo)),
        "simulate": ["simulate", str(fifo), "--window", "1", "-r", "20", "-g", "4"],
        "bench": ["bench", "--no-builtin", str(fifo)],
    }[command]
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, "FIFO")


def test_a_device_is_refused(capsys, tmp_path) -> None:
    code, _, err = run(capsys, *plan_args(Path("/dev/zero"), tmp_path))
    assert_user_error(code, err, "/dev/zero", "device")


def test_an_unreadable_file_is_a_usage_error(capsys, tmp_path, monkeypatch) -> None:
    path = tmp_path / "secret.npy"
    np.save(path, np.ones((2, E)))
    os.chmod(path, 0)
    if os.geteuid() == 0:  # root reads anything: make the kernel's refusal happen here
        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if Path(str(file)) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    code, _, err = run(capsys, *plan_args(path, tmp_path))
    assert_user_error(code, err, "ermission denied", "secret.npy")


def _safetensors_with_length_byte(tmp: Path, low_byte: int) -> Path:
    """A TensorRT-LLM rank file whose 8-byte header length starts with ``low_byte``."""
    st = pytest.importorskip("safetensors.torch")
    tensors = {f"{it}_{layer}": torch.arange(E, dtype=torch.int64) + it
               for it in range(2) for layer in (3, 4)}
    for pad in range(400):
        path = tmp / "rank0.safetensors"
        st.save_file(tensors, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == low_byte:
            return path
    pytest.fail("could not produce the header length")


def test_safetensors_whose_header_length_byte_is_0x80_is_not_a_pickle(capsys, tmp_path) -> None:
    path = _safetensors_with_length_byte(tmp_path, 0x80)
    assert sniff_container(path) == "safetensors"
    trace = read_loads(path)
    assert trace.format == "trtllm" and trace.layer_ids == [3, 4]
    code, _, err = run(capsys, *plan_args(path, tmp_path))
    assert code == 0, err


def test_the_data_folders_source_md_is_not_called_a_placement(capsys, tmp_path) -> None:
    path = REAL / "esft_deepseek_v2_lite_routing" / "SOURCE.md"
    if not path.is_file():
        pytest.skip(f"real data not found at {path} (set EPLB_REAL_DATA to the real-data folder)")
    code, _, err = run(capsys, "plan", str(path), "-r", "80", "-g", "16", "-o",
                       str(tmp_path / "out.json"))
    assert_user_error(code, err, "SOURCE.md", "unrecognised content")
    assert "TensorRT-LLM" not in err.split("expected")[0]


def test_a_trtllm_yaml_given_as_loads_is_named_a_placement(capsys, tmp_path) -> None:
    path = tmp_path / "lb.yaml"
    path.write_text("num_slots: 4\nlayer_updates_per_iter: 0\ninitial_global_assignments: {}\n")
    code, _, err = run(capsys, *plan_args(path, tmp_path))
    assert_user_error(code, err, "TensorRT-LLM load-balancer YAML", "--placement")


def test_format_error_is_a_value_error_naming_the_file(tmp_path) -> None:
    path = tmp_path / "x.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(FormatError, match=r"x\.npy"):
        read_loads(path)


def test_pt_files_are_refused_on_a_torch_whose_safe_load_is_unsafe(capsys, tmp_path,
                                                                   monkeypatch) -> None:
    path = tmp_path / "loads.pt"
    torch.save(torch.ones(2, E), path)
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    code, _, err = run(capsys, *plan_args(path, tmp_path))
    assert_user_error(code, err, "loads.pt", "torch 2.5.1", "CVE-2025-32434")
    monkeypatch.setattr(torch, "__version__", "2.10.0+cpu")
    code, _, err = run(capsys, *plan_args(path, tmp_path))
    assert code == 0, err


def test_the_declared_torch_floor_is_the_safe_one() -> None:
    from eplb.formats.detect import SAFE_TORCH_LOAD

    deps = read_pyproject()["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if d.startswith("torch")]
    floor = tuple(int(x) for x in torch_dep.split(">=")[1].split(".")[:2])
    assert floor >= SAFE_TORCH_LOAD == (2, 10)


def test_the_declared_version_is_the_packages(capsys) -> None:
    # pyproject.toml and eplb/_version.py say it twice (newcomer pass: nothing compared
    # them); --version prints the package's
    from eplb import __version__

    assert read_pyproject()["project"]["version"] == __version__
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"eplb {__version__}"


def test_an_output_that_cannot_be_created_names_the_output(capsys, tmp_path) -> None:
    np.save(tmp_path / "l.npy", np.ones((2, E)))
    code, _, err = run(capsys, *plan_args(tmp_path / "l.npy", tmp_path, "-o", "/proc/x.json"))
    assert_user_error(code, err, "/proc/x.json")
    assert ".tmp" not in err


def test_sizes_from_one_number_are_bounded_and_named(capsys, tmp_path) -> None:
    # each of these once sized an allocation of gigabytes from one number in the input
    rows = [[1, 2, 3, 4], [4, 3, 2, 1]]
    loads = tmp_path / "w.json"
    loads.write_text(json.dumps(rows))
    code, _, err = run(capsys, "plan", str(loads), "-r", "8", "-g", "4", "--first-layer", "3",
                       "--num-model-layers", "100000000", "-o", str(tmp_path / "x.sglang.json"))
    assert_user_error(code, err, "--num-model-layers", "1..4096")
    code, _, err = run(capsys, "plan", str(loads), "-r", "8", "-g", "4", "--first-layer", "4095",
                       "-o", str(tmp_path / "x.yaml"))
    assert_user_error(code, err, "--first-layer 4095", "layer 4096")
    huge = tmp_path / "huge.npz"
    np.savez(huge, counts=np.array([rows]), layer_ids=np.array([3, 100_000_000]))
    code, _, err = run(capsys, "plan", str(huge), "-r", "8", "-g", "4",
                       "-o", str(tmp_path / "o.sglang.json"))
    assert_user_error(code, err, "huge.npz", "layer id 100000000 is outside 0..4095")
    code, _, err = run(capsys, "generate", "--preset", "deepseek-v3", "--steps", "200000",
                       "-o", str(tmp_path / "g.pt"), "-q")
    assert_user_error(code, err, "22.1 GiB", "fewer steps")
    assert not (tmp_path / "g.pt").exists()


@pytest.mark.parametrize("where", ["output", "loads", "placement", "report", "trace"])
def test_a_name_too_long_is_a_usage_error(capsys, tmp_path, where) -> None:
    """A name longer than the file system allows is the user's to fix (exit 2, one line),
    not a failure while running with a hint at --debug."""
    loads = tmp_path / "loads.npy"
    np.save(loads, np.arange(1, 2 * E + 1, dtype=np.float64).reshape(2, E))
    long = str(tmp_path / ("x" * 300 + ".json"))
    argv = {
        "output": ["plan", str(loads), "-r", str(E), "-g", "4", "-o", long],
        "loads": ["plan", long, "-r", str(E), "-g", "4", "-o", str(tmp_path / "p.json")],
        "placement": ["eval", "--placement", long, str(loads)],
        "report": ["bench", "--no-builtin", str(loads), "--repeats", "1", "--report", long],
        "trace": ["generate", "--preset", "mixtral-8x7b", "--steps", "2", "-o", long, "-q"],
    }[where]
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eplb: error: ") and "too long" in lines[0]
    assert "--debug" not in err and "OSError" not in err


def test_bench_on_a_file_of_all_zero_layers_names_the_file(capsys, tmp_path) -> None:
    """bench leaves all-zero rows (dense layers) out; a file with no other rows is one
    error naming the file and why, not 'weight has no layers (shape (0, E))'."""
    loads = tmp_path / "dense.npy"
    np.save(loads, np.zeros((3, E)))
    code, _, err = run(capsys, "bench", "--no-builtin", str(loads), "-r", str(E), "-g", "4",
                       "--repeats", "1")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eplb: error: "), err
    assert "dense.npy" in lines[0] and "zero" in lines[0] and "shape" not in lines[0]


def test_a_missing_optional_package_is_a_set_up_error(capsys, tmp_path, monkeypatch) -> None:
    # the newcomer's pass: without safetensors, a TensorRT-LLM rank file printed
    # "eplb: error: ImportError: ..." and exit 1, a failure of eplb's; it is the set-up's
    path = _safetensors_with_length_byte(tmp_path, 0x80)
    for name in ("safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    code, _, err = run(capsys, *plan_args(path, tmp_path))
    assert_user_error(code, err, "needs the optional 'safetensors' package",
                      "pip install 'safetensors>=0.4'")
    assert "ImportError" not in err


def test_finite_loads_that_overflow_when_summed_are_named_as_such(capsys, tmp_path) -> None:
    # every entry is finite; their sum over the steps is not. The planner used to blame
    # the first entry ("weight[0, 0] ... is inf"), which the file does not hold (attacker)
    path = tmp_path / "huge.json"
    path.write_text(json.dumps([[[1.7e308] * E] * 2] * 2))
    code, _, err = run(capsys, *plan_args(path, tmp_path))
    assert_user_error(code, err, "the loads summed over 2 steps: the sum overflows float64",
                      "scale them down")


def test_a_number_beyond_float64_is_not_called_inf_alone(capsys, tmp_path) -> None:
    # a 5,000-digit count (CSV) or JSON's 1e400 reads as inf: the error said "is inf", a
    # value the file does not hold (attacker pass); now it names the overflow as a cause
    big = tmp_path / "big.csv"
    big.write_text(",".join(["1"] * (E - 1) + ["9" * 5000]) + "\n")
    huge = tmp_path / "huge.json"
    huge.write_text("[[" + ", ".join(["1"] * (E - 1) + ["1e400"]) + "]]")
    for path in (big, huge):
        code, _, err = run(capsys, *plan_args(path, tmp_path))
        assert_user_error(code, err, f"expert {E - 1}) is inf (infinite, or a number too "
                          "large for a 64-bit float in the input)", "finite")


def test_a_ragged_placement_names_its_rows(capsys, tmp_path) -> None:
    import eplb
    from eplb.formats import write_placement

    weight = torch.rand(3, E, generator=torch.Generator().manual_seed(0)) * 100
    placement = tmp_path / "p.json"
    write_placement(eplb.plan(weight, 20, 4), placement)
    record = json.loads(placement.read_text())
    record["phy2log"][1] = record["phy2log"][1][:-1]
    placement.write_text(json.dumps(record))
    loads = tmp_path / "w.pt"
    torch.save(weight, loads)
    code, _, err = run(capsys, "eval", "--placement", str(placement), str(loads))
    assert_user_error(code, err, "[1] has 19 entries where [0] has 20")
    # an empty first row: torch reads [[], [...]] as an empty table without a word
    record["phy2log"] = [[], *record["phy2log"][1:]]
    placement.write_text(json.dumps(record))
    code, _, err = run(capsys, "eval", "--placement", str(placement), str(loads))
    assert_user_error(code, err, "[1] has 19 entries where [0] has 0")


def test_a_list_option_given_a_negative_first_value_gets_eplbs_own_message(capsys, tmp_path,
                                                                           monkeypatch):
    # argparse reads "-1,1,1,1" as an option and answered "expected one argument"; the
    # value is glued to its option, so eplb's check names what is wrong (attacker pass)
    weight = torch.rand(3, E, generator=torch.Generator().manual_seed(0)) * 100
    loads = tmp_path / "w.pt"
    torch.save(weight, loads)
    code, _, err = run(capsys, *plan_args(loads, tmp_path, "--gpu-speed", "-1,1,1,1"))
    assert_user_error(code, err, "--gpu-speed values must be finite and > 0")
    code, _, err = run(capsys, *plan_args(loads, tmp_path, "--dead-gpus", "-3"))
    assert_user_error(code, err, "--dead-gpus: GPU -3 is outside 0..3")
    # a negative number argparse itself reads as an option (-inf, -nan, -1e5) reaches
    # the option's own check too, whatever its case
    for value in ("-inf", "-NaN", "-1e5", "-2.5E-3"):
        code, _, err = run(capsys, *plan_args(loads, tmp_path, "--max-moves", value))
        assert_user_error(code, err, "--max-moves")
        assert "expected one argument" not in err, (value, err)
    code, _, err = run(capsys, *plan_args(loads, tmp_path, "--gpu-speed", "-inf,1,1,1"))
    assert_user_error(code, err, "--gpu-speed values must be finite and > 0")
    # nothing after "--" is touched: a LOADS file may be named "-1e5.npy" (second
    # attacker pass: it read "ambiguous option: --=-1e5.npy")
    monkeypatch.chdir(tmp_path)
    torch.save(weight, "-1e5.pt")
    code, _, err = run(capsys, "plan", "-r", "24", "-g", "4", "-o", "odd.json", "--", "-1e5.pt")
    assert code == 0, err


def test_bench_repeats_and_an_empty_estimator_are_refused(capsys, tmp_path):
    """`eplb bench --repeats 100000000` ran until killed, and `simulate --estimator ''`
    replayed with the window sum where the API refuses '' (attacker pass)."""
    code, _, err = run(capsys, "bench", "--repeats", "100000000")
    assert_user_error(code, err, "--repeats must be between 1 and 1000")
    trace = tmp_path / "t.npy"
    np.save(trace, np.random.default_rng(0).random((40, 4, 16)))
    code, _, err = run(capsys, "simulate", str(trace), "-r", "32", "-g", "8", "--window", "10",
                       "--estimator", "")
    assert_user_error(code, err, "unknown estimator ''")


def test_a_layer_near_float64s_end_leaves_the_others_figures_right(capsys, tmp_path) -> None:
    """Attacker pass: one layer of 2e307 per expert (its total overflows float64) beside
    layers of hundreds. The loads are scaled by one power of two for the ratios, so the
    small layers' loads become about 1e-305, and a clamp of the divisors to 1e-300 read
    their ceiling as 5e-5 and their balancedness as 0 in ``eval``."""
    rng = np.random.default_rng(0)
    small = rng.integers(1, 1000, (3, 16)).astype(np.float64)
    loads = np.concatenate([np.full((1, 16), 2e307), small])
    np.save(tmp_path / "huge.npy", loads)
    np.save(tmp_path / "small.npy", small)
    out = tmp_path / "p.json"
    assert main(["plan", str(tmp_path / "huge.npy"), "-r", "32", "-g", "8", "-o", str(out)]) == 0
    capsys.readouterr()
    record = json.loads(out.read_text())
    assert record["layer_ceiling"] == [1.0, 1.0, 1.0, 1.0]
    assert all(b <= c for b, c in zip(record["layer_balancedness"], record["layer_ceiling"],
                                      strict=True))
    # each small layer's figures as if scored alone
    assert main(["eval", "--placement", str(out), str(tmp_path / "huge.npy"), "--json"]) == 0
    huge = json.loads(capsys.readouterr().out)
    assert main(["eval", "--placement", str(out), str(tmp_path / "small.npy"), "--json",
                 "--first-layer", "1"]) == 0
    alone = json.loads(capsys.readouterr().out)["layers"]
    for key in ("balancedness_before", "balancedness_after", "ceiling"):
        assert [row[key] for row in huge["layers"][1:]] == pytest.approx(
            [row[key] for row in alone], rel=1e-12)
    assert min(row["balancedness_before"] for row in huge["layers"]) > 0.5
    # under the nearest rule too (review pass: its loads were summed unscaled, to inf)
    near = tmp_path / "near.json"
    assert main(["plan", str(tmp_path / "huge.npy"), "-r", "32", "-g", "8", "--nodes", "2",
                 "--dispatch", "nearest", "-o", str(near), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert main(["eval", "--placement", str(near), str(tmp_path / "huge.npy"), "--json",
                 "--dispatch", "nearest", "--previous", str(near)]) == 0
    scored = json.loads(capsys.readouterr().out)
    figures = [planned["balancedness_after"], scored["balancedness_after"],
               scored["balancedness_in_force"],
               *(row["balancedness_after"] for row in scored["layers"])]
    assert all(0.5 < figure <= 1.0 for figure in figures), figures
