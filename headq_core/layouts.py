"""Encoded records and the layout descriptors kernels dispatch on.

An encoded block holds what a method stores for a run of tokens of one layer. Its tensors are
attrs fields declared with :func:`stored`, which says whether a tensor has the batch as its first
axis (so beam search can reorder it) and which part of the storage it is (for the bits report).
Everything a block holds is counted by :func:`block_nbytes`; a float tensor that merely holds
rounded values would show up there at full width, which is the point.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, TypeVar

import attrs
import torch

from headq_kernels import decode_plan, dequantize_affine, dequantize_along_tokens

KERNEL_BITS = (1, 2, 4, 8)

Part = Literal["payload", "scales", "side", "exact", "other"]
PARTS: tuple[Part, ...] = ("payload", "scales", "side", "exact", "other")

_META = "headq.stored"


def stored(part: Part, *, batched: bool = True) -> Any:
    """An attrs field holding a tensor the cache must account for.

    part: which line of the bits report it belongs to. batched: the tensor's first axis is the
    batch (reordered by beam search); shared tensors (codebooks) are left as they are.
    """
    return attrs.field(metadata={_META: (part, batched)})


# --- layout descriptors -------------------------------------------------------------------


@attrs.frozen
class Dense:
    """Unquantized tensor in its own dtype (the exact method)."""

    dtype: str


@attrs.frozen
class AffinePacked:
    """Integer codes packed along the grouped axis with a float16 scale and zero per group.

    axis="tokens": groups run along tokens (per-channel keys); codes packed along tokens, stored
    as bytes with the channels adjacent (``headq_kernels.bytes_along_tokens``).
    axis="channels": groups run along channels (per-token values); codes packed along channels
    in int32 words.
    """

    bits: int
    group: int
    axis: Literal["tokens", "channels"]


@attrs.frozen
class MixedAffine:
    """Per-token bit widths: each token's channel-grouped affine codes at its own width.

    An allocation row (a chunk of tokens) holds every token's top ``widths[0]`` bits at a fixed
    place, then the lower bits of the wider tokens in token order, a running sum over a packed
    per-token width index giving where each starts; float16 scale and zero per token and group,
    as in ``AffinePacked`` along channels.
    """

    widths: tuple[int, ...]
    group: int


@attrs.frozen
class Codebook:
    """Residual vector quantization: one index per stage and sub-vector of ``dim`` channels."""

    dim: int
    sizes: tuple[int, ...]


@attrs.frozen
class LowRankLogit:
    """A low-rank side code attached to keys: logits gain ``(U^T q) . z_hat_j``."""

    rank: int
    bits: int


@attrs.frozen
class Opaque:
    """A third-party record the kernels do not know: it runs on the reference path."""

    name: str


# --- encoded blocks -----------------------------------------------------------------------

B = TypeVar("B", bound="EncodedBlock")


@attrs.define(kw_only=True)
class EncodedBlock:
    """Base of every encoded block: ``tokens`` consecutive tokens of one layer.

    Subclasses declare their tensors with :func:`stored` and implement :meth:`dequantize`,
    returning ``(batch, kv_heads, tokens, head_dim)``.
    """

    tokens: int

    @property
    def layout(self) -> object:
        return Opaque(type(self).__name__)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement dequantize()")

    def token_axis(self, name: str) -> int:
        """Axis of the stored tensor ``name`` that runs over tokens (for merging blocks)."""
        return 2

    def kernel_segment(self, covered: int) -> decode_plan.Segment:
        """This block as the fused decode kernel reads it, attending its first ``covered`` tokens.

        The block's tensors are the cache's buffers here (``tokens`` is their capacity), so the
        segment points at them where they are. A block the kernel cannot read raises
        :class:`NoKernelLayout` saying why; its tokens are then attended on the reference path.
        """
        raise NoKernelLayout(f"{type(self).__name__} describes no kernel layout (kernel_segment)")


class NoKernelLayout(Exception):
    """A block the fused decode kernel cannot read; the message says why."""


def iter_stored(block: EncodedBlock) -> Iterator[tuple[str, torch.Tensor, Part, bool]]:
    """(name, tensor, part, batched) for every stored tensor of ``block``, nested blocks included."""
    for field in attrs.fields(type(block)):
        value = getattr(block, field.name)
        if isinstance(value, EncodedBlock):
            for name, tensor, part, batched in iter_stored(value):
                yield f"{field.name}.{name}", tensor, part, batched
        elif _META in field.metadata and value is not None:
            part, batched = field.metadata[_META]
            yield field.name, value, part, batched


def block_nbytes(block: EncodedBlock) -> dict[Part, int]:
    """Bytes held by ``block``, split by part."""
    out: dict[Part, int] = dict.fromkeys(PARTS, 0)
    for _, tensor, part, _ in iter_stored(block):
        out[part] += tensor.numel() * tensor.element_size()
    return out


def map_batched(block: B, fn: Any) -> B:
    """A copy of ``block`` with ``fn`` applied to every batched tensor (reorder, select, repeat)."""
    changes: dict[str, Any] = {}
    for field in attrs.fields(type(block)):
        value = getattr(block, field.name)
        if isinstance(value, EncodedBlock):
            changes[field.name] = map_batched(value, fn)
        elif _META in field.metadata and value is not None and field.metadata[_META][1]:
            changes[field.name] = fn(value)
    return attrs.evolve(block, **changes)


def concat_blocks(blocks: list[B]) -> B | None:
    """Blocks of one type and settings merged along tokens, or None where they cannot merge."""
    first = blocks[0]
    if any(type(b) is not type(first) for b in blocks):
        return None
    changes: dict[str, Any] = {"tokens": sum(b.tokens for b in blocks)}
    for field in attrs.fields(type(first)):
        values = [getattr(b, field.name) for b in blocks]
        if field.name == "tokens":
            continue
        if isinstance(values[0], EncodedBlock):
            merged = concat_blocks(values)
            if merged is None:
                return None
            changes[field.name] = merged
        elif _META in field.metadata and values[0] is not None:
            if field.metadata[_META][1]:
                changes[field.name] = torch.cat(values, dim=first.token_axis(field.name))
            elif any(v is not values[0] for v in values):
                return None
        elif any(v != values[0] for v in values):
            return None
    return attrs.evolve(first, **changes)


@attrs.define(kw_only=True)
class DenseBlock(EncodedBlock):
    """Tokens kept as they are. data: (batch, kv_heads, tokens, head_dim)."""

    data: torch.Tensor = stored("payload")

    @property
    def layout(self) -> Dense:
        return Dense(str(self.data.dtype).removeprefix("torch."))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.data.to(dtype)

    def kernel_segment(self, covered: int) -> decode_plan.Segment:
        return decode_plan.Dense(self.data, covered=covered)


@attrs.define(kw_only=True)
class AffineBlock(EncodedBlock):
    """Affine-quantized tokens in the :class:`AffinePacked` layout.

    axis="tokens":   codes (b, h, tokens*bits/8, d) uint8, scale/zero (b, h, d, tokens/group)
    axis="channels": codes (b, h, tokens, d*bits/32) int32, scale/zero (b, h, tokens, d/group)
    """

    codes: torch.Tensor = stored("payload")
    scale: torch.Tensor = stored("scales")
    zero: torch.Tensor = stored("scales")
    bits: int
    group: int
    axis: Literal["tokens", "channels"]

    def __attrs_post_init__(self) -> None:
        packed = torch.uint8 if self.axis == "tokens" else torch.int32
        if self.codes.dtype != packed:
            how = "bytes_along_tokens(words)" if self.axis == "tokens" else "pack_codes(codes, bits)"
            raise TypeError(
                f"AffineBlock(axis={self.axis!r}) holds {packed} codes (headq_kernels.{how}), "
                f"got {self.codes.dtype}"
            )

    @property
    def layout(self) -> AffinePacked:
        return AffinePacked(self.bits, self.group, self.axis)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        dequantize = dequantize_affine if self.axis == "channels" else dequantize_along_tokens
        return dequantize(self.codes, self.scale, self.zero, self.bits, self.group, dtype)

    def token_axis(self, name: str) -> int:
        return 3 if self.axis == "tokens" and name != "codes" else 2

    def kernel_segment(self, covered: int) -> decode_plan.Segment:
        if (
            self.bits not in KERNEL_BITS
            or self.group & (self.group - 1)
            or not 32 // self.bits <= self.group <= 256
        ):
            raise NoKernelLayout(
                f"affine codes of {self.bits} bits in groups of {self.group}: the kernel reads 1, 2, 4 or 8 "
                "bits in groups of a power of two that fill whole words, up to 256"
            )
        segment = decode_plan.AffineTokens if self.axis == "tokens" else decode_plan.AffineChannels
        return segment(
            self.codes, self.scale, self.zero, self.tokens, bits=self.bits, group=self.group, covered=covered
        )
