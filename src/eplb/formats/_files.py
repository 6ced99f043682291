"""Small file helpers shared by the readers and writers: optional imports, progress, safe
reads and safe writes.

Writes (:func:`atomic_write`) follow what a user expects of ``open(path, "w")`` and more:

- **Permissions**: a new file gets ``0o666 & ~umask``, like ``open()``, so an engine
  running as another user can read the placement when the umask allows it. A file
  replaced with ``force`` keeps its permission bits, as ``> file`` in a shell does: a
  user who made ``placement.json`` group-readable for the serving account (or private)
  keeps that choice across re-plans. It keeps its group too where the writer may set it
  (a member of that group, or root), and root keeps its owner (a shell's ``>`` rewrites
  the file in place, so both stay); where the group cannot be kept a warning says so.
- **No half-written files**: the content goes to an unnamed (``O_TMPFILE``) or hidden
  temporary file in the same folder, is flushed and ``fsync``-ed, and only then gets its
  name; the folder is ``fsync``-ed after. A writer killed at any point leaves either no
  file or the complete one (an unnamed temporary file vanishes with the process), on
  every file system but those that lack both hard links and ``renameat2`` (below).
- **No silent overwrite**: without ``force`` the name is published with ``link()``,
  which fails when *anything* already has the name (a file, a dangling symlink, or a
  concurrent writer that got there first). Of two concurrent writers exactly one wins;
  the other gets ``FileExistsError``. With ``force`` the name is replaced atomically by
  ``rename()`` (a symlink at the name is replaced, its target left alone). On a file
  system without hard links the name is published by Linux's ``renameat2`` with
  ``RENAME_NOREPLACE`` (one step, and it fails when the name is taken); only where that
  is missing too is the name reserved first by an empty file, then replaced (a writer
  killed in between leaves that empty file).

Reads (:func:`require_regular_file`) refuse FIFOs, sockets and devices up front (opening
a FIFO blocks forever) and turn permission problems into a clear ``PermissionError``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import secrets
import stat
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from eplb.core.inputs import RepeatedKeyError, unique_keys
from eplb.formats.errors import FormatError, MissingPackage, shown

# errors that mean "this file system cannot do that", not "the name is taken"
_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS,
                errno.EMLINK, errno.EISDIR, errno.EXDEV}


#: how to get the optional safetensors package. eplb is on no package index, so
#: ``pip install 'eplb[safetensors]'`` would fail there (or fetch another project's "eplb"):
#: name the [safetensors] extra's own requirement (pyproject.toml; tests check it)
SAFETENSORS_HINT = "pip install 'safetensors>=0.4'"
#: the largest safetensors header read for repeated keys (the library's own limit)
_MAX_HEADER = 100_000_000


def import_safetensors_torch() -> ModuleType:
    """``safetensors.torch``, or a :class:`MissingPackage` that says how to install it."""
    try:
        import safetensors.torch as st
    except ImportError as exc:  # optional dependency
        raise MissingPackage(
            "reading or writing .safetensors files needs the optional 'safetensors' package: "
            + SAFETENSORS_HINT
        ) from exc
    return st


def load_safetensors(path: Path) -> dict[str, Any]:
    """Every tensor of the safetensors file ``path`` by name, or a :class:`FormatError`:
    an unreadable file, or a header that names one tensor twice (the library keeps one of
    the two silently, where every other eplb reader refuses a repeated key)."""
    st = import_safetensors_torch()
    with open(path, "rb") as handle:  # the header: 8 bytes of length, then JSON
        size = int.from_bytes(handle.read(8), "little")
        header = handle.read(size) if 0 < size <= _MAX_HEADER else b""
    try:
        json.loads(header, object_pairs_hook=unique_keys)
    except RepeatedKeyError as exc:
        raise FormatError(path, f"its header names tensor {shown(exc.key)} twice (the "
                                "safetensors library keeps one of them, silently): remove "
                                "the one that is not meant") from None
    except ValueError:
        pass  # not JSON, or cut short: the library says what is wrong
    try:
        return dict(st.load_file(str(path)))
    except Exception as exc:  # safetensors raises its own error types
        raise FormatError(path, f"not a readable safetensors file: {exc}") from None


def _exists_message(path: Path) -> str:
    return f"{path} already exists; pass force=True (CLI: --force) to overwrite it"


def name_suffix(path: str | os.PathLike[str]) -> str:
    """The lower-case suffix of ``path``'s name, which names the file's format: the whole
    name where it is a suffix alone (``.pt``, ``.yaml``), which ``Path`` reads as a stem
    without a suffix (attacker pass: ``-o .pt`` wrote JSON into a hidden file named
    ``.pt`` where ``-o x.pt`` writes a torch file; ``.sglang.json`` keeps ``.json``)."""
    name = Path(os.fsdecode(os.fspath(path))).name.lower()
    suffix = Path(name).suffix
    if suffix or not name.startswith(".") or name in (".", ".."):
        return suffix
    return name


def output_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a ``Path``, refusing a name that ends in a separator (``out/``): that
    names a folder, and ``Path`` would drop the slash and write a file named ``out`` (or,
    with ``force``, replace the file ``out``)."""
    text = os.fsdecode(os.fspath(path))
    if text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        raise IsADirectoryError(f"{text} names a folder (it ends in {text[-1]!r}); give a "
                                "file name to write to")
    return Path(text)


