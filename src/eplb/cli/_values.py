"""Option values of the ``eplb`` commands: the argparse types (ASCII-digit integers and
numbers, counts, prices, file names), and the lists read once the GPU count is known
(``--dead-gpus``, ``--gpu-speed``, and the speeds ``eval`` scores with)."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from eplb.cli._common import CliError
from eplb.formats._files import require_regular_file
from eplb.formats.errors import shown


def integer(text: str) -> int:
    """``int(text)`` of ASCII digits only: ``int`` also reads other scripts' digits ('３２',
    Arabic-Indic '١'), which eplb's own files refuse (attacker pass: ``-g ８`` planned).
    The CLI's argparse type for integers too (argparse then says "invalid integer
    value")."""
    if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):  # (int() takes '2_88' and '٣' too)
        raise ValueError(f"{text!r} is not an integer in ASCII digits")
    return int(text)


_REAL = re.compile(  # ASCII only: Python's \d matches every script's digits
    r"\s*[+-]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?|inf(inity)?|nan)\s*", re.I)


def real(text: str) -> float:
    """``float(text)`` of ASCII digits only (``float`` also reads '０.５' and '1_0'), as
    :func:`integer` is for integers; the CLI's argparse type for decimal numbers too."""
    if not _REAL.fullmatch(text):
        raise ValueError(f"{text!r} is not a number in ASCII digits")
    return float(text)


