"""Written files appear whole or not at all: concurrent writers, killed and failing writers,
file systems without O_TMPFILE or hard links, a full disk, and the API's writers.

``eplb plan -o`` and the writers behind it; the helpers are ``test_cli_files.py``'s.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli_files import L, P, R, mode

import eplb
import eplb.formats._files as files
from eplb.formats import (
    LoadTrace,
    read_loads,
    read_placement,
    write_loads,
    write_placement,
)


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
