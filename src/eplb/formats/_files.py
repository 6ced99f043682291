"""Small file helpers shared by the readers and writers: optional imports, progress, safe writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any


def import_safetensors_torch() -> ModuleType:
    """``safetensors.torch``, or an ``ImportError`` that says how to install it."""
    try:
        import safetensors.torch as st
    except ImportError as exc:  # optional dependency
        raise ImportError(
            "reading or writing .safetensors files needs the optional 'safetensors' package: "
            "pip install eplb[safetensors]"
        ) from exc
    return st


def check_writable(path: Path, force: bool) -> None:
    """Refuse to overwrite ``path`` unless ``force``; check its folder exists."""
    if path.exists() and not force:
        raise FileExistsError(
            f"{path} already exists; pass force=True (CLI: --force) to overwrite it"
        )
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a directory; give a file name to write the placement to"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through a temporary file in the same folder, then rename over ``path``.

    ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``. A crash half-way never leaves a
    truncated placement behind.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        kwargs = {} if "b" in mode else {"encoding": "utf-8"}
        with os.fdopen(fd, mode, **kwargs) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
