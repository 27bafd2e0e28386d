"""Per-token-head integer keys and values: vLLM's int4 and int8 KV formats.

Each token of each KV head is one group of ``head_dim`` channels with one float16 scale:

- ``mode=sym`` (the default): codes ``round(x / s)`` in ``[-L, L]``, ``L = 2^(bits-1) - 1``,
  ``s = max |x| / L``; zero is a level. Stored as ``code + L`` packed into int32 words.
- ``mode=affine``: min-max codes in ``[0, 2^bits - 1]`` with a float16 minimum as well: KIVI's
  value layout with one group per token (``kivi:group=head_dim``), for keys too.

Bits per element: ``bits + 16 / head_dim`` (sym) or ``bits + 32 / head_dim`` (affine).
"""

from __future__ import annotations

from typing import Literal

import attrs
import torch

from headq_baselines.pair import key_and_value
from headq_core import MethodConfig
from headq_core.layouts import AffineBlock, EncodedBlock, NoKernelLayout, stored
from headq_kernels import decode_plan, pack_codes, quantize_affine, unpack_codes


@attrs.frozen
class IntConfig(MethodConfig):
    bits: int = attrs.field(
        default=8, validator=attrs.validators.in_((4, 8)), metadata={"help": "bits per code"}
    )
    mode: Literal["sym", "affine"] = attrs.field(
        default="sym",
        validator=attrs.validators.in_(("sym", "affine")),
        metadata={"help": "sym: a scale per token and KV head; affine: a scale and a minimum"},
    )

    def bits_per_element(self, head_dim: int) -> dict[str, float]:
        return {"payload": float(self.bits), "scales": (16.0 if self.mode == "sym" else 32.0) / head_dim}


@attrs.define(kw_only=True)
class SymmetricBlock(EncodedBlock):
    """codes (b, h, tokens, d * bits / 32) int32, ``code + L`` packed along channels;
    scale (b, h, tokens, 1) float16."""

    codes: torch.Tensor = stored("payload")
    scale: torch.Tensor = stored("scales")
    bits: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        top = (1 << (self.bits - 1)) - 1
        d = self.codes.shape[-1] * 32 // self.bits
        return ((unpack_codes(self.codes, self.bits, d).float() - top) * self.scale.float()).to(dtype)

    def kernel_segment(self, covered: int) -> decode_plan.Segment:
        d = self.codes.shape[-1] * 32 // self.bits
        if self.bits == 4 and d < 32:
            raise NoKernelLayout(
                f"4-bit tokens of head_dim {d}: the kernel reads halves of 16 channels or more"
            )
        return decode_plan.Scaled(
            self.codes, self.scale, self.tokens, decode_plan.INT, self.bits, self.dequantize, covered=covered
        )


def encode(x: torch.Tensor, config: IntConfig) -> EncodedBlock:
    """(b, h, tokens, d) -> its block: one group of ``d`` channels per token and head."""
    if config.mode == "affine":
        codes, scale, zero = quantize_affine(x, config.bits, x.shape[-1])
        return AffineBlock(
            tokens=x.shape[-2], codes=codes, scale=scale, zero=zero, bits=config.bits, group=x.shape[-1],
            axis="channels",
        )  # fmt: skip
    top = (1 << (config.bits - 1)) - 1
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / top).to(torch.float16)
    # codes against the stored float16 scale, so that decoding reproduces the encoder's numbers
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.round(x / safe).clamp_(-top, top) + top
    return SymmetricBlock(
        tokens=x.shape[-2], codes=pack_codes(codes, config.bits), scale=scale, bits=config.bits
    )


SUITE_ROWS = (("int", "int"), ("int:bits=4", "int:bits=4"))  # keys and values, as engines store them


IntKeys, IntValues = key_and_value(
    "Int",
    "int",
    IntConfig,
    encode,
    "int codes per token and KV head, a float16 scale (and minimum, affine) per token and head",
    SUITE_ROWS,
)
