"""Top-k routing files handed to the ``eplb`` command: several arrays and ``--key``, token
traces cut into steps, expert counts read off the ids, messages that name the flag, and
real multi-array routing files (ESFT, Qwen3, from ``../shared/data/real`` when present).

Runs through ``test_cli_inputs.py``'s ``run`` (a thread timeout), as its hostile files do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import skewed_loads_json
from test_cli_inputs import REAL, E, assert_user_error, plan_args, run

from eplb.core import LoadTrace
from eplb.formats import FormatError, read_loads, read_placement, write_loads


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


def test_several_token_traces_keep_every_file_s_step_tokens(capsys, tmp_path) -> None:
    """Files joined as steps one after another keep each file's per-step token counts:
    the first file's alone were kept, so the short last step of the second file went
    unnoted, the note counted the first file's steps, and a --step-range into the
    second file noted a step of the first."""
    gen = torch.Generator().manual_seed(3)
    files = []
    for name, tokens in (("whole.npz", 600), ("short.npz", 700)):  # cut by 300: 2 and 3 steps
        ids = torch.rand(tokens, 2, E, generator=gen).argsort(2)[..., :2]
        files.append(tmp_path / name)
        np.savez(files[-1], x_topk_ids=ids.numpy().astype(np.int8))
    base = ["--tokens-per-step", "300", "--window", "1", "-r", "20", "-g", "4"]
    code, _, err = run(capsys, "simulate", *map(str, files), *base)
    assert code == 0, err
    assert "note: 1 of 5 steps holds fewer than --tokens-per-step 300 tokens (step 4: 100;" \
        in err
    code, _, err = run(capsys, "simulate", *map(str, files[::-1]), *base, "--step-range", "3:")
    assert code == 0 and "note:" not in err, err  # steps 3, 4: the whole file's
    code, _, err = run(capsys, "simulate", *map(str, files), "--window", "2", "-r", "20",
                       "-g", "4")
    assert_user_error(code, err, "(it holds 1300 tokens)")


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
    # simulate and bench replay such a count too, and say so alike (new-user pass: they
    # were silent); with --num-experts they are not
    many = tmp_path / "many.npz"
    ids = np.random.default_rng(0).integers(0, 7, (400, 2, 2))
    ids[:, :, 1] = (ids[:, :, 0] + 1) % 7  # two distinct ids a token, never expert 7
    np.savez(many, x_topk_ids=ids)
    replay = ["simulate", str(many), "--tokens-per-step", "10", "--window", "5", "-r", "8",
              "-g", "4", "--planner", "greedy", "--json"]
    benched = ["bench", str(many), "--tokens-per-step", "10", "--no-builtin", "-r", "8",
               "-g", "4", "--repeats", "1", "--json"]
    for command in (replay, benched):
        code, _, err = run(capsys, *command)
        assert code == 0, err
        assert err.count("the expert count") == 1
        assert "the expert count" in err and ", 7, is the largest expert id" in err
        code, _, err = run(capsys, *command, "--num-experts", "8")
        assert code == 0 and "expert count" not in err, err


def test_token_traces_whose_largest_ids_differ_are_told_of_num_experts(capsys, tmp_path):
    # two traces of one model, one never routing to the last expert: their counts read
    # off the ids differ, and the refusal said "the same model" with no word of the fix
    first, second = tmp_path / "k1.npz", tmp_path / "k2.npz"
    np.savez(first, x_topk_ids=np.array([[[0, 5], [1, 6]], [[2, 6], [3, 4]]]))
    np.savez(second, x_topk_ids=np.array([[[0, 7], [1, 6]], [[2, 6], [3, 4]]]))
    code, _, err = run(capsys, "plan", str(first), str(second), "-r", "16", "-g", "4",
                       "-o", str(tmp_path / "kk.json"))
    assert_user_error(code, err, "same model", "k1.npz: the expert count was read off",
                      "--num-experts")
    code, _, err = run(capsys, "plan", str(first), str(second), "-r", "16", "-g", "4",
                       "-o", str(tmp_path / "kk.json"), "--num-experts", "8")
    assert code == 0, err


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


def test_key_on_a_single_array_format_is_refused(capsys, tmp_path) -> None:
    path = tmp_path / "dump.json"
    path.write_text(json.dumps({"logical_count": [[1, 2, 3, 4] * 4] * 2}))
    code, _, err = run(capsys, *plan_args(path, tmp_path, "--key", "foo"))
    assert_user_error(code, err, "--key", "'sglang'")


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


def test_eval_pairs_a_trace_of_a_dumps_moe_rows_with_its_loaded_rows(capsys, tmp_path) -> None:
    """A routing trace of the MoE layers beside an SGLang dump (dense rows all zero) and
    an SGLang file of every row: eval pairs the trace's layers with the rows that carry
    load, says so, and counts what it counts on the MoE rows alone in eplb's trace file
    (new-user passes: eval refused it, and the way forward needed Python)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.rand(200, 3, E, generator=gen).argsort(2)[..., :2]  # [tokens, 3 MoE, k]
    counts = torch.zeros(5, E)
    for layer in range(3):
        counts[2 + layer] = torch.bincount(ids[:, layer].flatten(), minlength=E).float()
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"logical_count": counts.tolist()}))  # 2 dense rows first
    trace = tmp_path / "trace.npz"
    np.savez(trace, topk_ids=ids.numpy().astype(np.int32))
    out = tmp_path / "p.sglang.json"
    topo = ["-g", "4", "--nodes", "2", "--dispatch", "nearest"]
    code, _, err = run(capsys, "plan", str(dump), "-r", "20", *topo, "-o", str(out))
    assert code == 0, err
    scored = ["eval", "--placement", str(out), "--routing", str(trace), *topo, "--json"]
    code, text, err = run(capsys, *scored, str(dump))
    assert code == 0, err
    assert "its 3 layers are the loads' 3 rows that carry load (rows 2..4)" in err
    paired = json.loads(text)["remote_nodes_per_token"]
    read = read_loads(dump)
    moe = tmp_path / "moe.npz"
    write_loads(LoadTrace(read.counts[:, 2:], read.layer_ids[2:]), moe)
    code, text, err = run(capsys, *scored, str(moe))
    assert code == 0, err
    assert json.loads(text)["remote_nodes_per_token"] == paired > 0


