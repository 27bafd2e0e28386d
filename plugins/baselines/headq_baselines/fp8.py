"""fp8 keys and values: each element cast to float8, optionally after dividing by a per-token scale.

``fp8:format=e4m3,scale=token`` (the default) is vLLM's per-token-head fp8: one float16 scale per
token and KV head, ``max |x| / fmax`` (448 for e4m3, 57344 for e5m2), so every row uses the
format's whole range. ``scale=none`` casts as it is (a unit per-tensor scale: what an engine does
when no calibrated scales were loaded), clamping to the format's range.
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from headq_baselines.pair import key_and_value
from headq_core import MethodConfig
from headq_core.layouts import EncodedBlock, stored
from headq_kernels import decode_plan

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# the smallest scale kept: an all-zero row still decodes to zeros
TINY = 2.0**-24


@attrs.frozen
class Fp8Config(MethodConfig):
    format: Literal["e4m3", "e5m2"] = attrs.field(
        default="e4m3",
        validator=attrs.validators.in_(tuple(FORMATS)),
        metadata={"help": "float8 format: e4m3 (3 mantissa bits) or e5m2 (2, wider range)"},
    )
    scale: Literal["token", "none"] = attrs.field(
        default="token",
        validator=attrs.validators.in_(("token", "none")),
        metadata={"help": "token: a float16 scale per token and KV head; none: cast as it is"},
    )

    def bits_per_element(self, head_dim: int) -> dict[str, float]:
        bits = {"payload": 8.0}
        if self.scale == "token":
            bits["scales"] = 16.0 / head_dim
        return bits


@attrs.define(kw_only=True)
class Fp8Block(EncodedBlock):
    """codes (b, h, tokens, d) float8; scale (b, h, tokens, 1) float16, or None (a unit scale)."""

    codes: torch.Tensor = stored("payload")
    scale: torch.Tensor | None = stored("scales")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = self.codes.float()
        if self.scale is not None:
            x = x * self.scale.float()
        return x.to(dtype)

    def kernel_segment(self, covered: int) -> decode_plan.Segment:
        e4m3 = self.codes.dtype == torch.float8_e4m3fn
        return decode_plan.Scaled(
            self.codes.view(torch.int32), self.scale, self.tokens, decode_plan.E4M3 if e4m3 else decode_plan.E5M2, 8,
            self.dequantize, covered=covered,
        )  # fmt: skip


def encode(x: torch.Tensor, config: Fp8Config) -> Fp8Block:
    """(b, h, tokens, d) -> its :class:`Fp8Block`."""
    dtype = FORMATS[config.format]
    top = torch.finfo(dtype).max
    x = x.float()
    scale = None
    if config.scale == "token":
        # divide by the float16 scale that is stored, so that decoding reproduces the encoder's numbers
        scale = (x.abs().amax(dim=-1, keepdim=True) / top).clamp_min(TINY).to(torch.float16)
        x = x / scale.float()
    return Fp8Block(tokens=x.shape[-2], codes=x.clamp(-top, top).to(dtype), scale=scale)


SUITE_ROWS = (("fp8", "fp8"),)  # keys and values, as engines store them


Fp8Keys, Fp8Values = key_and_value(
    "Fp8",
    "fp8",
    Fp8Config,
    encode,
    "float8 per element, a float16 scale per token and KV head (or none)",
    SUITE_ROWS,
)
