"""Load files whose numbers would take far more memory than the file: large JSON (a
dozen times its text as Python objects) and compressed ``.npz`` members or torch entries
(zip bombs) are streamed or refused naming the limit, before the memory is taken."""

from __future__ import annotations

import io
import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from eplb.cli import main
from eplb.formats import FormatError, detect_format, read_loads, read_routing

LIMIT = "33,554,432"  # the planner's most slots over all layers, as the errors print it


def _refused_within(path: Path, match: str, most: int) -> None:
    """``read_loads(path)`` raises a FormatError matching ``match`` and peaks below
    ``most`` bytes of Python-traced memory on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=match):
            read_loads(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < most, peak


def _counts(steps: int) -> np.ndarray:
    return (np.arange(steps * 58 * 256, dtype=np.int64) % 5000).reshape(steps, 58, 256)


@pytest.mark.parametrize("layout", ["sglang", "plain", "record"])
def test_large_json_loads_are_streamed(tmp_path, layout) -> None:
    counts = _counts(100)
    doc = {"sglang": {"logical_count": counts.tolist(), "note": "x"},
           "plain": counts.tolist(),
           "record": {"counts": counts.tolist(), "layers": list(range(3, 61))}}[layout]
    path = tmp_path / f"{layout}.json"
    path.write_text(json.dumps(doc))
    tracemalloc.start()
    try:
        trace = read_loads(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(trace.counts.numpy(), counts.astype(np.float64))
    assert trace.layer_ids == (list(range(3, 61)) if layout == "record" else list(range(58)))
    # json.loads took ~9 times the text (116 MB for 13 MB); streamed, the loads and a
    # few chunks of text
    assert peak < 6 * path.stat().st_size


def test_large_json_with_bad_content_keeps_its_error(tmp_path) -> None:
    # streamed, then parsed whole for the message it has always had
    rows = _counts(60).tolist()
    rows[5][3][2] = True
    path = tmp_path / "bool.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(FormatError, match=r"array\[5\]\[3\]\[2\] is true, not a load"):
        read_loads(path)


def test_huge_json_with_bad_content_is_refused_naming_the_limit(tmp_path) -> None:
    # 2**25 + 1 numbers: parsed whole, they took ~1 GB before the boolean was found
    path = tmp_path / "huge.json"
    path.write_bytes(b"[[true" + b",0" * (1 << 25) + b"]]")
    with pytest.raises(FormatError, match=rf"huge\.json: holds up to 33,554,434 numbers, "
                                          rf"more than the {LIMIT} eplb reads"):
        read_loads(path)


def _bomb(path: Path, name: str, shape: tuple[int, ...], compressed: bool = True) -> Path:
    """An ``.npz`` of int8 zeros (``shape``), its member deflated or stored."""
    save = np.savez_compressed if compressed else np.savez
    save(path, **{name: np.zeros(shape, dtype=np.int8)})
    return path


def test_compressed_npz_member_beyond_the_limit_is_refused(tmp_path) -> None:
    path = _bomb(tmp_path / "bomb.npz", "counts", (2, 64, (1 << 18) + 1))
    assert path.stat().st_size < (1 << 20)  # ~32 KB inflating to 32 MB (as float64, 268)
    with pytest.raises(FormatError, match=rf"bomb\.npz: 'counts' is compressed and declares "
                                          rf"shape \(2, 64, 262145\) .*beyond {LIMIT} numbers "
                                          r"eplb inflates a compressed member at most 100 "):
        read_loads(path)


def test_compressed_members_beyond_the_limit_in_all_are_refused_uninflated(tmp_path) -> None:
    # each member just under the limit, three of them past it: every one was inflated, to
    # say "choose one with key=" without a key, and all of them with keys naming them all
    # (3.4 GB from 3 MB with twelve; attacker pass)
    member = np.zeros((1 << 25) - 1, dtype=np.int8)
    path = tmp_path / "many.npz"
    np.savez_compressed(path, a=member, b=member, c=member)
    assert path.stat().st_size < (1 << 20)
    with pytest.raises(FormatError, match=r"many\.npz: holds 3 arrays \['a', 'b', 'c'\]"):
        read_loads(path)  # without a key: refused by the names, none inflated
    with pytest.raises(FormatError, match=r"many\.npz: the compressed members to read declare "
                                          r"100,663,293 numbers in all .*at most 100 times"):
        read_loads(path, key=["a", "b", "c"])
    # members not read do not count (the second attacker pass: a small array beside them)
    np.savez_compressed(path, a=member, b=member, c=member, counts=np.ones((2, 4)))
    assert read_loads(path, key="counts").counts.shape == (1, 2, 4)
    # members within the limit in all: several arrays and no key are named, not read
    small = tmp_path / "small.npz"
    np.savez_compressed(small, a=np.ones((2, 4)), b=np.ones((2, 4)))
    with pytest.raises(FormatError, match=r"holds 2 arrays \['a', 'b'\]; .*choose one"):
        read_loads(small)
    assert read_loads(small, key="b").counts.shape == (1, 2, 4)


def test_compressed_topk_trace_beyond_the_limit_is_refused(tmp_path) -> None:
    path = _bomb(tmp_path / "ids.npz", "topk_ids", ((1 << 22) + 1, 4, 2))
    with pytest.raises(FormatError, match=rf"'topk_ids' is compressed .*beyond {LIMIT}"):
        read_routing(path)


def test_cli_names_the_bomb_its_member_and_the_limit(tmp_path, capsys) -> None:
    path = _bomb(tmp_path / "bomb.npz", "loads", (2, 64, (1 << 18) + 1))
    code = main(["plan", str(path), "-r", "64", "-g", "8", "-o", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"eplb: error: {path}: 'loads' is compressed" in err and LIMIT in err
    assert not (tmp_path / "p.json").exists()


def test_large_stored_npz_member_is_not_refused(tmp_path) -> None:
    # a stored member's bytes are in the file (eplb's write_loads stores them): long
    # traces there are allowed; a compressed member at the limit is too
    stored = _bomb(tmp_path / "stored.npz", "counts", (2, 64, (1 << 18) + 1), compressed=False)
    with zipfile.ZipFile(stored) as archive:
        assert archive.getinfo("counts.npy").compress_type == zipfile.ZIP_STORED
    assert detect_format(stored) == "npz"
    small = _bomb(tmp_path / "small.npz", "counts", (2, 64, 1 << 18))
    assert detect_format(small) == "npz"
    rows = np.arange(3 * 4 * 8, dtype=np.int64).reshape(3, 4, 8)
    np.savez_compressed(tmp_path / "ok.npz", counts=rows)
    assert np.array_equal(read_loads(tmp_path / "ok.npz").counts.numpy(), rows)


def test_a_large_compressed_member_that_deflates_little_is_read(tmp_path) -> None:
    # real counts and top-k ids deflate a few times, not a thousandfold: a long trace
    # saved with savez_compressed stays readable beyond the limit
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 64, (1 << 18) + 1), dtype=np.int8)
    path = tmp_path / "long.npz"
    np.savez_compressed(path, counts=ids)
    assert detect_format(path) == "npz"


def _raw_member_bomb(path: Path, descr: str) -> Path:
    """An ``.npz`` whose one compressed member holds a single element of dtype ``descr``
    (64 MiB of zeros, ~64 KB deflated): one value, so no count of numbers bounds it."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": (1,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("counts.npy", "w", force_zip64=True) as member:
        member.write(header.getvalue())
        for _ in range(64):
            member.write(bytes(1 << 20))
    return path


@pytest.mark.parametrize("descr", ["|V67108864", "|S67108864"])
def test_a_compressed_member_of_one_huge_raw_element_is_refused_before_inflating(
        tmp_path, descr) -> None:
    # one element of 64 MiB raw bytes (or text) declared 1 value: it passed the count of
    # numbers and was inflated (a 1 MB file of one gigabyte element took 2.3 GB and 19 s)
    # before its dtype was refused; a 6 MB file would take the host's memory
    path = _raw_member_bomb(tmp_path / "raw.npz", descr)
    assert path.stat().st_size < (1 << 20)
    _refused_within(path, r"raw\.npz: 'counts' is compressed and declares shape \(1,\) "
                          r".*at most 100 ", 8 << 20)


def test_a_torch_file_whose_entries_inflate_a_thousandfold_is_refused(tmp_path) -> None:
    # torch.save stores its entries; torch.load inflates compressed ones all the same
    plain = tmp_path / "plain.pt"
    torch.save({"logical_count": torch.zeros(40, 58, 256, dtype=torch.int32)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < 10_000
    with pytest.raises(FormatError, match=r"bomb\.pt: entry .* inflates from .* at most 100"):
        read_loads(bomb)
    assert read_loads(plain).counts.shape == (40, 58, 256)


def test_writing_an_sglang_trace_streams_it(tmp_path) -> None:
    """write_loads(format="sglang") built the whole [T, M, E] trace as Python lists (a
    dozen times its numbers' size), more again with the zero rows of the layers a trace
    lacks: it now writes one step at a time, so Python holds about one step."""
    from eplb.formats import LoadTrace, write_loads

    counts = torch.from_numpy(_counts(40).astype(np.float64))
    trace = LoadTrace(counts, list(range(3, 61)), "test", "synthetic")
    tracemalloc.start()
    try:
        path = write_loads(trace, tmp_path / "dump.json", format="sglang")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 58 * 256 * 8 * 4  # a few steps' worth, not the 40 steps' lists
    back = read_loads(path)
    assert torch.equal(back.counts[:, 3:], counts) and back.counts[:, :3].eq(0).all()


def test_a_trtllm_rank_file_of_scattered_entries_is_refused_in_its_own_memory(
        tmp_path) -> None:
    """3,000 keys ``'{i}_{i % 4096}'`` (a 226 kB rank file) made the reader list the 9
    million (iteration, layer) pairs it lacks, 0.9 GB, before its error; 30,000 keys (2 MB)
    took some 10 GB (attacker pass). The missing pairs are counted, three of them named."""
    from safetensors.torch import save_file

    (tmp_path / "meta_info.json").write_text(json.dumps({"num_experts": 1}))
    save_file({f"{i}_{i % 4096}": torch.ones(1, dtype=torch.int64) for i in range(3000)},
              str(tmp_path / "rank0.safetensors"))
    _refused_within(tmp_path, r"8997000 \(iteration, layer\) entries are missing, e\.g\. "
                              r"\[\(0, 1\), \(0, 2\), \(0, 3\)\]", 50 * 2**20)


def test_an_sglang_per_pass_map_naming_experts_far_beyond_its_slots_is_refused(
        tmp_path) -> None:
    """A map of one slot a layer naming expert 65535 turned every record of 8 bytes a
    layer into 65,536 loads a layer: 20 records of 1,000 layers (a 175 kB dump) asked for
    more than 10 GB (attacker pass). Refused before the first such record is unpacked."""
    layers = 1000
    records = [{"forward_pass_id": i, "rank": 0,
                "global_physical_count": torch.full((layers, 1), i + 1, dtype=torch.int64)}
               for i in range(20)]
    path = tmp_path / "expert_distribution_recorder_0.pt"
    torch.save({"records": records,
                "last_physical_to_logical_map": torch.full((layers, 1), 65535)}, path)
    _refused_within(path, r"its 1 forward pass of 1,000 layers would hold 65,536 experts' "
                          r"loads each", 50 * 2**20)


def test_an_sglang_per_pass_dump_of_many_passes_is_read_whole(tmp_path) -> None:
    """Many passes of a real map (every expert on a slot) are read whole."""
    layers, slots, passes = 4, 6, 2000
    phys_map = torch.tensor([[0, 1, 2, 3, 0, 1]] * layers)
    records = [{"forward_pass_id": i, "rank": 0,
                "global_physical_count": torch.full((layers, slots), i % 7)}
               for i in range(passes)]
    path = tmp_path / "expert_distribution_recorder_0.pt"
    torch.save({"records": records, "last_physical_to_logical_map": phys_map}, path)
    trace = read_loads(path)
    assert tuple(trace.counts.shape) == (passes, layers, 4)
    assert float(trace.counts[3, 0, 0]) == 6.0