def test_a_routing_trace_of_the_moe_rows_pairs_with_a_dumps_loaded_rows(tmp_path, capsys):
    # new-user passes: sample_group_limited refuses all-zero rows, so its trace has the MoE
    # rows only; beside an SGLang dump (dense rows all zero) plan refused it, and the MoE
    # rows had to be written out in Python first. Now its layers go to the rows with load,
    # and those rows are planned as from the MoE rows alone
    _, w = skewed_loads_json(tmp_path, 4, 64, seed=3)
    rng = np.random.default_rng(0)
    p = (w / w.sum(1, keepdim=True)).numpy()
    routing = tmp_path / "trace.npz"
    np.savez(routing, task_topk_ids=np.stack([np.stack([
        rng.choice(64, 4, replace=False, p=p[layer]) for layer in range(4)])
        for _ in range(300)]).astype(np.int32))
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"logical_count": torch.cat(
        [torch.zeros(2, 64), w]).tolist()}))  # 2 dense rows, then the 4 MoE rows
    moe = tmp_path / "moe.npz"
    write_loads(LoadTrace(w[None], [2, 3, 4, 5]), moe)  # the MoE rows, with their layer ids
    topo = ["-r", "96", "-g", "16", "--nodes", "4", "--groups", "8", "--policy", "locality",
            "--dispatch", "nearest", "--routing", str(routing), "--json"]
    code, text, err = run(capsys, "plan", str(dump), *topo, "-o", str(tmp_path / "all.json"))
    assert code == 0, err
    assert "its 4 layers are the loads' 4 rows that carry load (rows 2..5)" in err
    assert "2 all-zero rows (0..1" in err
    whole = json.loads(text)
    code, text, err = run(capsys, "plan", str(moe), *topo, "-o", str(tmp_path / "moe_only.json"))
    assert code == 0, err
    alone = json.loads(text)
    assert whole["remote_nodes_per_token"] == alone["remote_nodes_per_token"]
    planned = read_placement(tmp_path / "all.json")
    assert torch.equal(planned.phy2log[2:], read_placement(tmp_path / "moe_only.json").phy2log)
    # from a map in force of the MoE rows alone (--previous covers rows 2..5): the trace
    # goes to those rows as well
    code, _, err = run(capsys, "plan", str(dump), *topo, "--previous",
                       str(tmp_path / "moe_only.json"), "-o", str(tmp_path / "next.json"))
    assert code == 0, err
    assert "its 4 layers are the loads' 4 rows that carry load" in err
    # a trace that fits neither every row nor the loaded ones is still refused
    short = tmp_path / "short.npz"
    np.savez(short, task_topk_ids=np.load(routing)["task_topk_ids"][:, :3])
    code, _, err = run(capsys, "plan", str(dump), *topo[:-2], str(short), "-o",
                       str(tmp_path / "x.json"))
    assert code == 2 and "Traceback" not in err
    assert "has 3 layers, the loads 6" in err


