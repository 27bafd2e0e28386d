"""3-bit KIVI keys (arXiv 2402.02750), the same-budget rival HeadQ must beat (arXiv 2605.03562).

HeadQ spends extra bits on a side code; the rival spends them on the base quantizer. 3-bit codes
do not fit the 1/2/4/8 word packing of ``headq_kernels``, so this method stores them as two bit
planes with that packing: the low two bits as 2-bit codes and the high bit as 1-bit codes, both
packed along tokens. Nothing is wasted: exactly 3 payload bits per element, plus ``32 / group``
for the float16 scale and minimum of each group of ``group`` tokens of a channel.
"""

from __future__ import annotations

import attrs
import torch

from headq_core import KeyQuantizer, MethodConfig
from headq_core.layouts import EncodedBlock, stored
from headq_kernels import pack_codes, unpack_codes

LEVELS = 7


def _whole_words(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0 or value % 32:
        raise ValueError(f"group must be a positive multiple of 32 (whole 1-bit words), got {value}")


@attrs.frozen
class ThreeBitConfig(MethodConfig):
    group: int = attrs.field(
        default=32, validator=_whole_words, metadata={"help": "tokens sharing one scale and minimum"}
    )


@attrs.define(kw_only=True)
class ThreeBitBlock(EncodedBlock):
    """Per-channel 3-bit keys. low: (b, h, d, t/16) int32, high: (b, h, d, t/32) int32,
    scale/zero: (b, h, d, t/group) float16; ``x_hat = (low | high << 2) * scale + zero``."""

    low: torch.Tensor = stored("payload")
    high: torch.Tensor = stored("payload")
    scale: torch.Tensor = stored("scales")
    zero: torch.Tensor = stored("scales")
    group: int

    def token_axis(self, name: str) -> int:
        return 3

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = self.tokens
        codes = unpack_codes(self.low, 2, n).float() + 4.0 * unpack_codes(self.high, 1, n).float()
        grouped = codes.reshape(*codes.shape[:-1], n // self.group, self.group)
        x = grouped * self.scale.float().unsqueeze(-1) + self.zero.float().unsqueeze(-1)
        return x.reshape(codes.shape).transpose(-1, -2).to(dtype)


class ThreeBitKeys(KeyQuantizer):
    """KIVI per-channel keys at 3 bits in two packed bit planes (``kivi3``)."""

    name = "kivi3"
    config_class = ThreeBitConfig
    summary = "KIVI per-channel keys at 3 bits (2-bit + 1-bit planes), the same-budget rival of headq"
    config: ThreeBitConfig

    @property
    def block_tokens(self) -> int:
        return self.config.group

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        return {"payload": 3.0, "scales": 32.0 / self.config.group}

    def encode(self, keys: torch.Tensor, layer_idx: int) -> ThreeBitBlock:
        """keys: (b, h, t, d), t a multiple of ``group``."""
        x = keys.float().transpose(-1, -2)  # (b, h, d, t): groups run along tokens
        g = self.config.group
        grouped = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
        zero = lo.to(torch.float16)
        scale = ((hi - lo) / LEVELS).to(torch.float16)
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(lo))
        codes = torch.round((grouped - zero.float().unsqueeze(-1)) / safe.unsqueeze(-1))
        codes = codes.clamp_(0, LEVELS).to(torch.int32).reshape(x.shape)
        return ThreeBitBlock(
            tokens=keys.shape[-2],
            low=pack_codes(codes & 3, 2),
            high=pack_codes(codes >> 2, 1),
            scale=scale,
            zero=zero,
            group=g,
        )
