"""eplb.formats: reading every engine's load statistics (SGLang dumps and per-pass files,
TensorRT-LLM folders, vLLM histories, top-k routing traces), and the real data.

The input writers here are shared: plain arrays and tables are read in
``test_formats_tables.py``, traces written in ``test_formats_traces.py``, placements in
``test_formats_placements.py``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REAL_DATA as REAL
from helpers import counts_tle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eplb
import eplb.tools
from eplb.formats import (
    FORMATS,
    FormatError,
    detect_format,
    read_loads,
    write_placement,
)

L, E, T = 3, 8, 4  # the shape of counts_tle()


# ----------------------------------------------------------------------- writers of inputs
def write_sglang_pt(path: Path, counts: torch.Tensor) -> Path:
    torch.save(
        {
            "rank": 0,
            "logical_count": counts.to(torch.int32),
            "average_utilization_rate_over_window": None,
        },
        path,
    )
    return path


def write_per_pass(path: Path, counts: torch.Tensor, rank: int = 0, first_pass: int = 0) -> Path:
    """An SGLang per-pass dump whose physical slots map back to ``counts`` [T, L, E]."""
    num_slots = E + 4
    phys_map = torch.arange(num_slots).repeat(L, 1) % E  # experts 0..3 have two slots
    records = []
    for t in range(counts.shape[0]):
        phys = torch.zeros(L, num_slots, dtype=torch.int32)
        for s in range(num_slots):
            e = s % E
            share = counts[t, :, e] // 2 if e < 4 else counts[t, :, e]
            extra = counts[t, :, e] - share if (e < 4 and s >= E) else 0
            phys[:, s] = (share if s < E or e >= 4 else extra).to(torch.int32)
        records.append(
            {
                "forward_pass_id": first_pass + t,
                "rank": rank,
                "gatherer_key": "primary",
                "global_physical_count": phys,
            }
        )
    torch.save({"records": records, "last_physical_to_logical_map": phys_map}, path)
    return path


def write_trtllm(folder: Path, counts: torch.Tensor, layers=(3, 4, 5), ranks=2) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "meta_info.json").write_text(
        json.dumps({"num_experts": E, "num_experts_per_token": 2})
    )
    share = counts // ranks
    for r in range(ranks):
        part = share if r < ranks - 1 else counts - share * (ranks - 1)
        tensors = {
            f"{10 + t}_{layer}": part[t, i].to(torch.int64).contiguous()
            for t in range(counts.shape[0])
            for i, layer in enumerate(layers)
        }
        save_file(tensors, str(folder / f"rank{r}.safetensors"))
    return folder


def write_history(path: Path, counts: torch.Tensor, extra: bool = True) -> Path:
    doc = {
        "load_history": [
            {"logical_expert_load": c.tolist(), "step": i} for i, c in enumerate(counts)
        ]
    }
    if extra:
        doc = {"model": "synthetic", **doc, "window": 100}
    path.write_text(json.dumps(doc))
    return path


def topk_ids(tokens: int = 50, k: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(L)]) for _ in range(tokens)]
    ).to(torch.int8)


def bincount_ids(ids: torch.Tensor) -> torch.Tensor:
    ids = ids.to(torch.int64)
    return torch.stack(
        [
            torch.bincount(ids[:, layer][ids[:, layer] >= 0].flatten(), minlength=E)
            for layer in range(ids.shape[1])
        ]
    ).to(torch.float64)


# ------------------------------------------------------------------------ detection + reads
def test_formats_constant_lists_every_reader():
    assert set(FORMATS) >= {
        "sglang",
        "sglang-per-pass",
        "trtllm",
        "vllm-history",
        "topk",
        "npy",
        "npz",
        "pt",
        "safetensors",
        "json",
        "csv",
    }


def test_sglang_pt_dump(tmp_path):
    c = counts_tle()
    path = write_sglang_pt(tmp_path / "expert_distribution_recorder_1.pt", c)
    assert detect_format(path) == "sglang"
    trace = read_loads(path)
    assert trace.format == "sglang"
    assert trace.counts.dtype == torch.float64
    assert torch.equal(trace.counts, c.double())
    assert trace.layer_ids == list(range(L))
    assert trace.meta["rank"] == 0


def test_folder_of_sglang_json_dumps(tmp_path):
    """The form the SGLang team published their DeepSeek statistics in."""
    first, second = counts_tle(1), counts_tle(2)
    folder = tmp_path / "dumps"
    folder.mkdir()
    (folder / "a_decode.json").write_text(json.dumps({"logical_count": first.tolist()}))
    (folder / "b_prefill.json").write_text(json.dumps({"logical_count": second.tolist()}))
    assert detect_format(folder) == "sglang"
    trace = read_loads(folder)
    assert torch.equal(trace.counts, torch.cat([first, second]).double())
    (folder / "notes.json").write_text(json.dumps({"comment": "not a dump"}))
    with pytest.raises(FormatError, match="logical_count"):
        read_loads(folder)


def test_a_copy_of_a_dump_in_its_folder_is_said_to_count_twice(tmp_path):
    """Two dumps of one folder with the same counts (a copy beside its original) were read
    as two steps, the window's loads counted twice, without a word; an idle (all-zero)
    dump may be recorded twice and is not named."""
    folder = tmp_path / "dumps"
    folder.mkdir()
    first = counts_tle(1)
    for name in ("a.json", "a (1).json"):
        (folder / name).write_text(json.dumps({"logical_count": first.tolist()}))
    with pytest.warns(UserWarning, match=r"a \(1\).json and a.json hold the same counts"):
        assert read_loads(folder).num_steps == 2 * first.shape[0]
    zero = tmp_path / "zero"
    zero.mkdir()
    for name in ("a.json", "b.json", "c.json"):
        counts = first if name == "c.json" else torch.zeros_like(first)
        (zero / name).write_text(json.dumps({"logical_count": counts.tolist()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_loads(zero).num_steps == 3 * first.shape[0]


@pytest.mark.parametrize("shape", ["LE", "TLE"])
def test_sglang_json(tmp_path, shape):
    c = counts_tle()
    value = c[0] if shape == "LE" else c
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"logical_count": value.tolist()}))
    assert detect_format(path) == "sglang"
    trace = read_loads(path)
    want = value.double() if shape == "TLE" else value.double()[None]
    assert torch.equal(trace.counts, want)


def test_sglang_per_pass_maps_slots_to_logical_experts(tmp_path):
    c = counts_tle()
    path = write_per_pass(tmp_path / "dump.pt", c)
    assert detect_format(path) == "sglang-per-pass"
    trace = read_loads(path)
    assert torch.equal(trace.counts, c.double())
    assert trace.meta["forward_pass_ids"] == list(range(T))


def test_sglang_per_pass_folder_sums_ranks(tmp_path):
    c0, c1 = counts_tle(0), counts_tle(1)
    folder = tmp_path / "dumps"
    folder.mkdir()
    write_per_pass(folder / "expert_distribution_recorder_1.0_0.pt", c0, rank=0)
    write_per_pass(folder / "expert_distribution_recorder_1.0_1.pt", c1, rank=1)
    assert detect_format(folder) == "sglang-per-pass"
    trace = read_loads(folder)
    assert torch.equal(trace.counts, (c0 + c1).double())
    assert trace.meta["ranks"] == [0, 1]


def test_sglang_per_pass_dumps_repeating_a_rank_s_pass_are_refused(tmp_path):
    """Two dumps of one rank taken without restarting the recorder both hold its earlier
    passes: they were summed twice (attacker pass). Other ranks' passes still sum."""
    c = counts_tle(0)
    folder = tmp_path / "dumps"
    folder.mkdir()
    write_per_pass(folder / "expert_distribution_recorder_1.pt", c[:2], rank=0)
    write_per_pass(folder / "expert_distribution_recorder_2.pt", c, rank=0)
    with pytest.raises(FormatError, match=r"recorder_2.pt: records\[0\] repeats forward pass "
                                          r"0 of rank 0, the same counts as "
                                          r"expert_distribution_recorder_1.pt records\[0\]"):
        read_loads(folder)
    # a restarted server numbers its passes anew: other counts under the same ids sum, as
    # do records of other gatherers (second attacker pass)
    write_per_pass(folder / "expert_distribution_recorder_2.pt", counts_tle(1), rank=0)
    assert torch.equal(read_loads(folder).counts[:2], (c[:2] + counts_tle(1)[:2]).double())