def _dump_and_moe_trace(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """``(dump, trace, ids)``: an SGLang dump of 2 all-zero dense rows and 3 MoE rows of
    ``E`` experts, and a top-k trace of the 3 MoE rows (``ids [200, 3, 2]``)."""
    ids = torch.rand(200, 3, E, generator=torch.Generator().manual_seed(2)).argsort(2)[..., :2]
    counts = torch.zeros(5, E)
    for layer in range(3):
        counts[2 + layer] = torch.bincount(ids[:, layer].flatten(), minlength=E).float()
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"logical_count": counts.tolist()}))
    trace = tmp_path / "trace.npz"
    np.savez(trace, topk_ids=ids.numpy())
    return dump, trace, ids.numpy()


def test_a_refused_moe_rows_trace_is_one_line_with_no_pairing_note(capsys, tmp_path) -> None:
    # attacker pass: the note on pairing a trace of the MoE rows with a dump's loaded rows
    # came before the refusal of the plan's policy or of the trace itself (two lines)
    dump, trace, ids = _dump_and_moe_trace(tmp_path)
    topo = ["-g", "4", "--nodes", "2", "--groups", "4", "--dispatch", "nearest"]
    beyond = tmp_path / "beyond.npz"
    wide = ids.copy()
    wide[0, 1, 0] = E  # an expert the loads do not have
    np.savez(beyond, topk_ids=wide)
    out = str(tmp_path / "p.json")
    for extra, needle in ((["--policy", "global", "--routing", str(trace)],
                           "--policy global plans without them"),
                          (["--policy", "locality", "--routing", str(beyond)], f"expert {E}")):
        code, _, err = run(capsys, "plan", str(dump), "-r", "20", *topo, *extra, "-o", out)
        assert_user_error(code, err, needle)
    code, _, err = run(capsys, "plan", str(dump), "-r", "20", *topo, "--policy", "locality",
                       "--routing", str(trace), "-o", out)
    assert code == 0 and "its 3 layers are the loads' 3 rows that carry load" in err, err
    code, _, err = run(capsys, "eval", "--placement", out, str(dump), *topo,
                       "--routing", str(beyond))
    assert_user_error(code, err, "beyond the placement's")


def test_a_repeated_id_is_named_by_the_routing_file_s_own_layer(capsys, tmp_path) -> None:
    # attacker pass: a trace of the MoE rows, padded to the dump's rows, named its repeated
    # id by the padded index ("layer 3" for the file's layer 1); eval also cut a trace of
    # every row to the placement's rows first
    dump, trace, ids = _dump_and_moe_trace(tmp_path)
    topo = ["-g", "4", "--nodes", "2", "--groups", "4", "--dispatch", "nearest"]
    out = str(tmp_path / "p.json")
    code, _, err = run(capsys, "plan", str(dump), "-r", "20", *topo, "--policy", "locality",
                       "--routing", str(trace), "-o", out)
    assert code == 0, err
    twice = tmp_path / "twice.npz"
    bad = ids.copy()
    bad[0, 1, 1] = bad[0, 1, 0]
    np.savez(twice, topk_ids=bad)
    code, _, err = run(capsys, "plan", str(dump), "-r", "20", *topo, "--policy", "locality",
                       "--routing", str(twice), "-o", out, "--force")
    assert_user_error(code, err, "token 0 names an expert twice in layer 1 ")
    code, _, err = run(capsys, "eval", "--placement", out, str(dump), *topo,
                       "--routing", str(twice))
    assert_user_error(code, err, "token 0 names an expert twice in layer 1 ")
    # a trace of every row beside a placement of the MoE rows (eval's cut)
    moe = tmp_path / "moe.json"
    read = read_loads(dump)
    moe_loads = tmp_path / "moe.npz"
    write_loads(LoadTrace(read.counts[:, 2:], read.layer_ids[2:]), moe_loads)
    code, _, err = run(capsys, "plan", str(moe_loads), "-r", "20", *topo, "-o", str(moe))
    assert code == 0, err
    every = tmp_path / "every.npz"
    np.savez(every, topk_ids=np.concatenate([ids[:, :2], bad], 1))  # 5 layers; 3 repeats
    code, _, err = run(capsys, "eval", "--placement", str(moe), str(dump), *topo,
                       "--routing", str(every))
    # (after the warning that rows 0..1 are left out, which rows_of_loads gives on reading)
    assert code == 2 and "Traceback" not in err
    assert "token 0 names an expert twice in layer 3 " in err.splitlines()[-1], err


