"""Baselines from inference engines, as headq methods, for head-to-head comparisons at matched bits.

- ``fp8``: keys and values cast to float8 (e4m3 or e5m2), with one float16 scale per token and
  KV head (vLLM's per-token-head fp8) or with none (a unit per-tensor scale, what an engine does
  without calibrated scales);
- ``int``: per-token-head integer codes of 4 or 8 bits (vLLM's int4/int8 KV formats): one float16
  scale per token and KV head, symmetric, or with a float16 minimum as well (affine);
- ``rotation``: the TurboQuant line: a randomized Hadamard rotation of each token, Lloyd–Max codes
  for every coordinate at 2 to 4 bits by halves, a float16 norm per token and KV head.

Both treat keys and values alike, one token and head at a time, so a batch row never depends on
another, nor on its own padding. docs/methods/baselines.md says what each stores and where the
numbers come from.
"""

from __future__ import annotations

from headq_baselines.fp8 import Fp8Keys, Fp8Values
from headq_baselines.integer import IntKeys, IntValues
from headq_baselines.rotation import RotationKeys, RotationValues
from headq_core import hookimpl
from headq_core.registry import Registry

__all__ = ["Fp8Keys", "Fp8Values", "IntKeys", "IntValues", "RotationKeys", "RotationValues"]


@hookimpl
def register_key_quantizers(registry: Registry) -> None:
    registry.add_key_quantizer(Fp8Keys)
    registry.add_key_quantizer(IntKeys)
    registry.add_key_quantizer(RotationKeys)


@hookimpl
def register_value_policies(registry: Registry) -> None:
    registry.add_value_policy(Fp8Values)
    registry.add_value_policy(IntValues)
    registry.add_value_policy(RotationValues)
