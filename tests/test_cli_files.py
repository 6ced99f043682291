"""Written files: permissions, overwrite guard, concurrent writers, killed writers.

Every case is what a user meets: ``eplb plan -o`` (and the writers behind it) run under
a umask, over an existing file, next to a dangling symlink, twice at once, or killed.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import eplb
import eplb.formats._files as files
from eplb.cli import main
from eplb.formats import (
    FormatError,
    LoadTrace,
    read_loads,
    read_placement,
    write_loads,
    write_placement,
)

L, E, R, P = 4, 16, 20, 4


@pytest.fixture
def loads(tmp_path: Path) -> Path:
    gen = np.random.default_rng(0)
    path = tmp_path / "loads.npy"
    np.save(path, np.exp(gen.normal(0, 1, size=(L, E))) * 100)
    return path


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


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


def test_a_file_that_appears_after_the_early_check_is_not_overwritten(tmp_path) -> None:
    # the early check passed; another writer publishes first: link-or-fail refuses
    path = tmp_path / "p.json"

    def write(handle) -> None:
        path.write_text("the other writer")
        handle.write("mine")

    with pytest.raises(FileExistsError, match="already exists"):
        files.atomic_write(path, write)
    assert path.read_text() == "the other writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def _racer(path: str, barrier, index: int) -> None:
    """Child process: write ``path`` without force, both children past their checks.

    Exit status 0: published; 3: refused because the other writer published first.
    """
    def write(handle) -> None:
        handle.write(f"writer {index}\n" * 1000)
        barrier.wait(timeout=30)  # both have passed the early check and written everything

    try:
        files.check_writable(Path(path), force=False)
        files.atomic_write(Path(path), write)
    except FileExistsError:
        os._exit(3)
    os._exit(0)


def test_two_concurrent_writers_cannot_both_succeed(tmp_path) -> None:
    ctx = multiprocessing.get_context("fork")  # the children need no fresh interpreter
    for trial in range(5):
        path = tmp_path / f"p{trial}.json"
        barrier = ctx.Barrier(2)
        procs = [ctx.Process(target=_racer, args=(str(path), barrier, i)) for i in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        codes = [proc.exitcode for proc in procs]
        assert sorted(codes) == [0, 3]
        winner = codes.index(0)
        assert path.read_text() == f"writer {winner}\n" * 1000  # complete, one writer's
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_two_concurrent_eplb_plan_runs_one_wins(tmp_path, loads) -> None:
    out = tmp_path / "same.json"
    cmd = [sys.executable, "-m", "eplb", "plan", str(loads), "-r", str(R), "-g", str(P),
           "-o", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    done = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], done
    loser_err = next(err for p, (_, err) in zip(procs, done, strict=True) if p.returncode)
    assert "already exists" in loser_err and "Traceback" not in loser_err
    assert read_placement(out).phy2log.shape == (L, R)


_SLOW_WRITER = """
import importlib.util, sys, time
# the writer module alone (stdlib only), without importing torch through the package
spec = importlib.util.spec_from_file_location("files", sys.argv[3])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
def write(handle):
    print("writing", flush=True)
    for i in range(100000):
        handle.write('{"step": %d, "payload": "%s"}\\n' % (i, "x" * 200))
        if i % 2000 == 0:
            handle.flush()
            time.sleep(0.01)
    handle.write("END\\n")
