"""The mixed-width value block: per-token affine codes, each token at its own bit width.

Tokens are stored in allocation rows: ``chunk`` consecutive tokens of one KV head
(``scope=head``, ``rows = kv_heads``) or of every KV head of the layer (``scope=layer``,
``rows = 1``, tokens ordered head by head). A row holds its tokens' codes packed at their own
widths, one after the other in token order (``words_per_token(d, b)`` int32 words each, channels
along the word as in per-token KIVI), then zeros up to a fixed ``row_words``. Every row of every
block has the same size, so blocks merge by concatenation and a batch row moves as one piece.

A token's word offset inside its row is the running sum of the widths before it, which the
packed per-token width index gives; with one width in use there is no index and the codes are
per-token KIVI's, word for word.
"""

from __future__ import annotations

import attrs
import torch

from headq_a2.config import words_per_token
from headq_core.layouts import KERNEL_BITS, EncodedBlock, MixedAffine, NoKernelLayout, stored
from headq_kernels import decode_plan, unpack_codes


def to_rows(x: torch.Tensor, rows: int, chunk: int) -> torch.Tensor:
    """(b, h, T, *rest) -> (b * rows * T/chunk, h/rows * chunk, *rest): allocation rows."""
    b, h, t, *rest = x.shape
    x = x.reshape(b, rows, h // rows, t // chunk, chunk, *rest).transpose(2, 3)
    return x.reshape(b * rows * (t // chunk), (h // rows) * chunk, *rest)


def from_rows(x: torch.Tensor, batch: int, heads: int, rows: int, chunk: int) -> torch.Tensor:
    """Inverse of :func:`to_rows`: (b * rows * T/chunk, h/rows * chunk, *rest) -> (b, h, T, *rest)."""
    n_chunks = x.shape[0] // (batch * rows)
    rest = x.shape[2:]
    x = x.reshape(batch, rows, n_chunks, heads // rows, chunk, *rest).transpose(2, 3)
    return x.reshape(batch, heads, n_chunks * chunk, *rest)


def row_offsets(widths: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Word offset of each token inside its row: (rows, n) bit widths -> (rows, n) int64."""
    words = torch.div(widths * head_dim + 31, 32, rounding_mode="floor")
    return words.cumsum(dim=-1) - words


@attrs.define(kw_only=True)
class MixedAffineBlock(EncodedBlock):
    """Per-token mixed-width affine values (the :class:`~headq_core.layouts.MixedAffine` layout).

    codes:       (b, rows, T/chunk * row_words) int32, one run of ``row_words`` per chunk and row
    width_index: (b, kv_heads, T/chunk * ceil(chunk * index_bits / 32)) int32: each token's index
                 into ``widths``, packed along tokens chunk by chunk; None with one width
    scale, zero: (b, kv_heads, T, d / group) float16, for the token's own width
    """

    codes: torch.Tensor = stored("payload")
    width_index: torch.Tensor | None = stored("other")
    scale: torch.Tensor = stored("scales")
    zero: torch.Tensor = stored("scales")
    widths: tuple[int, ...]
    group: int
    chunk: int
    row_words: int
    index_bits: int

    @property
    def layout(self) -> MixedAffine:
        return MixedAffine(self.widths, self.group)

    def token_widths(self) -> torch.Tensor:
        """Each token's bit width, (b, kv_heads, T) int64."""
        b, h, t, _ = self.scale.shape
        if self.width_index is None:
            return torch.full((b, h, t), self.widths[0], dtype=torch.int64, device=self.scale.device)
        n_chunks = t // self.chunk
        words = self.width_index.reshape(b, h, n_chunks, -1)
        index = unpack_codes(words, self.index_bits, self.chunk).long().reshape(b, h, t)
        return torch.tensor(self.widths, device=index.device)[index]

    def integer_codes(self) -> torch.Tensor:
        """Every token's codes unpacked at its own width, (b, kv_heads, T, d) uint8."""
        b, h, _, n_groups = self.scale.shape
        d, rows = n_groups * self.group, self.codes.shape[1]
        widths = to_rows(self.token_widths(), rows, self.chunk)  # (R, n)
        shape = widths.shape
        starts = row_offsets(widths, d)
        starts += torch.arange(shape[0], device=starts.device).unsqueeze(-1) * self.row_words
        stream, starts, widths = self.codes.reshape(-1), starts.reshape(-1), widths.reshape(-1)
        out = torch.empty((widths.shape[0], d), dtype=torch.uint8, device=stream.device)
        for bits in self.widths:
            # this width's tokens only: each is one run of words from its start
            chosen = (widths == bits).nonzero().squeeze(-1)
            span = torch.arange(words_per_token(d, bits), device=stream.device)
            out[chosen] = unpack_codes(stream[starts[chosen].unsqueeze(-1) + span], bits, d)
        return from_rows(out.reshape(*shape, d), b, h, rows, self.chunk)

    def kernel_segment(self, covered: int) -> decode_plan.Segment:
        """One allocation row per KV head, whole 32-bit words per token at every width."""
        kv_heads, d = self.scale.shape[1], self.scale.shape[-1] * self.group
        if self.codes.shape[1] != kv_heads:
            raise NoKernelLayout("A² allocation rows that span every KV head (scope=layer)")
        widths_ok = all(
            w in KERNEL_BITS and 32 // w <= self.group <= 256 and d * w % 32 == 0 for w in self.widths
        )
        if not widths_ok or self.group & (self.group - 1) or len(self.widths) > 4:
            raise NoKernelLayout(f"A² widths {self.widths} in groups of {self.group}")
        if self.chunk & (self.chunk - 1) or self.chunk > 128:
            raise NoKernelLayout(f"A² rows of {self.chunk} tokens: the kernel reads a power of two up to 128")
        return decode_plan.MixedChannels(
            self.codes, self.width_index, self.scale, self.zero, self.tokens, self.widths, self.group,
            self.chunk, self.row_words, self.index_bits, self.dequantize, covered=covered,
        )  # fmt: skip

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(b, kv_heads, T, d) in ``dtype``: ``code * scale + zero`` per group, as in KIVI."""
        codes = self.integer_codes().float()
        grouped = codes.reshape(*codes.shape[:-1], -1, self.group)
        out = grouped * self.scale.float().unsqueeze(-1) + self.zero.float().unsqueeze(-1)
        return out.reshape(codes.shape).to(dtype)
