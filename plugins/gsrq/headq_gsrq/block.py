"""The residual-VQ block: bit-packed per-token codeword indices, decoded through shared codebooks.

A head vector of ``d`` channels is ``P = d / dim`` sub-vectors; sub-vector ``p`` is the sum of one
codeword from each stage's codebook ``C_m[p]`` (``K_m`` codewords of ``dim`` channels). A token
stores, per KV head, its ``P x M`` indices bit-packed in position-major, stage-minor order, least
significant bit first, into ``ceil(P * sum_m log2 K_m / 8)`` bytes. With a channel scale ``s``
(per KV head, from the Fisher statistic) the codewords approximate ``s * x`` and decode divides by
``s``. The codebooks and scales are the method's per-layer state (counted once per layer by
``state_nbytes``); blocks only refer to them.
"""

from __future__ import annotations

import attrs
import torch

from headq_core.layouts import Codebook, EncodedBlock, NoKernelLayout, stored
from headq_gsrq.rotary import rotate
from headq_kernels import decode_plan


@attrs.define(eq=False)
class LayerCodebooks:
    """Codebooks of one layer and kind: ``stages[m]`` is (P, K_m, dim) float16, shared by all blocks;
    ``scale`` (kv_heads, head_dim) float16 or None: the channel scale codewords live in.

    Compared by identity, so blocks of one layer merge and blocks of different layers do not.
    """

    stages: tuple[torch.Tensor, ...]
    scale: torch.Tensor | None = None
    inv_freq: torch.Tensor | None = None  # (head_dim / 2,) float32 with rope=pre: codewords are pre-RoPE

    @property
    def positions(self) -> int:
        return int(self.stages[0].shape[0])

    @property
    def dim(self) -> int:
        return int(self.stages[0].shape[-1])

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(c.shape[1]).bit_length() - 1 for c in self.stages)

    @property
    def nbytes(self) -> int:
        held = [*self.stages, *(t for t in (self.scale, self.inv_freq) if t is not None)]
        return sum(t.numel() * t.element_size() for t in held)

    def place(self, device: torch.device) -> None:
        """Keep the codebooks on ``device`` (where the tokens are encoded, and a kernel reads them)."""
        if self.stages[0].device != device:
            self.stages = tuple(c.to(device) for c in self.stages)
            self.scale = None if self.scale is None else self.scale.to(device)
            self.inv_freq = None if self.inv_freq is None else self.inv_freq.to(device)

    def on(self, device: torch.device) -> list[torch.Tensor]:
        """The codebooks as float32 on ``device``: [(P, K_m, dim)]."""
        return [c.to(device=device, dtype=torch.float32) for c in self.stages]

    def channel_scale(self, device: torch.device) -> torch.Tensor | None:
        """(kv_heads, 1, head_dim) float32 on ``device``, to broadcast over (b, h, tokens, d); or None."""
        return None if self.scale is None else self.scale.to(device=device, dtype=torch.float32)[:, None]


def pack_indices(codes: torch.Tensor, widths: tuple[int, ...]) -> torch.Tensor:
    """codes (..., P, M) int64, stage m below 2**widths[m] -> (..., ceil(P * sum(widths) / 8)) uint8."""
    if all(w == 8 for w in widths):
        return codes.to(torch.uint8).flatten(-2)
    bits = [(codes[..., m : m + 1] >> torch.arange(w, device=codes.device)) & 1 for m, w in enumerate(widths)]
    stream = torch.cat(bits, dim=-1).flatten(-2)  # (..., P * sum(widths)) in p-major, m-minor order
    pad = -stream.shape[-1] % 8
    stream = torch.nn.functional.pad(stream, (0, pad)).unflatten(-1, (-1, 8))
    return (stream << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, positions: int, widths: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: (..., bytes) uint8 -> (..., P, M) int64."""
    if all(w == 8 for w in widths):
        return packed.long().unflatten(-1, (positions, len(widths)))
    shifts = torch.arange(8, device=packed.device)
    stream = ((packed.long().unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : positions * sum(widths)]
    per_position = stream.unflatten(-1, (positions, sum(widths)))
    codes, start = [], 0
    for w in widths:
        part = per_position[..., start : start + w]
        codes.append((part << torch.arange(w, device=packed.device)).sum(-1))
        start += w
    return torch.stack(codes, dim=-1)


@attrs.define(kw_only=True)
class CodebookBlock(EncodedBlock):
    """Residual-VQ tokens (the :class:`~headq_core.layouts.Codebook` layout).

    indices: (b, kv_heads, tokens, ceil(P * sum(widths) / 8)) uint8, see :func:`pack_indices`;
    books: the layer's codebooks (method state, not counted here).
    """

    indices: torch.Tensor = stored("payload")
    books: LayerCodebooks

    @property
    def layout(self) -> Codebook:
        return Codebook(self.books.dim, tuple(int(c.shape[1]) for c in self.books.stages))

    def kernel_segment(self, covered: int) -> decode_plan.Segment:
        """One or two stages of at most 256 float16 codewords, sub-vectors of a power of two."""
        books, widths, dim = self.books, self.books.widths, self.books.dim
        if len(widths) > 2 or max(widths) > 8 or any(c.dtype != torch.float16 for c in books.stages):
            raise NoKernelLayout(
                f"codebooks of widths {widths}: the kernel reads 1 or 2 float16 stages of 8 bits or fewer"
            )
        if dim & (dim - 1):
            raise NoKernelLayout(f"codebook sub-vectors of {dim} channels: the kernel reads powers of two")
        if books.scale is not None and books.scale.device != books.stages[0].device:
            raise NoKernelLayout("a channel scale on another device than its codebooks")
        return decode_plan.Codebook(
            self.indices, tuple(books.stages), books.scale, self.tokens, self.dequantize, covered=covered
        )

    def codes(self) -> torch.Tensor:
        """Codeword indices (b, kv_heads, tokens, P, M) int64."""
        return unpack_indices(self.indices, self.books.positions, self.books.widths)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes()
        out = decode(codes, self.books.on(codes.device)).flatten(-2)
        scale = self.books.channel_scale(codes.device)
        return (out if scale is None else out / scale).to(dtype)


@attrs.define(kw_only=True)
class RotatedCodebookBlock(CodebookBlock):
    """Codewords of keys rotated back to before the rotary embedding (``rope=pre``), with where each
    token sits: ``positions`` (b, 1, tokens) int32, the layer's token index the rotation is undone
    and redone with. The rotation differs per token, so the lookup tables and the fused kernel do
    not apply: these blocks are read dequantized, on the reference path."""

    positions: torch.Tensor = stored("side")

    def kernel_segment(self, covered: int) -> decode_plan.Segment:
        raise NoKernelLayout("pre-RoPE codebook keys: the kernel applies no rotary embedding")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        assert self.books.inv_freq is not None
        return rotate(super().dequantize(), self.positions, self.books.inv_freq).to(dtype)


def decode(codes: torch.Tensor, books: list[torch.Tensor]) -> torch.Tensor:
    """Sum of each stage's codewords: codes (..., P, M), books [(P, K_m, dim)] -> (..., P, dim)."""
    positions = torch.arange(codes.shape[-2], device=codes.device)
    out = torch.zeros((*codes.shape[:-1], books[0].shape[-1]), device=codes.device)
    for m, book in enumerate(books):
        out = out + book[positions, codes[..., m]]
    return out