files.atomic_write(__import__("pathlib").Path(sys.argv[1]), write, force=sys.argv[2] == "1")
"""


@pytest.mark.parametrize("force", [False, True])
def test_a_killed_writer_leaves_no_truncated_file(tmp_path, force) -> None:
    for delay in (0.0, 0.1, 0.3):
        out = tmp_path / f"out_{delay}.json"
        if force:
            out.write_text("old complete file\n")
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(out),
                                 "1" if force else "0", files.__file__],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "writing\n"  # the write has begun
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL  # killed mid-write, not finished
        if out.exists():
            text = out.read_text()
            assert text == "old complete file\n" or text.endswith("END\n")
        # an unnamed (O_TMPFILE) temporary file vanishes with the process
        if files._open_unnamed(tmp_path) is not None:
            leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
            assert leftovers == []


@pytest.mark.parametrize("no_tmpfile", [False, True])
@pytest.mark.parametrize("no_links", [False, True, "nor renameat2"])
def test_fallbacks_keep_every_guarantee(tmp_path, monkeypatch, umask, no_tmpfile,
                                        no_links) -> None:
    """File systems without O_TMPFILE and/or hard links (e.g. some network mounts), and
    systems without ``renameat2`` besides."""
    if no_tmpfile:
        monkeypatch.setattr(files, "_open_unnamed", lambda directory: None)
    if no_links:
        def refuse(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(files, "_link", refuse)
    if no_links == "nor renameat2":
        monkeypatch.setattr(files, "_renameat2", lambda: None)
    umask(0o027)
    path = tmp_path / "p.json"
    files.atomic_write(path, lambda h: h.write("one"))
    assert path.read_text() == "one" and mode(path) == 0o640
    with pytest.raises(FileExistsError):
        files.atomic_write(path, lambda h: h.write("two"))
    assert path.read_text() == "one"
    os.chmod(path, 0o604)
    files.atomic_write(path, lambda h: h.write("three"), force=True)
    assert path.read_text() == "three" and mode(path) == 0o604
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_without_hard_links_the_name_appears_in_one_step(tmp_path, monkeypatch) -> None:
    """Without ``link()``, the name is published by a rename that refuses to replace: no
    empty file holds the name first, so a writer killed at any point leaves no file or
    the complete one."""
    if files._renameat2() is None:
        pytest.skip("no renameat2 in this C library")
    probe_src, probe_dst = tmp_path / "probe", tmp_path / "probe2"
    probe_src.write_text("x")
    if not files._rename_noreplace(probe_src, probe_dst):
        pytest.skip("this file system has no RENAME_NOREPLACE")
    probe_dst.unlink()

    def refuse(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(files, "_link", refuse)
    path = tmp_path / "p.json"
    real_open = os.open

    def watch(name, flags, *args, **kwargs):
        # the reservation: an exclusive create of the output name itself
        assert not (os.fspath(name) == os.fspath(path) and flags & os.O_EXCL), \
            "the name was reserved by an empty file"
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", watch)
    files.atomic_write(path, lambda h: h.write("one"))
    assert path.read_text() == "one"
    with pytest.raises(FileExistsError, match="force"):
        files.atomic_write(path, lambda h: h.write("two"))
    assert path.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_a_failing_writer_leaves_nothing(tmp_path) -> None:
    path = tmp_path / "p.json"

    def write(handle) -> None:
        handle.write("half")
        raise RuntimeError("serialisation failed")

    with pytest.raises(RuntimeError):
        files.atomic_write(path, write)
    assert list(tmp_path.iterdir()) == []



_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
from eplb.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("name", ["t.pt", "t.npz", "t.npy", "t.json", "p.pt", "p.json"])
def test_a_write_that_runs_out_of_room_names_the_file_and_leaves_the_old_one(tmp_path, name):
    # torch.save used to say "[enforce fail at inline_container.cc] unexpected pos 832 vs
    # 726", np.save "2969600 requested and 16352 written", the others no file name
    out = tmp_path / name
    out.write_text("old complete file\n")
    command = (["generate", "--steps", "3", "-q"] if name.startswith("t.") else
               ["plan", str(_big_loads(tmp_path)), "-r", "512", "-g", "8"])
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, *command, "-o", str(out),
                           "--force"], capture_output=True, text=True)
    assert done.returncode == 1
    assert f"cannot write {out}: File too large" in done.stderr
    assert out.read_text() == "old complete file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) in ([name], sorted([name, "big.npy"]))


def _big_loads(folder: Path) -> Path:
    np.save(folder / "big.npy", np.random.default_rng(0).integers(0, 1000, (8, 256)))
    return folder / "big.npy"

def test_api_writers_refuse_to_overwrite_and_publish_complete_files(tmp_path) -> None:
    placement = eplb.plan(torch.rand(3, 8) * 10, 12, 4)
    path = write_placement(placement, tmp_path / "a.json")
    with pytest.raises(FileExistsError, match="force"):
        write_placement(placement, path)
    trace = LoadTrace(torch.rand(2, 3, 8))
    t = write_loads(trace, tmp_path / "t.npz")
    with pytest.raises(FileExistsError, match="force"):
        write_loads(trace, t)
    assert torch.equal(read_loads(t).counts, trace.counts)


def test_odd_but_valid_arrays_plan_and_odd_files_fail_clearly(tmp_path, capsys):
    np.save(tmp_path / "big_endian.npy", np.arange(16, dtype=">f8").reshape(2, 8) + 1)
    # distinct ids per top-k row, as a router's (a repeated one is refused)
    ids = np.random.default_rng(0).random((16, 2, 8)).argsort(2)[..., :2].astype(np.uint64)
    np.savez(tmp_path / "uint64.npz", x_topk_ids=ids)
    for name in ("big_endian.npy", "uint64.npz"):
        assert main(["plan", str(tmp_path / name), "-r", "16", "-g", "2", "-o",
                     str(tmp_path / f"{name}.json")]) == 0
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.rand(2, 8), 0.1, 0, torch.quint8)
    torch.save(quantized, tmp_path / "quantized.pt")
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    capsys.readouterr()
    for name, message in (("quantized.pt", "quantized tensor"), ("loop_a", "symbolic links")):
        code = main(["plan", str(tmp_path / name), "-r", "16", "-g", "2", "-o",
                     str(tmp_path / f"{name}.json")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err


def test_a_link_in_a_report_folder_is_refused_before_the_work(capsys, tmp_path) -> None:
    trace = tmp_path / "trace.pt"
    torch.save(torch.rand(40, 4, 16) * 100, trace)
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.html").symlink_to(tmp_path / "nowhere")  # dangling
    argv = ["simulate", str(trace), "-r", "20", "-g", "4", "--window", "10", "--report",
            str(report)]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert sorted(p.name for p in report.iterdir()) == ["report.html"]  # nothing written


@pytest.mark.parametrize("command", ["simulate", "bench"])
@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_a_report_folder_that_cannot_be_made_is_refused_before_the_work(
        command, where, capsys, tmp_path, monkeypatch) -> None:
    # "--report X" where X (or a folder above it) is a file was found only when the report
    # was written, after the whole simulation or benchmark had run
    import eplb.cli.bench
    import eplb.cli.sim

    forbid_work(monkeypatch, "--report", (eplb.cli.sim, "simulate"),
                (eplb.cli.bench, "compare"))
    trace = tmp_path / "trace.pt"
    torch.save(torch.rand(40, 4, 16) * 100, trace)
    (tmp_path / "file").write_text("not a folder")
    argv = ([command, str(trace), "-r", "20", "-g", "4"]
            + (["--window", "10"] if command == "simulate" else ["--no-builtin"])
            + ["--report", str(tmp_path / where)])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'file'} exists and is not a directory" in err, err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_an_empty_report_folder_name_is_refused(capsys, tmp_path, monkeypatch) -> None:
    """``--report ""`` wrote the report into the current folder."""
    monkeypatch.chdir(tmp_path)
    trace = tmp_path / "trace.pt"
    torch.save(torch.rand(40, 4, 16) * 100, trace)
    assert main(["simulate", str(trace), "-r", "20", "-g", "4", "--window", "10",
                 "--report", ""]) == 2
    assert "--report needs a folder name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.pt"]


def test_a_folder_of_sglang_dumps_and_other_files_is_refused_by_name(capsys, tmp_path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "x.json").write_text('{"logical_count": [[1, 2, 3, 4]]}')
    np.save(folder / "other.npy", np.ones((2, 4)))
    assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "other files (other.npy)" in err and "folder of such dumps only" in err


def test_a_folder_of_sglang_pt_dumps_and_other_files_is_refused_by_name(capsys,
                                                                      tmp_path) -> None:
    """Beside .pt recorder dumps, JSON dumps (or any data file) were left out without a
    word (attacker pass: 800 of 80,800 tokens read); a folder named like a dump is named
    as a folder (it read "found none")."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    torch.save({"rank": 0, "logical_count": torch.ones(1, 2, 4, dtype=torch.int32)},
               folder / "expert_distribution_recorder_1.pt")
    (folder / "x.json").write_text('{"logical_count": [[100, 200, 300, 400], [1, 2, 3, 4]]}')
    for format_flag in ([], ["--format", "sglang"]):
        code = main(["plan", str(folder), *format_flag, "-r", "4", "-g", "2", "-o",
                     str(tmp_path / "p.json")])
        err = capsys.readouterr().err
        assert code == 2 and "other files (x.json)" in err and "dumps only" in err, err
    # a placement planned from the folder and written into it is no load file
    (folder / "x.json").unlink()
    assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o",
                 str(folder / "placement.json")]) == 0
    assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o",
                 str(folder / "again.sglang.json")]) == 0
    for name in ("placement.pt", "third.sglang.pt"):  # (torch placements too)
        assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o", str(folder / name)]) == 0
    assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o", str(tmp_path / "p.json"),
                 "--force"]) == 0
    capsys.readouterr()
    (folder / "expert_distribution_recorder_2.pt").mkdir()
    for format_flag in ([], ["--format", "sglang"], ["--format", "sglang-per-pass"]):
        code = main(["plan", str(folder), *format_flag, "-r", "4", "-g", "2", "-o",
                     str(tmp_path / "q.json")])
        err = capsys.readouterr().err
        assert code == 2 and "expert_distribution_recorder_2.pt: is a folder" in err, err
    # dumps in a sub-folder are named, not skipped (second attacker pass)
    (folder / "expert_distribution_recorder_2.pt").rmdir()
    (folder / "node1").mkdir()
    torch.save({"rank": 0, "logical_count": torch.ones(1, 2, 4, dtype=torch.int32)},
               folder / "node1" / "expert_distribution_recorder_3.pt")
    code = main(["plan", str(folder), "-r", "4", "-g", "2", "-o", str(tmp_path / "q.json")])
    err = capsys.readouterr().err
    assert code == 2 and "a folder of more of them (node1)" in err, err
    (folder / "node1" / "expert_distribution_recorder_3.pt").unlink()
    (folder / "node1").rmdir()
    # a named per-pass format checks the files beside the dumps too (second attacker pass)
    (folder / "extra.pkl").write_bytes(b"x")
    code = main(["plan", str(folder), "--format", "sglang-per-pass", "-r", "4", "-g", "2",
                 "-o", str(tmp_path / "q.json")])
    err = capsys.readouterr().err
    assert code == 2 and "other files (extra.pkl)" in err, err


