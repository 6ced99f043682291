"""Recognise a load file by its content (magic bytes, keys), not only by its extension.

Two levels: :func:`sniff_container` names the container (zip/npz, torch pickle, npy,
safetensors, JSON text, CSV text, YAML text, folder); :func:`detect_format` names the
load format inside it, one of :data:`FORMATS`.
"""

from __future__ import annotations

import json
import re
import stat
import threading
import warnings
import zipfile
from os import PathLike
from pathlib import Path

import numpy as np

from eplb.formats._expand import MAX_INFLATION, MIN_BUDGET, check_expansion, inflates_too_far
from eplb.formats._files import require_regular_file
from eplb.formats._npy import npz_headers
from eplb.formats.errors import FormatError

#: Load formats :func:`eplb.formats.read_loads` accepts as ``format=``.
FORMATS: tuple[str, ...] = (
    "sglang",  # SGLang recorder dump / --init-expert-location: {"logical_count": [T?][L][E]}
    "sglang-per-pass",  # SGLang per_pass dump: {"records", "last_physical_to_logical_map"}
    "trtllm",  # TensorRT-LLM statistics folder: meta_info.json + rank{r}.safetensors
    "vllm-history",  # ADRS: {"load_history": [{"logical_expert_load": [L][E]}, ...]}
    "topk",  # per-token routing trace: top-k expert ids [tokens, L, k]
    "npy",
    "npz",
    "pt",
    "safetensors",
    "json",
    "csv",  # plain tensors [L, E] or [T, L, E] (csv: one row per layer)
)

#: npz / .pt / safetensors keys that hold per-token top-k expert ids.
TOPK_KEY_PATTERN = re.compile(r"topk|top_k|selected_experts|expert_ids|routed_experts", re.I)

_HEAD_BYTES = 1 << 20
#: blank bytes skipped before a text file's content when sniffing its kind
_MAX_LEADING_SPACE = 1 << 20
# warnings.catch_warnings saves and restores the process-wide filter list: two threads
# loading .pt files at once restored each other's copies, and an ``ignore UserWarning``
# filter outlived both (every UserWarning of the process silenced). One load at a time
# inside the filter keeps the saves and restores nested.
_QUIET_LOAD = threading.Lock()
_TRTLLM_KEY = re.compile(r"^[0-9]+_[0-9]+$")  # ASCII digits only


#: steps of a plain counts array :func:`ids_read_as_counts` looks at (a bounded cost)
_ID_CHECK_STEPS = 64


def ids_read_as_counts(counts: np.ndarray) -> str | None:
    """Why plain counts ``[T, L, K]`` look like per-token top-k expert ids read as counts,
    or ``None``. Ids saved under a name :data:`TOPK_KEY_PATTERN` does not match (or a
    bare ``.npy``) were read as a ``K``-expert model without a word (attacker pass).

    Ids of an ``N``-expert model routing each token to ``K`` of them: ``K <= 32``; each
    (step, layer) row holds ``K`` distinct integers; they cover nearly all of ``0..N−1``
    (at least 95 %) once there are 4 draws per id; ``N`` is more than ``K`` and below
    ``64·K`` (DeepSeek-V3 32×, Kimi-K2 48×); and the layers' totals differ within a step,
    which counts of one batch do not (every token is routed in every layer). Checked on
    the first 64 steps, at least 64 rows. Counts miss small integers, or repeat within a
    row once there are many rows (review pass: random loads of 2–4 experts in the tens
    and hundreds were flagged without the cover)."""
    if counts.ndim != 3 or counts.shape[1] < 2 or not 2 <= counts.shape[2] <= 32:
        return None
    head = counts[:_ID_CHECK_STEPS]
    width = head.shape[2]
    if head.shape[0] * head.shape[1] < 64 or not (head >= 0).all() or (
            head.max() >= 64 * width) or not (head == np.floor(head)).all():
        return None
    top = int(head.max())
    held = np.unique(head)
    if top < width or head.size < 4 * (top + 1) or len(held) < 0.95 * (top + 1):
        return None
    rows = np.sort(head.reshape(-1, width), axis=1)
    if (rows[:, 1:] == rows[:, :-1]).any():
        return None
    totals = head.sum(2)  # [T, L]
    if (totals == totals[:, :1]).all():
        return None
    return (f"every row holds {width} distinct integers, together {len(held)} of 0..{top}, "
            "and the layers' totals differ within a step, as top-k expert ids do (counts of "
            "one batch have equal totals in every layer)")