def count_type(unit: str, least: int = 0, most: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``least`` (and <= ``most``) of ``unit``
    (``--max-moves``' slots, ``simulate --expert-bytes``), refused by flag, not by the
    API's keyword."""

    def parse(text: str) -> int:
        try:
            value = integer(text)
        except ValueError:
            value = least - 1
        if value < least or (most is not None and value > most):
            within = f">= {least}" if most is None else f"in {least}..{most}"
            raise argparse.ArgumentTypeError(
                f"must be an integer {within} ({unit}), got {text!r}")
        return value

    return parse


def real_type(accepts: Callable[[float], bool], within: str) -> Callable[[str], float]:
    """An argparse type: a number (:func:`real`) that ``accepts`` takes, ``within`` saying
    which in the message, refused by flag, not by the API's keyword (as :func:`count_type`
    is for integers)."""

    def parse(text: str) -> float:
        try:
            value = real(text)
        except ValueError:
            value = float("nan")  # accepted by none of the ranges below
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {within}, got {text!r}")
        return value

    return parse


#: ``--move-price``: the balancedness a whole layer's move must buy, as the API takes it
price_type = real_type(lambda value: 0 <= value < 1, "a number in [0, 1)")
#: ``--drift``: the log-std of one expert's load change between rebalances that
#: incremental planning values moves by, as the API's ``drift`` takes it
drift_type = real_type(lambda value: 0 <= value <= 2, "a number in [0, 2]")
#: ``--slack``: the locality policy's node load allowed above the mean, as the API's
#: ``slack`` takes it (the API's refusal named its keyword: attacker pass)
slack_type = real_type(lambda value: 0 <= value < float("inf"), "a finite number >= 0")


def named_file(text: str) -> str:
    """An argparse type for an option that names a file (``--previous``, ``--placement``,
    ``--routing``): an empty or blank value is refused by flag. ``--previous ""`` (an unset
    shell variable) planned fresh without a word, moving nearly every slot, and the others
    read the current folder (attacker pass)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"needs a file name, got {text!r}")
    return text


def speed_spec(text: str) -> str:
    """An argparse type for ``--gpu-speed``: an empty value is refused by flag (it planned
    for equal GPUs without a word; attacker pass). The list or file is read later, where
    the GPU count is known (:func:`gpu_speed_from`)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"needs one number per GPU (comma-separated) or a file of them, got {text!r}")
    return text


_ID_RANGE = re.compile(r"([0-9]+)-([0-9]+)")  # ASCII digits, as integer() takes them


def _gpu_ids(text: str, num_gpus: int) -> list[int]:
    """``"3,8-15"`` -> ``[3, 8, 9, ..., 15]``: ids and inclusive ranges (a whole node lost
    is a range of GPUs), each within ``0..num_gpus-1``. ``-3`` is a negative id, not a
    range (a range has digits on both sides); a range running down (``15-8``) is refused,
    not reversed."""
    ids: list[int] = []
    for item in text.replace(" ", "").split(","):
        if not item:  # a number left out by a slip, most likely: not for eplb to guess
            raise CliError(f"--dead-gpus {text!r} has an empty item: give comma-separated "
                           "ids or ranges like 3,8-15")
        match = _ID_RANGE.fullmatch(item)
        try:
            first, last = (int(match[1]), int(match[2])) if match else (integer(item),) * 2
        except ValueError:  # ('8–15' with an en dash was told "a list of integers")
            raise CliError(f"--dead-gpus: {item!r} is neither a GPU id nor a range like "
                           "8-15 (integers in ASCII digits, joined by '-')") from None
        if first > last:
            raise CliError(f"--dead-gpus: range {item} runs down; write {last}-{first}")
        outside = first if not 0 <= first < num_gpus else last if last >= num_gpus else None
        if outside is not None:  # before the range is listed: 0-10**12 would fill memory
            raise CliError(f"--dead-gpus: GPU {outside} is outside 0..{num_gpus - 1}")
        ids.extend(range(first, last + 1))
    return ids


def active_gpus_from(dead: str | None, num_gpus: int) -> torch.Tensor | None:
    """``--dead-gpus 3,17`` or ``8-15`` -> ``[P]`` bool mask with those GPUs False
    (``None`` if not given)."""
    if dead is None:
        return None
    if not dead.strip(" ,"):
        raise CliError("--dead-gpus names no GPU (give ids like 3,17, or leave it out)")
    ids = _gpu_ids(dead, num_gpus)
    twice = torch.nonzero(torch.bincount(torch.tensor(ids), minlength=num_gpus) > 1)
    if len(twice):  # a typo for another GPU, most likely: do not guess which
        raise CliError(f"--dead-gpus names GPU {int(twice[0])} twice")
    mask = torch.ones(num_gpus, dtype=torch.bool)
    mask[ids] = False
    if not bool(mask.any()):
        raise CliError("--dead-gpus marks every GPU dead")
    return mask


#: the largest ``--gpu-speed`` file read: room for a long number (a float64's 24 digits,
#: blanks, a comma) per GPU and a few lines of JSON or notes around them
_SPEED_FILE_BYTES_PER_GPU = 64
_SPEED_FILE_SLACK_BYTES = 1 << 16


def gpu_speed_from(spec: str | None, num_gpus: int) -> torch.Tensor | None:
    """``--gpu-speed``: a comma list (``1,1,0.5,...``) or a file (JSON list or plain numbers)."""
    if not spec:
        return None
    path = Path(spec)
    if path.exists():
        require_regular_file(path, "--gpu-speed file")  # a FIFO would block forever
        if path.is_dir():  # (folders pass that check: load statistics may be one)
            raise CliError(f"--gpu-speed {spec}: a folder; expected {num_gpus} comma-separated "
                           "numbers or a file of them")
        # a list of P numbers is small: a huge (e.g. sparse) file was read whole and ended
        # in "MemoryError: unknown error", or an out-of-memory kill (attacker pass)
        most = _SPEED_FILE_BYTES_PER_GPU * num_gpus + _SPEED_FILE_SLACK_BYTES
        if path.stat().st_size > most:
            raise CliError(f"--gpu-speed file {path} holds {path.stat().st_size} bytes, more "
                           f"than a list of {num_gpus} numbers needs (at most {most}); give "
                           "a text file of one number per GPU")
        try:
            text = path.read_text(encoding="utf-8-sig")  # (a Windows editor's BOM)
        except UnicodeDecodeError:
            raise CliError(f"--gpu-speed file {path} is not UTF-8 text: give a text file of "
                           f"{num_gpus} numbers (a JSON list, or separated by commas or "
                           "blanks) or the comma list itself") from None
        try:
            values = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError, deep nesting, huge ints
            values = text.replace(",", " ").split()
    else:
        values = spec.split(",")
    if path.exists() and not isinstance(values, list):
        raise CliError(f"--gpu-speed file {path} holds {shown(values)}; expected {num_gpus} "
                       "numbers (a JSON list, or separated by commas or blanks)")
    for value in values:  # a JSON true is no speed, though float() reads it as 1
        if isinstance(value, bool) or not isinstance(value, int | float | str) or (
                isinstance(value, str) and not _REAL.fullmatch(value)):
            if path.exists():
                said = json.dumps(value) if isinstance(value, bool) or value is None else shown(
                    value)  # (in the JSON's words: true, null)
                raise CliError(f"--gpu-speed file {path}: {said} is not a number; "
                               f"expected {num_gpus} numbers (a JSON list, or separated by "
                               "commas or blanks)")
            raise CliError(f"--gpu-speed: expected {num_gpus} comma-separated numbers or a "
                           f"file of them, got {spec!r} (and no file of that name exists)")
    try:
        speed = torch.tensor([real(v) if isinstance(v, str) else float(v) for v in values],
                             dtype=torch.float64)
    except OverflowError:  # a JSON integer beyond float64
        raise CliError("--gpu-speed values must be finite and > 0") from None
    if speed.numel() != num_gpus:
        count = speed.numel()
        raise CliError(f"--gpu-speed has {count} value{'' if count == 1 else 's'}, expected one "
                       f"per GPU ({num_gpus})")
    if bool((speed <= 0).any()) or not bool(torch.isfinite(speed).all()):
        raise CliError("--gpu-speed values must be finite and > 0")
    return speed


def _runs(speeds: torch.Tensor) -> str:
    """GPU speeds as runs, e.g. ``16×1, 16×2``: a list of 32 values cut after its first
    few would hide where two lists differ."""
    runs: list[list] = []
    for x in speeds.tolist():
        if runs and runs[-1][1] == x:
            runs[-1][0] += 1
        else:
            runs.append([1, x])
    return ", ".join(f"{n}×{x:g}" if n > 1 else f"{x:g}" for n, x in runs)


def eval_gpu_speed(spec: str | None, meta: dict, num_gpus: int, placement: object
                   ) -> torch.Tensor | None:
    """The GPU speeds ``eval`` scores with: ``--gpu-speed``, else those the placement file
    records (eplb's files planned with ``--gpu-speed``). A flag that contradicts recorded
    speeds is refused; one given for a file planned for equal GPUs asks how that plan
    fares on them."""
    given = gpu_speed_from(spec, num_gpus)
    recorded = meta.get("gpu_speed")
    if recorded is None:
        return given
    recorded = torch.tensor(recorded, dtype=torch.float64)
    if given is not None and not torch.equal(given, recorded):
        gpu = int((given != recorded).nonzero()[0, 0])
        raise CliError(f"{placement} records the GPU speeds it was planned for "
                       f"({_runs(recorded)}); --gpu-speed gives {_runs(given)}, which differs "
                       f"first at GPU {gpu} ({given[gpu].item():g} against "
                       f"{recorded[gpu].item():g}): leave --gpu-speed out")
    return recorded
