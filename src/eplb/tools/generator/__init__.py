"""Calibrated synthetic expert loads (the generator behind ``eplb generate`` and ``eplb demo``).

- :mod:`.presets`: model shapes and traffic configurations;
- :mod:`.model`: the popularity process and the two generators;
- :mod:`.stats`: skew statistics and the calibration targets from real loads.
"""

from eplb.tools.generator.model import check_trace_size, generate_loads, generate_trace
from eplb.tools.generator.presets import (
    BURSTY_CONFIG,
    DOMAIN_RANK_CORR,
    PREFILL_DECODE_RANK_CORR,
    PRESET_CONFIGS,
    PRESETS,
    ModelShape,
    WorkloadConfig,
    default_config,
    resolve_shape,
)
from eplb.tools.generator.stats import TARGETS, rank_correlation, regime_correlation, skew_stats

__all__ = [
    "BURSTY_CONFIG",
    "DOMAIN_RANK_CORR",
    "PREFILL_DECODE_RANK_CORR",
    "PRESETS",
    "PRESET_CONFIGS",
    "TARGETS",
    "ModelShape",
    "WorkloadConfig",
    "check_trace_size",
    "default_config",
    "generate_loads",
    "generate_trace",
    "rank_correlation",
    "regime_correlation",
    "resolve_shape",
    "skew_stats",
]
