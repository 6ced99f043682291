"""Inputs a user or an attacker hands the ``eplb`` command.

Every bad file is one ``eplb: error:`` line naming it, exit status 2, no traceback and
no hang (each case runs under a thread timeout). Real multi-array routing files (ESFT,
Qwen3) are read from ``../shared/data/real`` when present.
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


# ------------------------------------------------------------- top-k routing files
def _two_tasks(tmp: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    # distinct ids per top-k row, as a router's (a repeated one is refused)
    a = torch.rand(300, 3, E, generator=gen).argsort(2)[..., :2]
    b = torch.rand(200, 3, E, generator=gen).argsort(2)[..., :2]
    path = tmp / "routing.npz"
    np.savez(path, law_topk_ids=a.numpy().astype(np.int8), code_topk_ids=b.numpy().astype(
        np.int8), law_seq_lens=np.array([100, 200], dtype=np.int32))
    return path


def test_several_topk_arrays_need_key_never_a_silent_mix(capsys, tmp_path) -> None:
    path = _two_tasks(tmp_path)
    code, _, err = run(capsys, *plan_args(path, tmp_path))
    assert_user_error(code, err, "2 top-k id arrays", "--key")
    assert "CLI: --key" in err
    code, _, err = run(capsys, *plan_args(path, tmp_path, "--key", "law_topk_ids", "--json"))
    assert code == 0, err
    code, _, err = run(capsys, *plan_args(path, tmp_path, "--key", "nope", "--force"))
    assert_user_error(code, err, "no array 'nope'", "--key")


def test_key_with_several_arrays_reads_them_one_after_another(tmp_path) -> None:
    path = _two_tasks(tmp_path)
    both = read_loads(path, key=["law_topk_ids", "code_topk_ids"], tokens_per_step=100)
    assert both.num_steps == 3 + 2
    assert [s["name"] for s in both.meta["segments"]] == ["law_topk_ids", "code_topk_ids"]
    # one array named twice would be read twice (attacker pass), as a file given twice is
    with pytest.raises(ValueError, match="names 'law_topk_ids' twice"):
        read_loads(path, key=["law_topk_ids", "law_topk_ids"], tokens_per_step=100)


def test_key_with_several_count_arrays_reads_them_one_after_another(capsys, tmp_path) -> None:
    # plain count arrays too (new-user pass: mixing OLMoE's domains, or gpt-oss's think and
    # answer counts, was refused): one after another as steps, of one shape and layers
    rng = np.random.default_rng(3)
    path = tmp_path / "domains.npz"
    np.savez(path, arxiv=rng.random((3, E)) * 100, c4=rng.random((2, 3, E)) * 100,
             other=rng.random((3, E + 1)))
    both = read_loads(path, key=["arxiv", "c4"])
    assert both.num_steps == 3 and [s["steps"] for s in both.meta["segments"]] == [1, 2]
    assert torch.allclose(both.total(), read_loads(path, key="arxiv").total()
                          + read_loads(path, key="c4").total())
    with pytest.raises(FormatError, match=r"array 'other' has \[layers, experts\] = "
                                          r"\(3, 17\), but 'arxiv' has \(3, 16\)"):
        read_loads(path, key=["arxiv", "other"])
    records = tmp_path / "counts.json"
    records.write_text(json.dumps({"a": {"layers": [0, 7, 15], "counts": [[1] * E] * 3},
                                   "b": {"layers": [0, 7, 16], "counts": [[2] * E] * 3},
                                   "plain": [[3] * E] * 3}))
    with pytest.raises(FormatError, match="array 'b' names model layers 0, 7, 16, but 'a' "
                                          "names 0, 7, 15"):
        read_loads(records, key=["a", "b"])
    # an array naming no layers takes the others' (as files given together do)
    assert read_loads(records, key=["plain", "a"]).layer_ids == [0, 7, 15]
    # count arrays in a file detected as top-k ids by another array's name: refused, not
    # read as ids (third attacker pass); the format says how to read them
    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, arxiv=np.ones((3, E), np.int64), law_topk_ids=np.zeros((5, 3, 2), np.int64))
    with pytest.raises(FormatError, match=r"key .* names 'arxiv', not named so: give the format"):
        read_loads(mixed, key="arxiv")
    assert read_loads(mixed, key="arxiv", format="npz").counts.shape == (1, 3, E)
    code, out, err = run(capsys, *plan_args(path, tmp_path, "--key", "arxiv,c4"))
    assert code == 0, err
    assert "3 steps summed" in out
    # eval's and bench's headers name the arrays they scored (new-user pass: two domains
    # of one file read alike)
    code, out, err = run(capsys, "eval", "--placement", str(tmp_path / "out.json"), str(path),
                         "--key", "c4")
    assert code == 0, err
    assert f"on {path} [key c4]" in out
    code, out, err = run(capsys, "bench", str(path), "--key", "arxiv", "--no-builtin", "-r", "20",
                         "-g", "4")
    assert code == 0, err
    assert f"{path.name} [key arxiv]: " in out


def test_simulate_cuts_a_token_trace_into_steps(capsys, tmp_path) -> None:
    path = _two_tasks(tmp_path)
    code, out, err = run(capsys, "simulate", str(path), "--key", "law_topk_ids",
                         "--tokens-per-step", "25", "--window", "2", "-r", "20", "-g", "4",
                         "--json")
    assert code == 0, err
    runs = json.loads(out)["runs"]
    assert runs[0]["summary"]["steps"] == 12  # 300 tokens / 25 per step
    code, _, err = run(capsys, "simulate", str(path), "--key", "law_topk_ids",
                       "--tokens-per-step", "0", "--window", "2", "-r", "20", "-g", "4")
    assert_user_error(code, err, "--tokens-per-step")


def test_simulate_names_the_short_last_step_of_a_cut_token_trace(capsys, tmp_path) -> None:
    # new-user pass: 8327 tokens cut into 256s made 33 steps, the last of 135, without a word
    path = _two_tasks(tmp_path)  # 300 law tokens
    code, _, err = run(capsys, "simulate", str(path), "--key", "law_topk_ids",
                       "--tokens-per-step", "40", "--window", "2", "-r", "20", "-g", "4")
    assert code == 0, err
    assert "note: 1 of 8 steps holds fewer than --tokens-per-step 40 tokens (step 7: 20;" in err
    code, _, err = run(capsys, "simulate", str(path), "--key", "law_topk_ids",
                       "--tokens-per-step", "25", "--window", "2", "-r", "20", "-g", "4")
    assert code == 0 and "note:" not in err  # 300 = 12 × 25: every step whole


def test_a_mistyped_key_suggests_the_names_it_resembles(capsys, tmp_path) -> None:
    path = _two_tasks(tmp_path)
    code, _, err = run(capsys, *plan_args(path, tmp_path, "--key", "law"))
    assert_user_error(code, err, "no array 'law'", "did you mean 'law_topk_ids'")
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"mistral": {"counts": {"arxiv": [[1.0] * E] * 3}}}))
    code, _, err = run(capsys, *plan_args(nested, tmp_path, "--key",
                                          "mixtral/counts/arxiv", "--force"))
    assert_user_error(code, err, "did you mean 'mistral/counts/arxiv'")
    code, _, err = run(capsys, *plan_args(path, tmp_path, "--key", "nope", "--force"))
    assert "did you mean" not in err


def test_a_json_object_of_numbered_keys_is_named_no_array(capsys, tmp_path) -> None:
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"scores": {"1": {"0": 0.5, "1": 0.25}}}))
    code, _, err = run(capsys, *plan_args(path, tmp_path))
    assert_user_error(code, err, "holds no array of numbers")


def test_simulate_on_an_uncut_token_trace_points_at_tokens_per_step(capsys, tmp_path) -> None:
    path = _two_tasks(tmp_path)
    code, _, err = run(capsys, "simulate", str(path), "--key", "law_topk_ids",
                       "--window", "2", "-r", "20", "-g", "4")
    assert_user_error(code, err, "has 1 step;", "--tokens-per-step N", "300 tokens")


def test_tokens_per_step_on_counts_is_refused_naming_the_flag(capsys, tmp_path) -> None:
    path = tmp_path / "counts.npy"
    np.save(path, np.ones((3, E)))
    code, _, err = run(capsys, *plan_args(path, tmp_path, "--tokens-per-step", "8"))
    assert_user_error(code, err, "--tokens-per-step", "top-k")


def test_all_padding_ids_ask_for_num_experts_by_flag(capsys, tmp_path) -> None:
    path = tmp_path / "pad.npz"
    np.savez(path, x_topk_ids=np.full((4, 2, 2), -1, dtype=np.int64))
    code, _, err = run(capsys, *plan_args(path, tmp_path))
    assert_user_error(code, err, "--num-experts")
    code, _, err = run(capsys, *plan_args(path, tmp_path, "--num-experts", "16"))
    assert code == 0, err


def test_an_expert_count_read_off_the_ids_is_said_once(capsys, tmp_path) -> None:
    # a top-k trace does not record the expert count: the largest id + 1 is a guess, and
    # a short trace that never routes to the last expert plans one expert too few
    # (new-user pass: SGLang then failed on the file with a ZeroDivisionError)
    path = tmp_path / "short.npz"
    np.savez(path, x_topk_ids=np.array([[[0, 5], [1, 6]], [[2, 6], [3, 4]]]))
    code, out, err = run(capsys, *plan_args(path, tmp_path))
    assert code == 0, err
    assert err.count("warning") == 1 and "the expert count, 7, is the largest expert id" in err
    assert "--num-experts" in err and "2 layers × 7 experts" in out
    code, out, err = run(capsys, *plan_args(path, tmp_path, "--num-experts", "8", "--force"))
    assert code == 0 and "expert count" not in err and "2 layers × 8 experts" in out


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--placement", "{p}", "{loads}"], "--gpus"),  # an SGLang file without -g
    (["plan", "{loads}", "-r", "24", "-g", "4", "--dead-gpus", "1", "-o", "{out}.sglang.json",
      "--num-model-layers", "2"], "--emit json"),
])
def test_messages_name_the_flag_not_a_python_keyword(capsys, tmp_path, argv, flag) -> None:
    loads = tmp_path / "loads.npy"
    np.save(loads, np.ones((2, E)) + np.arange(E))
    sglang = tmp_path / "p.sglang.json"
    code, _, err = run(capsys, *plan_args(loads, tmp_path, "-o", str(sglang), "--force",
                                          "--num-model-layers", "2"))
    assert code == 0, err
    argv = [a.format(p=sglang, loads=loads, out=tmp_path / "x") for a in argv]
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, flag)


def test_real_multi_array_routing_files(capsys, tmp_path) -> None:
    esft = REAL / "esft_deepseek_v2_lite_routing" / "esft_topk_ids.npz"
    qwen = REAL / "qwen3_30b_a3b_sharegpt_prefill_vllm" / "qwen3_30b_sharegpt_prefill_topk_ids.npz"
    if not (esft.is_file() and qwen.is_file()):
        pytest.skip(f"real routing files not found under {REAL}"
                    " (set EPLB_REAL_DATA to the real-data folder)")
    code, _, err = run(capsys, "plan", str(esft), "-r", "80", "-g", "16", "-o",
                       str(tmp_path / "e.json"))
    assert_user_error(code, err, "4 top-k id arrays", "intent_topk_ids", "--key")
    code, _, err = run(capsys, "plan", str(esft), "--key", "law_topk_ids", "-r", "80", "-g",
                       "16", "-o", str(tmp_path / "e.json"))
    assert code == 0, err
    code, _, err = run(capsys, "plan", str(qwen), "-r", "160", "-g", "16", "-o",
                       str(tmp_path / "q.json"))
    assert_user_error(code, err, "3 top-k id arrays", "--key")
    law = read_loads(esft, key="law_topk_ids", tokens_per_step=1024)
    assert law.num_steps == 9 and law.counts.sum() == 8327 * 26 * 6


def test_format_error_is_a_value_error_naming_the_file(tmp_path) -> None:
    path = tmp_path / "x.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(FormatError, match=r"x\.npy"):
        read_loads(path)


def test_key_on_a_single_array_format_is_refused(capsys, tmp_path) -> None:
    path = tmp_path / "dump.json"
    path.write_text(json.dumps({"logical_count": [[1, 2, 3, 4] * 4] * 2}))
    code, _, err = run(capsys, *plan_args(path, tmp_path, "--key", "foo"))
    assert_user_error(code, err, "--key", "'sglang'")


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


def test_a_json_file_that_is_one_count_record_keeps_its_layer_ids(capsys, tmp_path) -> None:
    # the README's {"counts": [[...]], "layers": [...]} record, as the whole file
    rows = [[1, 2, 3, 4], [5, 6, 7, 8]]
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"counts": rows, "layers": [3, 4]}))
    assert read_loads(path).layer_ids == [3, 4]
    out = tmp_path / "plan.json"
    code, _, err = run(capsys, "plan", str(path), "-r", "4", "-g", "2", "-o", str(out))
    assert code == 0, err
    assert json.loads(out.read_text())["layer_ids"] == [3, 4]
    path.write_text(json.dumps({"counts": rows, "layer_ids": [3]}))
    code, _, err = run(capsys, "plan", str(path), "-r", "4", "-g", "2", "-o", str(out),
                       "--force")
    assert_user_error(code, err, "counts has 1 layer ids for 2 rows")
    # a record beside another array is one of two arrays: the key still chooses
    path.write_text(json.dumps({"counts": rows, "layers": [3, 4], "other": rows}))
    code, _, err = run(capsys, "plan", str(path), "-r", "4", "-g", "2", "-o", str(out),
                       "--force")
    assert_user_error(code, err, "--key")


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


@pytest.mark.parametrize(("name", "write"), [
    ("ids.npz", lambda p: np.savez(p, counts=np.ones((1, 2, 4)), layer_ids=np.array([3.7, 5.2]))),
    ("ids.csv", lambda p: p.write_text("layer,a,b\n3.5,1,2\n4,3,4\n")),
    ("twice.csv", lambda p: p.write_text("layer,a,b\n3,1,2\n3,3,4\n")),
])
def test_layer_ids_are_whole_distinct_numbers_never_truncated(capsys, tmp_path, name,
                                                               write) -> None:
    path = tmp_path / name
    write(path)
    code, _, err = run(capsys, "plan", str(path), "-r", "4", "-g", "2", "-o",
                       str(tmp_path / "o.json"))
    assert_user_error(code, err, name, "layer id")


def test_key_on_one_plain_json_array_is_refused(capsys, tmp_path) -> None:
    path = tmp_path / "w.json"
    path.write_text(json.dumps([[1, 2, 3, 4]] * 2))
    code, _, err = run(capsys, "plan", str(path), "--key", "x", "-r", "4", "-g", "2", "-o",
                       str(tmp_path / "o.json"))
    assert_user_error(code, err, "w.json", "picks nothing")


def test_key_on_a_one_record_json_file_is_counts_or_nothing(capsys, tmp_path) -> None:
    # found by a review pass: --key layers planned the ids as loads
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"counts": [[1, 2, 3, 4], [4, 3, 2, 1]], "layers": [3, 7]}))
    assert read_loads(path, key="counts").layer_ids == [3, 7]
    code, _, err = run(capsys, "plan", str(path), "--key", "layers", "-r", "4", "-g", "2",
                       "-o", str(tmp_path / "o.json"))
    assert_user_error(code, err, "one count record", "picks nothing")


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


def test_eval_and_simulate_read_several_loads_files_as_steps_as_plan_does(capsys,
                                                                          tmp_path) -> None:
    """A shell glob of SGLang dumps (README: plan, eval and simulate read them) names
    several files: eval and simulate read them as steps one after another, as plan does,
    instead of stopping at argparse's 'unrecognized arguments'."""
    from test_cli import E, L, P, R, run

    gen = np.random.default_rng(7)
    steps = np.exp(gen.normal(0, 1, size=(4, L, E))) * 100
    files = []
    for i, step in enumerate(steps):
        files.append(tmp_path / f"dump{i}.npy")
        np.save(files[-1], step)
    whole = tmp_path / "whole.npy"
    np.save(whole, steps)
    out = tmp_path / "p.json"
    assert run(capsys, "plan", *files, "-r", R, "-g", P, "-o", out)[0] == 0
    code, text, err = run(capsys, "eval", "--placement", out, *files, "--json")
    assert code == 0, err
    alone = json.loads(run(capsys, "eval", "--placement", out, whole, "--json")[1])
    assert json.loads(text)["balancedness_after"] == alone["balancedness_after"]
    code, text, err = run(capsys, "simulate", *files, "--window", "1", "-r", R, "-g", P,
                          "--json")
    assert code == 0, err
    steps_of = json.loads(text)["runs"][0]["summary"]
    whole_of = json.loads(run(capsys, "simulate", whole, "--window", "1", "-r", R, "-g", P,
                              "--json")[1])["runs"][0]["summary"]
    assert steps_of["steps"] == 4
    assert steps_of["window_balancedness"] == whole_of["window_balancedness"]


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