def sniff_container(path: str | PathLike[str]) -> str:
    """The container kind of ``path``: ``"dir"``, ``"npz"``, ``"pt-zip"``, ``"pt-pickle"``,
    ``"npy"``, ``"safetensors"``, ``"json"``, ``"csv"``, ``"yaml"``, ``"text"`` (other
    text) or ``"unknown"``.

    A zip archive (.pt, .npz) that cannot be opened is refused (``FormatError``).
    FIFOs, sockets and devices are refused (reading one may block forever), and so is a
    file this user cannot read (``PermissionError``).
    """
    path = Path(path)
    info = require_regular_file(path)
    if stat.S_ISDIR(info.st_mode):
        return "dir"
    with open(path, "rb") as handle:
        head = handle.read(4096)
        if not head.strip() and len(head) == 4096:
            # text after more than a head of blank space (JSON or CSV may be indented or
            # padded so; attacker pass): the head is taken where the text starts, looked
            # for in at most 1 MiB
            skipped = 0
            while head and not head.strip() and skipped < _MAX_LEADING_SPACE:
                skipped += len(head)
                head = handle.read(4096)
            head = head.lstrip() + handle.read(4096)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            # .pt and .npz files are zip archives: one cut short (a copy or a save that
            # was interrupted) loses its directory, which sits at the end
            raise FormatError(path, f"is a damaged or truncated zip archive (the container "
                              f"of .pt and .npz files): {exc}") from None
        if any(n.endswith("data.pkl") for n in names):
            return "pt-zip"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "unknown"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    # safetensors before pickle: its first byte is the low byte of the header length,
    # which may well be 0x80, the pickle marker
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len < (100 << 20) and header_len + 8 <= info.st_size:
            return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pt-pickle"  # pickle protocol 2-5: torch's legacy (non-zip) format
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] in (b"{", b"["):
        return "json"
    if not text:
        return "unknown"
    try:
        sample = text.decode("utf-8")
    except UnicodeDecodeError:
        # the 4096-byte head may end inside a multi-byte character
        try:
            sample = text[:-4].decode("utf-8") if len(text) > 8 else ""
        except UnicodeDecodeError:
            return "unknown"
    lines = sample.splitlines()
    first = lines[0] if lines else ""
    # header cells may hold parentheses and slashes ("expert(0)", "tokens/s"), not the
    # colons and brackets of YAML or JSON text
    if re.match(r"^[\w\s.\-+,\"'()/]*,[\w\s.\-+,\"'()/]*$", first) and "," in first:
        return "csv"
    if first.lstrip().startswith("#") and _commented_csv(lines):
        return "csv"
    if _looks_like_yaml(lines):
        return "yaml"
    if re.match(r"^[\d.eE+\-\s]+$", first):
        return "csv"  # a single column of numbers
    return "text"


def _commented_csv(lines: list[str]) -> bool:
    """A CSV load table after ``#`` comment lines (the CSV reader skips them): its first
    other line is a row of numbers, or a row of cells over a row of numbers (so a
    Markdown title over a sentence with a comma is still no CSV)."""
    rows = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    numbers = r"^[\d.eE+\-\s,]*\d[\d.eE+\-\s,]*$"
    if rows and "," in rows[0] and re.match(numbers, rows[0]) is not None:
        # a headerless table: its first row alone says so, which matters where one row
        # is longer than the head read here (numpy's savetxt writes 6.4 kB for 256
        # experts) or the table has one layer
        return True
    return (len(rows) >= 2 and "," in rows[0]
            and re.match(r"^[\w\s.\-+,\"']*$", rows[0]) is not None
            and re.match(numbers, rows[1]) is not None)


def _looks_like_yaml(lines: list[str]) -> bool:
    """A YAML mapping: its first line that is no comment reads ``key: value``.

    A Markdown file (``# Title`` then prose) is not YAML, although YAML would read its
    title as a comment.
    """
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#") or line.strip() == "---":
            continue
        return re.match(r"^[\w\-]+\s*:(\s|$)", line) is not None
    return False


def _json_top_key(path: Path) -> str | None:
    """Which known key a JSON object file carries, judged from its first megabyte."""
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
    if re.search(rb'"format"\s*:\s*"eplb\.placement"', head):
        return "physical_to_logical_map"
    for key in ("load_history", "logical_count", "physical_to_logical_map", "records"):
        if re.search(rb'"' + key.encode() + rb'"\s*:', head):
            return key
    return None


def sglang_json_dumps(folder: Path) -> list[Path]:
    """The ``{"logical_count": ...}`` JSON files of ``folder``, by name (empty when any
    JSON file there is something else: a folder is read whole or not at all)."""
    # (a JSON placement beside them holds no loads: planned into, the folder stays
    # readable; second attacker pass)
    keys = {p: _json_top_key(p) for p in sorted(folder.glob("*.json")) if p.is_file()}
    files = [p for p, key in keys.items() if key != "physical_to_logical_map"]
    if files and all(keys[p] == "logical_count" for p in files) and not _others(folder, files):
        return files
    return []


