"""Written files: permissions, owners and the overwrite guard.

Every case is what a user meets: ``eplb plan -o`` (and the writers behind it) run under
a umask, over an existing file or one of its own inputs, next to a dangling symlink, a
device or a FIFO. Concurrent, killed and failing writers: ``test_cli_files_atomic.py``;
report and output folders: ``test_cli_files_folders.py``; input files:
``test_cli_files_inputs.py``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import eplb
import eplb.formats._files as files
from eplb.cli import main
from eplb.formats import (
    LoadTrace,
    read_loads,
    read_placement,
    write_loads,
    write_placement,
)

L, E, R, P = 4, 16, 20, 4


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def forbid_work(monkeypatch, checked: str, *targets: tuple[object, str]) -> None:
    """Make each ``(module, name)`` raise if called: the work a command does only after
    ``checked`` (its output or report folder) has been checked."""

    def no_work(*args, **kwargs):
        raise AssertionError(f"the work ran before {checked} was checked")

    for module, name in targets:
        monkeypatch.setattr(module, name, no_work)


def plan(capsys, loads: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(out), *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
@pytest.mark.parametrize("name", ["p.json", "p.pt", "lb.yaml", "init.sglang.json",
                                  "init.sglang.pt"])
def test_outputs_follow_the_umask(capsys, tmp_path, loads, umask, mask, name) -> None:
    umask(mask)
    out = tmp_path / name
    extra = ["--num-model-layers", str(L)] if "sglang" in name else []
    code, err = plan(capsys, loads, out, *extra)
    assert code == 0, err
    assert mode(out) == 0o666 & ~mask  # what open() would give
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_trace_writers_follow_the_umask(tmp_path, umask) -> None:
    umask(0o027)
    trace = LoadTrace(torch.rand(2, 3, 8))
    for fmt, name in (("pt", "t.pt"), ("npz", "t.npz"), ("vllm-history", "t.json")):
        assert mode(write_loads(trace, tmp_path / name, fmt)) == 0o640


@pytest.mark.parametrize("existing", [0o644, 0o640, 0o600, 0o664])
def test_force_keeps_the_mode_of_the_file_it_replaces(capsys, tmp_path, loads, umask,
                                                       existing) -> None:
    # like `> file` in a shell: the user's choice of who may read the placement survives
    umask(0o077)
    out = tmp_path / "placement.json"
    out.write_text("old")
    os.chmod(out, existing)
    code, err = plan(capsys, loads, out, "--force")
    assert code == 0, err
    assert mode(out) == existing
    assert read_placement(out).phy2log.shape == (L, R)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a file to another owner needs root")
def test_force_keeps_the_owner_and_group_of_the_file_it_replaces(capsys, tmp_path, loads,
                                                                  monkeypatch):
    # the mode was kept, but the file became root's: a group-readable placement for the
    # serving account was no longer readable by it (attacker pass)
    out = tmp_path / "placement.json"
    out.write_text("old")
    os.chown(out, 65534, 65534)  # nobody, nogroup
    os.chmod(out, 0o640)

    def by_name(*args, **kwargs):  # a name can be swapped for a link: descriptors only
        raise AssertionError(f"changed through a name: {args}")

    monkeypatch.setattr(os, "chown", by_name)
    monkeypatch.setattr(os, "chmod", by_name)
    code, err = plan(capsys, loads, out, "--force")
    assert code == 0, err
    info = os.stat(out)
    assert (info.st_uid, info.st_gid, mode(out)) == (65534, 65534, 0o640)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="a file of another group needs root to make")
def test_force_warns_where_the_group_cannot_be_kept(capsys, tmp_path, loads, monkeypatch):
    out = tmp_path / "placement.json"
    out.write_text("old")
    os.chown(out, -1, 65534)

    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # as a user outside that group
    monkeypatch.setattr(os, "fchown", refuse)
    code, err = plan(capsys, loads, out, "--force")
    assert code == 0, err
    assert "cannot keep its group (gid 65534)" in err, err
    assert read_placement(out).phy2log.shape == (L, R)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="a file of another owner needs root to make")
def test_a_root_that_cannot_give_files_away_warns_of_the_owner_and_keeps_the_group(
        capsys, tmp_path, loads, monkeypatch):
    # root without CAP_CHOWN (a container; a user namespace that does not map the owner)
    # replacing another user's file: the warning blamed the group, naming the gid the
    # new file kept, and the group was not even tried on its own (attacker pass)
    out = tmp_path / "placement.json"
    out.write_text("old")
    os.chown(out, 65534, 65534)  # nobody, nogroup
    os.chmod(out, 0o640)
    real_fchown = os.fchown

    def group_only(fd, uid, gid):  # the group may change, the owner may not
        if uid != -1:
            raise PermissionError(1, "Operation not permitted")
        real_fchown(fd, uid, gid)

    monkeypatch.setattr(os, "fchown", group_only)
    code, err = plan(capsys, loads, out, "--force")
    assert code == 0, err
    assert "cannot keep its owner (uid 65534)" in err, err
    assert "cannot keep its group" not in err, err
    info = os.stat(out)
    assert (info.st_uid, info.st_gid, mode(out)) == (0, 65534, 0o640)
    assert read_placement(out).phy2log.shape == (L, R)


def test_existing_output_is_refused_without_force(capsys, tmp_path, loads) -> None:
    out = tmp_path / "placement.json"
    out.write_text("precious")
    code, err = plan(capsys, loads, out)
    assert code == 2 and "--force" in err and "Traceback" not in err
    assert out.read_text() == "precious"


def test_dangling_symlink_is_not_replaced_without_force(capsys, tmp_path, loads) -> None:
    out = tmp_path / "placement.json"
    target = tmp_path / "elsewhere.json"
    out.symlink_to(target)
    # --force replaces regular files only: a link (or a device, FIFO) is refused, and
    # said so at once rather than after a --force (new-user pass: "-o /dev/null")
    for extra in ((), ("--force",)):
        code, err = plan(capsys, loads, out, *extra)
        assert code == 2 and "symbolic link" in err and "pass --force" not in err
        assert out.is_symlink() and not target.exists()


def test_force_never_replaces_devices_or_fifos(capsys, tmp_path, loads) -> None:
    import os

    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    for extra in ((), ("--force",)):
        code, err = plan(capsys, loads, fifo, *extra)
        assert code == 2 and "not a regular file" in err and "pass --force" not in err
        assert fifo.exists() and not fifo.is_file()


@pytest.mark.parametrize("flags, said", [
    (("--dead-gpus", "40"), "outside 0..3"),
    (("--dead-gpus", "a,b"), "--dead-gpus"),
    (("--gpu-speed", "1,2"), "one per GPU"),
    (("--policy", "hierarchical", "--nodes", "2", "--groups", "4", "--dead-gpus", "1"),
     "hierarchical is impossible"),
    # the second attacker pass's list
    (("--dispatch", "nearest", "--nodes", "2", "--gpu-speed", "1,2,1,2"), "cannot be combined"),
    (("--max-moves", "3"), "--max-moves needs --previous"),
    (("--nodes", "3"), "multiple of --nodes"),
    (("--slack", "0.1"), "add --policy locality --dispatch nearest"),
])
def test_a_bad_flag_is_reported_before_an_existing_output(capsys, tmp_path, loads, flags,
                                                          said) -> None:
    """New-user pass: "already exists; pass --force" came first, and the real mistake
    only after the user had cleared the output."""
    out = tmp_path / "placement.json"
    out.write_text("precious")
    code, err = plan(capsys, loads, out, *flags)
    assert code == 2 and said in err and "already exists" not in err, err
    assert out.read_text() == "precious"


@pytest.mark.parametrize(("replicas", "gpus", "hint"), [
    ("4", "16", "(swapped? -r 16 -g 4 is 4 slots on each of 4 GPUs)"),
    ("6", "16", ""),  # 16 is no multiple of 6: no swap makes this a cluster
])
def test_replicas_and_gpus_swapped_are_named_as_such(capsys, tmp_path, loads, replicas,
                                                      gpus, hint) -> None:
    # (new-user pass: -r 16 -g 160 said only "must be a multiple of --gpus (160)")
    code = main(["plan", str(loads), "-r", replicas, "-g", gpus, "-o",
                 str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == (f"eplb: error: --replicas ({replicas}) must be a multiple of "
                           f"--gpus ({gpus})" + (" " + hint if hint else ""))


def test_a_folder_as_output_is_named_as_one_without_suggesting_force(capsys, tmp_path,
                                                                   loads) -> None:
    # "already exists; pass --force" sent the user to a second error: --force cannot
    # replace a folder either
    folder = tmp_path / "out"
    folder.mkdir()
    for extra in ((), ("--force",)):
        code, err = plan(capsys, loads, folder, *extra)
        assert code == 2 and "is a directory" in err and "--force" not in err
    assert main(["generate", "--preset", "mixtral-8x7b", "--steps", "4", "-q", "--format",
                 "npy", "-o", str(folder)]) == 2
    assert "is a directory" in capsys.readouterr().err
    placement = eplb.plan(np.load(loads), R, P)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        write_placement(placement, folder)
    assert list(folder.iterdir()) == []


def test_an_output_name_ending_in_a_slash_names_a_folder(capsys, tmp_path, loads) -> None:
    # pathlib drops a trailing slash: "-o results/" wrote a file named "results", and
    # "-o p.json/ --force" replaced the file p.json
    taken = tmp_path / "p.json"
    taken.write_text("mine")
    for out, extra in ((f"{tmp_path}/results/", ()), (f"{taken}/", ("--force",))):
        code = main(["plan", str(loads), "-r", str(R), "-g", str(P), "-o", out, *extra])
        assert code == 2 and "names a folder" in capsys.readouterr().err
    assert main(["generate", "--preset", "mixtral-8x7b", "--steps", "4", "-q", "-o",
                 f"{tmp_path}/t.npy/"]) == 2
    assert "names a folder" in capsys.readouterr().err
    placement = eplb.plan(np.load(loads), R, P)
    with pytest.raises(IsADirectoryError, match="names a folder"):
        write_placement(placement, f"{taken}/", force=True)
    with pytest.raises(IsADirectoryError, match="names a folder"):
        write_loads(LoadTrace(torch.ones(1, 2, 4)), f"{tmp_path}/t.pt/")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loads.npy", "p.json"]
    assert taken.read_text() == "mine"


def test_force_drops_setuid_bits(capsys, tmp_path, loads) -> None:
    out = tmp_path / "placement.json"
    out.write_text("old")
    out.chmod(0o4755)
    assert plan(capsys, loads, out, "--force")[0] == 0
    assert out.stat().st_mode & 0o7777 == 0o755


@pytest.mark.parametrize("how", ["same name", "symlink to it", "second of two"])
def test_force_never_writes_the_placement_over_the_loads_it_read(capsys, tmp_path, loads,
                                                                 how) -> None:
    """``-o`` naming the loads file itself (or the file a LOADS symlink points to) is a
    slip that ``--force`` must not turn into lost data: the command is refused and the
    loads are left as they were."""
    before = loads.read_bytes()
    given = [str(loads)]
    if how == "symlink to it":
        link = tmp_path / "link.npy"
        link.symlink_to(loads)
        given = [str(link)]
    elif how == "second of two":
        other = tmp_path / "other.npy"
        other.write_bytes(before)
        given = [str(other), str(loads)]
    code = main(["plan", *given, "-r", str(R), "-g", str(P), "-o", str(loads), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and "would replace it" in err and str(loads) in err
    assert loads.read_bytes() == before


@pytest.mark.parametrize("kind", ["sglang dumps", "tensorrt-llm ranks"])
def test_force_never_writes_the_placement_over_a_file_a_folder_read_took(capsys, tmp_path,
                                                                         kind) -> None:
    """LOADS a folder: its dumps or rank files are read too, and -o naming one of them
    is refused even with --force (attacker pass: the placement replaced the SGLang dump,
    or the TensorRT-LLM rank file, it was planned from)."""
    folder = tmp_path / "stats"
    folder.mkdir()
    counts = torch.randint(1, 100, (L, E), generator=torch.Generator().manual_seed(3))
    if kind == "sglang dumps":
        target = folder / "expert_distribution_recorder_1.pt"
        for name in (target.name, "expert_distribution_recorder_2.pt"):
            torch.save({"rank": 0, "logical_count": counts[None].to(torch.int32)},
                       folder / name)
    else:
        st = pytest.importorskip("safetensors.torch")
        target = folder / "rank0.safetensors"
        (folder / "meta_info.json").write_text(json.dumps({"num_experts": E,
                                                           "num_experts_per_token": 2}))
        st.save_file({f"0_{layer}": counts[layer] for layer in range(L)}, str(target))
    # (and a TensorRT-LLM folder's meta file, which the read takes too: second attacker
    # pass)
    targets = [target] + ([folder / "meta_info.json"] if kind != "sglang dumps" else [])
    for target in targets:
        before = target.read_bytes()
        code = main(["plan", str(folder), "-r", str(R), "-g", str(P), "-o", str(target),
                     "--force"])
        err = capsys.readouterr().err
        assert code == 2 and "would replace it" in err and target.name in err, err
        assert target.read_bytes() == before


def test_force_never_writes_the_placement_over_a_gpu_speed_file(capsys, tmp_path,
                                                                loads) -> None:
    speeds = tmp_path / "speeds.txt"
    speeds.write_text(",".join(["1"] * P))
    code, err = plan(capsys, loads, speeds, "--gpu-speed", str(speeds), "--force")
    assert code == 2 and "--gpu-speed" in err
    assert speeds.read_text() == ",".join(["1"] * P)


def test_a_replan_in_place_may_replace_the_previous_placement(capsys, tmp_path,
                                                              loads) -> None:
    """``--previous p.json -o p.json --force`` is the re-plan in place: allowed."""
    out = tmp_path / "p.json"
    assert plan(capsys, loads, out)[0] == 0
    code, _ = plan(capsys, loads, out, "--previous", str(out), "--force")
    assert code == 0 and read_placement(out).num_layers == L


@pytest.mark.parametrize("stem", ["a" * 245, "é" * 124])
@pytest.mark.parametrize("no_tmpfile", [False, True])
def test_a_long_but_allowed_output_name_is_written_and_replaced(capsys, tmp_path, loads,
                                                                monkeypatch, stem,
                                                                no_tmpfile) -> None:
    """Found by the twelfth-session hostile-files pass: the hidden temporary name
    (``.{name}.{random}.tmp``) is 18 bytes longer than OUT, so a 250-byte OUT (allowed)
    failed with ENAMETOOLONG naming the temporary file, under --force (and always where
    O_TMPFILE is missing)."""
    if no_tmpfile:
        monkeypatch.setattr(files, "_open_unnamed", lambda directory: None)
    out = tmp_path / f"{stem}.json"
    assert len(os.fsencode(out.name)) <= 255
    code, err = plan(capsys, loads, out)
    assert code == 0, err
    code, err = plan(capsys, loads, out, "--seed", "3", "--force")
    assert code == 0, err
    assert read_placement(out).num_layers == L
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["loads.npy", out.name])


def test_an_output_under_a_file_says_the_file_is_no_folder(capsys, tmp_path, loads) -> None:
    """Found by the twelfth-session hostile-files pass: ``-o loads.npy/p.json`` said
    "folder loads.npy does not exist" (API: the same), though it exists, as a file."""
    code, err = plan(capsys, loads, loads / "p.json")
    assert code == 2 and "is not a directory" in err and "does not exist" not in err
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        write_loads(read_loads(loads), loads / "t.pt")
    assert np.load(loads).shape == (L, E)


@pytest.mark.parametrize("command", ["plan", "generate"])
@pytest.mark.parametrize("name", ["-", ""])
def test_dash_or_nothing_as_output_is_refused_not_a_file(capsys, tmp_path, loads, monkeypatch,
                                                         command, name) -> None:
    """``-o -`` wrote a file named '-' (with a 'no suffix' warning) where the user meant
    stdout; ``-o ''`` was called '. is a directory'."""
    monkeypatch.chdir(tmp_path)
    argv = (["plan", str(loads), "-r", str(R), "-g", str(P), "-o", name]
            if command == "plan" else ["generate", "--steps", "2", "-o", name, "-q"])
    before = sorted(tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("eplb: error: ") and "-o" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.iterdir()) == before


def test_plan_names_a_missing_input_before_an_existing_output(capsys, tmp_path, loads):
    # with both mistakes, plan asked for --force first: given it, the run then failed on
    # the input anyway
    out = tmp_path / "exists.json"
    out.write_text("{}")
    code, err = plan(capsys, tmp_path / "missing.npy", out)
    assert code == 2 and "loads file" in err and "missing.npy' not found" in err, err
    code, err = plan(capsys, loads, out, "--previous", str(tmp_path / "gone.json"))
    assert code == 2 and "previous placement" in err and "gone.json' not found" in err, err
    assert out.read_text() == "{}"


def test_generate_names_an_unknown_preset_before_an_existing_output(capsys, tmp_path):
    # it asked for --force first; given it, the run then failed on the preset anyway
    out = tmp_path / "exists.pt"
    out.write_text("keep")
    code = main(["generate", "--preset", "nope", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown preset 'nope'" in err, err
    assert out.read_text() == "keep"


def test_a_file_that_appears_during_the_run_is_kept_and_named_in_the_clis_words(
        capsys, tmp_path, loads, monkeypatch) -> None:
    """Attacker pass: the loser of two runs writing one output read "pass force=True
    (CLI: --force)", the API's words. Simulated: the output appears after the up-front
    check, so the writer finds it when it publishes."""
    import eplb.cli.commands as commands
    out = tmp_path / "placement.json"
    real_check = commands.check_output

    def check_then_race(path, force):
        checked = real_check(path, force)
        out.write_text("the other run's")
        return checked

    monkeypatch.setattr(commands, "check_output", check_then_race)
    code, err = plan(capsys, loads, out)
    assert code == 2 and "pass --force" in err and "force=True" not in err, err
    assert out.read_text() == "the other run's"
