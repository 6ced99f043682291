"""Checked reading of ``.npy`` / ``.npz`` files.

``numpy.load`` trusts the array header: a header that claims shape ``(10**7, 10**7)``
makes it allocate the whole array before finding the data missing (a ``MemoryError``
after asking for terabytes), and an object array fails with a message that names no
file. Here every header is read first and checked against the bytes that really follow
it, and object dtypes are refused by name, before any array is allocated.

A compressed ``.npz`` member (``numpy.savez_compressed``) is bounded by no bytes of the
file: 3 MB of deflated zeros inflate to 3.4 GB, which took 14 s before the plan's size
check refused it. Its header declares the inflated size, so a compressed member that
declares more than :data:`MAX_UNPACKED_VALUES` numbers *and* more than
:data:`MAX_INFLATION` times its compressed bytes is refused before it is inflated (real
loads and top-k ids deflate a few times; a long routing trace saved compressed stays
readable).
Stored members (``numpy.savez``, eplb's ``write_loads``) and ``.npy`` files hold their
bytes in the file, so a long trace there still loads.
"""

from __future__ import annotations

import io
import math
import tokenize
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from eplb.formats._expand import MAX_INFLATION, MAX_UNPACKED_VALUES, inflates_too_far
from eplb.formats.errors import FormatError

_MAX_HEADER = 1 << 16


def _header(
    handle: IO[bytes], path: Path, name: str, size: int, compressed_size: int | None = None
) -> tuple[tuple[int, ...], np.dtype]:
    """Read one array header from ``handle`` (``size`` bytes in all, inflated from
    ``compressed_size`` bytes when the member is compressed) and check it."""
    fmt = np.lib.format
    try:
        # the header's length is checked before its bytes are read: NumPy reads as many as
        # it declares, and one of 4 GiB in a 70-byte file asked for a 4 GiB buffer first
        # (a MemoryError under a memory limit; attacker pass)
        magic = handle.read(fmt.MAGIC_LEN)
        if magic[6:7] not in (b"\x01", b"\x02", b"\x03"):  # (before its length is read)
            raise FormatError(path, f"{name}: not a .npy array header NumPy writes (format "
                                    f"version {magic[6:8].hex() or 'missing'}; 1 to 3 are)")
        width = 2 if magic[6:7] == b"\x01" else 4
        declared = handle.read(width)
        length = int.from_bytes(declared, "little")
        if length > _MAX_HEADER:
            raise FormatError(path, f"{name}: the .npy header declares {length:,} bytes of "
                                    f"header, more than {_MAX_HEADER:,}: not an array eplb "
                                    "reads")
        bounded = io.BytesIO(magic + declared + handle.read(length))
        version = fmt.read_magic(bounded)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _fortran, dtype = reader(bounded, max_header_size=_MAX_HEADER)
    except FormatError:
        raise
    # NumPy tokenizes and literal-evaluates the header text: an unclosed bracket escaped as
    # tokenize.TokenError and a long '1+1+...' chain as a RecursionError (attacker pass)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, tokenize.TokenError,
            RecursionError) as exc:
        raise FormatError(path, f"{name}: not a valid .npy array header: {exc}") from None
    # sizes NumPy can hold: a bool dimension (True) or one past int64 beside a zero one
    # (no bytes to check) escaped as a TypeError or OverflowError (attacker pass)
    if any(isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < 1 << 62
           for d in shape) or math.prod(d for d in shape if d) >= 1 << 62:
        raise FormatError(path, f"{name}: the .npy header declares shape {shape!r}: not the "
                                "shape of an array (dimensions are integers below 2**62)")
    if dtype.hasobject:
        raise FormatError(
            path,
            f"{name} holds Python objects (dtype {dtype}); eplb reads numeric arrays only "
            "(loading object arrays could run code)",
        )
    values = math.prod(shape)
    claimed = values * dtype.itemsize
    # an element of a record, text or raw-bytes dtype may be any size (one of |V1073741824
    # is a gigabyte, deflated to a megabyte): such members, which hold no loads, count
    # their bytes; a number is at most 16 of them
    numbers = values if dtype.kind in "biufc" else claimed
    if (compressed_size is not None and numbers > MAX_UNPACKED_VALUES
            and inflates_too_far(claimed, compressed_size)):
        raise FormatError(
            path,
            f"{name} is compressed and declares shape {tuple(shape)} of {dtype} "
            f"({f'{values:,} numbers, ' if numbers == values else ''}{claimed:,} bytes "
            f"from {compressed_size:,}): beyond "
            f"{MAX_UNPACKED_VALUES:,} numbers eplb inflates a compressed member at most "
            f"{MAX_INFLATION} times (a crafted one inflates a thousandfold); save it "
            "uncompressed (numpy.savez, eplb's write_loads) or as .npy",
        )
    available = size - handle.tell()
    if claimed > available:
        raise FormatError(
            path,
            f"{name}: the header claims shape {tuple(shape)} of {dtype} ({claimed:,} bytes) but "
            f"only {available:,} bytes follow; the file is truncated or corrupt",
        )
    return tuple(shape), dtype


def load_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array, its header checked first (see the module docstring)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        _header(handle, path, "the array", size)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FormatError(path, f"not a readable .npy file: {exc}") from None


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{array name: (shape, dtype)}`` of an ``.npz`` archive, every header checked."""
    return {name: (shape, dtype) for name, (shape, dtype, _) in _npz_members(path).items()}


def _npz_members(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype, int | None]]:
    """``{array name: (shape, dtype, compressed bytes or None if stored)}``, every header
    checked."""
    out: dict[str, tuple[tuple[int, ...], np.dtype, int | None]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with archive.open(info) as member:
                    packed = (None if info.compress_type == zipfile.ZIP_STORED
                              else info.compress_size)
                    out[name] = (*_header(member, path, repr(name), info.file_size, packed),
                                 packed)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise FormatError(path, f"not a readable .npz archive: {exc}") from None
    return out


def _refuse_inflating_too_far(path: Path, members: list[tuple[tuple[int, ...], np.dtype,
                                                             int | None]]) -> None:
    """The compressed ``members`` to be read, bounded in all as one member is (a dozen
    each just under the bound inflated 3.4 GB from 3 MB; attacker pass). Members not read
    do not count."""
    packed = [(math.prod(shape), math.prod(shape) * dtype.itemsize, size)
              for shape, dtype, size in members if size is not None]
    numbers = sum(n for n, _, _ in packed)
    claimed = sum(b for _, b, _ in packed)
    compressed = sum(size for _, _, size in packed)
    if numbers > MAX_UNPACKED_VALUES and inflates_too_far(claimed, compressed):
        raise FormatError(
            path,
            f"the compressed members to read declare {numbers:,} numbers in all ({claimed:,} "
            f"bytes from {compressed:,}): beyond {MAX_UNPACKED_VALUES:,} numbers eplb "
            f"inflates compressed members at most {MAX_INFLATION} times in all (a crafted "
            "archive inflates a thousandfold); save it uncompressed (numpy.savez, eplb's "
            "write_loads)")


def load_npz(path: Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` archive by name (all, or ``names``), headers checked first."""
    members = _npz_members(path)
    wanted = list(members) if names is None else names
    _refuse_inflating_too_far(path, [members[k] for k in wanted if k in members])
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in wanted}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise FormatError(path, f"not a readable .npz archive: {exc}") from None