def test_a_folder_of_json_dumps_planned_into_stays_readable(capsys, tmp_path) -> None:
    """A JSON placement written into a folder of {"logical_count"} JSON dumps is no dump:
    the folder read "found none" of them after it (second attacker pass)."""
    folder = tmp_path / "dumps"
    folder.mkdir()
    for k in range(2):
        (folder / f"d{k}.json").write_text(json.dumps(
            {"logical_count": [[100 + k, 200, 300, 400], [1, 2, 3, 4 + k]]}))
    for name in ("placement.json", "again.sglang.json", "third.json"):
        assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o", str(folder / name)]) == 0
    capsys.readouterr()
    assert main(["plan", str(folder), "--format", "sglang", "-r", "4", "-g", "2", "-o",
                 str(tmp_path / "p.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps_summed"] == 2


def test_notes_beside_sglang_dumps_do_not_stop_the_folder_being_read(capsys, tmp_path) -> None:
    folder = tmp_path / "dumps"
    folder.mkdir()
    for k in range(2):
        (folder / f"d{k}.json").write_text('{"logical_count": [[1, 2, 3, 4]]}')
    (folder / "SOURCE.md").write_text("where these came from")
    assert main(["plan", str(folder), "-r", "4", "-g", "2", "-o", str(tmp_path / "p.json")]) == 0


def test_a_plan_for_unequal_gpus_records_its_speeds_and_eval_uses_them(tmp_path, capsys):
    """A plan made with --gpu-speed used to be scored by eval as if every GPU were equal
    (no warning), and its file recorded that score."""
    loads = tmp_path / "loads.json"
    weight = torch.exp(torch.randn(4, 16, generator=torch.Generator().manual_seed(5)))
    loads.write_text(json.dumps({"logical_count": weight.tolist()}))
    speeds = [1.0] * 4 + [2.0] * 4
    out = tmp_path / "fast.json"
    assert main(["plan", str(loads), "-r", "24", "-g", "8", "--gpu-speed",
                 ",".join(map(str, speeds)), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["gpu_speed"] == speeds
    timed = read_placement(out).balancedness(weight, gpu_speed=speeds)
    assert doc["balancedness"] == pytest.approx(timed)
    assert doc["ceiling"] is None  # the bounds are for equal GPUs
    capsys.readouterr()
    assert main(["eval", "--placement", str(out), str(loads), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["balancedness_after"] == pytest.approx(timed)
    assert main(["eval", "--placement", str(out), str(loads), "--gpu-speed",
                 ",".join(["1"] * 8)]) == 2
    assert "records the GPU speeds" in capsys.readouterr().err
    # re-planning from it for equal GPUs is allowed, and said
    assert main(["plan", str(loads), "-r", "24", "-g", "8", "--previous", str(out),
                 "-o", str(tmp_path / "again.json")]) == 0
    said = capsys.readouterr().err
    # its advice can be followed: --gpu-speed with --previous is refused (new-user pass)
    assert "planned for unequal GPU speeds" in said and "plan without --previous" in said
    assert "pass --gpu-speed as it was" not in said
    # a hostile speed field is a clear format error
    doc["gpu_speed"][0] = -1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    assert main(["eval", "--placement", str(bad), str(loads)]) == 2
    assert "gpu_speed must be null or 8 positive" in capsys.readouterr().err
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


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
@pytest.mark.parametrize("command", ["bench", "simulate", "demo"])
def test_a_report_folder_that_cannot_be_written_is_refused_before_the_work(
        capsys, tmp_path, monkeypatch, command, case) -> None:
    """A report folder that is a file, lies under one, or is not writable failed only in
    Report.write, after the whole benchmark, simulation or demo had run."""
    import eplb.cli._common as common
    import eplb.cli.bench as bench
    import eplb.cli.sim as sim

    forbid_work(monkeypatch, "the report folder", (bench, "compare"),
                (bench, "generated_trace"), (sim, "run_simulation"))
    trace = tmp_path / "trace.pt"
    torch.save(torch.rand(40, 4, 16) * 100, trace)
    folder = {"a file": trace, "under a file": trace / "report",
              "read-only": tmp_path / "ro" / "report"}[case]
    if case == "read-only":
        (tmp_path / "ro").mkdir()
        real_access = os.access
        monkeypatch.setattr(common.os, "access", lambda path, mode: (
            False if Path(path) == tmp_path / "ro" else real_access(path, mode)))
    argv = {"bench": ["bench", "--no-builtin", str(trace), "--report", str(folder)],
            "simulate": ["simulate", str(trace), "-r", "20", "-g", "4", "--window", "10",
                         "--report", str(folder)],
            "demo": ["demo", "--quick", "--out", str(folder)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("eplb: error: ") and len(err.strip().splitlines()) == 1, err
    assert {"a file": "is not a directory", "under a file": "is not a directory",
            "read-only": "permission denied"}[case] in err


@pytest.mark.parametrize("command", ["plan", "generate"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(
        capsys, tmp_path, loads, monkeypatch, command) -> None:
    import eplb.cli._checks as checks
    import eplb.cli.commands as commands
    import eplb.cli.sim as sim

    forbid_work(monkeypatch, "the output folder", (commands, "read_trace"),
                (sim, "generate_trace"))
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(checks.os, "access", lambda path, mode: (
        False if Path(path) == locked else real_access(path, mode)))
    out = locked / ("p.json" if command == "plan" else "t.pt")
    argv = (["plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(out)]
            if command == "plan" else ["generate", "--steps", "2", "-o", str(out), "-q"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"eplb: error: cannot write {out}: permission denied in '{locked}'"


@pytest.mark.parametrize("command", ["plan", "generate", "demo"])
def test_a_read_only_file_system_is_named_as_one(capsys, tmp_path, loads, monkeypatch,
                                                 command) -> None:
    """Attacker pass (a tmpfs mounted read-only): the early check said "permission denied",
    which sends the user to chmod a folder whose mode is fine; the mount is the cause."""
    import eplb.cli.bench as bench
    import eplb.cli.commands as commands
    import eplb.cli.sim as sim

    forbid_work(monkeypatch, "the output folder", (commands, "read_trace"),
                (sim, "generate_trace"), (bench, "generated_trace"))
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    real_access, real_statvfs = os.access, os.statvfs

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda path, mode: (
        False if Path(path) == mounted else real_access(path, mode)))
    monkeypatch.setattr(os, "statvfs", lambda path: (
        ReadOnly() if Path(path) == mounted else real_statvfs(path)))
    out = mounted / {"plan": "p.json", "generate": "t.pt", "demo": "report"}[command]
    argv = {"plan": ["plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(out)],
            "generate": ["generate", "--steps", "2", "-o", str(out), "-q"],
            "demo": ["demo", "--quick", "--out", str(out)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{mounted}' is on a read-only file system" if command != "demo" else
                        f"{mounted} is on a read-only file system"), err
    assert "permission denied" not in err and len(err.splitlines()) == 1


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


@pytest.mark.parametrize("command", ["plan", "eval"])
def test_a_loads_file_named_twice_is_refused(capsys, tmp_path, loads, command):
    # several loads files are steps one after another: the same file twice (also through
    # another spelling of its path) doubled its loads without a word
    again = tmp_path / "." / loads.name
    out = tmp_path / "p.json"
    if command == "plan":
        argv = ["plan", str(loads), str(again), "-r", str(R), "-g", str(P), "-o", str(out)]
    else:
        assert main(["plan", str(loads), "-r", str(R), "-g", str(P), "-o", str(out)]) == 0
        capsys.readouterr()
        argv = ["eval", "--placement", str(out), str(loads), str(again)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is given twice" in err and len(err.strip().splitlines()) == 1, err
    assert out.exists() == (command == "eval")


def test_a_dump_read_twice_through_a_folder_is_refused(capsys, tmp_path):
    # a folder and a file in it, a "latest" link beside the dumps, two folders holding one
    # dump: each summed it twice without a word (attacker pass)
    dumps, linked, other = tmp_path / "a", tmp_path / "e", tmp_path / "b"
    for folder in (dumps, linked, other):
        folder.mkdir()
    for name in ("d1", "d2"):
        (dumps / f"{name}.json").write_text(json.dumps({"logical_count": [[1, 2, 3, 4]]}))
    (linked / "d1.json").write_text(json.dumps({"logical_count": [[1, 2, 3, 4]]}))
    (linked / "latest.json").symlink_to("d1.json")
    (other / "x.json").symlink_to(dumps / "d1.json")
    out = str(tmp_path / "p.json")
    for loads, said in (([dumps, dumps / "d1.json"], "is read from the folder"),
                        ([linked], "are the same file"),
                        ([dumps, other], "both hold one file (d1.json, x.json")):
        assert main(["plan", *map(str, loads), "-r", "8", "-g", "4", "-o", out]) == 2
        err = capsys.readouterr().err
        assert said in err and "count twice" in err and len(err.strip().splitlines()) == 1, err
    assert main(["plan", str(dumps), "-r", "8", "-g", "4", "-o", out]) == 0
    with pytest.raises(FormatError, match="same file"):
        read_loads(linked)
    # hard links are the same file too (second attacker pass); equal content is not
    hard, equal = tmp_path / "hard", tmp_path / "equal"
    hard.mkdir(), equal.mkdir()
    os.link(dumps / "d1.json", hard / "d1.json")
    os.link(dumps / "d1.json", hard / "d9.json")
    for loads in ([hard], [dumps, hard / "d1.json"], [dumps / "d1.json", hard / "d9.json"]):
        assert main(["plan", *map(str, loads), "-r", "8", "-g", "4", "-o", out, "--force"]) == 2
        assert "count twice" in capsys.readouterr().err
    for name in ("x1.json", "x2.json"):
        (equal / name).write_text((dumps / "d1.json").read_text())
    assert main(["plan", str(equal), "-r", "8", "-g", "4", "-o", out, "--force"]) == 0
    # a link to itself is named as the reader names it, not as an internal error
    loop = tmp_path / "loop"
    loop.mkdir()
    name = "expert_distribution_recorder_1.0.pt"
    (loop / name).symlink_to(name)
    assert main(["plan", str(loop), "-r", "8", "-g", "4", "-o", out, "--force"]) == 2
    err = capsys.readouterr().err
    assert "symbolic links" in err and "RuntimeError" not in err, err


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


def test_equal_gpu_speeds_plan_as_equal_gpus(tmp_path, capsys):
    """--gpu-speed 1,1,... took the speed path: no count search, no ceiling, and a
    hierarchical plan refused as if the speeds differed (attacker pass)."""
    loads = tmp_path / "loads.json"
    weight = torch.exp(torch.randn(4, 16, generator=torch.Generator().manual_seed(5)))
    loads.write_text(json.dumps({"logical_count": weight.tolist()}))
    plain, even = tmp_path / "plain.json", tmp_path / "even.json"
    assert main(["plan", str(loads), "-r", "24", "-g", "8", "-o", str(plain)]) == 0
    assert main(["plan", str(loads), "-r", "24", "-g", "8", "--gpu-speed", ",".join(["2"] * 8),
                 "-o", str(even)]) == 0
    doc = json.loads(even.read_text())
    assert doc["gpu_speed"] is None and doc["ceiling"] is not None
    assert doc["phy2log"] == json.loads(plain.read_text())["phy2log"]
    assert main(["plan", str(loads), "-r", "24", "-g", "8", "--nodes", "2", "--groups", "4",
                 "--policy", "hierarchical", "--gpu-speed", ",".join(["1"] * 8),
                 "-o", str(tmp_path / "hier.json")]) == 0
    capsys.readouterr()
    # eval too scores equal speeds as equal GPUs, with the ceiling; and a file that earlier
    # eplb wrote with equal speeds is not called "planned for unequal GPU speeds"
    assert main(["eval", "--placement", str(plain), str(loads), "--gpu-speed",
                 ",".join(["2"] * 8), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["balancedness_ceiling"] is not None
    doc["gpu_speed"] = [2.0] * 8
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    assert main(["plan", str(loads), "-r", "24", "-g", "8", "--gpu-speed", ",".join(["2"] * 8),
                 "--previous", str(old), "-o", str(tmp_path / "next.json")]) == 0
    assert "unequal" not in capsys.readouterr().err


def test_a_fifo_in_a_report_folder_is_refused_in_the_clis_words(capsys, tmp_path):
    """Attacker pass: the refusal read "even with --force (force=True)", the API's word."""
    folder = tmp_path / "report"
    folder.mkdir()
    os.mkfifo(folder / "report.html")
    assert main(["demo", "--out", str(folder), "--force", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "not a regular file" in err and "force=True" not in err, err


@pytest.mark.parametrize("where", ["flag", "file"])
def test_eval_refuses_gpu_speeds_beyond_the_ratio_plan_takes(tmp_path, capsys, where):
    """Speeds 1e-308 apart made a GPU's time overflow: eval printed balancedness 0.0000
    beside a worst max/mean of 1.0000, and ``Infinity`` (not JSON) with --json, where
    plan refuses such speeds (attacker pass). Now both refuse them, naming the source."""
    loads = tmp_path / "loads.json"
    loads.write_text(json.dumps({"logical_count": [[1, 2, 3, 4], [4, 3, 2, 1]]}))
    out = tmp_path / "p.json"
    assert main(["plan", str(loads), "-r", "8", "-g", "4", "-o", str(out)]) == 0
    speeds = [1e308, 1e308, 1e-308, 1.0]
    flags = ["--gpu-speed", ",".join(map(str, speeds))]
    if where == "file":
        doc = json.loads(out.read_text())
        doc["gpu_speed"] = speeds
        out.write_text(json.dumps(doc))
        flags = []
    capsys.readouterr()
    code = main(["eval", "--placement", str(out), str(loads), "--json", *flags])
    captured = capsys.readouterr()
    assert code == 2 and "Infinity" not in captured.out, captured.out
    assert "times slower than the fastest" in captured.err
    assert ("--gpu-speed" if where == "flag" else "p.json's gpu_speed") in captured.err


def test_an_sglang_file_without_gpus_names_the_flag_not_the_keyword(tmp_path, capsys):
    # an SGLang file records no GPU count: eval asks for -g, not the API's num_gpus=
    # (the keyword came first and misled a newcomer)
    loads = tmp_path / "w.npy"
    np.save(loads, np.arange(1, 17, dtype=np.float64).reshape(2, 8))
    placement = tmp_path / "p.sglang.json"
    assert main(["plan", str(loads), "-r", "12", "-g", "4", "-o", str(placement),
                 "--first-layer", "0"]) == 0
    capsys.readouterr()
    assert main(["eval", "--placement", str(placement), str(loads)]) == 2
    err = capsys.readouterr().err
    assert "give the EP size with -g/--gpus (12 slots must divide evenly)" in err
    assert "num_gpus=" not in err