#: a TensorRT-LLM rank file's name (ASCII digits only)
RANK_FILE = re.compile(r"^rank([0-9]+)\.safetensors$")


def folder_load_files(folder: Path) -> list[Path]:
    """The files a read of ``folder`` takes: a TensorRT-LLM folder's rank files, SGLang's
    recorder dumps, or its ``{"logical_count"}`` JSON files (empty for none of these)."""
    if (folder / "meta_info.json").is_file():
        return sorted(p for p in folder.iterdir() if RANK_FILE.match(p.name))
    return (sorted(folder.glob("expert_distribution_recorder_*.pt"))
            or sglang_json_dumps(folder))


def file_identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of the file ``path`` names (through links, symbolic or hard), or
    ``None`` where it cannot be read (a dangling link, a loop: the reader says so)."""
    try:
        info = path.stat()
    except (OSError, RuntimeError):  # (RuntimeError: a symlink loop, Python 3.11)
        return None
    return info.st_dev, info.st_ino


def refuse_same_files(folder: Path, files: list[Path]) -> None:
    """A :class:`FormatError` where two of ``folder``'s ``files`` are one file (a link such
    as ``latest.json`` beside the dumps it points to, or a hard link): read one after
    another, its loads would count twice (attacker pass: two steps summed from one dump,
    without a word). Files of equal content are distinct files."""
    seen: dict[tuple[int, int], Path] = {}
    for file in files:
        where = file_identity(file)
        if where is None:
            continue
        if where in seen:
            raise FormatError(folder, f"{seen[where].name} and {file.name} are the same file "
                                      "(a link): its loads would count twice; remove the link, "
                                      "or name the files one by one")
        seen[where] = file


# files that could hold loads; notes beside the dumps (SOURCE.md, README) do not count
_DATA_SUFFIXES = frozenset({".json", ".npy", ".npz", ".pt", ".pth", ".safetensors", ".csv",
                            ".pkl", ".pickle", ".bin", ".tsv", ".dat"})


def _others(folder: Path, files: list[Path]) -> list[Path]:
    """The files of ``folder`` beside ``files`` that could hold loads too (a placement,
    eplb's or SGLang's, cannot: ``eplb plan dumps/ -o dumps/placement.json`` leaves the
    folder readable)."""
    chosen = set(files)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in _DATA_SUFFIXES and p not in chosen
                  and not _is_placement(p))


#: the largest ``.pt`` file beside dumps that is loaded to tell a placement from loads
_PLACEMENT_PT_BYTES = 1 << 24


def _is_placement(path: Path) -> bool:
    """Whether ``path`` is a placement file, eplb's or SGLang's, JSON or torch (a ``.pt``
    up to :data:`_PLACEMENT_PT_BYTES`, loaded safely; a larger or unreadable one counts
    as loads). Second attacker pass: a ``.pt`` placement planned into a folder of dumps
    made the folder unreadable."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _json_top_key(path) == "physical_to_logical_map"
    if suffix not in (".pt", ".pth") or path.stat().st_size > _PLACEMENT_PT_BYTES:
        return False
    try:
        record = _load_pt(path)
    except (FormatError, OSError):
        return False
    return isinstance(record, dict) and (record.get("format") == "eplb.placement"
                                         or set(record) == {"physical_to_logical_map"})


def recorder_dumps(folder: Path) -> list[Path]:
    """``folder``'s SGLang ``expert_distribution_recorder_*.pt`` dumps, by name (empty for
    none), checked as a folder read whole: a sub-folder named like a dump, and data files
    beside the dumps, are a :class:`FormatError` (:func:`refuse_other_files`). Detection
    and both SGLang readers list them here, so a named format checks as detection does."""
    dumps = sorted(folder.glob("expert_distribution_recorder_*.pt"))
    inner = [p for p in dumps if p.is_dir()]
    if inner:  # (it read "found none": attacker pass)
        raise FormatError(inner[0], "is a folder; expected an SGLang "
                                    "expert_distribution_recorder_*.pt dump file")
    if dumps:
        refuse_other_files(folder, dumps, "expert_distribution_recorder_*.pt dumps")
        # dumps one level down (a folder per node) are not read: say so, not skip them
        # (second attacker pass)
        nested = sorted(p for p in folder.iterdir() if p.is_dir()
                        and next(p.glob("expert_distribution_recorder_*.pt"), None))
        if nested:
            raise FormatError(folder, f"holds SGLang dumps and a folder of more of them "
                                      f"({nested[0].name}); a folder is read without its "
                                      "sub-folders: give the folders one by one")
    return dumps


