"""GSRQ for headq: gain-shape residual vector quantization of keys and values (arXiv 2607.01065).

Spec examples: ``gsrq`` (1 bit per element: sub-vectors of 8 channels, one stage of 256
codewords), ``gsrq:bits=2,dim=8`` (two stages of 256), ``gsrq:dim=8,stages=256x16``, the learner
control ``gsrq:learner=kmeans`` (plain Euclidean k-means) and the weighting control
``gsrq:weighted=false``; ``gsrq:bits=1,scale=fisher,rope=pre`` codes keys rotated back to before the
rotary embedding. Codebooks come from ``headq calibrate --keys gsrq ... --values gsrq ...``.
"""

from __future__ import annotations

from headq_core import hookimpl
from headq_core.registry import Registry
from headq_gsrq.block import CodebookBlock, LayerCodebooks
from headq_gsrq.config import GsrqConfig
from headq_gsrq.learners import Fitted, gskm, kmeans
from headq_gsrq.methods import GsrqKeys, GsrqValues

__all__ = [
    "CodebookBlock",
    "Fitted",
    "GsrqConfig",
    "GsrqKeys",
    "GsrqValues",
    "LayerCodebooks",
    "gskm",
    "kmeans",
]


@hookimpl
def register_key_quantizers(registry: Registry) -> None:
    registry.add_key_quantizer(GsrqKeys)


@hookimpl
def register_value_policies(registry: Registry) -> None:
    registry.add_value_policy(GsrqValues)