def test_trtllm_folder_sums_ranks(tmp_path):
    c = counts_tle()
    folder = write_trtllm(tmp_path / "stats", c)
    assert detect_format(folder) == "trtllm"
    trace = read_loads(folder)
    assert torch.equal(trace.counts, c.double())
    assert trace.layer_ids == [3, 4, 5]
    assert trace.meta["iterations"] == [10, 11, 12, 13]
    assert trace.meta["num_experts_per_token"] == 2
    single = read_loads(folder / "rank0.safetensors")
    assert single.format == "trtllm" and single.counts.shape == (T, L, E)


def test_trtllm_folder_without_its_meta_file_is_named(tmp_path):
    # new-user pass: a statistics folder that lost meta_info.json read "found none of them"
    folder = write_trtllm(tmp_path / "stats", counts_tle())
    (folder / "meta_info.json").unlink()
    with pytest.raises(FormatError, match=r"TensorRT-LLM statistics \(rank0.safetensors, "
                                          r"\.\.\.\) but no meta_info.json"):
        read_loads(folder)


def test_trtllm_folder_with_a_rank_gap_warns(tmp_path):
    """meta_info.json does not record the EP size, so a lost rank file is only visible as a
    gap: summed without a word, its tokens were silently missing."""
    folder = write_trtllm(tmp_path / "stats", counts_tle(), ranks=3)
    (folder / "rank1.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"no rank1.safetensors between rank0 and rank2"):
        trace = read_loads(folder)
    assert trace.meta["ranks"] == [0, 2]


def test_a_rank_lacking_entries_the_others_record_is_refused(tmp_path):
    """Each rank records every (iteration, layer): a rank file lacking some was summed
    without a word, those entries carrying the other ranks' tokens alone (attacker pass)."""
    from safetensors.torch import load_file, save_file

    folder = write_trtllm(tmp_path / "stats", counts_tle())
    rank1 = folder / "rank1.safetensors"
    tensors = load_file(str(rank1))
    del tensors["11_4"], tensors["12_4"]
    save_file(tensors, str(rank1))
    with pytest.raises(FormatError, match=r"rank1.safetensors: lacks 2 \(iteration, layer\) "
                                          r"entries of its layers that other ranks record, "
                                          r"e\.g\. \[\(11, 4\)"):
        read_loads(folder)
    # pipeline parallelism: a rank records only its stage's layers, every iteration of them
    # (the first version of this check refused such folders; attacker pass)
    del tensors["10_4"], tensors["13_4"]
    save_file(tensors, str(rank1))  # rank 1 runs layers 3 and 5 only
    trace = read_loads(folder)
    assert trace.layer_ids == [3, 4, 5] and trace.counts.shape == (T, L, E)


def test_vllm_history_streams_with_tiny_chunks(tmp_path, monkeypatch):
    import eplb.formats.history as history

    c = counts_tle(steps=7)
    path = write_history(tmp_path / "hist.json", c)
    assert detect_format(path) == "vllm-history"
    want = read_loads(path)
    assert torch.equal(want.counts, c.double())
    assert want.meta == {"model": "synthetic", "window": 100, "model_layer_ids": False}
    for chunk in (1, 3, 17, 64):  # entry and number boundaries split across chunks
        monkeypatch.setattr(history, "_CHUNK", chunk)
        assert torch.equal(read_loads(path).counts, c.double())


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.lists(
        st.lists(
            st.lists(st.floats(0, 1e6, allow_nan=False), min_size=2, max_size=2),
            min_size=2,
            max_size=2,
        ),
        min_size=1,
        max_size=4,
    ),
    chunk=st.integers(1, 40),
    spaces=st.booleans(),
)
def test_vllm_history_matches_json_load(tmp_path, monkeypatch, data, chunk, spaces):
    import eplb.formats.history as history

    path = tmp_path / "h.json"
    doc = {"load_history": [{"logical_expert_load": d} for d in data]}
    path.write_text(json.dumps(doc, indent=2 if spaces else None))
    monkeypatch.setattr(history, "_CHUNK", chunk)
    trace = read_loads(path, format="vllm-history")
    assert torch.equal(trace.counts, torch.tensor(data, dtype=torch.float64))


