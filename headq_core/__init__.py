"""headq: KV-cache quantization methods as plugins, a quantized cache for transformers models,
and a harness that compares methods head to head."""

from __future__ import annotations

from headq_core.attention import register_attention, use_headq_attention
from headq_core.cache import QuantizedKVCache
from headq_core.chunked import prefill
from headq_core.compat import cache_kwargs
from headq_core.errors import CacheStateError, CalibrationError, HeadqError, PluginError, SpecError
from headq_core.generation import greedy, static_generate
from headq_core.graphs import StaticDecode
from headq_core.hookspecs import hookimpl
from headq_core.interfaces import (
    AttentionSample,
    DistortionMetric,
    KeyQuantizer,
    MethodConfig,
    ValuePolicy,
)
from headq_core.registry import get_registry
from headq_core.spec import Spec, parse_spec

__version__ = "0.1.0"

register_attention()

__all__ = [
    "AttentionSample",
    "CacheStateError",
    "CalibrationError",
    "DistortionMetric",
    "HeadqError",
    "KeyQuantizer",
    "MethodConfig",
    "PluginError",
    "QuantizedKVCache",
    "Spec",
    "SpecError",
    "StaticDecode",
    "ValuePolicy",
    "cache_kwargs",
    "get_registry",
    "greedy",
    "hookimpl",
    "parse_spec",
    "prefill",
    "register_attention",
    "static_generate",
    "use_headq_attention",
]
