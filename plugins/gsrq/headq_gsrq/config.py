"""Parameters of GSRQ and the stage plan they imply.

A spec gives the rate either as ``bits`` (index bits per element) or as explicit ``stages``
(codewords per residual stage, ``256x16``); with neither it is 1 bit. ``bits`` resolves to
``bits * dim`` index bits per sub-vector, spent on as many 256-codeword (8-bit) stages as fit and
one smaller stage for the rest: ``gsrq:bits=1,dim=8`` is one stage of 256, ``bits=2`` is
``256x256``, ``bits=0.75`` is one stage of 64, ``bits=0.5,dim=16`` is one stage of 256.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs

from headq_core import MethodConfig

Learner = Literal["gskm", "kmeans"]
Scale = Literal["fisher", "none"]
Rope = Literal["post", "pre"]
MAX_STAGE_BITS = 8  # codewords per stage up to 256: indices fit a byte
AUTO = "auto"


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def parse_stages(text: str) -> tuple[int, ...]:
    """``"256x16"`` -> (256, 16): codewords per residual stage, each a power of two in [2, 65536]."""
    try:
        sizes = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"stages must look like 256 or 256x16, got {text!r}") from None
    for size in sizes:
        if size < 2 or size > 1 << 16 or size & (size - 1):
            raise ValueError(f"stage sizes must be powers of two from 2 to 65536, got {size} in {text!r}")
    return sizes


def plan_for_bits(bits: float, dim: int) -> tuple[int, ...]:
    """Stage sizes spending ``bits * dim`` index bits per sub-vector: 8-bit stages, then the rest."""
    total = bits * dim
    whole = round(total)
    if abs(total - whole) > 1e-9 or whole < 1:
        raise ValueError(
            f"bits={bits} x dim={dim} = {total:g} index bits per sub-vector; it must be a whole number >= 1"
        )
    full, rest = divmod(whole, MAX_STAGE_BITS)
    return (1 << MAX_STAGE_BITS,) * full + ((1 << rest,) if rest else ())


@attrs.frozen
class GsrqConfig(MethodConfig):
    bits: float = attrs.field(
        default=0.0,
        converter=float,
        validator=_non_negative,
        metadata={"help": "index bits per element (0: from stages, or 1 if stages is auto too)"},
    )
    dim: int = attrs.field(default=8, validator=_positive, metadata={"help": "channels per sub-vector"})
    stages: str = attrs.field(
        default=AUTO, metadata={"help": "codewords per residual stage, e.g. 256x256 (auto: from bits)"}
    )
    learner: Learner = attrs.field(
        default="gskm",
        validator=attrs.validators.in_(("gskm", "kmeans")),
        metadata={"help": "codebook learner: gain-shape (gskm) or Euclidean (kmeans) k-means"},
    )
    weighted: bool = attrs.field(
        default=True,
        metadata={"help": "weight samples by log(1 + F / median F), F the Fisher of the sub-vector"},
    )
    scale: Scale = attrs.field(
        default="none",
        validator=attrs.validators.in_(("fisher", "none")),
        metadata={
            "help": "quantize channels scaled by the root of their mean Fisher per KV head (none: as they are)"
        },
    )
    rope: Rope = attrs.field(
        default="post",
        validator=attrs.validators.in_(("post", "pre")),
        metadata={
            "help": "keys as the cache holds them (post) or rotated back to before the rotary embedding "
            "(pre: rotated again at read, on the reference path; keys only)"
        },
    )
    iters: int = attrs.field(default=20, validator=_positive, metadata={"help": "learner passes per stage"})
    seed: int = attrs.field(default=0, metadata={"help": "seed of the learner"})

    def __attrs_post_init__(self) -> None:
        explicit = self.stages != AUTO
        sizes = parse_stages(self.stages) if explicit else plan_for_bits(self.bits or 1.0, self.dim)
        if explicit and self.bits:
            implied = sum(math.log2(s) for s in sizes) / self.dim
            if abs(implied - self.bits) > 1e-9:
                raise ValueError(
                    f"bits={self.bits} disagrees with stages={self.stages} ({implied:g} bits per element "
                    f"at dim={self.dim}); give one of them"
                )

    @property
    def sizes(self) -> tuple[int, ...]:
        """Codewords per residual stage."""
        return parse_stages(self.stages) if self.stages != AUTO else plan_for_bits(self.bits or 1.0, self.dim)

    @property
    def widths(self) -> tuple[int, ...]:
        """Index bits per stage."""
        return tuple(int(math.log2(s)) for s in self.sizes)

    def positions(self, head_dim: int) -> int:
        """Sub-vectors per head; raises ValueError when ``dim`` does not divide ``head_dim``."""
        if head_dim % self.dim:
            raise ValueError(f"gsrq dim={self.dim} does not divide head_dim={head_dim}")
        return head_dim // self.dim

    def token_bytes(self, head_dim: int) -> int:
        """Bytes one token's indices take per head: all positions and stages bit-packed."""
        return math.ceil(self.positions(head_dim) * sum(self.widths) / 8)

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        return {"payload": 8.0 * self.token_bytes(head_dim) / head_dim}