def test_vllm_history_progress_bar(tmp_path, capsys):
    path = write_history(tmp_path / "hist.json", counts_tle())
    trace = read_loads(path, progress=True)
    assert trace.num_steps == T
    assert "hist.json" in capsys.readouterr().err


def test_a_forced_plain_format_on_top_k_ids_warns_that_they_are_read_as_counts(tmp_path):
    # --format npz on a routing file planned "26 layers x 6 experts" (the k axis as
    # experts) without a word (fifteenth-session newcomer pass, the ESFT file); forcing a
    # plain format stays allowed: it reads a counts array whose name looks like ids
    path = tmp_path / "r.npz"
    np.savez(path, batch_topk_ids=topk_ids().numpy())
    with pytest.warns(UserWarning, match="named like top-k expert ids"):
        trace = read_loads(path, format="npz", key="batch_topk_ids")
    assert trace.format == "npz"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_loads(path, num_experts=E)  # detected as ids: nothing to warn about


@pytest.mark.parametrize("container", ["npz", "pt", "npy", "safetensors"])
def test_topk_trace_counts(tmp_path, container):
    ids = topk_ids()
    if container == "npz":
        path = tmp_path / "r.npz"
        np.savez(path, batch_topk_ids=ids.numpy(), batch_seq_lens=np.array([20, 30]))
    elif container == "pt":
        path = tmp_path / "r.pt"
        torch.save({"topk_ids": ids}, path)
    elif container == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "r.safetensors"
        save_file({"topk_ids": ids}, str(path))
    else:
        path = tmp_path / "r.npy"
        np.save(path, ids.numpy())
    fmt = None if container != "npy" else "topk"  # a bare int array is counts unless told
    if fmt is None:
        assert detect_format(path) == "topk"
    trace = read_loads(path, format=fmt, num_experts=E)
    assert trace.format == "topk"
    assert trace.num_steps == 1
    assert torch.equal(trace.counts[0], bincount_ids(ids))
    assert trace.meta["top_k"] == 2


