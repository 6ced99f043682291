"""eplb.formats on hostile load and placement files: files that expand far beyond their
size when read (JSON and YAML "laughs"), keys given twice (JSON, placements, the
TensorRT-LLM topology comment) and load-history entries named where they are. Each
refusal names the file and what is wrong.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from eplb.formats import FormatError, read_loads


# ------------------------------------------------------------- files that expand when read
def _laughs(levels: int = 9):
    """Nine references to a list of nine numbers, nested ``levels`` deep: 9**levels numbers
    held as ``levels`` shared lists."""
    node: list = list(range(9))
    for _ in range(levels - 1):
        node = [node] * 9
    return node


_YAML_LAUGHS = "".join(
    [f"l0: &l0 [{', '.join(map(str, range(9)))}]\n"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)]
)


@pytest.mark.parametrize("case", ["loads .pt", "placement .pt", "stride-0 tensor",
                                  "yaml num_slots", "yaml row", "yaml self"])
def test_files_that_expand_far_beyond_their_size_are_refused_by_the_cli(tmp_path, capsys,
                                                                        case) -> None:
    """Found by the twelfth-session hostile-files pass: a pickle reference or a YAML
    alias names one list many times, so a 1.5 KB file held 9**9 numbers once expanded;
    converting them (or printing them in an error) took more than the host's memory
    (a traceback with MemoryError under a 4 GB limit). A tensor of stride 0 did the
    same. They are refused in a second, naming the file."""
    from eplb.cli import main

    loads = tmp_path / "loads.npy"
    np.save(loads, np.arange(64.0).reshape(4, 16))
    path = tmp_path / ("bomb.pt" if "pt" in case or "tensor" in case else "bomb.yaml")
    if case == "loads .pt":
        torch.save({"logical_count": _laughs()}, path)
    elif case == "placement .pt":
        torch.save({"physical_to_logical_map": _laughs()}, path)
    elif case == "stride-0 tensor":
        big = torch.ones(1, dtype=torch.int32).as_strided((400, 61, 65536), (0, 0, 0))
        torch.save({"logical_count": big}, path)
    elif case == "yaml num_slots":
        path.write_text(_YAML_LAUGHS + "num_slots: *l8\ninitial_global_assignments:\n"
                        "  0: [0, 1, 2, 3]\n")
    elif case == "yaml row":
        path.write_text(_YAML_LAUGHS + "initial_global_assignments:\n  0: [*l8, 1]\n")
    else:
        path.write_text("a: &a [1, *a]\ninitial_global_assignments:\n  0: *a\n")
    assert path.stat().st_size < 4096
    if case == "loads .pt" or case == "stride-0 tensor":
        argv = ["plan", str(path), "-r", "32", "-g", "8", "-o", str(tmp_path / "p.json")]
    else:
        argv = ["eval", "--placement", str(path), str(loads), "-g", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eplb: error: {path}: ") and err.count("\n") == 1
    assert "contains itself" in err if case == "yaml self" else "more than 1,048,576" in err
    assert len(err) < 600


def test_shared_parts_within_the_file_size_are_read(tmp_path) -> None:
    """A pickle or YAML that repeats one row for every layer is a fine, small file."""
    from eplb.formats import read_placement

    row = list(range(16)) * 2
    torch.save({"logical_count": [[list(range(16))] * 4] * 3}, tmp_path / "l.pt")
    assert read_loads(tmp_path / "l.pt").counts.shape == (3, 4, 16)
    (tmp_path / "p.yaml").write_text(
        f"row: &r {row}\nnum_slots: 32\ninitial_global_assignments:\n"
        + "".join(f"  {i}: *r\n" for i in range(4)))
    assert read_placement(tmp_path / "p.yaml", num_gpus=8).num_layers == 4


# --------------------------------------------------------------------------- repeated keys
def _spaced(doc: str, size: int) -> str:
    """``doc`` padded with blanks past ``size`` characters: read by the streaming parser
    (files above 2 MiB) instead of ``json.loads``."""
    return doc[:-1] + " " * size + doc[-1]


@pytest.mark.parametrize("streamed", [False, True])
def test_a_json_key_given_twice_is_refused_by_name(tmp_path, streamed):
    # Python's JSON keeps the last of equal keys silently: a file with two "logical_count"
    # arrays (or two "load_history" lists, two placement maps) planned on the second alone
    from eplb.formats._json import WHOLE_BYTES

    pad = (lambda doc: _spaced(doc, WHOLE_BYTES + 1)) if streamed else (lambda doc: doc)
    sglang = tmp_path / "sglang.json"
    sglang.write_text(pad('{"logical_count": [[[1, 2], [3, 4]]], '
                          '"logical_count": [[[5, 6], [7, 8]]]}'))
    nested = tmp_path / "nested.json"
    nested.write_text(pad('{"model": {"counts": [[1, 2]], "counts": [[3, 4]]}}'))
    history = tmp_path / "history.json"
    entry = '{"logical_expert_load": [[1, 2]], "logical_expert_load": [[3, 4]]}'
    history.write_text(pad('{"load_history": [' + entry + "]}"))
    twice = tmp_path / "twice.json"
    twice.write_text(pad('{"load_history": [{"logical_expert_load": [[1, 2]]}], '
                         '"load_history": [{"logical_expert_load": [[3, 4]]}]}'))
    for path, key in ((sglang, "logical_count"), (nested, "counts"),
                      (history, "logical_expert_load"), (twice, "load_history")):
        with pytest.raises(FormatError, match=f"gives key '{key}' twice in one JSON object"):
            read_loads(path)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(("entry", "said"), [
    ("null", "is null, not a load"), ("-401", "is -401.0 (a negative load)"),
    ("1e999", "is inf (an infinite load)")])
def test_a_bad_entry_of_a_load_history_is_named_where_it_is(tmp_path, streamed, entry, said):
    # null read as "is nan"; the streamed path (files above 2 MiB) said only "holds a
    # negative, NaN or infinite load", with no layer or expert (attacker pass)
    from eplb.formats._json import WHOLE_BYTES

    doc = ('{"load_history": [{"logical_expert_load": [[1, 2], [3, 4]]}, '
           '{"logical_expert_load": [[1, 2], [3, ' + entry + ']]}]}')
    history = tmp_path / "history.json"
    history.write_text(_spaced(doc, WHOLE_BYTES + 1) if streamed else doc)
    with pytest.raises(FormatError,
                       match=re.escape("load_history[1].logical_expert_load[1][1] " + said)):
        read_loads(history)
    plain = tmp_path / "plain.json"
    plain.write_text("[[1, 2], [3, " + entry + "]]")
    with pytest.raises(FormatError):
        read_loads(plain)


@pytest.mark.parametrize(("history", "said"), [
    ('[{"logical_expert_load": null}]', "load_history[0].logical_expert_load is null"),
    ("[null]", "load_history[0] is null; expected an object with 'logical_expert_load'"),
    ('[{"other": 1}]', "load_history[0] has no 'logical_expert_load' (found keys ['other'])"),
    ('[{"logical_expert_load": [1, -2, 3]}]',
     "load_history[0].logical_expert_load[1] is -2.0 (a negative load)"),
    ("[[[1, 2], [3, -4]]]", "load_history[0][1][1] is -4.0 (a negative load)"),
])
def test_load_history_entries_are_named_as_the_file_has_them(tmp_path, history, said):
    # second attacker pass: "found keys NoneType", a key "missing" that was there, and
    # indices or keys the file does not have
    path = tmp_path / "h.json"
    path.write_text('{"load_history": ' + history + "}")
    with pytest.raises(FormatError, match=re.escape(said)):
        read_loads(path)


def test_a_placement_key_given_twice_is_refused_by_name(tmp_path):
    import eplb
    from eplb.formats import read_placement, write_placement

    placement = eplb.plan(torch.rand(2, 8), 8, 4)
    doc = write_placement(placement, tmp_path / "p.json")
    text = doc.read_text()
    doc.write_text(text[:-1].rstrip().rstrip("}") + ', "phy2log": [[0, 1, 2, 3, 4, 5, 6, 7]]}')
    with pytest.raises(FormatError, match="gives key 'phy2log' twice in one JSON object"):
        read_placement(doc)
    yaml_path = write_placement(placement, tmp_path / "p.trtllm.yaml")
    lines = yaml_path.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("  1:"))
    yaml_path.write_text("\n".join([*lines, lines[row].replace("  1:", "  0:")]) + "\n")
    with pytest.raises(FormatError, match="gives key '0' twice in one YAML object"):
        read_placement(yaml_path)


def test_the_trtllm_topology_comment_giving_a_key_twice_is_refused(tmp_path):
    # the YAML's keys were checked, but the eplb-topology comment (JSON) kept the last of
    # two "num_gpus" silently: the placement was read on 8 GPUs instead of the 4 planned
    import eplb
    from eplb.formats import read_placement, write_placement

    placement = eplb.plan(torch.rand(2, 8), 16, 4)
    path = write_placement(placement, tmp_path / "p.trtllm.yaml")
    text = path.read_text()
    assert '"num_gpus":4' in text
    path.write_text(text.replace('"num_gpus":4', '"num_gpus":4,"num_gpus":8'))
    with pytest.raises(FormatError, match="gives key 'num_gpus' twice in one JSON object"):
        read_placement(path)


@pytest.mark.parametrize("damage", [('"num_gpus":4', '"num_gpus":4,'),  # cut short
                                    ('{"', '["'),  # not an object
                                    ('{', '')])  # no brace left
def test_a_damaged_trtllm_topology_comment_is_refused(tmp_path, damage):
    # a comment that did not parse was read as no comment, silently: the map was then read
    # on whatever cluster the caller named
    import eplb
    from eplb.formats import read_placement, write_placement

    placement = eplb.plan(torch.rand(2, 8), 16, 4)
    path = write_placement(placement, tmp_path / "p.trtllm.yaml")
    line = next(x for x in path.read_text().splitlines() if "eplb-topology" in x)
    path.write_text(path.read_text().replace(line, line.replace(*damage, 1)))
    with pytest.raises(FormatError, match=r"eplb-topology comment .* is not one JSON object"):
        read_placement(path, num_gpus=4)
