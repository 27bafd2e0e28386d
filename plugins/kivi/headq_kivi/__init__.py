"""KIVI (Liu et al., 2024, arXiv 2402.02750): asymmetric 2/4-bit KV quantization.

Keys per channel (groups of ``group`` consecutive tokens share a scale and minimum), values per
token (groups of ``group`` consecutive channels); key codes packed along tokens into bytes with the
channels adjacent, value codes along channels into int32 words; scales and minima in float16.
Effective bits per quantized element: ``bits + 32 / group``.
"""

from __future__ import annotations

import attrs
import torch

from headq_core import KeyQuantizer, MethodConfig, ValuePolicy, hookimpl
from headq_core.layouts import AffineBlock
from headq_core.registry import Registry
from headq_kernels import SUPPORTED_BITS, bytes_along_tokens, codes_per_word, quantize_affine


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


@attrs.frozen
class KiviConfig(MethodConfig):
    bits: int = attrs.field(
        default=2, validator=attrs.validators.in_(SUPPORTED_BITS), metadata={"help": "bits per code"}
    )
    group: int = attrs.field(
        default=32, validator=_positive, metadata={"help": "elements sharing one scale and minimum"}
    )

    def __attrs_post_init__(self) -> None:
        if self.group % codes_per_word(self.bits):
            raise ValueError(
                f"group={self.group} does not fill whole 32-bit words at {self.bits} bits; "
                f"use a multiple of {codes_per_word(self.bits)}"
            )

    def bits_per_element(self) -> dict[str, float]:
        return {"payload": float(self.bits), "scales": 32.0 / self.group}


class KiviKeys(KeyQuantizer):
    """Per-channel keys: codes (b, h, tokens*bits/8, d) uint8, scale/zero (b, h, d, tokens/group)."""

    name = "kivi"
    config_class = KiviConfig
    summary = "int codes per channel in groups of G tokens, fp16 scale and minimum per group"
    config: KiviConfig

    @property
    def block_tokens(self) -> int:
        return self.config.group

    def encode(self, keys: torch.Tensor, layer_idx: int) -> AffineBlock:
        codes, scale, zero = quantize_affine(keys.transpose(-1, -2), self.config.bits, self.config.group)
        return AffineBlock(
            tokens=keys.shape[-2],
            codes=bytes_along_tokens(codes),
            scale=scale,
            zero=zero,
            bits=self.config.bits,
            group=self.config.group,
            axis="tokens",
        )

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        return self.config.bits_per_element()


class KiviValues(ValuePolicy):
    """Per-token values: codes (b, h, tokens, d*bits/32), scale/zero (b, h, tokens, d/group)."""

    name = "kivi"
    config_class = KiviConfig
    summary = "int codes per token in groups of G channels, fp16 scale and minimum per group"
    config: KiviConfig

    def encode(
        self, values: torch.Tensor, layer_idx: int, sq_attention: torch.Tensor | None = None
    ) -> AffineBlock:
        group = min(self.config.group, values.shape[-1])
        codes, scale, zero = quantize_affine(values, self.config.bits, group)
        return AffineBlock(
            tokens=values.shape[-2],
            codes=codes,
            scale=scale,
            zero=zero,
            bits=self.config.bits,
            group=group,
            axis="channels",
        )

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        group = min(self.config.group, head_dim)
        return {"payload": float(self.config.bits), "scales": 32.0 / group}


@hookimpl
def register_key_quantizers(registry: Registry) -> None:
    registry.add_key_quantizer(KiviKeys)


@hookimpl
def register_value_policies(registry: Registry) -> None:
    registry.add_value_policy(KiviValues)