def check_writable(path: Path, force: bool) -> None:
    """Refuse to overwrite ``path`` unless ``force``; check its folder exists.

    This is the early check (fail before the work); :func:`atomic_write` re-checks at
    the moment of publishing, so a file that appears in between is not overwritten.
    A dangling symlink counts as existing.
    """
    if path.is_dir():  # first: --force cannot replace a folder, so do not suggest it
        raise IsADirectoryError(f"{path} is a directory; give a file name to write to")
    if os.path.lexists(path) and not force:
        raise FileExistsError(_exists_message(path))
    if force:
        only_regular_files_are_replaced(path)
    if not path.parent.is_dir():
        # a parent that is a file: "does not exist" would send the user looking for it
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} {what}")


def only_regular_files_are_replaced(path: Path) -> None:
    """``--force`` replaces a regular file, nothing else: a symlink, device, FIFO or socket
    at the output name is refused (replacing ``/dev/null`` or a link someone set up on
    purpose is never what "overwrite" meant)."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):  # nothing there (the folder's error
        return  # is the caller's to word)
    if stat.S_ISLNK(info.st_mode):
        raise FileExistsError(
            f"{path} is a symbolic link; eplb only replaces regular files, even with "
            "--force (force=True): write to the link's target or remove the link"
        )
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise FileExistsError(
            f"{path} is not a regular file (a device, FIFO or socket); eplb only replaces "
            "regular files, even with --force (force=True)"
        )


def require_regular_file(path: Path, what: str = "input") -> os.stat_result:
    """``os.stat(path)`` of a readable regular file, else a clear error.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: it is a FIFO, socket or device (reading one can block forever).
        PermissionError: the current user may not read it.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise PermissionError(f"{what} {path}: permission denied (cannot reach the file)") \
            from None
    except OSError as exc:  # a symlink loop, a name too long, an I/O error
        raise ValueError(f"{what} {path}: cannot be opened ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        return info
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode)
                else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
                else "not a regular file")
        raise FormatError(path, f"is {kind}; eplb reads regular files and folders only")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{what} {path}: permission denied (the file is not readable "
                              "by this user)")
    return info


# ------------------------------------------------------------------------------ writing
def _fsync_dir(directory: Path) -> None:
    """Make a rename/link in ``directory`` durable; silently skipped where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_unnamed(directory: Path) -> int | None:
    """An ``O_TMPFILE`` descriptor in ``directory`` (mode ``0o666 & ~umask``), or ``None``."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, flag | os.O_RDWR, 0o666)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED or exc.errno == errno.ENOENT:
            return None
        raise


def _open_named(directory: Path, name: str) -> tuple[int, Path]:
    """A new hidden temporary file next to the output, mode ``0o666 & ~umask``."""
    for _ in range(100):
        tmp = _temp_name(directory, name)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {directory}")


def _link(src: str | Path, dst: Path) -> None:
    """``linkat(src, dst, AT_SYMLINK_FOLLOW)``: a ``/proc/self/fd/N`` source names the open
    file itself (plain ``link()`` would try to link the magic symlink and fail)."""
    root = os.open("/", os.O_RDONLY)
    try:  # a src_dir_fd makes CPython call linkat() with the follow flag
        os.link(src, dst, src_dir_fd=root, follow_symlinks=True)
    finally:
        os.close(root)


def _temp_name(directory: Path, name: str) -> Path:
    """A fresh hidden name ``.{name}.{random}.tmp`` beside the output, ``name`` cut so the
    whole stays within the file system's limit on one name (255 bytes): an output name
    that is itself allowed, e.g. 245 characters, must not fail on its temporary name."""
    suffix = f".{secrets.token_hex(6)}.tmp"
    room = _name_max(directory) - 1 - len(suffix)
    name = name[:max(room, 0)]
    while len(os.fsencode(name)) > room:  # a multi-byte character takes more room
        name = name[:-1]
    return directory / f".{name}{suffix}"