def test_a_trace_that_fits_no_rows_hears_how_many_carry_load(capsys, tmp_path) -> None:
    # attacker pass: a MoE row idle in the steps --step-range keeps leaves fewer rows with
    # load than the trace of the MoE rows has layers; the refusal read "has 3 layers, the
    # loads 5" alone, where the rows with load say why
    dump, trace, _ = _dump_and_moe_trace(tmp_path)
    counts = read_loads(dump).counts.repeat(2, 1, 1)
    counts[1, 3] = 0  # MoE row 3 idle in the second step
    steps = tmp_path / "steps.npz"
    write_loads(LoadTrace(counts, list(range(5))), steps)
    topo = ["-g", "4", "--nodes", "2", "--groups", "4", "--dispatch", "nearest"]
    out = str(tmp_path / "p.json")
    code, _, err = run(capsys, "plan", str(steps), "-r", "20", *topo, "--policy", "locality",
                       "--routing", str(trace), "-o", out)
    assert code == 0, err  # both steps: the 3 MoE rows carry load
    picked = ["--step-range", "1:2", "--routing", str(trace)]
    code, _, err = run(capsys, "plan", str(steps), "-r", "20", *topo, "--policy", "locality",
                       *picked, "-o", str(tmp_path / "q.json"))
    assert_user_error(code, err, "has 3 layers, the loads 5, of which 2 carry load (rows 2, 4)")
    code, _, err = run(capsys, "eval", "--placement", out, str(steps), *topo, *picked)
    assert_user_error(code, err, "has 3 layers, the loads 5, of which 2 carry load (rows 2, 4)")


def test_eval_pairs_a_moe_rows_trace_where_the_placement_covers_some_rows(tmp_path, capsys):
    """A placement of rows 1..5 (one dense row and the 4 MoE rows) scored on a dump of 6
    rows (2 dense) with a trace of the 4 MoE layers: eval pads the trace over the loaded
    rows and cuts it to the placement's, as plan --previous does (a review pass found eval
    refused it, "(the placement 5)"); the figure equals the trace padded by hand."""
    _, w = skewed_loads_json(tmp_path, 4, 64, seed=3)
    rng = np.random.default_rng(0)
    p = (w / w.sum(1, keepdim=True)).numpy()
    ids = np.stack([np.stack([rng.choice(64, 4, replace=False, p=p[layer])
                              for layer in range(4)]) for _ in range(300)]).astype(np.int32)
    routing, by_hand = tmp_path / "trace.npz", tmp_path / "trace5.npz"
    np.savez(routing, task_topk_ids=ids)
    np.savez(by_hand, task_topk_ids=np.concatenate([np.full((300, 1, 4), -1, np.int32), ids],
                                                   axis=1))
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"logical_count": torch.cat([torch.zeros(2, 64), w]).tolist()}))
    part = tmp_path / "part.npz"
    write_loads(LoadTrace(torch.cat([torch.zeros(1, 64), w])[None], [1, 2, 3, 4, 5]), part)
    placed = tmp_path / "part.json"
    code, _, err = run(capsys, "plan", str(part), "-r", "96", "-g", "16", "--nodes", "4",
                       "-o", str(placed))
    assert code == 0, err
    scored = ["eval", "--placement", str(placed), str(dump), "--dispatch", "nearest", "--json"]
    figures = []
    for trace in (routing, by_hand):
        code, out, err = run(capsys, *scored, "--routing", str(trace))
        assert code == 0, err
        figures.append(json.loads(out)["remote_nodes_per_token"])
    assert figures[0] == figures[1] > 0



def test_routing_without_the_locality_policy_is_one_line_before_any_policy_warning(
        tmp_path, capsys):
    # with --dead-gpus the policy falls back (a warning) and --routing was refused after
    # it: a two-line error (attacker pass); now the flag is refused before
    path, _ = skewed_loads_json(tmp_path, 4, 64, seed=3)
    trace = tmp_path / "trace.npz"
    np.savez(trace, task_topk_ids=np.tile(np.arange(4, dtype=np.int32), (10, 4, 1)))
    for extra in ([], ["--dead-gpus", "5"], ["--policy", "global"]):
        code, _, err = run(capsys, "plan", str(path), "-r", "96", "-g", "16", "--nodes", "4",
                           "--groups", "8", "--dispatch", "nearest", "--routing", str(trace),
                           *extra, "-o", str(tmp_path / "x.json"))
        assert_user_error(code, err, "--routing gives the locality policy its co-selection",
                          "add --policy locality, or drop --routing")
