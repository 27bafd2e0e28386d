"""Parameters of the A² value policy and the storage plan they imply for a given head shape.

Two ways to choose widths, both minimizing ``sum_j w_j range_j^2 (2^b_j - 1)^-2`` per allocation
row (``chunk`` consecutive tokens of one KV head, or of every KV head of the layer):

- ``mode=tiers``: the top ``frac`` of the row's tokens by ``w * range^2`` at ``hi`` bits, the rest
  at ``bits`` (``a2:bits=2,hi=4,frac=0.1``);
- ``mode=greedy``: greedy marginal-gain allocation over the widths of {1, 2, 4, 8} between ``bits``
  and ``hi`` at an average of ``avg`` bits per element, the width bookkeeping included
  (``a2:mode=greedy,avg=2.5,bits=1,hi=8``).
"""

from __future__ import annotations

import math
from typing import Literal

import attrs

from headq_core import MethodConfig
from headq_kernels import SUPPORTED_BITS

Mode = Literal["tiers", "greedy"]
Weight = Literal["sq", "abs", "none"]
Scope = Literal["head", "layer"]


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _fraction(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must lie in [0, 1], got {value}")


def words_per_token(head_dim: int, bits: int) -> int:
    """int32 words one token's codes take at ``bits`` (the last word zero-filled if partial)."""
    return math.ceil(head_dim * bits / 32)


def rungs(widths: tuple[int, ...]) -> tuple[int, ...]:
    """The widths above ``widths[0]`` that a code is built up through, each twice the one below.

    A token at width ``w`` stores its code's top ``widths[0]`` bits as its base and, for every rung
    ``r <= w``, the next ``r / 2`` bits: (2, 4) -> (4,); (2, 8) -> (4, 8); (1, 2, 4, 8) -> (2, 4, 8).
    """
    out: list[int] = []
    rung = 2 * widths[0]
    while rung <= widths[-1]:
        out.append(rung)
        rung *= 2
    return tuple(out)


def token_words(head_dim: int, widths: tuple[int, ...]) -> tuple[int, ...]:
    """int32 words a token takes at each of ``widths``: its base plus the rungs up to its width."""
    base = words_per_token(head_dim, widths[0])
    return tuple(
        base + sum(words_per_token(head_dim, r // 2) for r in rungs(widths) if r <= w) for w in widths
    )


@attrs.frozen
class RowPlan:
    """What one allocation row stores, for a head shape: fixed, so that blocks merge.

    widths: the widths in use, narrowest first; tokens: tokens per row (``chunk`` per head in the
    row); row_words: int32 code words per row (every token's base, the wider tokens' rungs, then
    zeros; see :mod:`headq_a2.block`);
    hi_count: tokens per row at the widest width (tiers mode); index_bits / index_words: the packed
    per-token width index, per head and chunk (0 when only one width is in use).
    """

    widths: tuple[int, ...]
    tokens: int
    row_words: int
    hi_count: int
    index_bits: int
    index_words: int


@attrs.frozen
class A2Config(MethodConfig):
    mode: Mode = attrs.field(
        default="tiers",
        validator=attrs.validators.in_(("tiers", "greedy")),
        metadata={"help": "tiers: top frac at hi bits, the rest at bits; greedy: multi-width at avg bits"},
    )
    bits: int = attrs.field(
        default=2,
        validator=attrs.validators.in_(SUPPORTED_BITS),
        metadata={"help": "low tier (tiers) or narrowest allowed width (greedy)"},
    )
    hi: int = attrs.field(
        default=4,
        validator=attrs.validators.in_(SUPPORTED_BITS),
        metadata={"help": "high tier (tiers) or widest allowed width (greedy)"},
    )
    frac: float = attrs.field(
        default=0.1, validator=_fraction, metadata={"help": "tiers: fraction of tokens at hi bits"}
    )
    avg: float = attrs.field(
        default=0.0,
        metadata={"help": "greedy (required): average code bits per element, width index included"},
    )
    group: int = attrs.field(
        default=32, validator=_positive, metadata={"help": "channels sharing one scale and minimum"}
    )
    chunk: int = attrs.field(
        default=32, validator=_positive, metadata={"help": "tokens per allocation row and encode unit"}
    )
    weight: Weight = attrs.field(
        default="sq",
        validator=attrs.validators.in_(("sq", "abs", "none")),
        metadata={"help": "token weight: sq = sum p^2 (A²), abs = sum p (H2O-style), none = 1"},
    )
    scope: Scope = attrs.field(
        default="head",
        validator=attrs.validators.in_(("head", "layer")),
        metadata={"help": "allocate within each KV head, or across the KV heads of a layer"},
    )

    def __attrs_post_init__(self) -> None:
        if self.hi < self.bits:
            raise ValueError(f"hi={self.hi} is narrower than bits={self.bits}")
        default = {f.name: f.default for f in attrs.fields(A2Config)}
        if self.mode == "tiers" and self.avg != default["avg"]:
            raise ValueError("avg applies to mode=greedy; tiers take bits, hi and frac")
        if self.mode == "tiers":
            # whole tokens per chunk at hi bits: refuse a frac that rounding would miss by > 0.05 bits
            miss = abs(round(self.frac * self.chunk) - self.frac * self.chunk) * (self.hi - self.bits)
            if miss / self.chunk > 0.05:
                raise ValueError(
                    f"frac={self.frac} is {self.frac * self.chunk:g} of {self.chunk} tokens per chunk; "
                    f"rounding to whole tokens would miss its bits by {miss / self.chunk:.3f}. Use a "
                    f"multiple of 1/{self.chunk} or a larger chunk"
                )
        if self.mode == "greedy":
            if self.avg == default["avg"]:
                raise ValueError("mode=greedy needs avg, the average bits per element (e.g. avg=2.5)")
            if self.frac != default["frac"]:
                raise ValueError("frac applies to mode=tiers; greedy takes avg, bits and hi")
            if not self.bits <= self.avg <= self.hi:
                raise ValueError(f"avg={self.avg} must lie between bits={self.bits} and hi={self.hi}")

    @property
    def widths(self) -> tuple[int, ...]:
        """The widths in use, narrowest first; one width means uniform per-token KIVI."""
        if self.mode == "greedy":
            return tuple(b for b in SUPPORTED_BITS if self.bits <= b <= self.hi)
        if self.hi == self.bits or self.frac == 0.0:
            return (self.bits,)
        return (self.bits, self.hi)

    def plan(self, head_dim: int, kv_heads: int) -> RowPlan:
        """The storage plan for values of ``head_dim`` channels and ``kv_heads`` KV heads."""
        widths = self.widths
        heads_per_row = kv_heads if self.scope == "layer" else 1
        tokens = self.chunk * heads_per_row
        index_bits = 0 if len(widths) == 1 else next(b for b in SUPPORTED_BITS if 1 << b >= len(widths))
        index_words = math.ceil(self.chunk * index_bits / 32)
        words = token_words(head_dim, widths)
        lo, top = words[0], words[-1]
        if self.mode == "tiers":
            hi_count = round(self.frac * tokens) if len(widths) > 1 else 0
            row_words = (tokens - hi_count) * lo + hi_count * top
        else:
            hi_count = 0
            index_per_element = 32 * index_words / (self.chunk * head_dim)
            row_words = math.floor((self.avg - index_per_element) * tokens * head_dim / 32 + 1e-9)
            if row_words < tokens * lo:
                raise ValueError(
                    f"avg={self.avg} leaves {row_words} code words per row of {tokens} tokens, fewer than "
                    f"the {tokens * lo} that {widths[0]}-bit codes need once the width index "
                    f"({index_per_element:.3f} bits per element) is paid; raise avg or chunk"
                )
            row_words = min(row_words, tokens * top)
        return RowPlan(widths, tokens, row_words, hi_count, index_bits, index_words)

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        """Bits per element by part, for one KV head per row (``scope=layer`` rounds alike)."""
        plan = self.plan(head_dim, 1)
        group = min(self.group, head_dim)
        out = {
            "payload": 32.0 * plan.row_words / (plan.tokens * head_dim),
            "scales": 32.0 / group,
        }
        if plan.index_words:
            out["other"] = 32.0 * plan.index_words / (self.chunk * head_dim)
        return out
