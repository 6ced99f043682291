"""Recognise a load file by its content (magic bytes, keys), not only by its extension.

Two levels: :func:`sniff_container` names the container (zip/npz, torch pickle, npy,
safetensors, JSON text, CSV text, YAML text, folder); :func:`detect_format` names the
load format inside it, one of :data:`FORMATS`.
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from os import PathLike
from pathlib import Path

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
_TRTLLM_KEY = re.compile(r"^\d+_\d+$")


def sniff_container(path: str | PathLike[str]) -> str:
    """The container kind of ``path``: ``"dir"``, ``"npz"``, ``"pt-zip"``, ``"pt-pickle"``,
    ``"npy"``, ``"safetensors"``, ``"json"``, ``"csv"``, ``"yaml"`` or ``"unknown"``."""
    path = Path(path)
    if path.is_dir():
        return "dir"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any(n.endswith("data.pkl") for n in names):
            return "pt-zip"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "unknown"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head[:1] == b"\x80":  # pickle protocol marker: torch's legacy (non-zip) format
        return "pt-pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len < (100 << 20):
            return "safetensors"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] in (b"{", b"["):
        return "json"
    if not text:
        return "unknown"
    try:
        sample = text.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    first = sample.splitlines()[0] if sample.splitlines() else ""
    if re.match(r"^[\w\s.\-+,\"']*,[\w\s.\-+,\"']*$", first) and "," in first:
        return "csv"
    if re.match(r"^\s*(#.*|[\w\-]+\s*:.*)$", first):
        return "yaml"
    if re.match(r"^[\d.eE+\-\s]+$", first):
        return "csv"  # a single column of numbers
    return "unknown"


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
        if list(path.glob("expert_distribution_recorder_*.pt")):
            return "sglang-per-pass"
        raise FormatError(
            path,
            "expected a TensorRT-LLM statistics folder (meta_info.json + rank*.safetensors) or "
            "a folder of SGLang expert_distribution_recorder_*.pt dumps; found neither",
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
        import numpy as np

        with np.load(path) as archive:
            topk = [k for k in archive.files if TOPK_KEY_PATTERN.search(k)]
            if topk and all(archive[k].dtype.kind in "iu" for k in topk):
                return "topk"
        return "npz"
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
        raise FormatError(
            path,
            "this looks like YAML (a TensorRT-LLM placement?); load statistics are expected "
            "as .pt, .npy, .npz, .safetensors, .json, .csv or a TensorRT-LLM statistics folder. "
            "Use eplb.formats.read_placement for placements",
        )
    raise FormatError(
        path,
        "unrecognised content: expected load statistics (SGLang .pt/.json dump, TensorRT-LLM "
        "statistics folder, vLLM load_history JSON, top-k routing trace, or a plain "
        "[L, E] / [T, L, E] tensor in .pt/.npy/.npz/.safetensors/.json/.csv)",
    )


def _placement_error(path: Path) -> FormatError:
    return FormatError(
        path,
        "holds a placement ('physical_to_logical_map'), not load statistics; use "
        "eplb.formats.read_placement",
    )


def _safetensors_keys(path: Path) -> list[str]:
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(path, f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError(path, "safetensors header is not a JSON object")
    return [k for k in header if k != "__metadata__"]


def _load_pt(path: Path) -> object:
    import pickle

    import torch

    try:
        with warnings.catch_warnings():  # torch warns about the protocol of garbage files
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FormatError(
            path,
            "torch.load(weights_only=True) refused it (it holds objects other than tensors, "
            f"numbers, strings, lists and dicts): {str(exc).splitlines()[0]}",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise FormatError(path, f"not a readable torch file: {str(exc).splitlines()[0]}") from None


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
