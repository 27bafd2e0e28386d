"""HeadQ (arXiv 2605.03562) for headq: a low-rank logit correction of key quantization error in a
basis learned from calibration queries (``headq``), its null-space control (``nullspace``), and
3-bit KIVI keys (``kivi3``), the same-budget rival that spends HeadQ's extra bits on the base.

Spec grammar (both forms of a nested base resolve to the same method)::

    headq:base=kivi:bits=2,rank=8,zbits=4
    headq:base=(kivi:bits=2,group=32),rank=16,zbits=2,scale=static,basis=joint
    nullspace:mode=orthogonal,mse=0.5,energy=0.999
"""

from __future__ import annotations

from headq_core import hookimpl
from headq_core.registry import Registry
from headq_scorecorr.block import LayerBasis, LowRankBlock
from headq_scorecorr.headq import HeadQConfig, HeadQKeys
from headq_scorecorr.nullspace import NullSpaceConfig, NullSpaceKeys
from headq_scorecorr.threebit import ThreeBitBlock, ThreeBitConfig, ThreeBitKeys

__all__ = [
    "HeadQConfig",
    "HeadQKeys",
    "LayerBasis",
    "LowRankBlock",
    "NullSpaceConfig",
    "NullSpaceKeys",
    "ThreeBitBlock",
    "ThreeBitConfig",
    "ThreeBitKeys",
]


@hookimpl
def register_key_quantizers(registry: Registry) -> None:
    registry.add_key_quantizer(HeadQKeys)
    registry.add_key_quantizer(NullSpaceKeys)
    registry.add_key_quantizer(ThreeBitKeys)