def refuse_other_files(folder: Path, dumps: list[Path], what: str) -> None:
    """A folder is read whole or not at all: a :class:`FormatError` naming the files of
    ``folder`` beside its ``dumps`` that could hold loads too (attacker pass: JSON dumps
    beside ``.pt`` ones were left out without a word, 800 of 80,800 tokens read)."""
    others = _others(folder, dumps)
    if others:
        names = ", ".join(p.name for p in others[:3]) + (", ..." if len(others) > 3 else "")
        raise FormatError(folder, f"holds SGLang {what} and other files ({names}); give one "
                                  "file, or a folder of such dumps only")


def detect_format(path: str | PathLike[str]) -> str:
    """Name the load format of ``path`` (one of :data:`FORMATS`) from its content.

    Raises :class:`FormatError` for files that are no load statistics at all (e.g. a
    placement) or whose content is not recognised.
    """
    path = Path(path)
    kind = sniff_container(path)
    if kind == "dir":
        if (path / "meta_info.json").is_file():
            return "trtllm"
        dumps = recorder_dumps(path)
        if dumps:
            # stat-mode dumps hold logical_count; per_pass / per_token dumps hold records
            first = _load_pt(dumps[0])
            return "sglang" if isinstance(first, dict) and "logical_count" in first \
                else "sglang-per-pass"
        if sglang_json_dumps(path):
            return "sglang"
        dumps = sorted(p for p in path.glob("*.json")
                       if p.is_file() and _json_top_key(p) == "logical_count")
        if dumps:
            refuse_other_files(path, dumps, '{"logical_count": ...} JSON files')
        ranks = sorted(path.glob("rank*.safetensors"))
        if ranks:  # a TensorRT-LLM statistics folder but for its meta file (new-user pass)
            raise FormatError(
                path, f"holds TensorRT-LLM statistics ({ranks[0].name}, ...) but no "
                      "meta_info.json beside them: TensorRT-LLM writes it with the rank "
                      "files (it names the layers); copy it into the folder")
        raise FormatError(
            path,
            "expected a TensorRT-LLM statistics folder (meta_info.json + rank*.safetensors), "
            "a folder of SGLang expert_distribution_recorder_*.pt dumps or of SGLang "
            '{"logical_count": ...} JSON files; found none of them',
        )
    if kind == "json":
        key = _json_top_key(path)
        if key == "load_history":
            return "vllm-history"
        if key == "logical_count":
            return "sglang"
        if key == "physical_to_logical_map":
            raise _placement_error(path)
        return "json"
    if kind in ("pt-zip", "pt-pickle"):
        return _pt_format(path, _load_pt(path))
    if kind == "npz":
        headers = npz_headers(path)
        # integer arrays named like ids (float ones beside them, e.g. a router's top-k
        # weights, are not ids; a float one alone is judged where it is read)
        topk = [k for k in headers if TOPK_KEY_PATTERN.search(k)
                and headers[k][1].kind in "iu"]
        return "topk" if topk else "npz"
    if kind == "safetensors":
        st = _safetensors_keys(path)
        if st and all(_TRTLLM_KEY.match(k) for k in st):
            return "trtllm"
        if any(TOPK_KEY_PATTERN.search(k) for k in st):
            return "topk"
        return "safetensors"
    if kind in ("npy", "csv"):
        return kind
    if kind == "yaml":
        head = path.read_bytes()[:_HEAD_BYTES]
        if re.search(rb"^\s*(initial_global_assignments|num_slots|moe_config)\s*:", head, re.M):
            raise _placement_error(path, "a TensorRT-LLM load-balancer YAML")
        # (a Markdown or text file whose first line reads "Key: value" parses as YAML too:
        # it was called YAML, new-user pass)
        what = "YAML text" if path.suffix.lower() in (".yaml", ".yml") else "text"
        raise FormatError(
            path,
            f"is {what}, not load statistics; expected .pt, .npy, .npz, .safetensors, "
            ".json, .csv or a TensorRT-LLM statistics folder",
        )
    found = ""
    if path.is_file() and path.stat().st_size == 0:
        raise FormatError(path, "is empty: expected load statistics")
    if kind == "text":
        with open(path, "rb") as handle:
            first = handle.read(200).decode("utf-8", "replace").strip().splitlines()
        found = f" (text starting {first[0][:60]!r})" if first else " (blank text)"
    csv_hint = "; if it is CSV, say so with format='csv' (CLI: --format csv)"
    raise FormatError(
        path,
        f"unrecognised content{found}: expected load statistics (SGLang .pt/.json dump, "
        "TensorRT-LLM statistics folder, vLLM load_history JSON, top-k routing trace, or a "
        "plain [L, E] / [T, L, E] tensor in .pt/.npy/.npz/.safetensors/.json/.csv)"
        + (csv_hint if kind == "text" and "," in found else
           # (new-user pass: a table of "1;2;3" rows was not told what is wrong with it)
           "; CSV cells are separated by commas"
           if kind == "text" and any(c in found for c in ";\t") else
           # a .csv name whose first line is a comment, of a block longer than the head
           # the detection reads (new-user pass: no hint was given there)
           csv_hint if kind == "text" and path.suffix.lower() == ".csv" else ""),
    )


