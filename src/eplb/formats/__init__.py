"""Every engine's load statistics in, every engine's placement format out.

- :func:`read_loads` reads SGLang, TensorRT-LLM, vLLM-history, top-k routing traces and
  plain tensors into a :class:`LoadTrace` (``counts [T, L, E]`` float64 + layer ids).
- :func:`write_placement` writes eplb's JSON/.pt, SGLang's ``--init-expert-location``
  JSON and TensorRT-LLM's load-balancer YAML (the format the name implies, :func:`emit_for`,
  unless ``emit=`` names one); :func:`read_placement` reads all four.
- :func:`write_loads` saves a :class:`LoadTrace` (pt/npz keep layer ids; ADRS JSON, SGLang).
- Problems with a file raise :class:`FormatError` (a ``ValueError``) naming the file.
"""

from eplb.core.trace import LoadTrace
from eplb.formats.detect import FORMATS, detect_format
from eplb.formats.errors import FormatError
from eplb.formats.placement_writer import (
    EMITS,
    check_emit_fits_name,
    emit_for,
    write_placement,
)
from eplb.formats.placements import read_placement, read_placement_meta
from eplb.formats.readers import read_loads, read_routing, read_routing_steps
from eplb.formats.trace_writer import TRACE_EMITS, write_loads

__all__ = [
    "EMITS",
    "FORMATS",
    "TRACE_EMITS",
    "FormatError",
    "LoadTrace",
    "check_emit_fits_name",
    "detect_format",
    "emit_for",
    "read_loads",
    "read_placement",
    "read_placement_meta",
    "read_routing",
    "read_routing_steps",
    "write_loads",
    "write_placement",
]