def test_a_topk_row_naming_an_expert_twice_is_refused_but_padding_may_repeat(tmp_path):
    # counted as loads, [3, 3] was two tokens on expert 3, where the same file given as a
    # routing trace is refused (attacker pass); -1 padding repeats freely
    ids = topk_ids(10, seed=3)
    ids[4, 1] = torch.tensor([-1, -1])
    path = tmp_path / "r.npz"
    np.savez(path, a_topk_ids=ids.numpy())
    assert read_loads(path, num_experts=E).counts.sum() == ids.ge(0).sum()
    ids[6, 0] = torch.tensor([3, 3])
    np.savez(path, a_topk_ids=ids.numpy())
    with pytest.raises(FormatError, match=r"token 6 names an expert twice in layer 0 "
                                          r"\(top-k \[3, 3\]\)"):
        read_loads(path, num_experts=E)


def test_topk_windows_and_segments(tmp_path):
    a, b = topk_ids(50, seed=1), topk_ids(23, seed=2)
    a[0, 0, 0] = -1  # padding is not counted
    path = tmp_path / "r.npz"
    np.savez(path, a_topk_ids=a.numpy(), b_topk_ids=b.numpy())
    with pytest.raises(FormatError, match=r"2 top-k id arrays.*--key"):
        read_loads(path, num_experts=E)  # never mixed silently
    both = ["a_topk_ids", "b_topk_ids"]
    whole = read_loads(path, num_experts=E, key=both)
    assert whole.num_steps == 2  # one step per array by default
    assert torch.equal(whole.counts[0], bincount_ids(a))
    win = read_loads(path, tokens_per_step=20, num_experts=E, key=both)
    assert win.meta["step_tokens"] == [20, 20, 10, 20, 3]
    assert [s["steps"] for s in win.meta["segments"]] == [3, 2]
    assert torch.equal(win.counts[:3].sum(0), bincount_ids(a))
    assert torch.equal(win.counts[1], bincount_ids(a[20:40]))
    only_b = read_loads(path, key="b_topk_ids", num_experts=E)
    assert torch.equal(only_b.counts[0], bincount_ids(b))