def _placement_error(
    path: Path, what: str = "a placement (eplb's or SGLang's)"
) -> FormatError:
    return FormatError(
        path,
        f"holds {what}, not load statistics; give placements to `eplb eval --placement` or "
        "`eplb plan --previous` (Python: eplb.formats.read_placement)",
    )


def _safetensors_keys(path: Path) -> list[str]:
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(path, f"safetensors header is not valid JSON: {exc}") from None
        except RecursionError:
            raise FormatError(path, "safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise FormatError(path, "safetensors header is not a JSON object")
    return [k for k in header if k != "__metadata__"]


#: The first torch whose ``torch.load(weights_only=True)`` is a security boundary.
SAFE_TORCH_LOAD = (2, 10)


def _torch_version() -> tuple[int, int]:
    import torch

    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _load_pt(path: Path) -> object:
    import pickle

    import torch

    require_regular_file(path)
    if _torch_version() < SAFE_TORCH_LOAD:
        raise FormatError(
            path,
            f"refusing to torch.load it with torch {torch.__version__}: before torch "
            f"{'.'.join(map(str, SAFE_TORCH_LOAD))} weights_only=True does not stop a crafted "
            "file from running code (CVE-2025-32434, CVE-2026-24747); upgrade torch (eplb "
            "requires >= 2.10), or give the data as .npy/.npz/.safetensors/.json",
        )
    _refuse_inflating_entries(path)
    try:
        with _QUIET_LOAD, warnings.catch_warnings():  # torch warns about garbage files' protocol
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text advises weights_only=False, i.e. running the file's code: keep only
        # the unpickler's own reason
        text = str(exc)
        reason = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text \
            else text
        reason = " ".join(reason.split("Check the documentation")[0].split())
        raise FormatError(
            path,
            "not a readable torch file: the safe loader (torch.load with weights_only=True) "
            "refused it, as it holds something other than tensors, numbers, strings, lists "
            f"and dicts, or is damaged ({reason or 'no reason given'})",
        ) from None
    except RecursionError:
        raise FormatError(path, "not a readable torch file: nested too deeply") from None
    except PermissionError:
        raise
    except Exception as exc:  # torch.load raises many types on damaged files; all mean this
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FormatError(path, f"not a readable torch file: {first}") from None
    # pickle references and stride-0 tensors: a tiny file must not expand to gigabytes
    check_expansion(obj, path)
    return obj


def _refuse_inflating_entries(path: Path) -> None:
    """A torch zip file whose entries inflate far beyond their bytes (a zip bomb): refused
    before ``torch.load`` inflates them. ``torch.save`` stores entries uncompressed, but
    ``torch.load`` inflates compressed ones too (a re-zipped 4 MB file of 4.8 KB loaded)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError):
        return  # torch.load names the damage
    for entry in entries:
        if (entry.compress_type != zipfile.ZIP_STORED and entry.file_size > MIN_BUDGET
                and inflates_too_far(entry.file_size, entry.compress_size)):
            raise FormatError(path, f"entry {entry.filename!r} inflates from "
                                    f"{entry.compress_size:,} to {entry.file_size:,} bytes; eplb "
                                    f"inflates at most {MAX_INFLATION} times (torch.save "
                                    "writes no compressed entries)")


def _pt_format(path: Path, obj: object) -> str:
    if isinstance(obj, dict):
        if "logical_count" in obj:
            return "sglang"
        if "records" in obj and "last_physical_to_logical_map" in obj:
            return "sglang-per-pass"
        if "physical_to_logical_map" in obj or obj.get("format") == "eplb.placement":
            raise _placement_error(path)
        if any(isinstance(k, str) and TOPK_KEY_PATTERN.search(k) for k in obj):
            return "topk"
    return "pt"
