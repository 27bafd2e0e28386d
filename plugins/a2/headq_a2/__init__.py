"""A² value policy for headq: per-token bit widths from squared attention and value range.

Spec examples: ``a2`` (2-bit values, the top 10% of each 32-token chunk by ``w * range^2`` at
4 bits), ``a2:bits=2,hi=4,frac=0.25``, ``a2:mode=greedy,avg=2.5,bits=1,hi=8``, and the controls
``a2:weight=abs`` (accumulated attention, H2O-style) and ``a2:weight=none`` (value range only).
"""

from __future__ import annotations

from headq_a2.block import MixedAffineBlock
from headq_a2.config import A2Config
from headq_a2.policy import A2Values
from headq_core import hookimpl
from headq_core.registry import Registry

__all__ = ["A2Config", "A2Values", "MixedAffineBlock"]


@hookimpl
def register_value_policies(registry: Registry) -> None:
    registry.add_value_policy(A2Values)
