"""The mixed-width value block: per-token affine codes, each token at its own bit width.

Tokens are stored in allocation rows: ``chunk`` consecutive tokens of one KV head
(``scope=head``, ``rows = kv_heads``) or of every KV head of the layer (``scope=layer``,
``rows = 1``, tokens ordered head by head). A token's code at width ``w`` is stored as its top
``widths[0]`` bits, its base, and for every rung ``r`` of :func:`~headq_a2.config.rungs` up to
``w`` the next ``r / 2`` bits. A row holds, in order:

- the base of every token, ``words_per_token(d, widths[0])`` int32 words each (channels along the
  word, as in per-token KIVI), so a token's base sits at a fixed place;
- the rungs of the tokens above ``widths[0]``, token after token in row order, each token's
  rungs lowest first (``words_per_token(d, r / 2)`` words each);
- zeros up to a fixed ``row_words``.

Every row of every block has the same size, so blocks merge by concatenation and a batch row moves
as one piece. The base plane is uniform: a decode kernel reads it as per-token KIVI codes (with a
wider token's scale multiplied by ``2^(w - widths[0])``), and adds the rungs of the few wider
tokens as a correction. A token's rung words start after those of the wider tokens before it in
its row, which the packed per-token width index gives; with one width in use there is no index
and the codes are per-token KIVI's, word for word.
"""

from __future__ import annotations

import attrs
import torch

from headq_a2.config import rungs, words_per_token
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


def rung_offsets(widths: torch.Tensor, block_widths: tuple[int, ...], head_dim: int) -> torch.Tensor:
    """Word offset of each token's first rung inside its row, after the bases of the row's tokens:
    (rows, n) bit widths -> (rows, n) int64 (``block_widths``: the widths in use, narrowest first)."""
    words = torch.zeros_like(widths)
    for rung in rungs(block_widths):
        words += (widths >= rung) * words_per_token(head_dim, rung // 2)
    base = widths.shape[-1] * words_per_token(head_dim, block_widths[0])
    return base + words.cumsum(dim=-1) - words


def split_code(code: torch.Tensor, width: torch.Tensor, lo: int, rung: int | None = None) -> torch.Tensor:
    """The base (``rung`` None: the top ``lo`` bits) or the bits that ``rung`` adds (``rung / 2``
    bits below the rung's top) of uint8 codes ``code`` at per-token ``width`` (int64, broadcast);
    uint8, whatever a token narrower than ``rung`` gets."""
    shift = (width - (lo if rung is None else rung)).clamp_min(0).to(torch.uint8)
    return code >> shift if rung is None else (code >> shift) & ((1 << (rung // 2)) - 1)


@attrs.define(kw_only=True)
class MixedAffineBlock(EncodedBlock):
    """Per-token mixed-width affine values (the :class:`~headq_core.layouts.MixedAffine` layout).

    codes:       (b, rows, T/chunk * row_words) int32, one run of ``row_words`` per chunk and row:
                 the row's bases, then its wider tokens' rungs (the module docstring)
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
        """Every token's codes at its own width, (b, kv_heads, T, d) uint8: its base, then its rungs."""
        b, h, _, n_groups = self.scale.shape
        d, rows, lo = n_groups * self.group, self.codes.shape[1], self.widths[0]
        widths = to_rows(self.token_widths(), rows, self.chunk)  # (R, n)
        shape = widths.shape
        first = torch.arange(shape[0], device=widths.device).unsqueeze(-1) * self.row_words  # (R, 1)
        stream = self.codes.reshape(-1)
        span = torch.arange(words_per_token(d, lo), device=stream.device)
        bases = first + torch.arange(shape[1], device=stream.device) * span.numel()  # (R, n)
        code = unpack_codes(stream[bases.unsqueeze(-1) + span], lo, d)  # (R, n, d) uint8
        at = first + rung_offsets(widths, self.widths, d)
        for rung in rungs(self.widths):
            # the tokens this wide: one run of words each, at the same place in every token's rungs
            span = torch.arange(words_per_token(d, rung // 2), device=stream.device)
            chosen = (widths >= rung).unsqueeze(-1)
            words = stream[torch.where(chosen, at.unsqueeze(-1) + span, 0)]
            bits = unpack_codes(words, rung // 2, d)
            code = torch.where(chosen, (code << (rung // 2)) | bits, code)
            at = at + span.numel()
        return from_rows(code.reshape(*shape, d), b, h, rows, self.chunk)

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
