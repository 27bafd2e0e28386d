"""GSRQ key quantizer and value policy (arXiv 2607.01065): gain-shape residual vector quantization.

Both split each head vector into sub-vectors of ``dim`` channels and store, per token, one index
per residual stage and sub-vector, bit-packed (:mod:`headq_gsrq.block`). Codebooks are learned
per (layer, keys or values, sub-vector position) by ``headq calibrate`` (:mod:`headq_gsrq.fitting`)
and are per-layer state, amortized over the cache. Keys read logits through per-step lookup tables,
values read out through per-codeword attention histograms (:mod:`headq_gsrq.lookup`). Sinks and
the full-precision window are the cache's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from headq_core import KeyQuantizer, ValuePolicy
from headq_core.errors import CalibrationError
from headq_gsrq.block import CodebookBlock, RotatedCodebookBlock
from headq_gsrq.codebooks import Codebooks
from headq_gsrq.config import GsrqConfig
from headq_gsrq.lookup import lut_logits, lut_readout


class _CodebookMethod:
    """What GSRQ keys and values share: codebooks of one kind, fitted, bound and counted alike."""

    kind: ClassVar[Literal["key", "value"]]
    config: GsrqConfig
    spec: Any

    def __init__(self, config: GsrqConfig | None = None) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        self.books = Codebooks(self.kind, self.config)

    @property  # the Fisher statistic only when weighted
    def calibration_needs(self) -> frozenset[str]:
        return self.books.needs

    def fit(self, stats: Any) -> dict[str, torch.Tensor]:
        return self.books.fit(stats)

    def bind(self, model_config: Any, calibration: Any = None) -> None:
        spec = str(self.spec)
        if calibration is None:
            raise CalibrationError(
                f"{spec} needs codebooks: run `headq calibrate --{self.kind}s '{spec}' --out FILE`, "
                "then pass the file (--calibration FILE, or QuantizedKVCache(calibration=...))"
            )
        self.books.bind(spec, model_config, calibration.tensors_for(self.kind, self))

    def state_nbytes(self, layer_idx: int) -> int:
        return self.books.state_nbytes(layer_idx)

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        return self.config.nominal_bits(head_dim)

    def stores(self) -> str:
        config = self.config
        sizes = "x".join(map(str, config.sizes))
        return (
            f"per token and sub-vector of {config.dim} channels, one index per stage ({sizes} codewords), "
            f"bit-packed; float16 codebooks per (layer, sub-vector position), learned by {config.learner}"
            f"{' with Fisher weights' if config.weighted else ''}, amortized over the cache"
            f"{'; keys coded before the rotary embedding, an int32 position per token' if config.rope == 'pre' else ''}"
        )


class GsrqKeys(_CodebookMethod, KeyQuantizer):  # type: ignore[misc,override]
    """Residual-VQ keys; logits through per-step lookup tables ``q . C`` and a gather-add."""

    name = "gsrq"
    suite_rows = (("gsrq:bits=1", "gsrq:bits=1"),)  # keys and values at one index bit
    kind = "key"
    config_class = GsrqConfig
    summary = "residual VQ indices per sub-vector (gain-shape k-means codebooks), LUT logits"

    def encode(self, keys: torch.Tensor, layer_idx: int) -> CodebookBlock:
        return self.books.encode(str(self.spec), keys, layer_idx)

    def encode_at(self, keys: torch.Tensor, layer_idx: int, start: int) -> CodebookBlock:
        return self.books.encode(str(self.spec), keys, layer_idx, start)

    def logits(self, query: torch.Tensor, block: Any, layer_idx: int) -> torch.Tensor:
        if not isinstance(block, CodebookBlock) or isinstance(block, RotatedCodebookBlock):
            return super().logits(query, block, layer_idx)  # a rotation per token: no shared table
        return lut_logits(query.float(), block)

    def keys_as_read(self, block: Any, dtype: torch.dtype) -> torch.Tensor | None:
        return block.dequantize(dtype)  # the LUT sums the codewords' dot products


class GsrqValues(_CodebookMethod, ValuePolicy):  # type: ignore[misc,override]
    """Residual-VQ values; readout through per-codeword attention histograms times the codebooks."""

    name = "gsrq"
    suite_rows = (("gsrq:bits=1", "gsrq:bits=1"),)  # keys and values at one index bit
    kind = "value"
    config_class = GsrqConfig
    summary = "residual VQ indices per sub-vector (gain-shape k-means codebooks), histogram readout"

    def encode(
        self, values: torch.Tensor, layer_idx: int, sq_attention: torch.Tensor | None = None
    ) -> CodebookBlock:
        return self.books.encode(str(self.spec), values, layer_idx)

    def readout(self, probs: torch.Tensor, block: Any, layer_idx: int) -> torch.Tensor:
        if not isinstance(block, CodebookBlock):
            return super().readout(probs, block, layer_idx)
        return lut_readout(probs, block)

    def values_as_read(self, block: Any, dtype: torch.dtype) -> torch.Tensor | None:
        return block.dequantize(dtype)  # the histograms weight the codewords