def _name_max(directory: Path) -> int:
    """The longest file name ``directory`` takes, in bytes (255 where it cannot be asked)."""
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError, TypeError):
        return 255


def _name_unnamed(fd: int, directory: Path, name: str) -> Path:
    """Give the unnamed file ``fd`` a fresh hidden name in ``directory``."""
    for _ in range(100):
        tmp = _temp_name(directory, name)
        try:
            _link(f"/proc/self/fd/{fd}", tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary name in {directory}")


def _publish_exclusive(src: str | Path, path: Path) -> bool:
    """Give ``src`` the name ``path``, failing if anything has that name already.

    Returns ``False`` when the file system cannot link (the caller then reserves the name
    with :func:`_reserve_and_replace`).
    """
    try:
        _link(src, path)
        return True
    except FileExistsError:
        raise FileExistsError(_exists_message(path)) from None
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise


#: ``renameat2`` arguments: the current folder as the directory descriptor, and the flag
#: that makes the rename fail when the destination exists (linux/fcntl.h, linux/fs.h)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """The C library's ``renameat2`` (Linux, glibc 2.28 and later), or ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` in one step, failing if anything has the name ``dst``.

    Returns ``False`` where the C library or the file system cannot (the caller then
    reserves the name). Python's ``os`` has no such rename; ``link()`` is the usual
    way, and this serves the file systems that lack it.
    """
    rename = _renameat2()
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
              _RENAME_NOREPLACE) == 0:
        return True
    error = ctypes.get_errno()
    if error == errno.EEXIST:
        raise FileExistsError(_exists_message(dst))
    if error in _UNSUPPORTED:
        return False
    raise OSError(error, os.strerror(error), os.fsdecode(dst))


def _reserve_and_replace(tmp: Path, path: Path) -> None:
    """Without hard links: publish by a rename that refuses to replace
    (:func:`_rename_noreplace`); where there is none, reserve the name exclusively, then
    fill it by an atomic rename (a concurrent writer still fails on the reservation, but
    a writer killed between the two steps leaves an empty file under the name)."""
    if _rename_noreplace(tmp, path):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise FileExistsError(_exists_message(path)) from None
    os.replace(tmp, path)


def _copy_to_named(fd: int, directory: Path, name: str, file_mode: int,
                   owner: tuple[int, int]) -> Path:
    """Copy the unnamed file ``fd`` into a named temporary file (no linkat on this system),
    with its mode and its ``(uid, gid)`` where the writer may set them."""
    out, tmp = _open_named(directory, name)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 1 << 20):
            os.write(out, chunk)
        with contextlib.suppress(OSError):  # (set already where they could be)
            os.fchown(out, *owner)
        os.fchmod(out, file_mode)
        os.fsync(out)
    except BaseException:
        os.close(out)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(out)
    return tmp


class _Sink:
    """The handle ``write`` callbacks get: it remembers the first ``OSError`` of a write.

    ``torch.save`` turns a failed write (a full disk) into an opaque ``RuntimeError``
    ("unexpected pos ..."), and ``np.save`` on a real file into an ``OSError`` without
    errno ("N requested and M written"); a handle that is not a real file makes NumPy go
    through ``write()`` too, and the remembered error is raised instead, naming the file.
    Everything else is the handle's own.
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` with a message that names ``path`` (the output, not a temporary file)."""
    if exc.errno is None:
        return OSError(f"cannot write {path}: {exc}")
    return type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}")


def _keep_owner(fd: int, path: Path, uid: int, gid: int, mode: int | None,
                _depth: int = 0) -> None:
    """Give the open file ``fd`` (about to replace ``path``) the replaced file's group, and
    its owner when running as root; a warning where the group cannot be kept (the writer
    is not in it), or the owner (a root that may not give files away). Through the
    descriptor, before the file has a name: a name could be swapped for a link to another
    file between two calls (attacker pass). The permission bits are set again after, as a
    change of owner may clear some."""
    now = os.fstat(fd)
    owner = uid if os.geteuid() == 0 and uid != now.st_uid else -1
    if owner == -1 and gid == now.st_gid:
        return
    try:
        os.fchown(fd, owner, gid)
    except OSError:
        if owner == -1:
            warnings.warn(f"eplb: the file replacing {path} cannot keep its group (gid "
                          f"{gid}): the writer is not in that group; the new file's group "
                          f"is gid {now.st_gid}", UserWarning, stacklevel=4 + _depth)
            return
        # root without CAP_CHOWN (a container, a user namespace that does not map the
        # owner): the owner is what cannot be kept, not the group, which may still be
        # (the warning used to blame the group, even one the file kept; attacker pass)
        warnings.warn(f"eplb: the file replacing {path} cannot keep its owner (uid {uid}): "
                      f"this root may not give files away; the new file's owner is uid "
                      f"{now.st_uid}", UserWarning, stacklevel=4)
        if gid != now.st_gid:  # the group alone, as any user may where a member of it
            _keep_owner(fd, path, now.st_uid, gid, mode, _depth=1)  # (the caller's frame)
        return
    if mode is not None:
        os.fchmod(fd, mode)


def atomic_write(
    path: Path, write: Callable[[Any], None], mode: str = "w", *, force: bool = False
) -> None:
    """Write ``path`` through ``write(handle)`` safely (see the module docstring).

    ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``. Without ``force`` an existing name
    (including a dangling symlink, or a file a concurrent writer published first)
    raises ``FileExistsError`` and nothing is changed.
    """
    path = Path(path)
    directory = path.parent
    keep_mode = None
    keep_owner: tuple[int, int] | None = None  # (uid, gid) of the file replaced
    if force:
        only_regular_files_are_replaced(path)
        if path.is_dir():  # else os.replace fails naming its temporary file
            raise IsADirectoryError(f"{path} is a directory; give a file name to write to")
        with contextlib.suppress(OSError):
            info = os.stat(path, follow_symlinks=False)
            if stat.S_ISREG(info.st_mode):
                # the permission bits, never setuid/setgid/sticky (the owner and group are
                # kept where the writer may set them: _keep_owner)
                keep_mode = stat.S_IMODE(info.st_mode) & 0o777
                keep_owner = (info.st_uid, info.st_gid)
    try:
        fd = _open_unnamed(directory)
        tmp: Path | None = None  # the named temporary file, once there is one
        if fd is None:
            fd, tmp = _open_named(directory, path.name)
    except OSError as exc:  # name the output, not a temporary file the user never asked for
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    try:
        kwargs = {} if "b" in mode else {"encoding": "utf-8"}
        failed: OSError | None = None  # a failed write, named (closing retries it)
        try:
            with os.fdopen(fd, mode, **kwargs) as handle:
                # binary writers (torch.save, np.save) hide a failed write's OSError, so
                # they write through a handle that remembers it; text writers (json,
                # yaml) raise it as it is, and make many small writes the wrapper would
                # slow down (a 35 MB JSON trace: 1.5 → 1.9 s)
                sink = _Sink(handle) if "b" in mode else None
                try:
                    write(handle if sink is None else sink)
                    handle.flush()
                except Exception as exc:
                    cause = sink.error if sink is not None and sink.error is not None else exc
                    if not isinstance(cause, OSError):
                        raise
                    failed = _named(cause, path)
                    raise failed from None
                if keep_mode is not None:
                    os.fchmod(handle.fileno(), keep_mode)
                if keep_owner is not None:
                    _keep_owner(handle.fileno(), path, *keep_owner, keep_mode)
                os.fsync(handle.fileno())
                if tmp is None:  # unnamed: publish straight from the descriptor when possible
                    src = f"/proc/self/fd/{handle.fileno()}"
                    if not force and _publish_exclusive(src, path):
                        _fsync_dir(directory)
                        return
                    try:
                        tmp = _name_unnamed(handle.fileno(), directory, path.name)
                    except OSError as exc:
                        if exc.errno not in _UNSUPPORTED:
                            raise
                        info = os.fstat(handle.fileno())
                        tmp = _copy_to_named(handle.fileno(), directory, path.name,
                                             stat.S_IMODE(info.st_mode),
                                             (info.st_uid, info.st_gid))
        except OSError as exc:
            if failed is not None and exc is not failed:
                raise failed from None
            raise
        if force:
            os.replace(tmp, path)
        elif _publish_exclusive(tmp, path):
            os.unlink(tmp)  # the content lives on under its published name
        else:
            _reserve_and_replace(tmp, path)
        tmp = None
        _fsync_dir(directory)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------- progress
@contextlib.contextmanager
def byte_progress(enabled: bool, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(num_bytes)``; with ``enabled`` a rich progress bar on stderr tracks it."""
    if not enabled:
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