# ---------------------------------------------------------------------------- real data
def _real(folder: str) -> Path:
    path = REAL / folder
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent"
                    " (set EPLB_REAL_DATA to the real-data folder)")
    return path


def test_real_sglang_statistics_load():
    files = sorted(_real("sglang_deepseek_ep_statistics").glob("*.json"))
    assert len(files) == 12
    for path in files:
        trace = read_loads(path)
        assert trace.format == "sglang"
        assert trace.counts.shape == (1, 61, 256)
        moe = trace.drop_empty_layers()
        assert moe.layer_ids == list(range(3, 61))
        assert bool((moe.counts > 0).any(2).all())


def test_real_sglang_statistics_plan_and_emit(tmp_path):
    path = _real("sglang_deepseek_ep_statistics") / "prefill_in4096.json"
    moe = read_loads(path).drop_empty_layers()
    placement = eplb.plan(moe.total(), 288, 32)
    out = write_placement(placement, tmp_path / "init.json", "sglang", layer_ids=moe.layer_ids)
    assert torch.tensor(json.loads(out.read_text())["physical_to_logical_map"]).shape == (61, 288)
    lb = write_placement(placement, tmp_path / "lb.yaml", "trtllm", layer_ids=moe.layer_ids)
    assert min(yaml.safe_load(lb.read_text())["initial_global_assignments"]) == 3


def test_real_routing_traces_load():
    esft = _real("esft_deepseek_v2_lite_routing") / "esft_topk_ids.npz"
    tasks = ["intent_topk_ids", "law_topk_ids", "summary_topk_ids", "translation_topk_ids"]
    trace = read_loads(esft, key=tasks)
    assert trace.format == "topk" and trace.counts.shape == (4, 26, 64)
    assert trace.counts[0].sum() == 8222 * 26 * 6  # every token picks 6 experts per layer
    law = read_loads(esft, key="law_topk_ids", tokens_per_step=1024)
    assert law.num_steps == 9 and law.counts.sum() == 8327 * 26 * 6
    qwen_dir = _real("qwen3_30b_a3b_sharegpt_prefill_vllm")
    batches = ["ep_states_topk_ids", "token_distri_8_topk_ids", "token_distri_16_topk_ids"]
    qwen = read_loads(qwen_dir / "qwen3_30b_sharegpt_prefill_topk_ids.npz", key=batches)
    assert qwen.counts.shape == (3, 48, 128)
    assert qwen.meta["step_tokens"] == [1960, 2050, 2080]


def test_real_olmoe_counts_by_key():
    path = REAL / "olmoe_mixtral_routing_counts" / "expert_counts.json"
    if not path.exists():
        pytest.skip(f"real data not present: {path} (set EPLB_REAL_DATA to the real-data folder)")
    trace = read_loads(path, key="olmoe/expert_counts/arxiv")
    assert trace.counts.shape[1:] == (3, 64) and trace.layer_ids == [0, 7, 15]