def test_several_loads_files_are_matched_by_model_layer(capsys, tmp_path) -> None:
    """An SGLang dump (a row per model layer, the dense ones zero) and a trace of the MoE
    layers alone, or bare rows that --first-layer names beside a trace that names them,
    are one model's steps (new-user pass: both were refused, the message naming no layer);
    files whose layers differ where they carry load are refused, naming the layers."""
    gen = np.random.default_rng(3)
    moe = np.exp(gen.normal(0, 1, size=(3, E))) * 100  # 3 MoE layers, model layers 2..4
    dump = tmp_path / "dump.json"  # SGLang's layout: layers 0..4, dense 0 and 1 all zero
    dump.write_text(json.dumps({"logical_count": [[[0] * E] * 2 + moe.round().tolist()]}))
    trace = tmp_path / "trace.npz"
    np.savez(trace, counts=moe[None], layer_ids=np.array([2, 3, 4]))
    bare = tmp_path / "bare.npy"
    np.save(bare, moe)
    out = tmp_path / "p.json"
    code, _, err = run(capsys, "plan", str(dump), str(trace), "-r", "20", "-g", "4", "-o",
                       str(out))
    assert code == 0, err
    assert json.loads(out.read_text())["layer_ids"] == [2, 3, 4]
    code, _, err = run(capsys, "plan", str(bare), str(trace), "--first-layer", "2", "-r",
                       "20", "-g", "4", "-o", str(out), "--force")
    assert code == 0, err
    assert json.loads(out.read_text())["layer_ids"] == [2, 3, 4]
    # bare rows of the MoE layers beside the dump, whose dense rows are zero
    code, _, err = run(capsys, "plan", str(dump), str(bare), "-r", "20", "-g", "4", "-o",
                       str(out), "--force")
    assert code == 0, err
    assert json.loads(out.read_text())["layer_ids"] == [2, 3, 4]
    # the layers disagree where they carry load: named, not matched
    other = tmp_path / "other.npz"
    np.savez(other, counts=moe[None], layer_ids=np.array([5, 6, 7]))
    code, _, err = run(capsys, "plan", str(trace), str(other), *plan_args(trace, tmp_path)[2:])
    assert_user_error(code, err, "no model layer in common")
    shifted = tmp_path / "shifted.npz"
    np.savez(shifted, counts=moe[None], layer_ids=np.array([3, 4, 5]))
    code, _, err = run(capsys, "plan", str(trace), str(shifted), *plan_args(trace, tmp_path)[2:])
    assert_user_error(code, err, "trace.npz has load in layers the others lack",
                      "trace.npz: 2..4", "shifted.npz: 3..5")
    # bare rows of another count than the named layers', and bare files of unequal rows
    np.save(tmp_path / "two.npy", moe[:2])
    code, _, err = run(capsys, "plan", str(tmp_path / "two.npy"), str(trace),
                       *plan_args(trace, tmp_path)[2:])
    assert_user_error(code, err, "2 rows without model layer ids", "2..4")
    code, _, err = run(capsys, "plan", str(tmp_path / "two.npy"), str(bare),
                       *plan_args(trace, tmp_path)[2:])
    assert_user_error(code, err, "must describe the same model")
    # a file that lists its layers high to low: bare rows still go lowest layer first
    # (attacker pass: bare row 0 was summed into layer 4)
    down = tmp_path / "down.npz"
    np.savez(down, counts=moe[None, ::-1], layer_ids=np.array([4, 3, 2]))
    code, _, err = run(capsys, "plan", str(down), str(bare), "-r", "20", "-g", "4", "-o",
                       str(out), "--force", "--json")
    assert code == 0, err
    assert json.loads(out.read_text())["layer_ids"] == [2, 3, 4]
    code, _, err = run(capsys, "plan", str(trace), str(bare), "-r", "20", "-g", "4", "-o",
                       str(tmp_path / "up.json"))
    assert code == 0, err
    assert (json.loads(out.read_text())["phy2log"]
            == json.loads((tmp_path / "up.json").read_text())["phy2log"])


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
